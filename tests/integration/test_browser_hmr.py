"""A real browser's dev-server HMR socket through the link (issue #17).

A headless Chromium (tests/integration/chromium.py) loads the Vite-like dev server's page
(tests/integration/hmr_devserver.py) through the link; the page opens its WebSocket
(``/__hmr?client=1``, subprotocol ``vite-hmr``) back through the same path. The test then
changes the watched file on disk and waits until the page's DOM shows the new content:
the dev server's push crossed the tunnel to the browser. A ``ping`` from the page is
answered ``pong`` (the browser-to-server direction).

The desktop is the real thing: a :class:`linkd.daemon.LinkDaemon` with ``upstream_url`` set
(``linkd up --upstream <dev server>``), signed in to a real gateway on an operator-mode
nats-server. Two ways in:

- browser -> ``linkctl forward``'s listener (:class:`cli.local_proxy.Forwarder`, in-process,
  on a NATS connection allowed to call desktops) -> tunnel -> linkd;
- browser -> the gateway's preview origin ``http://<label>.localhost:<port>`` (Chromium
  resolves ``*.localhost`` to loopback), signed in by the one-time ticket URL of
  ``POST /api/links/preview`` (docs/preview.md) -> tunnel -> linkd.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import nats
import pytest
from nats.aio.client import Client, RawCredentials

import tunnel
from cli.local_proxy import Forwarder
from linkd.daemon import LinkDaemon
from tests.helpers import NatsServerFactory
from tests.integration.chromium import Chromium, Page
from tests.integration.gateway_harness import OperatorServer, start_operator_server
from tests.integration.hmr_devserver import DevServer
from tests.integration.linkd_harness import (
    EVENT_TIMEOUT,
    LiveGateway,
    daemon_settings,
    live_gateway,
    running_daemon,
)

USER = "dev@example.com"
PAGE_TIMEOUT = 15.0

pytestmark = pytest.mark.timeout(90)


@dataclass
class Link:
    """The gateway and the user's desktop (linkd with the dev server as its upstream)."""

    gateway: LiveGateway
    daemon: LinkDaemon
    hostname: str
    dev: DevServer
    op: OperatorServer


@pytest.fixture
def watched(tmp_path: Path) -> Path:
    path = tmp_path / "App.vue"
    path.write_text("v1")
    return path


@pytest.fixture
async def link(nats_server_factory: NatsServerFactory, tmp_path: Path, watched: Path) -> AsyncIterator[Link]:
    op = start_operator_server(nats_server_factory, tmp_path)
    async with (
        DevServer(watched) as dev,
        live_gateway(op.env(GATEWAY_PREVIEW_DOMAIN="localhost")) as gw,
        running_daemon(
            tmp_path, gw.url, gw.token(USER), settings=daemon_settings(tmp_path, upstream_url=dev.url)
        ) as desk,
    ):
        yield Link(gw, desk.daemon, desk.hostname, dev, op)


@asynccontextmanager
async def forward_listener(link: Link) -> AsyncIterator[str]:
    """``linkctl forward``'s listener to the desktop on a free loopback port; yields its URL."""
    nc: Client = await nats.connect(
        link.op.server.url,
        user_credentials=RawCredentials(link.op.gateway_creds.read_text()),
        connect_timeout=EVENT_TIMEOUT,
    )
    client = tunnel.TunnelClient(nc)
    forwarder = Forwarder(client, link.hostname)
    listener = await forwarder.start("127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}"
    finally:
        await forwarder.close()
        await client.aclose()
        await nc.close()


async def preview_ticket(link: Link) -> str:
    """The one-time ticket URL the app asks the gateway for (the user's own desktop)."""
    headers = {"Authorization": f"Bearer {link.gateway.token(USER)}"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{link.gateway.url}/api/links/preview", headers=headers, json={"path": "/"}) as resp,
    ):
        assert resp.status == 200, await resp.text()
        url: str = (await resp.json())["url"]
    return url


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


async def test_hmr_through_linkctl_forward(link: Link, watched: Path) -> None:
    async with forward_listener(link) as url, Chromium.launch() as page:
        await hot_reload(page, url + "/", watched, link.dev)
        assert await page.evaluate("location.host") == url.removeprefix("http://")


async def test_hmr_through_the_gateway_preview(link: Link, watched: Path) -> None:
    ticket_url = await preview_ticket(link)
    origin = ticket_url.split("/__natslink/", 1)[0]
    assert origin.startswith("http://p") and origin.endswith(f".localhost:{link.gateway.port}"), origin
    async with Chromium.launch() as page:
        await hot_reload(page, ticket_url, watched, link.dev)
        assert await page.evaluate("location.href") == origin + "/"  # the ticket redirected home
        # The preview cookie is the gateway's alone (HttpOnly): the page's script cannot read it.
        assert await page.evaluate("document.cookie") == ""
