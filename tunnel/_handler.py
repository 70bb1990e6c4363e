"""What a server handler sees (``Request``) and returns (``Response``).

Plain objects with no NATS in them: the server feeds the request body in and
reads the response body out, applying flow control on both.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from ._errors import TunnelError
from ._headers import all_headers, first_header

Headers = list[tuple[str, str]]
ResponseBody = bytes | bytearray | memoryview | str | AsyncIterable[bytes] | Iterable[bytes] | None


@dataclass
class Response:
    """A handler's answer; ``body`` may be bytes, text (UTF-8) or an (async) iterator of bytes."""

    status: int = 200
    headers: Headers = field(default_factory=list)
    body: ResponseBody = None
    status_text: str | None = None


class Request:
    """One incoming request. The body is a stream: read it once, with ``stream()`` or ``read()``."""

    def __init__(
        self,
        *,
        request_id: str,
        hostname: str,
        method: str,
        url: str,
        headers: Headers,
        has_body: bool,
        deadline: float | None,
        on_consumed: Callable[[int], Awaitable[None]],
        upgrade: bool = False,
    ) -> None:
        self.request_id = request_id
        self.hostname = hostname
        self.method = method
        self.url = url
        path, _, query = url.partition("?")
        self.path = path
        self.query_string = query
        self.headers = headers
        self.has_body = has_body
        #: Monotonic (event loop) time by which the caller wants the answer, or None.
        self.deadline = deadline
        #: The caller asked for an upgraded stream (``Upgrade: websocket``, say) and can take
        #: one: answer ``Response(101, headers, body=<async iterator>)`` to open it. The
        #: response body is then the stream's server->caller direction and ``stream()`` its
        #: caller->server direction, both open at once; ending the response body ends the
        #: stream. Any other status refuses the upgrade with an ordinary response.
        self.upgrade = upgrade
        self._cancelled: asyncio.Event | None = None  # created on first use: most handlers never look
        self._is_cancelled = False
        self._chunks: deque[bytes] = deque()
        self._ended = not has_body
        self._error: TunnelError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._on_consumed = on_consumed
        self._streamed = False
        self._ready: bytes | None = None  # consumed, not yet handed out (its read was cancelled)

    # -- for the application ------------------------------------------------------

    @property
    def query(self) -> list[tuple[str, str]]:
        """Decoded query parameters, order and repeats kept."""
        return parse_qsl(self.query_string, keep_blank_values=True)

    def header(self, name: str, default: str | None = None) -> str | None:
        """First value of a header (case-insensitive)."""
        return first_header(self.headers, name, default)

    def header_values(self, name: str) -> list[str]:
        return all_headers(self.headers, name)

    @property
    def is_cancelled(self) -> bool:
        return self._is_cancelled

    @property
    def cancelled(self) -> asyncio.Event:
        """Set when the caller aborted, the deadline passed or the server is closing."""
        if self._cancelled is None:
            self._cancelled = asyncio.Event()
            if self._is_cancelled:
                self._cancelled.set()
        return self._cancelled

    def stream(self) -> AsyncIterator[bytes]:
        """Request body chunks as they arrive (granting the caller credit as we go).

        Cancel-safe: a read cancelled while waiting (``asyncio.wait_for`` around it) loses
        nothing, and the next read carries on where it left off. (An async generator would
        be closed by the cancellation, and the rest of the body would look like its end.)
        """
        if self._streamed:
            raise RuntimeError("request body already consumed")
        self._streamed = True
        return _BodyReader(self)

    async def _next_chunk(self) -> bytes:
        while True:
            if self._ready is not None:
                chunk, self._ready = self._ready, None
                return chunk
            if self._chunks:
                chunk = self._chunks.popleft()
                # Counted as consumed now; if this read is cancelled while the grant goes out,
                # the chunk waits in _ready for the next read instead of being lost (a lost
                # grant is repaired: limits are cumulative and re-sent with heartbeats).
                self._ready = chunk
                await self._on_consumed(len(chunk))
                self._ready = None
                return chunk
            if self._error is not None:
                raise self._error
            if self._ended:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter  # cancelling this read cancels only the wait
            finally:
                self._waiter = None

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.stream()])

    async def json(self) -> Any:
        return json.loads(await self.read())

    # -- for the server -----------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._wake()

    def _end(self) -> None:
        self._ended = True
        self._wake()

    def _fail(self, error: TunnelError) -> None:
        if self._error is None and not self._ended:
            self._error = error
        self._is_cancelled = True
        if self._cancelled is not None:
            self._cancelled.set()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _detach(self) -> None:
        """The server is done with this request: drop its callback (a reference cycle).

        The server's request object holds this one and the callback holds it back, so
        without this every request would wait for the cyclic garbage collector (measured: a
        dozen objects per request, ~10% of a small request's CPU in collections). Credit for
        what is read afterwards is owed to nobody.
        """
        self._on_consumed = _owed_to_nobody


async def _owed_to_nobody(n: int) -> None:
    """What reading costs once the request is over: nothing to grant."""


class _BodyReader:
    """The iterator ``Request.stream()`` returns: every read is a fresh, cancel-safe call."""

    __slots__ = ("_closed", "_request")

    def __init__(self, request: Request) -> None:
        self._request = request
        self._closed = False

    def __aiter__(self) -> _BodyReader:
        return self

    async def __anext__(self) -> bytes:
        if self._closed:
            raise StopAsyncIteration
        return await self._request._next_chunk()

    async def aclose(self) -> None:
        """Stop reading (like an async generator's ``aclose``); unread bytes stay unread."""
        self._closed = True


Handler = Callable[[Request], Awaitable[Response]]
