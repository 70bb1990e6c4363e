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
        self._cancelled: asyncio.Event | None = None  # created on first use: most handlers never look
        self._is_cancelled = False
        self._chunks: deque[bytes] = deque()
        self._ended = not has_body
        self._error: TunnelError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._on_consumed = on_consumed
        self._streamed = False

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

    async def stream(self) -> AsyncIterator[bytes]:
        """Yield request body chunks as they arrive (granting the caller credit as we go)."""
        if self._streamed:
            raise RuntimeError("request body already consumed")
        self._streamed = True
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                await self._on_consumed(len(chunk))
                yield chunk
                continue
            if self._error is not None:
                raise self._error
            if self._ended:
                return
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
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


Handler = Callable[[Request], Awaitable[Response]]
