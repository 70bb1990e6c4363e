"""One WebSocket connection: the ASGI ``websocket`` messages on one side, the upgraded
tunnel stream (a :class:`~tunnel.websocket.WebSocketChannel`) on the other."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any, Final

from .. import asgi
from .._frames import validate_headers
from .._handler import Headers, Request, Response
from .._ws_protocol import (
    ABNORMAL_CLOSURE,
    INTERNAL_ERROR,
    NORMAL_CLOSURE,
    accept_token,
    split_tokens,
    valid_close_code,
    valid_key,
)
from ..websocket import CLOSE_TIMEOUT, WebSocketChannel, WebSocketClosed
from ._http import _INTERNAL_ERROR_BODY
from ._types import ASGIApp, Message, Scope

log = logging.getLogger("tunnel.asgi")

# A close frame holds 125 bytes of payload: the code takes 2, the reason the rest.
MAX_REASON_BYTES: Final = 123


class ClientDisconnected(OSError):
    """``send()`` on a WebSocket whose client is gone (ASGI 2.4: an ``OSError`` subclass)."""


def is_websocket_upgrade(request: Request) -> bool:
    """An upgraded tunnel request asking for a WebSocket (RFC 6455 4.2.1: key and version 13)."""
    if not request.upgrade:
        return False
    upgrade = [token.lower() for token in split_tokens(request.header_values("upgrade"))]
    version = (request.header("sec-websocket-version") or "").strip()
    return "websocket" in upgrade and version == "13" and valid_key(request.header("sec-websocket-key"))


def _fit_reason(reason: str) -> str:
    """``reason`` cut to the 123 bytes of UTF-8 a close frame holds (whole characters)."""
    return reason.encode("utf-8")[:MAX_REASON_BYTES].decode("utf-8", "ignore")


def _header_pairs(raw: Any, where: str) -> Headers:
    """ASGI ``[bytes, bytes]`` header pairs as checked tunnel headers."""
    try:
        headers = [(bytes(name).decode("latin-1"), bytes(value).decode("latin-1")) for name, value in raw]
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{where} 'headers' must be [bytes, bytes] pairs") from exc
    return validate_headers(headers, error=ValueError)


class _WebSocketCycle:
    """One WebSocket connection: the ASGI ``websocket`` messages and the upgraded stream.

    Before ``websocket.accept`` the tunnel request waits for an answer (101, 403 after a
    ``websocket.close``, 500 if the application fails); after it, a
    :class:`~tunnel.websocket.WebSocketChannel` carries the frames both ways.
    """

    def __init__(self, request: Request, scope: Scope) -> None:
        self._loop = asyncio.get_running_loop()
        self.request = request
        self.scope = scope
        self.channel = WebSocketChannel(client=False)
        self.app_task: asyncio.Task[None] | None = None
        self.connect_sent = False
        self.accepted = False
        self.closed = False  # websocket.close sent, refused, or the client is gone
        self.disconnected = False
        self.answer: Response | None = None
        self.head: asyncio.Future[None] = self._loop.create_future()
        self._grace: asyncio.TimerHandle | None = None
        self._watcher: asyncio.Task[None] | None = None
        # websocket.http.response.start seen: (status, headers, body parts so far)
        self._denial: tuple[int, Headers, list[bytes]] | None = None

    async def run(self, app: ASGIApp) -> None:
        try:
            await app(self.scope, self.receive, self.send)
        except asyncio.CancelledError:
            await self.channel.abort()
            raise
        except Exception:
            if self.disconnected:
                log.debug("ASGI WebSocket application failed after the client left", exc_info=True)
            else:
                log.error("Exception in ASGI application", exc_info=True)
            if self.accepted:
                await self._close(INTERNAL_ERROR, "")
        else:
            if not self.accepted and self.answer is None:
                log.error(
                    "ASGI WebSocket application returned without accepting or closing (%s)", self.request.path
                )
            elif self.accepted and not self.closed:
                await self._close(NORMAL_CLOSURE, "")
        finally:
            self._finish()

    async def receive(self) -> Message:
        if not self.connect_sent:
            self.connect_sent = True
            return {"type": "websocket.connect"}
        if not self.accepted:
            if self.answer is None:
                raise RuntimeError("ASGI WebSocket application called receive() before websocket.accept")
            return {"type": "websocket.disconnect", "code": ABNORMAL_CLOSURE, "reason": ""}
        try:
            message = await self.channel.receive()
        except WebSocketClosed as exc:
            self.disconnected = True
            self._start_grace()
            return {"type": "websocket.disconnect", "code": exc.code, "reason": exc.reason}
        if message.kind == "text":
            return {"type": "websocket.receive", "text": message.data, "bytes": None}
        return {"type": "websocket.receive", "bytes": message.data, "text": None}

    async def send(self, message: Message) -> None:
        mtype = message["type"]
        if self._denial is not None:
            self._deny(mtype, message)
            return
        if not self.accepted and self.answer is None:
            if mtype == "websocket.accept":
                self._accept(message)
            elif mtype == "websocket.close":
                self.closed = True
                self._answer(Response(403, [("content-type", "text/plain"), ("content-length", "0")], b""))
            elif mtype == "websocket.http.response.start":
                self._start_denial(message)
            else:
                expected = "'websocket.accept', 'websocket.close' or 'websocket.http.response.start'"
                raise RuntimeError(f"Expected ASGI message {expected}, but got '{mtype}'.")
            return
        if self.closed or not self.accepted:
            raise ClientDisconnected(f"cannot send '{mtype}': the WebSocket is closed")
        if mtype == "websocket.send":
            text, data = message.get("text"), message.get("bytes")
            try:
                if text is not None:
                    await self.channel.send_text(str(text))
                elif data is not None:
                    await self.channel.send_bytes(data)
                else:
                    raise ValueError("websocket.send needs 'text' or 'bytes'")
            except WebSocketClosed as exc:
                self.closed = True
                raise ClientDisconnected(f"the WebSocket is closed ({exc.code})") from exc
        elif mtype == "websocket.close":
            code = message.get("code") or NORMAL_CLOSURE
            await self._close(int(code), str(message.get("reason") or ""))
        else:
            raise RuntimeError(
                f"Expected ASGI message 'websocket.send' or 'websocket.close', but got '{mtype}'."
            )

    def _start_denial(self, message: Message) -> None:
        """The ``websocket.http.response`` extension: refuse with an HTTP response of the app's."""
        status = message["status"]
        if (
            not isinstance(status, int)
            or isinstance(status, bool)
            or not 200 <= status <= 599
            or status == 101
        ):
            raise ValueError(f"invalid HTTP status {status!r} in websocket.http.response.start")
        self._denial = (
            status,
            _header_pairs(message.get("headers") or [], "websocket.http.response.start"),
            [],
        )

    def _deny(self, mtype: str, message: Message) -> None:
        if self.answer is not None:
            raise ClientDisconnected(f"cannot send '{mtype}': the denial response is complete")
        if mtype != "websocket.http.response.body":
            raise RuntimeError(f"Expected ASGI message 'websocket.http.response.body', but got '{mtype}'.")
        assert self._denial is not None
        status, headers, parts = self._denial
        body = message.get("body", b"")
        if not isinstance(body, bytes | bytearray | memoryview):
            raise TypeError(f"websocket.http.response.body 'body' must be bytes, not {type(body).__name__}")
        parts.append(bytes(body))
        if not message.get("more_body", False):
            self.closed = True
            self._answer(Response(status, headers, b"".join(parts)))

    def _accept(self, message: Message) -> None:
        subprotocol = message.get("subprotocol")
        extra = _header_pairs(message.get("headers") or [], "websocket.accept")
        key = self.request.header("sec-websocket-key") or ""
        headers: Headers = [
            ("upgrade", "websocket"),
            ("connection", "Upgrade"),
            ("sec-websocket-accept", accept_token(key.strip())),
        ]
        if subprotocol is not None:
            headers.append(("sec-websocket-protocol", str(subprotocol)))
        headers.extend(extra)
        self.accepted = True
        self.channel.start(self.request.stream().__aiter__())
        self._answer(Response(101, headers, self._frames()))
        if self._watcher is None:
            self._watcher = self._loop.create_task(self._watch_cancelled())

    async def _frames(self) -> AsyncIterator[bytes]:
        """The 101's body: the frames going to the client; its end ends the stream."""
        try:
            async for data in self.channel.outbound.chunks():
                yield data
        finally:
            if not self.channel.proto.finished:
                self.disconnect()  # the tunnel stopped pulling: the client is gone
            elif not self.channel.reader_done.is_set():
                # The body's end ends the stream both ways: the request side may never
                # see its end, so its reader stops here.
                self.channel.stop()

    async def _close(self, code: int, reason: str) -> None:
        await self.close(code, reason, CLOSE_TIMEOUT)

    async def close(self, code: int, reason: str, timeout: float) -> None:
        """The close handshake from the server's side (once).

        A code no endpoint may send is the app's error (ValueError, before anything is marked
        closed, so its failure still closes with 1011); a reason longer than a close frame
        holds is cut to 123 bytes of UTF-8 (apps pass ``str(exc)``): either way the client
        gets a close frame, never a silent 1006.
        """
        if self.closed:
            return
        if not valid_close_code(code):
            raise ValueError(f"not a close code an endpoint may send: {code}")
        self.closed = True
        await self.channel.close(code, _fit_reason(reason), timeout)

    def _answer(self, response: Response) -> None:
        self.answer = response
        if not self.head.done():
            self.head.set_result(None)

    def response(self) -> Response:
        if self.answer is not None:
            return self.answer
        headers = [
            ("content-type", "text/plain; charset=utf-8"),
            ("content-length", str(len(_INTERNAL_ERROR_BODY))),
        ]
        return Response(500, headers, _INTERNAL_ERROR_BODY)

    async def _watch_cancelled(self) -> None:
        await self.request.cancelled.wait()
        self.disconnect()

    def disconnect(self) -> None:
        """The client is gone (abort, tunnel failure): the application hears websocket.disconnect."""
        if self.disconnected and self._grace is not None:
            return
        self.disconnected = True
        self.channel.stop()
        self._start_grace()

    def _start_grace(self) -> None:
        task = self.app_task
        if task is not None and not task.done() and self._grace is None:
            self._grace = self._loop.call_later(asgi.DISCONNECT_GRACE, self._cancel_app)

    def _cancel_app(self) -> None:
        task = self.app_task
        if task is not None and not task.done():
            log.warning(
                "ASGI WebSocket application for %s still running %.0fs after the client left: cancelling it",
                self.request.path,
                asgi.DISCONNECT_GRACE,
            )
            task.cancel()

    def _finish(self) -> None:
        if not self.head.done():
            self.head.set_result(None)
        self.channel.outbound.end()
        if self._watcher is not None:
            self._watcher.cancel()
        if self._grace is not None:
            self._grace.cancel()
