"""The record of every tunnelled request linkd serves, for whoever wants to watch.

Why one record: the access log (:mod:`linkd.access_log`), the local inspector and the
metrics all want the same facts about a request (method, target, status, bytes, timing,
error), and they must not each wrap the handler and count bytes their own way.
:meth:`Traffic.wrap` wraps the daemon's whole handler once; observers get an
:class:`Exchange` three times: ``"started"`` (the head arrived), ``"response"`` (the
response head is known) and ``"finished"`` (exactly once: normal end, handler error,
caller cancel, the end of an upgraded stream).

Observers are called synchronously and must be cheap; one that raises is logged once
(then counted in :attr:`Traffic.observer_errors`) and never breaks a request. Bodies:
the first ``capture_limit`` bytes of each direction are kept when ``capture_bodies``
is on (never for a 101 upgraded stream); byte counts are exact either way. Headers are
recorded as received: whoever shows them redacts them. With no observer and capture
off, :meth:`Traffic.wrap` calls the handler directly.

A handler learns its own exchange with :func:`current_exchange` (a context variable set
for the handler's call) and can note why it failed with :func:`note_error`, as the
``--upstream`` proxy does for ``upstream_unreachable`` and friends.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import tunnel
from contract.routes import CONTROL_PATH, RESERVED_PREFIX, STATUS_PATH, WORK_PATH

__all__ = [
    "CAPTURE_LIMIT",
    "Exchange",
    "ExchangeEvent",
    "Observer",
    "Traffic",
    "TunnelHandler",
    "classify_route",
    "current_exchange",
    "note_error",
]

log = logging.getLogger("linkd.traffic")

CAPTURE_LIMIT: Final = 64 * 1024  # default bytes of each body kept

ExchangeEvent = Literal["started", "response", "finished"]
Route = Literal["upstream", "status", "work", "control", "other"]
TunnelHandler = Callable[[tunnel.Request], Awaitable[tunnel.Response]]

_ROUTES: Final[dict[str, Route]] = {STATUS_PATH: "status", WORK_PATH: "work", CONTROL_PATH: "control"}
_BYTES_LIKE: Final = (bytes, bytearray, memoryview)
_WHOLE: Final = (bytes, bytearray, memoryview, str)


@dataclass(slots=True)
class Exchange:
    """One tunnelled request and its answer, as far as it got."""

    id: str
    started_at: float  # time.time() when the request arrived
    method: str
    target: str  # path and query as the caller sent them
    route: str  # "upstream" | "status" | "work" | "control" | "other"
    request_headers: list[tuple[str, str]]  # as received (NOT redacted: consumers redact)
    request_body: bytes = b""  # the first capture_limit bytes of the request body
    request_bytes: int = 0  # total request body bytes seen so far
    status: int | None = None  # the response status once the head is known
    response_headers: list[tuple[str, str]] = field(default_factory=list)
    response_body: bytes = b""  # the first capture_limit bytes of the response body
    response_bytes: int = 0
    ttfb_ms: float | None = None  # time to the response head
    duration_ms: float | None = None  # None while in flight
    error: str | None = None  # "upstream_unreachable", a tunnel ErrorCode value, "cancelled", ...
    error_detail: str | None = None
    upgraded: bool = False  # a 101 stream: bodies are not captured, byte counts are
    tunnel_request_id: str = ""  # the caller's tunnel request id (not unique across callers)
    hostname: str = ""  # the tunnel hostname the request came in on
    monotonic_start: float = 0.0  # time.perf_counter() at arrival, for the durations

    @property
    def finished(self) -> bool:
        return self.duration_ms is not None

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.monotonic_start) * 1000.0


Observer = Callable[[ExchangeEvent, Exchange], None]

_current: ContextVar[Exchange | None] = ContextVar("linkd_traffic_exchange", default=None)


def current_exchange() -> Exchange | None:
    """The exchange of the request whose handler is running in this task, if recorded."""
    return _current.get()


def note_error(code: str, detail: str | None = None, *, exchange: Exchange | None = None) -> None:
    """Record why the current request (or ``exchange``) failed; the first cause wins; no-op when unrecorded.

    ``exchange``: for code that runs after the handler returned (a response body), which
    kept :func:`current_exchange` from the handler's call.
    """
    if exchange is None:
        exchange = _current.get()
    if exchange is not None and exchange.error is None:
        exchange.error = code
        exchange.error_detail = detail


def classify_route(path: str) -> Route:
    """Which of the daemon's routes ``path`` goes to (anything outside the reserved prefix: upstream)."""
    route = _ROUTES.get(path)
    if route is not None:
        return route
    return "other" if path.startswith(RESERVED_PREFIX) else "upstream"


class Traffic:
    """Wraps the daemon's handler and tells observers about every exchange."""

    def __init__(self, *, capture_limit: int = CAPTURE_LIMIT, capture_bodies: bool = True) -> None:
        if capture_limit < 0:
            raise ValueError("capture_limit must be >= 0")
        self.capture_limit = capture_limit
        #: Keep body prefixes (the inspector); may be switched at any time, new requests follow.
        self.capture_bodies = capture_bodies
        self.observer_errors = 0
        self._observers: tuple[Observer, ...] = ()
        self._failed: set[int] = set()  # ids of observers whose error was logged already
        self._ids = itertools.count(1)

    @property
    def active(self) -> bool:
        """Whether requests are recorded at all (someone watches, or bodies are captured)."""
        return bool(self._observers) or self.capture_bodies

    def subscribe(self, observer: Observer) -> Callable[[], None]:
        """Call ``observer(event, exchange)`` from now on; returns the unsubscribe function."""
        self._observers = (*self._observers, observer)

        def unsubscribe() -> None:
            self._observers = tuple(o for o in self._observers if o is not observer)

        return unsubscribe

    def wrap(self, handler: TunnelHandler) -> TunnelHandler:
        """``handler`` recorded: the daemon's whole handler (routes and upstream)."""

        async def recorded(request: tunnel.Request) -> tunnel.Response:
            if not self._observers and not self.capture_bodies:
                return await handler(request)  # nobody watches: next to no cost
            return await _Recording(self, request).run(handler)

        return recorded

    def _emit(self, event: ExchangeEvent, exchange: Exchange) -> None:
        for observer in self._observers:
            try:
                observer(event, exchange)
            except Exception:
                self.observer_errors += 1
                key = id(observer)
                if key not in self._failed:
                    self._failed.add(key)
                    log.exception("traffic observer %r failed (further errors are only counted)", observer)


class _Recording:
    """One request being recorded: the request body reader, the response body, the end."""

    __slots__ = ("_done", "_request_buf", "_response_buf", "capture", "exchange", "request", "traffic")

    def __init__(self, traffic: Traffic, request: tunnel.Request) -> None:
        self.traffic = traffic
        self.request = request
        self.capture = traffic.capture_limit if traffic.capture_bodies else 0
        self.exchange = Exchange(
            id=str(next(traffic._ids)),
            started_at=time.time(),
            method=request.method,
            target=request.url,
            route=classify_route(request.path),
            request_headers=request.headers,
            tunnel_request_id=request.request_id,
            hostname=request.hostname,
            monotonic_start=time.perf_counter(),
        )
        self._request_buf: bytearray | None = None
        self._response_buf: bytearray | None = None
        self._done = False

    async def run(self, handler: TunnelHandler) -> tunnel.Response:
        request = self.request
        if request.has_body:
            original = request.stream

            def stream() -> AsyncIterator[bytes]:
                return _CountingReader(original(), self)

            # Instance attribute over the method: read()/json() call self.stream() too.
            request.stream = stream  # type: ignore[method-assign]
        exchange = self.exchange
        self.traffic._emit("started", exchange)
        token = _current.set(exchange)
        try:
            response = await handler(request)
        except asyncio.CancelledError:
            self.finish("cancelled", "the caller left or the request timed out before the response")
            raise
        except tunnel.TunnelError as exc:
            self.finish(exc.code, str(exc))
            raise
        except Exception as exc:
            self.finish(tunnel.ErrorCode.HANDLER_ERROR, f"handler raised {type(exc).__name__}: {exc}")
            raise
        finally:
            _current.reset(token)
        exchange.status = response.status
        exchange.response_headers = response.headers
        exchange.ttfb_ms = exchange.elapsed_ms()
        exchange.upgraded = response.status == 101 and request.upgrade
        if exchange.upgraded:
            self.capture = 0
        body: object = response.body  # object: a handler may return anything (the tunnel refuses it)
        if body is None or isinstance(body, _WHOLE):
            data = body.encode("utf-8") if isinstance(body, str) else body
            if data:
                exchange.response_bytes = len(data)
                if self.capture:
                    exchange.response_body = bytes(data[: self.capture])
            self._sync_request_body()
            self.traffic._emit("response", exchange)
            self.finish()  # handed over whole: the tunnel sends it in one go
            return response
        self._sync_request_body()
        self.traffic._emit("response", exchange)
        if isinstance(body, AsyncIterable):
            response.body = _CountingBody(aiter(body), self)
        elif isinstance(body, Iterable):
            response.body = _CountingSyncBody(iter(body), self)
        else:
            self.finish()  # the tunnel will refuse it (a TypeError there); nothing to count
        return response

    # -- counting -------------------------------------------------------------------

    def on_request_chunk(self, chunk: bytes) -> None:
        exchange = self.exchange
        before = exchange.request_bytes
        exchange.request_bytes = before + len(chunk)
        if before < self.capture:
            if self._request_buf is None:
                self._request_buf = bytearray()
            self._request_buf += chunk[: self.capture - before]

    def on_response_chunk(self, chunk: bytes | bytearray | memoryview) -> None:
        exchange = self.exchange
        before = exchange.response_bytes
        exchange.response_bytes = before + len(chunk)
        if before < self.capture:
            if self._response_buf is None:
                self._response_buf = bytearray()
            self._response_buf += chunk[: self.capture - before]

    def _sync_request_body(self) -> None:
        if self._request_buf is not None:
            self.exchange.request_body = bytes(self._request_buf)

    def finish(self, error: str | None = None, detail: str | None = None) -> None:
        """End the record (only the first call counts) and tell the observers."""
        if self._done:
            return
        self._done = True
        exchange = self.exchange
        if error is not None and exchange.error is None:
            exchange.error = error
            exchange.error_detail = detail
        self._sync_request_body()
        if self._response_buf is not None:
            exchange.response_body = bytes(self._response_buf)
        exchange.duration_ms = exchange.elapsed_ms()
        self.traffic._emit("finished", exchange)

    def finish_body(self, exc: BaseException | None, *, ended: bool) -> None:
        """The response body ended (``ended``), failed (``exc``) or was closed early."""
        if ended:
            self.finish()
        elif isinstance(exc, tunnel.TunnelError):
            self.finish(exc.code, str(exc))
        elif isinstance(exc, asyncio.CancelledError) or self.request.is_cancelled:
            self.finish("cancelled", "the caller left or the request timed out during the response")
        elif exc is not None:
            self.finish(tunnel.ErrorCode.HANDLER_ERROR, f"response body raised {type(exc).__name__}")
        else:
            self.finish()  # closed unread on purpose (HEAD, 204): a normal end


class _CountingReader:
    """``request.stream()`` counted (and its prefix kept); cancel-safe as the reader it wraps."""

    __slots__ = ("_inner", "_recording")

    def __init__(self, inner: AsyncIterator[bytes], recording: _Recording) -> None:
        self._inner = inner
        self._recording = recording

    def __aiter__(self) -> _CountingReader:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._inner.__anext__()
        self._recording.on_request_chunk(chunk)
        return chunk

    async def aclose(self) -> None:
        close = getattr(self._inner, "aclose", None)
        if close is not None:
            await close()


class _CountingBody:
    """A streamed response body counted on its way to the tunnel; its end finishes the record."""

    __slots__ = ("_inner", "_recording")

    def __init__(self, inner: AsyncIterator[bytes], recording: _Recording) -> None:
        self._inner = inner
        self._recording = recording

    def __aiter__(self) -> _CountingBody:
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk: Any = await self._inner.__anext__()
        except StopAsyncIteration:
            self._recording.finish_body(None, ended=True)
            raise
        except BaseException as exc:
            self._recording.finish_body(exc, ended=False)
            raise
        self._recording.on_response_chunk(chunk.encode("utf-8") if isinstance(chunk, str) else chunk)
        return chunk  # type: ignore[no-any-return]  # whatever the handler yields, the tunnel checks

    async def aclose(self) -> None:
        try:
            close = getattr(self._inner, "aclose", None)
            if close is not None:
                await close()
        finally:
            self._recording.finish_body(None, ended=False)


class _CountingSyncBody:
    """As :class:`_CountingBody`, for a plain iterable body."""

    __slots__ = ("_inner", "_recording")

    def __init__(self, inner: Iterator[bytes], recording: _Recording) -> None:
        self._inner = inner
        self._recording = recording

    def __iter__(self) -> _CountingSyncBody:
        return self

    def __next__(self) -> bytes:
        try:
            chunk: Any = next(self._inner)
        except StopIteration:
            self._recording.finish_body(None, ended=True)
            raise
        except BaseException as exc:
            self._recording.finish_body(exc, ended=False)
            raise
        self._recording.on_response_chunk(chunk.encode("utf-8") if isinstance(chunk, str) else chunk)
        return chunk  # type: ignore[no-any-return]  # whatever the handler yields, the tunnel checks

    def close(self) -> None:
        try:
            close = getattr(self._inner, "close", None)
            if close is not None:
                close()
        finally:
            self._recording.finish_body(None, ended=False)
