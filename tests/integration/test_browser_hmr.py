"""A real browser's dev-server HMR socket through the link (issue #17).

A headless Chromium (tests/integration/chromium.py) loads the Vite-like dev server's page
(tests/integration/hmr_devserver.py) through the link; the page opens its WebSocket
(``/__hmr?client=1``, subprotocol ``vite-hmr``) back through the same path. The test then
changes the watched file on disk and waits until the page's DOM shows the new content:
the dev server's push crossed the tunnel to the browser. A ``ping`` from the page is
answered ``pong`` (the browser-to-server direction).

Path tested: browser -> ``linkctl forward``'s listener (:class:`cli.local_proxy.Forwarder`,
in-process) -> tunnel -> the desktop's linkd upstream proxy (:class:`linkd.upstream.UpstreamProxy`
behind :class:`linkd.routes.LinkRoutes`, as ``linkd up --upstream`` serves it) -> dev server.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

import tunnel
from cli.local_proxy import Forwarder
from cli.nats_server import NatsServer
from linkd.routes import LinkRoutes
from linkd.run_events import MemoryEventSink
from linkd.runs import RunManager
from linkd.upstream import UpstreamProxy
from tests.integration.chromium import Chromium, Page
from tests.integration.hmr_devserver import DevServer
from tests.integration.tunnel_harness import connect_peers, serving

HOST = "desk-hmr"
PAGE_TIMEOUT = 15.0


@asynccontextmanager
async def desktop(server: NatsServer, dev: DevServer) -> AsyncIterator[str]:
    """The desktop serving ``dev`` as its upstream, and a forward listener to it; yields its URL."""
    proxy = UpstreamProxy(dev.url + "/")
    routes = LinkRoutes(RunManager({}, MemoryEventSink()), upstream=proxy)
    try:
        async with connect_peers(server) as peers, serving(peers.server_nc, HOST, routes):
            client = tunnel.TunnelClient(peers.caller_nc)
            forwarder = Forwarder(client, HOST)
            listener = await forwarder.start("127.0.0.1", 0)
            try:
                yield f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}"
            finally:
                await forwarder.close()
                await client.aclose()
            assert peers.errors == []
    finally:
        await proxy.aclose()


async def hot_reload(page: Page, url: str, watched: Path, dev: DevServer) -> None:
    """Open the page at ``url``, see its socket open, change the file, see the DOM follow."""
    await page.navigate(url)
    await page.wait_for_text("out", "connected:v1", PAGE_TIMEOUT)
    assert await page.text("state") == "open:vite-hmr"
    # Path, query and subprotocol arrived intact at the dev server (it refuses anything else).
    assert [(h.path_qs, h.protocols, h.accepted) for h in dev.handshakes] == [
        ("/__hmr?client=1", "vite-hmr", True)
    ]

    await asyncio.to_thread(watched.write_text, "v2: the edited component")
    await page.wait_for_text("out", "update:v2: the edited component", PAGE_TIMEOUT)
    await asyncio.to_thread(watched.write_text, "v3")
    await page.wait_for_text("out", "update:v3", PAGE_TIMEOUT)

    await page.evaluate("window.hmrSocket.send('ping')")
    await page.wait_for_text("out", "pong", PAGE_TIMEOUT)
    assert await page.evaluate("window.hmrMessages") == [
        "connected:v1",
        "update:v2: the edited component",
        "update:v3",
        "pong",
    ]
    assert await page.text("state") == "open:vite-hmr"


@pytest.fixture
def watched(tmp_path: Path) -> Path:
    path = tmp_path / "App.vue"
    path.write_text("v1")
    return path


async def test_hmr_through_linkctl_forward(nats_server: NatsServer, watched: Path) -> None:
    async with DevServer(watched) as dev, desktop(nats_server, dev) as url, Chromium.launch() as page:
        await hot_reload(page, url + "/", watched, dev)
