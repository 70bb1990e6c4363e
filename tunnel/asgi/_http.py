"""One HTTP request-response cycle: the application's ``receive``/``send`` on one side,
the tunnel request and its streamed response on the other (see the package docstring)."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator
from typing import Final

from .. import asgi
from .._errors import TunnelError
from .._frames import validate_headers
from .._handler import Headers, Request, Response
from ._types import ASGIApp, Message, Scope

log = logging.getLogger("tunnel.asgi")

# Statuses that carry no body on the wire (the tunnel, like HTTP, sends none).
_NO_BODY_STATUSES: Final = frozenset({204, 205, 304})
_INTERNAL_ERROR_BODY: Final = b"Internal Server Error"


class _Cycle:
    """One request-response cycle: the application's ``receive``/``send`` and the tunnel side."""

    def __init__(self, request: Request, scope: Scope) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self.request = request
        self.scope = scope
        self.app_task: asyncio.Task[None] | None = None
        # request side
        self._body_iter: AsyncIterator[bytes] | None = None
        self._pending_read: asyncio.Task[tuple[bytes, bool] | None] | None = None
        self._request_complete = False
        # response side
        self.started = False
        self.complete = False
        self.status = 500
        self.headers: Headers = []
        self.discard_body = False
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self.disconnected = False
        self.app_done = False
        self.app_error: BaseException | None = None
        # Resolved once the head is known (start sent) or the application ended without one.
        self.head: asyncio.Future[None] = loop.create_future()
        # Resolved when the caller left or the response is complete: receive() then says disconnect.
        self._ended: asyncio.Future[None] = loop.create_future()
        self._data_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._grace: asyncio.TimerHandle | None = None

    # -- the application's side ------------------------------------------------------

    async def run(self, app: ASGIApp) -> None:
        try:
            await app(self.scope, self.receive, self.send)
        except asyncio.CancelledError:
            self.app_error = RuntimeError("ASGI application was cancelled")
            raise
        except Exception as exc:
            self.app_error = exc
            if self.disconnected:
                log.debug("ASGI application failed after the caller left", exc_info=True)
            else:
                log.error("Exception in ASGI application", exc_info=True)
        else:
            if not self.started:
                self.app_error = RuntimeError("ASGI application returned without starting a response")
                log.error("%s (%s %s)", self.app_error, self.request.method, self.request.path)
            elif not self.complete and not self.disconnected:
                self.app_error = RuntimeError("ASGI application returned without completing the response")
                log.error("%s (%s %s)", self.app_error, self.request.method, self.request.path)
        finally:
            self.app_done = True
            self._finish()

    async def receive(self) -> Message:
        while not (self.disconnected or self.complete):
            if self._request_complete:
                await self._block(self._ended)
                break
            if not self.request.has_body:
                self._request_complete = True
                return {"type": "http.request", "body": b"", "more_body": False}
            # The read runs in its own task so a cancelled receive() (Starlette cancels its
            # disconnect listener) never cancels the body stream halfway through a chunk.
            read = self._pending_read
            if read is None:
                read = self._pending_read = self._loop.create_task(self._read_chunk())
            await asyncio.wait((read, self._ended), return_when=asyncio.FIRST_COMPLETED)
            if not read.done():
                continue
            self._pending_read = None
            result = read.result()
            if result is None:
                continue  # the caller failed or left: disconnected
            chunk, more_body = result
            if not more_body:
                self._request_complete = True
            return {"type": "http.request", "body": chunk, "more_body": more_body}
        return {"type": "http.disconnect"}

    async def _read_chunk(self) -> tuple[bytes, bool] | None:
        """(chunk, more_body), or None when the caller failed or left (then we are disconnected)."""
        if self._body_iter is None:
            self._body_iter = self.request.stream().__aiter__()
        try:
            return await anext(self._body_iter), True
        except StopAsyncIteration:
            return b"", False
        except TunnelError:
            self.disconnect()
            return None

    async def send(self, message: Message) -> None:
        mtype = message["type"]
        if self.disconnected:
            return  # ASGI 2.3: messages to a gone caller are dropped
        if not self.started:
            if mtype != "http.response.start":
                raise RuntimeError(f"Expected ASGI message 'http.response.start', but got '{mtype}'.")
            self._start(message)
            return
        if self.complete:
            raise RuntimeError(f"Unexpected ASGI message '{mtype}' sent, after response already completed.")
        if mtype != "http.response.body":
            raise RuntimeError(f"Expected ASGI message 'http.response.body', but got '{mtype}'.")
        body = message.get("body", b"")
        if not isinstance(body, bytes | bytearray | memoryview):
            raise TypeError(f"http.response.body 'body' must be bytes, not {type(body).__name__}")
        more_body = bool(message.get("more_body", False))
        if body and not self.discard_body:
            self._chunks.append(bytes(body))
            self._buffered += len(body)
            self._wake_reader()
        if not more_body:
            self.complete = True
            _resolve(self._ended)
            self._wake_reader()
        elif self._buffered > asgi.RESPONSE_HIGH_WATER:
            self._drain_waiter = self._loop.create_future()
            try:
                await self._block(self._drain_waiter)
            finally:
                self._drain_waiter = None

    def _start(self, message: Message) -> None:
        status = message["status"]
        if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
            raise ValueError(f"invalid HTTP status {status!r} in http.response.start")
        raw_headers = message.get("headers", [])
        try:
            headers = [
                (bytes(name).decode("latin-1"), bytes(value).decode("latin-1")) for name, value in raw_headers
            ]
        except (TypeError, ValueError) as exc:
            raise TypeError("http.response.start 'headers' must be [bytes, bytes] pairs") from exc
        self.headers = validate_headers(headers, error=ValueError)
        self.status = status
        self.started = True
        self.discard_body = self.request.method == "HEAD" or status in _NO_BODY_STATUSES or status < 200
        _resolve(self.head)

    async def _block(self, waiter: asyncio.Future[None]) -> None:
        """Wait for ``waiter``; also wakes (as a disconnect) if the request is failed meanwhile."""
        if self._watcher is None and not self.request.is_cancelled:
            self._watcher = self._loop.create_task(self._watch_cancelled())
        elif self.request.is_cancelled:
            self.disconnect()
        if not waiter.done():
            # asyncio.wait, not ``await waiter``: cancelling the application's await must
            # not cancel a future the cycle shares (``_ended``).
            await asyncio.wait((waiter,))

    async def _watch_cancelled(self) -> None:
        await self.request.cancelled.wait()
        self.disconnect()

    # -- the tunnel's side -----------------------------------------------------------

    def response(self) -> Response:
        """The tunnel response once ``head`` resolved."""
        if not self.started:
            body = None if self.request.method == "HEAD" else _INTERNAL_ERROR_BODY
            headers = [
                ("content-type", "text/plain; charset=utf-8"),
                ("content-length", str(len(_INTERNAL_ERROR_BODY))),
            ]
            return Response(500, headers, body)
        if self.discard_body:
            # The caller gets the head and nothing else: from here on it has left, so a
            # streaming app (SSE answering a HEAD) hears http.disconnect instead of running on.
            self.disconnect()
            return Response(self.status, self.headers, None)
        if self.complete:
            # The whole body is already here (the usual case for small answers): one message.
            data = b"".join(self._chunks)
            self._chunks.clear()
            self._buffered = 0
            return Response(self.status, self.headers, data)
        return Response(self.status, self.headers, self._body())

    async def _body(self) -> AsyncIterator[bytes]:
        delivered = False
        try:
            while True:
                if self._chunks:
                    chunks = self._chunks
                    data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
                    chunks.clear()
                    self._buffered = 0
                    if self._drain_waiter is not None:
                        _resolve(self._drain_waiter)
                    yield data
                    continue
                if self.complete:
                    delivered = True
                    return
                if self.app_error is not None:
                    raise RuntimeError("ASGI application failed after starting the response") from (
                        self.app_error
                    )
                if self.app_done or self.disconnected:
                    raise RuntimeError("ASGI application returned without completing the response")
                self._data_waiter = self._loop.create_future()
                try:
                    await self._data_waiter
                finally:
                    self._data_waiter = None
        finally:
            if not delivered:
                self.disconnect()

    def _wake_reader(self) -> None:
        if self._data_waiter is not None:
            _resolve(self._data_waiter)

    def disconnect(self) -> None:
        """The caller left (abort, deadline, server closing): tell the application."""
        if self.disconnected:
            return
        self.disconnected = True
        _resolve(self._ended)
        _resolve(self.head)
        if self._drain_waiter is not None:
            _resolve(self._drain_waiter)
        self._wake_reader()
        task = self.app_task
        if task is not None and not task.done() and self._grace is None:
            self._grace = self._loop.call_later(asgi.DISCONNECT_GRACE, self._cancel_app)

    def _cancel_app(self) -> None:
        task = self.app_task
        if task is not None and not task.done():
            log.warning(
                "ASGI application for %s %s still running %.0fs after the caller left: cancelling it",
                self.request.method,
                self.request.path,
                asgi.DISCONNECT_GRACE,
            )
            task.cancel()

    def _finish(self) -> None:
        _resolve(self.head)
        self._wake_reader()
        if self._watcher is not None:
            self._watcher.cancel()
        if self._grace is not None:
            self._grace.cancel()
        if self._pending_read is not None:
            self._pending_read.cancel()


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
