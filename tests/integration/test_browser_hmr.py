"""A real browser's dev-server HMR socket through the link (issue #17).

A headless Chromium (tests/integration/chromium.py) loads the Vite-like dev server's page
(tests/integration/hmr_devserver.py) through the link; the page opens its WebSocket
(``/__hmr?client=1``, subprotocol ``vite-hmr``) back through the same path. The test then
changes the watched file on disk and waits until the page's DOM shows the new content:
the dev server's push crossed the tunnel to the browser. A ``ping`` from the page is
answered ``pong`` (the browser-to-server direction).

Paths tested, both ending at the desktop's linkd upstream proxy (:class:`linkd.upstream.UpstreamProxy`
behind :class:`linkd.routes.LinkRoutes`, as ``linkd up --upstream`` serves it) -> dev server:

- browser -> ``linkctl forward``'s listener (:class:`cli.local_proxy.Forwarder`, in-process)
  -> tunnel;
- browser -> the gateway's preview origin (``<label>.localhost``, signed in by the one-time
  ticket URL of ``POST /api/links/preview``; see docs/preview.md) -> tunnel.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from nats.aio.client import Client

import tunnel
from cli.local_proxy import Forwarder
from cli.nats_server import NatsServer
from linkd.routes import LinkRoutes
from linkd.run_events import MemoryEventSink
from linkd.runs import RunManager
from linkd.upstream import UpstreamProxy
from studio_gateway.hostnames import tunnel_hostname
from tests.integration.chromium import Chromium, Page
from tests.integration.gateway_harness import base_env, connect_daemon, running_gateway
from tests.integration.hmr_devserver import DevServer
from tests.integration.tunnel_harness import connect_peers, serving

HOST = "desk-hmr"
USER = "dev@example.com"
PAGE_TIMEOUT = 15.0


@asynccontextmanager
async def upstream_desktop(
    nc: Client, hostname: str, dev: DevServer, prefix: str = tunnel.DEFAULT_PREFIX
) -> AsyncIterator[None]:
    """A desktop serving ``hostname`` with ``dev`` as its upstream, as ``linkd up --upstream`` does."""
    proxy = UpstreamProxy(dev.url + "/")
    routes = LinkRoutes(RunManager({}, MemoryEventSink()), upstream=proxy)
    try:
        async with serving(nc, hostname, routes, prefix=prefix):
            yield
    finally:
        await proxy.aclose()


@asynccontextmanager
async def forward_listener(nc: Client, hostname: str) -> AsyncIterator[str]:
    """``linkctl forward``'s listener to ``hostname`` on a free loopback port; yields its URL."""
    client = tunnel.TunnelClient(nc)
    forwarder = Forwarder(client, hostname)
    listener = await forwarder.start("127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}"
    finally:
        await forwarder.close()
        await client.aclose()


async def hot_reload(page: Page, url: str, watched: Path, dev: DevServer) -> None:
    """Open the page at ``url``, see its socket open, change the file, see the DOM follow.

    The socket reached the dev server through the browser's host (``location.host``), which
    every proxy on the way passes on as ``X-Forwarded-Host``.
    """
    await page.navigate(url)
    await page.wait_for_text("out", "connected:v1", PAGE_TIMEOUT)
    assert await page.text("state") == "open:vite-hmr"
    # Path, query and subprotocol arrived intact at the dev server (it refuses anything else).
    browser_host = await page.evaluate("location.host")
    assert [(h.path_qs, h.protocols, h.forwarded_host, h.accepted) for h in dev.handshakes] == [
        ("/__hmr?client=1", "vite-hmr", browser_host, True)
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
    async with DevServer(watched) as dev, connect_peers(nats_server) as peers:
        async with (
            upstream_desktop(peers.server_nc, HOST, dev),
            forward_listener(peers.caller_nc, HOST) as url,
            Chromium.launch() as page,
        ):
            await hot_reload(page, url + "/", watched, dev)
        assert peers.errors == []


async def test_hmr_through_the_gateway_preview(nats_server: NatsServer, watched: Path) -> None:
    """The preview origin ``http://<label>.localhost:<port>`` (Chromium resolves ``*.localhost`` to
    loopback): the ticket URL from ``POST /api/links/preview`` sets the cookie, then the page and
    its socket go through the gateway to the user's own desktop."""
    env = base_env(NATS_URL=nats_server.url, GATEWAY_PREVIEW_DOMAIN="localhost")
    async with DevServer(watched) as dev, running_gateway(env) as gw:
        desk = await connect_daemon(nats_server.url)
        try:
            async with upstream_desktop(desk.nc, tunnel_hostname(USER), dev, gw.config.tunnel_prefix):
                resp = await gw.client.post(
                    "/api/links/preview", headers=gw.headers(USER), json={"path": "/"}
                )
                assert resp.status == 200, await resp.text()
                ticket_url = (await resp.json())["url"]
                assert ticket_url.startswith("http://p") and ".localhost:" in ticket_url
                async with Chromium.launch() as page:
                    await hot_reload(page, ticket_url, watched, dev)
                    origin = await page.evaluate("location.origin")
                    assert origin == ticket_url.split("/__natslink/")[0]
                    # The preview cookie is the gateway's alone: the page's script cannot read it.
                    assert await page.evaluate("document.cookie") == ""
            assert desk.errors == []
        finally:
            await desk.nc.close()
