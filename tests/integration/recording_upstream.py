"""A local HTTP/1.1 service that records exactly what reached it, for hostile-input tests.

Why not aiohttp: these tests ask "what bytes did the local service receive?" (a smuggled
second request, a header split by CR/LF, a target outside the base path), so the service
parses with h11 and records every request of every connection, including ones an attacker
hid in a body. Paths under ``/raw/<name>`` answer with hand-written, possibly invalid bytes
(see :data:`RAW_RESPONSES`) so hostile *responses* can be tested too.

:class:`WebSocketEchoService` is the other kind: a real (aiohttp) WebSocket server for the
upgrade tests of linkd's proxy and ``linkctl forward``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp
import h11
from aiohttp import web

from cli.nats_server import free_port

LOOPBACK: Final = "127.0.0.1"
MiB: Final = 1024 * 1024

RAW_RESPONSES: Final[dict[str, bytes]] = {
    # A header value over the tunnel's 64 KiB limit.
    "huge-header": b"HTTP/1.1 200 OK\r\nX-Huge: " + b"v" * (70 * 1024) + b"\r\nContent-Length: 2\r\n\r\nok",
    # More headers than the tunnel carries (512).
    "many-headers": b"HTTP/1.1 200 OK\r\n"
    + b"".join(b"X-H%d: v\r\n" % i for i in range(600))
    + b"Content-Length: 2\r\n\r\nok",
    # A bare LF inside a header block and a NUL in a value: invalid HTTP.
    "nul-header": b"HTTP/1.1 200 OK\r\nX-Nul: a\x00b\r\nContent-Length: 2\r\n\r\nok",
    # obs-fold (a continuation line): deprecated, must not become a new header.
    "obs-fold": b"HTTP/1.1 200 OK\r\nX-Fold: a\r\n Injected: yes\r\nContent-Length: 2\r\n\r\nok",
    # Two different Content-Lengths: a response smuggling attempt.
    "two-lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 40\r\n\r\nok",
    # Not HTTP at all.
    "garbage": b"\x00\xff garbage, not a status line\r\n\r\n",
}


@dataclass
class Seen:
    """One request as the service parsed it."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes = b""


@dataclass
class RecordingService:
    """``async with RecordingService() as svc``: listens on loopback, records into ``svc.seen``."""

    seen: list[Seen] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def origin(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    async def __aenter__(self) -> RecordingService:
        self._server = await asyncio.start_server(self._on_client, LOOPBACK, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 2.0)

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except h11.RemoteProtocolError as exc:
            self.errors.append(f"bad request bytes: {exc}")
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        current: Seen | None = None
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                conn.receive_data(data)
                if not data and conn.their_state is not h11.SEND_BODY:
                    return
                continue
            if isinstance(event, h11.Request):
                current = Seen(
                    event.method.decode("latin-1"),
                    event.target.decode("latin-1"),
                    [(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers.raw_items()],
                )
                self.seen.append(current)
            elif isinstance(event, h11.Data) and current is not None:
                current.body += event.data
            elif isinstance(event, h11.EndOfMessage) and current is not None:
                raw = _raw_response(current.target)
                if raw is not None:
                    writer.write(raw)
                    await writer.drain()
                    return  # hand-written bytes: the connection is done
                body = b"ok " + current.target.encode("latin-1")
                writer.write(
                    conn.send(h11.Response(status_code=200, headers=[("Content-Length", str(len(body)))]))
                    or b""
                )
                writer.write(conn.send(h11.Data(data=body)) or b"")
                writer.write(conn.send(h11.EndOfMessage()) or b"")
                await writer.drain()
                conn.start_next_cycle()
                current = None
            elif isinstance(event, h11.ConnectionClosed):
                return


def _raw_response(target: str) -> bytes | None:
    marker = "/raw/"
    index = target.find(marker)
    if index < 0:
        return None
    return RAW_RESPONSES.get(target[index + len(marker) :].split("?", 1)[0])


@dataclass
class WebSocketEchoService:
    """A local aiohttp WebSocket service (a dev server's HMR socket) recording what reached it.

    ``/ws/...`` accepts the ``vite-hmr`` subprotocol and echoes messages; the text
    ``close-me`` makes it close with 4001 "bye", ``die`` makes it drop the TCP connection;
    ``seen`` holds each handshake's raw path and headers, ``close_codes`` the close code each
    socket ended with. ``/forbidden`` answers 403 with a body. Here aiohttp is the point:
    a real WebSocket server, not a hand-written one.
    """

    seen: list[dict[str, Any]] = field(default_factory=list)
    close_codes: list[int | None] = field(default_factory=list)
    port: int = field(default_factory=free_port)
    tls: ssl.SSLContext | None = None  # serve https with this server context
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{LOOPBACK}:{self.port}"

    async def __aenter__(self) -> WebSocketEchoService:
        self._runner = web.AppRunner(self.app(), handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, LOOPBACK, self.port, ssl_context=self.tls).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/ws/{tail:.*}", self.websocket)
        app.router.add_get("/forbidden", self.forbidden)
        return app

    async def forbidden(self, request: web.Request) -> web.Response:
        return web.Response(status=403, text="origin not allowed")

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        self.seen.append(
            {
                "path": request.raw_path,
                "host": request.host,
                "headers": [
                    (k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in request.raw_headers
                ],
            }
        )
        ws = web.WebSocketResponse(protocols=("vite-hmr",), max_msg_size=4 * MiB)
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                if msg.data == "close-me":
                    await ws.close(code=4001, message=b"bye")
                    break
                if msg.data == "die":
                    assert request.transport is not None
                    request.transport.abort()  # the service dies mid-socket
                    return ws
                await ws.send_str(msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        self.close_codes.append(ws.close_code)
        return ws
