"""The browser driver (tests/integration/chromium.py) and the HMR dev server, on loopback only.

The base the tunnel browser tests stand on: a real headless Chromium loads the dev server's
page, its WebSocket opens with the ``vite-hmr`` subprotocol, and a change to the watched
file shows up in the DOM. Also: the dev server refuses a socket without its subprotocol or
query, the driver reports a failed navigation and a page exception with what the browser
saw, always ends the browser and deletes its profile, and a missing browser fails with the
fix (no skip).
"""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from cli.nats_server import free_port
from tests.integration.chromium import BrowserError, Chromium, find_chromium
from tests.integration.hmr_devserver import DevServer

PAGE_TIMEOUT = 15.0


async def test_page_socket_opens_and_a_file_change_reaches_the_dom(tmp_path: Path) -> None:
    watched = tmp_path / "App.vue"
    watched.write_text("v1")
    async with DevServer(watched) as dev, Chromium.launch() as page:
        await page.navigate(dev.url + "/")
        await page.wait_for_text("out", "connected:v1", PAGE_TIMEOUT)
        assert await page.text("state") == "open:vite-hmr"
        assert [(h.path_qs, h.protocols, h.accepted) for h in dev.handshakes] == [
            ("/__hmr?client=1", "vite-hmr", True)
        ]

        watched.write_text("v2 <b>not html</b>")
        await page.wait_for_text("out", "update:v2 <b>not html</b>", PAGE_TIMEOUT)
        await page.evaluate("window.hmrSocket.send('ping')")
        await page.wait_for_text("out", "pong", PAGE_TIMEOUT)
        messages = await page.evaluate("window.hmrMessages")
        assert messages == ["connected:v1", "update:v2 <b>not html</b>", "pong"]
    browser = page.browser
    assert browser.proc.returncode is not None
    assert not browser.profile.exists()


@pytest.mark.parametrize(
    ("path", "protocols"),
    [("/__hmr?client=1", ()), ("/__hmr?client=1", ("other",)), ("/__hmr", ("vite-hmr",))],
)
async def test_dev_server_refuses_socket_without_subprotocol_or_query(
    tmp_path: Path, path: str, protocols: tuple[str, ...]
) -> None:
    async with DevServer(tmp_path / "watched") as dev, aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
            await session.ws_connect(dev.url + path, protocols=protocols)
        assert caught.value.status == 400
        assert [h.accepted for h in dev.handshakes] == [False]
        # The accepted handshake, for contrast: the same server takes the right one.
        async with session.ws_connect(dev.url + "/__hmr?client=1", protocols=("vite-hmr",)) as ws:
            assert ws.protocol == "vite-hmr"
            assert await ws.receive_str() == "connected:"


async def test_driver_reports_failed_navigation_and_page_exceptions() -> None:
    refused = f"http://127.0.0.1:{free_port()}/"
    async with Chromium.launch() as page:
        with pytest.raises(BrowserError, match="ERR_CONNECTION_REFUSED"):
            await page.navigate(refused)
        with pytest.raises(BrowserError, match="boom"):
            await page.evaluate("(() => { throw new Error('boom') })()")
        assert await page.evaluate("Promise.resolve(6 * 7)") == 42
    assert page.browser.proc.returncode is not None
    assert not page.browser.profile.exists()


async def test_missing_browser_fails_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CHROMIUM", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(BrowserError, match="apt-get install -y chromium"):
        find_chromium()
    with pytest.raises(BrowserError, match="apt-get install -y chromium"):
        async with Chromium.launch():
            pass
    monkeypatch.setenv("CHROMIUM", "/nonexistent/chromium")
    with pytest.raises(BrowserError, match=r"CHROMIUM=/nonexistent/chromium.*apt-get install -y chromium"):
        find_chromium()
