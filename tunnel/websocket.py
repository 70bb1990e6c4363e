"""WebSockets through the tunnel: a client, and the byte-stream glue both ends share.

Connect to a WebSocket endpoint served behind a tunnel hostname (an ASGI app served
with :mod:`tunnel.asgi`, or anything answering the upgrade)::

    async with await websocket_connect(nc, "tunnel://desk.example/ws", subprotocols=["chat"]) as ws:
        await ws.send_text("hello")
        msg = await ws.receive()          # WebSocketMessage(kind="text", data="...")
        async for msg in ws:              # until the server closes with 1000/1001
            ...

The handshake is an ordinary tunnel request with ``upgrade=True``; after the 101 the
RFC 6455 frames travel as raw bytes on the upgraded stream, framed by wsproto.

Flow control: ``send_*`` waits while the tunnel has no credit (the outgoing queue
holds about :data:`SEND_HIGH_WATER` bytes), and a reader task stops pulling from the
tunnel once :data:`RECEIVE_HIGH_WATER` bytes of messages wait to be received, so a
slow reader slows the server instead of growing memory: what is held is at most the
tunnel's window, those messages and the one being reassembled.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING, Final

from wsproto.utilities import LocalProtocolError as _WsprotoLocalError

from ._errors import TunnelError
from ._handler import Headers
from ._headers import all_headers, first_header
from ._subjects import DEFAULT_PREFIX
from ._ws_protocol import (
    ABNORMAL_CLOSURE,
    DEFAULT_MAX_MESSAGE_SIZE,
    GOING_AWAY,
    NORMAL_CLOSURE,
    WebSocketMessage,
    WebSocketProtocol,
    accept_token,
    new_key,
    split_tokens,
)

if TYPE_CHECKING:  # nats-py is imported at runtime only under tunnel/_natsio
    from nats.aio.client import Client as NATS

    from ._natsio.client import FetchResponse, TunnelClient

__all__ = [
    "CLOSE_TIMEOUT",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "RECEIVE_HIGH_WATER",
    "SEND_HIGH_WATER",
    "TunnelWebSocket",
    "WebSocketClosed",
    "WebSocketError",
    "WebSocketHandshakeError",
    "WebSocketMessage",
    "websocket_connect",
]

#: Outgoing frame bytes queued before ``send_*`` waits for the tunnel to take them.
SEND_HIGH_WATER: Final = 256 * 1024
#: Received message bytes waiting for ``receive()`` before the reader stops pulling.
RECEIVE_HIGH_WATER: Final = 256 * 1024
#: Frames queued together leave as one piece of at most this many bytes (one tunnel data frame).
BATCH_BYTES: Final = 64 * 1024
#: How long ``close()`` waits for the peer's close frame and the end of the stream.
CLOSE_TIMEOUT: Final = 5.0
# Request headers websocket_connect sets itself; the caller's copies are dropped.
_HANDSHAKE_HEADERS: Final = frozenset(
    {
        "upgrade",
        "connection",
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-protocol",
        "sec-websocket-extensions",
        "sec-websocket-accept",
    }
)
# How much of a refused handshake's body WebSocketHandshakeError keeps.
_HANDSHAKE_BODY_LIMIT: Final = 64 * 1024


class WebSocketError(Exception):
    """Base class of the WebSocket errors."""


class WebSocketClosed(WebSocketError):
    """The WebSocket is closed: ``code`` and ``reason`` from the close frame (1006: none came;
    then a tunnel failure, if that was why, is the ``__cause__``)."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"WebSocket closed with code {code}" + (f": {reason}" if reason else ""))
        self.code = code
        self.reason = reason


class WebSocketHandshakeError(WebSocketError):
    """The server did not accept the WebSocket: its ``status``, ``headers`` and up to
    64 KiB of its ``body``; ``message`` says what was wrong."""

    def __init__(self, message: str, status: int, headers: Headers, body: bytes = b"") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.headers = headers
        self.body = body


class _Outbound:
    """Frames on their way to the tunnel, in order; its :meth:`chunks` is the upgraded body.

    Senders wait (:meth:`wait_space`) while :data:`SEND_HIGH_WATER` bytes are queued, so
    the tunnel's flow control reaches them. Control replies are appended without waiting.
    """

    def __init__(self, high_water: int = SEND_HIGH_WATER) -> None:
        self.high_water = high_water
        self._items: deque[bytes] = deque()
        self.buffered = 0
        self.ended = False  # no more frames: the iterator ends once drained
        self.gone = False  # the consumer stopped (stream over): nothing will be sent
        self._data: asyncio.Future[None] | None = None
        self._space: asyncio.Future[None] | None = None
        self.drained = asyncio.Event()  # ended, and everything was handed to the tunnel

    def append(self, data: bytes) -> None:
        if self.ended or self.gone or not data:
            return
        self._items.append(data)
        self.buffered += len(data)
        _wake(self._data)

    def end(self) -> None:
        if self.ended:
            return
        self.ended = True
        if not self._items:
            self.drained.set()
        _wake(self._data)

    async def wait_space(self) -> None:
        while self.buffered >= self.high_water and not self.gone:
            self._space = asyncio.get_running_loop().create_future()
            try:
                await self._space
            finally:
                self._space = None

    def _take_batch(self) -> bytes:
        """Every frame queued so far (up to BATCH_BYTES) as one piece: one tunnel data frame, one
        NATS message for a burst of small WebSocket messages instead of one each."""
        items = self._items
        first = items.popleft()
        if not items or len(first) >= BATCH_BYTES:
            return first
        batch = [first]
        size = len(first)
        while items and size + len(items[0]) <= BATCH_BYTES:
            data = items.popleft()
            batch.append(data)
            size += len(data)
        return b"".join(batch)

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            while True:
                if self._items:
                    data = self._take_batch()
                    self.buffered -= len(data)
                    if self.buffered < self.high_water:
                        _wake(self._space)
                    yield data
                    continue
                if self.ended:
                    self.drained.set()
                    return
                self._data = asyncio.get_running_loop().create_future()
                try:
                    await self._data
                finally:
                    self._data = None
        finally:
            self.gone = True
            self._items.clear()
            self.buffered = 0
            self.drained.set()
            _wake(self._space)


def _wake(fut: asyncio.Future[None] | None) -> None:
    if fut is not None and not fut.done():
        fut.set_result(None)


class WebSocketChannel:
    """A WebSocket over a pair of byte streams: the shared core of both ends.

    :meth:`start` runs a reader task over ``incoming`` (the peer's bytes); the frames
    going out are :attr:`outbound` ``.chunks()``. Used by :class:`TunnelWebSocket` (client
    role) and by :mod:`tunnel.asgi` (server role).
    """

    def __init__(
        self,
        *,
        client: bool,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        receive_high_water: int = RECEIVE_HIGH_WATER,
        send_high_water: int = SEND_HIGH_WATER,
    ) -> None:
        self.proto = WebSocketProtocol(client=client, max_message_size=max_message_size)
        self.outbound = _Outbound(send_high_water)
        self.receive_high_water = receive_high_water
        self._inbox: deque[tuple[WebSocketMessage, int]] = deque()  # with each one's size
        self._inbox_bytes = 0
        # Tasks waiting for a message or for the close (several may wait: each has its own future).
        self._waiters: set[asyncio.Future[None]] = set()
        self._space_waiter: asyncio.Future[None] | None = None
        self._send_lock = asyncio.Lock()
        self._discard = False  # we are closing: unread messages are dropped, the reader runs on
        self._reader: asyncio.Task[None] | None = None
        self.reader_done = asyncio.Event()
        #: Why the byte stream failed (a TunnelError, usually), if it did.
        self.error: BaseException | None = None

    # -- state -------------------------------------------------------------------------

    @property
    def close_code(self) -> int | None:
        return self.proto.close_code

    @property
    def close_reason(self) -> str:
        return self.proto.close_reason

    @property
    def buffered(self) -> int:
        """Received bytes held here: whole messages not yet received, plus the partial one."""
        return self._inbox_bytes + self.proto.buffered

    def closed_error(self) -> WebSocketClosed:
        code = self.proto.close_code if self.proto.close_code is not None else ABNORMAL_CLOSURE
        exc = WebSocketClosed(code, self.proto.close_reason)
        if code == ABNORMAL_CLOSURE and self.error is not None:
            exc.__cause__ = self.error
        return exc

    # -- the reader ----------------------------------------------------------------------

    def start(self, incoming: AsyncIterator[bytes]) -> None:
        self._reader = asyncio.get_running_loop().create_task(self._read(incoming))

    async def _read(self, incoming: AsyncIterator[bytes]) -> None:
        proto = self.proto
        try:
            while True:
                while self._inbox_bytes >= self.receive_high_water and not (proto.closed or self._discard):
                    self._space_waiter = asyncio.get_running_loop().create_future()
                    try:
                        await self._space_waiter
                    finally:
                        self._space_waiter = None
                try:
                    data = await anext(incoming)
                except StopAsyncIteration:
                    break
                proto.answer_pings = self.outbound.buffered < 2 * self.outbound.high_water
                for message in proto.receive_data(data):
                    if not self._discard:
                        size = _size(message)
                        self._inbox.append((message, size))
                        self._inbox_bytes += size
                self.outbound.append(proto.data_to_send())
                if proto.finished:
                    self.outbound.end()
                self._wake_receivers()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the tunnel failed (TunnelError), or the peer's bytes did
            self.error = exc
        finally:
            proto.receive_data(None)
            self.outbound.end()
            self.reader_done.set()
            self._wake_receivers()
            closer = getattr(incoming, "aclose", None)
            if closer is not None and self.error is None and not _cancelling():
                with contextlib.suppress(Exception):
                    await closer()

    def _wake_receivers(self) -> None:
        for waiter in self._waiters:
            _wake(waiter)

    # -- the application's side ---------------------------------------------------------

    async def receive(self) -> WebSocketMessage:
        while True:
            if self._inbox:
                message, size = self._inbox.popleft()
                self._inbox_bytes -= size
                if self._inbox_bytes < self.receive_high_water:
                    _wake(self._space_waiter)
                return message
            if self.proto.closed or self.reader_done.is_set():
                raise self.closed_error()
            await self._wait_for_reader()

    async def _wait_for_reader(self) -> None:
        """Until the reader delivers something (a message, the close, its end)."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        try:
            await waiter
        finally:
            self._waiters.discard(waiter)

    async def send_text(self, text: str) -> None:
        await self._send(lambda: self.proto.send_text(text))

    async def send_bytes(self, data: bytes | bytearray | memoryview) -> None:
        payload = bytes(data)
        await self._send(lambda: self.proto.send_bytes(payload))

    async def ping(self, payload: bytes = b"") -> None:
        await self._send(lambda: self.proto.ping(payload))

    async def _send(self, frame: Callable[[], bytes]) -> None:
        async with self._send_lock:
            await self.outbound.wait_space()
            if not self.proto.open or self.outbound.gone or self.outbound.ended:
                raise self.closed_error() if self.proto.closed else WebSocketClosed(ABNORMAL_CLOSURE)
            try:
                data = frame()
            except _WsprotoLocalError:
                raise self.closed_error() from None
            self.outbound.append(data)

    async def close(
        self, code: int = NORMAL_CLOSURE, reason: str = "", timeout: float = CLOSE_TIMEOUT
    ) -> None:
        """Send a close frame (unless one went out), wait up to ``timeout`` s for the peer's
        and for the stream to end; then no more frames go out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self._discard = True
        self._inbox.clear()
        self._inbox_bytes = 0
        _wake(self._space_waiter)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline):
                async with self._send_lock:
                    self.outbound.append(self.proto.close(code, reason))
                while not self.proto.closed and not self.reader_done.is_set():
                    await self._wait_for_reader()
        if self.proto.close_code is None:
            self.proto.receive_data(None)  # no close frame in time: 1006
        self.outbound.end()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline):
                await self.outbound.drained.wait()
                if self._reader is not None:
                    await self.reader_done.wait()

    def stop(self) -> None:
        """Stop at once: no close handshake (1006 unless a close frame came), the reader is cancelled."""
        self.proto.receive_data(None)
        self.outbound.end()
        if self._reader is not None:
            self._reader.cancel()
        self._wake_receivers()

    async def abort(self) -> None:
        """:meth:`stop`, and wait for the reader to finish."""
        self.stop()
        reader = self._reader
        if reader is not None and not reader.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait((reader,))


def _size(message: WebSocketMessage) -> int:
    """A message's size on the wire (text as UTF-8), for the receive high-water mark."""
    data = message.data
    return len(data.encode("utf-8")) if isinstance(data, str) else len(data)


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class TunnelWebSocket:
    """A client WebSocket over one upgraded tunnel stream (from :func:`websocket_connect`)."""

    def __init__(self, response: FetchResponse, channel: WebSocketChannel, subprotocol: str | None) -> None:
        self._response = response
        self._channel = channel
        #: The subprotocol the server chose, or None.
        self.subprotocol = subprotocol
        #: The headers of the server's 101 answer.
        self.response_headers: list[tuple[str, str]] = list(response.headers)

    @property
    def close_code(self) -> int | None:
        """The close code once closed (the peer's close frame, ours if we failed, 1006 if none)."""
        return self._channel.close_code

    @property
    def close_reason(self) -> str:
        return self._channel.close_reason

    @property
    def buffered(self) -> int:
        """Received bytes held by this socket, not yet handed to ``receive()``."""
        return self._channel.buffered

    @property
    def pongs_received(self) -> int:
        """Pongs the server sent (answers to :meth:`ping`, or unsolicited heartbeats)."""
        return self._channel.proto.pongs_received

    async def send_text(self, text: str) -> None:
        await self._channel.send_text(text)

    async def send_bytes(self, data: bytes | bytearray | memoryview) -> None:
        await self._channel.send_bytes(data)

    async def ping(self, payload: bytes = b"") -> None:
        """Send a ping (the pong is consumed silently; pings from the server are answered)."""
        await self._channel.ping(payload)

    async def receive(self) -> WebSocketMessage:
        """The next message; raises :class:`WebSocketClosed` once the socket closed."""
        return await self._channel.receive()

    def __aiter__(self) -> AsyncIterator[WebSocketMessage]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[WebSocketMessage]:
        while True:
            try:
                message = await self._channel.receive()
            except WebSocketClosed as exc:
                if exc.code in (NORMAL_CLOSURE, GOING_AWAY):
                    return
                raise
            yield message

    async def close(
        self, code: int = NORMAL_CLOSURE, reason: str = "", timeout: float = CLOSE_TIMEOUT
    ) -> None:
        """Close handshake (up to ``timeout`` s), then the tunnel stream ends."""
        try:
            await self._channel.close(code, reason, timeout)
        finally:
            await self._channel.abort()
            await self._response.aclose()

    async def __aenter__(self) -> TunnelWebSocket:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = "open" if self.close_code is None else f"closed {self.close_code}"
        return f"<TunnelWebSocket tunnel://{self._response.hostname} {state}>"


async def websocket_connect(
    nc_or_client: NATS | TunnelClient,
    url: str,
    *,
    subprotocols: Iterable[str] | None = None,
    headers: Iterable[tuple[str, str]] | None = None,
    prefix: str = DEFAULT_PREFIX,
    idle_timeout: float | None = None,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
) -> TunnelWebSocket:
    """Open a WebSocket to ``tunnel://host/path?query``.

    ``nc_or_client``: a nats-py connection (its shared :func:`tunnel.client_for` client
    under ``prefix``) or a :class:`tunnel.TunnelClient`. ``idle_timeout``: how long the
    server may stay silent at the tunnel level (it sends heartbeats) before the socket
    fails with 1006; None keeps the client's ``Timeouts.idle``. No total timeout applies.

    ``headers`` go with the handshake (``origin``, cookies, ``x-forwarded-*``), except the
    handshake's own (``upgrade``, ``connection``, ``sec-websocket-*``): those are dropped;
    offer subprotocols with ``subprotocols``.

    Raises :class:`WebSocketHandshakeError` if the server answers anything but a valid
    101, and ``tunnel.UpgradeUnsupported`` if it cannot upgrade streams at all.
    """
    from ._natsio.client import TunnelClient, client_for  # nats-py only under _natsio

    client = nc_or_client if isinstance(nc_or_client, TunnelClient) else client_for(nc_or_client, prefix)
    offered = [p.strip() for p in subprotocols or ()]
    key = new_key()
    request_headers: list[tuple[str, str]] = [
        ("upgrade", "websocket"),
        ("connection", "Upgrade"),
        ("sec-websocket-key", key),
        ("sec-websocket-version", "13"),
    ]
    if offered:
        request_headers.append(("sec-websocket-protocol", ", ".join(offered)))
    # The handshake's own headers are ours to set: a proxy passing its client's on must
    # not send a second key, version or extension offer.
    request_headers.extend((n, v) for n, v in headers or () if n.lower() not in _HANDSHAKE_HEADERS)
    channel = WebSocketChannel(client=True, max_message_size=max_message_size)
    # A WebSocket lives as long as both ends want: no total deadline, only liveness.
    timeouts = dataclasses.replace(
        client.timeouts, total=None, idle=client.timeouts.idle if idle_timeout is None else idle_timeout
    )
    response = await client.fetch(
        url,
        method="GET",
        headers=request_headers,
        body=channel.outbound.chunks(),
        upgrade=True,
        timeouts=timeouts,
    )
    try:
        subprotocol = _check_handshake(response, key, offered)
        if response.status != 101:
            body = await _read_some(response)
            raise WebSocketHandshakeError(
                f"the server refused the WebSocket with HTTP {response.status}",
                response.status,
                list(response.headers),
                body,
            )
    except BaseException:
        channel.outbound.end()
        await response.aclose()
        raise
    channel.start(aiter(response.aiter_bytes()))
    return TunnelWebSocket(response, channel, subprotocol)


def _check_handshake(response: FetchResponse, key: str, offered: list[str]) -> str | None:
    """The chosen subprotocol, if the 101 is a valid answer to ``key``."""
    if response.status != 101:
        return None
    headers = list(response.headers)

    def refuse(why: str) -> WebSocketHandshakeError:
        return WebSocketHandshakeError(f"invalid WebSocket handshake: {why}", 101, headers)

    if "websocket" not in [t.lower() for t in split_tokens(all_headers(headers, "upgrade"))]:
        raise refuse("no 'Upgrade: websocket'")
    if "upgrade" not in [t.lower() for t in split_tokens(all_headers(headers, "connection"))]:
        raise refuse("no 'Connection: Upgrade'")
    if (first_header(headers, "sec-websocket-accept") or "").strip() != accept_token(key):
        raise refuse("wrong Sec-WebSocket-Accept")
    chosen = split_tokens(all_headers(headers, "sec-websocket-protocol"))
    if len(chosen) > 1:
        raise refuse("more than one subprotocol chosen")
    if chosen and chosen[0] not in offered:
        raise refuse(f"subprotocol {chosen[0]!r} was not offered")
    if all_headers(headers, "sec-websocket-extensions"):
        raise refuse("an extension was chosen, none was offered")
    return chosen[0] if chosen else None


async def _read_some(response: FetchResponse) -> bytes:
    """Up to 64 KiB of a refusal's body (the rest is dropped, the response closed)."""
    parts: list[bytes] = []
    size = 0
    with contextlib.suppress(TunnelError):
        async for chunk in response.aiter_bytes():
            parts.append(chunk)
            size += len(chunk)
            if size >= _HANDSHAKE_BODY_LIMIT:
                break
    return b"".join(parts)[:_HANDSHAKE_BODY_LIMIT]
