"""A tiny Vite-like dev server for browser tests: a page, an HMR WebSocket, a watched file.

``GET /`` serves a page whose script opens
``ws(s)://<location.host>/__hmr?client=1`` with the ``vite-hmr`` subprotocol (as Vite's client
does), so the path, the query and the subprotocol must all survive whatever sits between
the browser and this server. The page shows the socket's state in ``#state`` and the last
message in ``#out`` (all messages in ``window.hmrMessages``, the socket is ``window.hmrSocket``:
``hmrSocket.send('ping')`` is answered ``pong``, the browser-to-server direction).

The server polls the watched file (its own behaviour, as a dev server's watcher: not test
synchronisation) and pushes ``update:<content>`` to every connected socket when the content
changes; a new socket first gets ``connected:<content>``. A socket without the ``vite-hmr``
subprotocol or without ``client=1`` is refused with 400.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from aiohttp import WSMsgType, web

from cli.nats_server import free_port

__all__ = ["HMR_PATH", "INDEX_HTML", "SUBPROTOCOL", "DevServer", "HandshakeSeen"]

SUBPROTOCOL: Final = "vite-hmr"
HMR_PATH: Final = "/__hmr"
POLL_INTERVAL: Final = 0.05

INDEX_HTML: Final = """<!doctype html>
<html>
<head><meta charset="utf-8"><title>hmr test</title><link rel="icon" href="data:,"></head>
<body>
<pre id="state">connecting</pre>
<pre id="out"></pre>
<script>
window.hmrMessages = [];
const scheme = location.protocol === 'https:' ? 'wss://' : 'ws://';
const ws = new WebSocket(scheme + location.host + '/__hmr?client=1', 'vite-hmr');
window.hmrSocket = ws;
ws.onopen = () => { document.getElementById('state').textContent = 'open:' + ws.protocol; };
ws.onmessage = (event) => {
  window.hmrMessages.push(event.data);
  document.getElementById('out').textContent = event.data;
};
ws.onclose = (event) => {
  document.getElementById('state').textContent = 'closed:' + event.code;
};
ws.onerror = () => { console.error('hmr socket error'); };
</script>
</body>
</html>
"""


@dataclass(frozen=True)
class HandshakeSeen:
    """What one WebSocket handshake looked like when it reached the dev server."""

    path_qs: str
    protocols: str
    forwarded_host: str  # X-Forwarded-Host: what the browser used, when a proxy passed it on
    accepted: bool


class DevServer:
    """``async with DevServer(watched_file) as dev:`` serves on ``dev.url`` (loopback, free port)."""

    def __init__(self, watched: Path) -> None:
        self.watched = watched
        self.port = free_port()
        self.sockets: set[web.WebSocketResponse] = set()
        self.handshakes: list[HandshakeSeen] = []
        self.pushed = 0  # updates sent (to all sockets), for failure messages
        app = web.Application()
        app.router.add_get("/", self._index)
        app.router.add_get(HMR_PATH, self._hmr)
        self._runner = web.AppRunner(app, handle_signals=False)
        self._watcher: asyncio.Task[None] | None = None
        self._content = self._read()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> DevServer:
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        self._watcher = asyncio.create_task(self._watch(), name="hmr-watcher")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        for ws in list(self.sockets):
            await ws.close()
        await self._runner.cleanup()

    def _read(self) -> str:
        try:
            return self.watched.read_text(encoding="utf-8")
        except FileNotFoundError:
            return ""

    async def _index(self, request: web.Request) -> web.Response:
        return web.Response(text=INDEX_HTML, content_type="text/html")

    async def _hmr(self, request: web.Request) -> web.StreamResponse:
        offered_header = request.headers.get("Sec-WebSocket-Protocol", "")
        offered = [p.strip() for p in offered_header.split(",")]
        accepted = SUBPROTOCOL in offered and request.query.get("client") == "1"
        self.handshakes.append(
            HandshakeSeen(
                request.path_qs, offered_header, request.headers.get("X-Forwarded-Host", ""), accepted
            )
        )
        if not accepted:
            raise web.HTTPBadRequest(text=f"HMR needs ?client=1 and the {SUBPROTOCOL} subprotocol\n")
        ws = web.WebSocketResponse(protocols=(SUBPROTOCOL,), heartbeat=None)
        await ws.prepare(request)
        self.sockets.add(ws)
        try:
            await ws.send_str(f"connected:{self._content}")
            async for message in ws:
                if message.type is WSMsgType.TEXT and message.data == "ping":
                    await ws.send_str("pong")
        finally:
            self.sockets.discard(ws)
        return ws

    async def _watch(self) -> None:
        """Poll the watched file; push its new content to every socket when it changes."""
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            content = self._read()
            if content == self._content:
                continue
            self._content = content
            for ws in list(self.sockets):
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await ws.send_str(f"update:{content}")
            self.pushed += 1
