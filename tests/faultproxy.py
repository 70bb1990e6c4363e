"""A fault-injecting TCP proxy for tests: partitions and slow links for real, on loopback.

It sits between a client and a server (in practice: a NATS connection and nats-server)
and forwards bytes both ways, unless told otherwise::

    async with FaultProxy(nats_server.port) as proxy:
        nc = await nats.connect(proxy.url)
        proxy.pause()        # stop reading both ways: TCP backpressure builds, nothing is lost
        proxy.resume()
        proxy.delay(0.05)    # every byte arrives 50 ms late (pipelined, not one chunk at a time)
        proxy.throttle(100_000)  # at most 100 kB/s per direction
        proxy.blackhole()    # read and discard both ways: a half-open partition
        proxy.pass_through() # heal everything (connections that lost bytes are reset, see below)
        proxy.reset_all()    # RST every connection now (SO_LINGER 0)

Every command applies to all current connections *and* to connections accepted later; the
same commands on one ``ProxiedConnection`` (``proxy.connections[0].pause()``) affect that
connection only. Commands take effect at once: data already inside the proxy is held back
too, so after ``pause()`` returns no further byte reaches either end.

Faults and what they model:

- ``pause``: a link that stops carrying packets but keeps the connection (a stalled Wi-Fi,
  a frozen VM). The proxy stops reading, so the sender's socket buffers fill and its
  writes block; on ``resume`` everything buffered is delivered, in order, nothing lost.
- ``blackhole``: the peer vanished without a FIN or RST (machine off, NAT entry dropped).
  The proxy keeps reading so writes still succeed, and throws the bytes away; a close from
  either end is swallowed too, so the other end still believes in the connection. A
  connection that lost bytes or a close this way cannot carry a valid stream any more, so
  when the blackhole is lifted it is reset, as a real peer that forgot the connection would
  answer the next segment with RST.
- ``delay``/``throttle``: a slow path; combine freely with each other.
- ``reset_all``/``reset``: both ends get RST immediately (SO_LINGER 0, then close).

The proxy buffers at most ``PIPE_LIMIT`` bytes per direction per connection, so backpressure
from a slow or paused end reaches the other end. Loopback only: it listens on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import struct
from collections import deque
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Final, Self

from tests.helpers import wait_until

__all__ = ["LOOPBACK", "FaultProxy", "Faults", "ProxiedConnection"]

LOOPBACK: Final = "127.0.0.1"
# One read from a socket: large enough that bulk transfers are not limited by proxy overhead.
READ_SIZE: Final = 64 * 1024
# Bytes held inside the proxy per direction: enough to keep a 50 ms delay line full at
# ~20 MB/s, small next to the socket buffers, so backpressure still reaches the sender.
PIPE_LIMIT: Final = 1024 * 1024
# A throttled direction writes pieces worth this many seconds of its rate (smooth, not bursty).
THROTTLE_SLICE: Final = 0.02
# Dialling the real server on loopback takes microseconds; a hung dial means it is wedged.
UPSTREAM_CONNECT_TIMEOUT: Final = 2.0
# SO_LINGER on, zero seconds: close() sends RST instead of FIN.
_LINGER_RST: Final = struct.pack("ii", 1, 0)


@dataclass(frozen=True, slots=True)
class Faults:
    """What a connection currently suffers; the default is a clean pass-through."""

    paused: bool = False
    delay: float = 0.0  # seconds added to every byte, each direction
    rate: int | None = None  # bytes per second per direction, None for unlimited
    blackhole: bool = False

    @property
    def clean(self) -> bool:
        return self == Faults()


class _Changed:
    """A broadcast wakeup: every waiter resumes when ``fire`` is called."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout: float | None = None) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout)


_EOF: Final = object()


class _Direction:
    """One direction of one connection: a reader task, a bounded delay line, a writer task."""

    def __init__(
        self, conn: ProxiedConnection, name: str, src: asyncio.StreamReader, dst: asyncio.StreamWriter
    ) -> None:
        self.conn = conn
        self.name = name
        self.src = src
        self.dst = dst
        self.line: deque[tuple[float, bytes] | object] = deque()
        self.buffered = 0
        self.forwarded = 0
        self.discarded = 0
        self.eof_swallowed = False
        self.done = False
        self._next_send_at = 0.0

    async def read_loop(self) -> None:
        conn = self.conn
        loop = asyncio.get_running_loop()
        while True:
            while conn.faults.paused or self.buffered >= PIPE_LIMIT:
                await conn.changed.wait()
            data = await self.src.read(READ_SIZE)
            if not data:
                if conn.faults.blackhole:
                    self.eof_swallowed = True  # the other end must not learn of the close
                    return
                self.line.append(_EOF)
                conn.changed.fire()
                return
            if conn.faults.blackhole:
                self.discarded += len(data)
                continue
            self.line.append((loop.time(), data))
            self.buffered += len(data)
            conn.changed.fire()

    async def write_loop(self) -> None:
        conn = self.conn
        loop = asyncio.get_running_loop()
        while True:
            while not self.line:
                await conn.changed.wait()
            item = self.line[0]
            faults = conn.faults
            if faults.paused:
                await conn.changed.wait()
                continue
            if item is _EOF:
                self.line.popleft()
                if faults.blackhole:
                    self.eof_swallowed = True
                    return
                if self.dst.can_write_eof():
                    self.dst.write_eof()
                self.done = True
                conn._direction_done()
                return
            assert isinstance(item, tuple)
            read_at, data = item
            if faults.blackhole:
                self._consume(len(data))
                self.discarded += len(data)
                continue
            now = loop.time()
            due = read_at + faults.delay
            if now < due:
                await conn.changed.wait(due - now)  # re-check: the delay may change meanwhile
                continue
            if faults.rate is not None:
                if now < self._next_send_at:
                    await conn.changed.wait(self._next_send_at - now)
                    continue
                piece = data[: max(1, int(faults.rate * THROTTLE_SLICE))]
                self._next_send_at = max(now, self._next_send_at) + len(piece) / faults.rate
            else:
                piece = data
            self.dst.write(piece)
            await self.dst.drain()
            self.forwarded += len(piece)
            if len(piece) == len(data):
                self._consume(len(data))
            else:
                self.line[0] = (read_at, data[len(piece) :])
                self.buffered -= len(piece)

    def _consume(self, n: int) -> None:
        self.line.popleft()
        self.buffered -= n
        self.conn.changed.fire()  # the reader may be waiting for room


class ProxiedConnection:
    """One accepted client connection and its upstream twin; faults can be set per connection."""

    def __init__(
        self,
        proxy: FaultProxy,
        number: int,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        faults: Faults,
    ) -> None:
        self.proxy = proxy
        self.number = number
        self.faults = faults
        self.changed = _Changed()
        self.closed = False
        self._client_writer = client[1]
        self._upstream_writer = upstream[1]
        self.upward = _Direction(self, "client->server", client[0], upstream[1])
        self.downward = _Direction(self, "server->client", upstream[0], client[1])
        # No write buffering in the proxy's transports: a byte the proxy wrote is in the kernel
        # (on the wire), so after pause() nothing more trickles out of the proxy itself.
        for writer in (self._client_writer, self._upstream_writer):
            writer.transport.set_write_buffer_limits(0)
        self._tasks = [
            asyncio.create_task(d.read_loop(), name=f"proxy#{number} read {d.name}")
            for d in (self.upward, self.downward)
        ] + [
            asyncio.create_task(d.write_loop(), name=f"proxy#{number} write {d.name}")
            for d in (self.upward, self.downward)
        ]
        for task in self._tasks:
            task.add_done_callback(self._task_done)
            proxy._tasks.add(task)
            task.add_done_callback(proxy._tasks.discard)

    def __repr__(self) -> str:
        state = "closed" if self.closed else repr(self.faults)
        return f"<ProxiedConnection #{self.number} {state}>"

    # -- commands (this connection only) -------------------------------------------------

    def pause(self) -> None:
        self._set(replace(self.faults, paused=True))

    def resume(self) -> None:
        self._set(replace(self.faults, paused=False))

    def delay(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("delay must be >= 0")
        self._set(replace(self.faults, delay=seconds))

    def throttle(self, bytes_per_second: int | None) -> None:
        if bytes_per_second is not None and bytes_per_second <= 0:
            raise ValueError("throttle rate must be positive (or None to lift it)")
        self._set(replace(self.faults, rate=bytes_per_second))

    def blackhole(self) -> None:
        self._set(replace(self.faults, blackhole=True))

    def pass_through(self) -> None:
        """Lift every fault; a connection that lost bytes or a close to a blackhole is reset."""
        self._set(Faults())

    def reset(self) -> None:
        """RST both ends now."""
        if self.closed:
            return
        for writer in (self._client_writer, self._upstream_writer):
            _rst(writer)
        self._close()

    # -- inspection ------------------------------------------------------------------------

    @property
    def damaged(self) -> bool:
        """Bytes or a close were swallowed by a blackhole: the stream can never be whole again."""
        return any(d.discarded or d.eof_swallowed for d in (self.upward, self.downward))

    @property
    def bytes_forwarded(self) -> int:
        return self.upward.forwarded + self.downward.forwarded

    @property
    def bytes_discarded(self) -> int:
        return self.upward.discarded + self.downward.discarded

    @property
    def bytes_buffered(self) -> int:
        return self.upward.buffered + self.downward.buffered

    # -- internals ---------------------------------------------------------------------------

    def _set(self, faults: Faults) -> None:
        if self.closed:
            return
        leaving_blackhole = self.faults.blackhole and not faults.blackhole
        self.faults = faults
        self.changed.fire()
        if leaving_blackhole and self.damaged:
            self.reset()

    def _direction_done(self) -> None:
        if self.upward.done and self.downward.done:
            self._close()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            # A socket error on either side (reset, broken pipe): the other side gets RST too,
            # like a router that learnt the connection is gone.
            self.reset()

    def _close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        for writer in (self._client_writer, self._upstream_writer):
            writer.close()
        self.proxy._forget(self)


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with RST instead of FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    writer.transport.abort()


class FaultProxy:
    """Listens on 127.0.0.1 (a free port unless given) and forwards to ``target_host:target_port``."""

    def __init__(self, target_port: int, target_host: str = LOOPBACK, *, listen_port: int = 0) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self._listen_port = listen_port
        self._server: asyncio.Server | None = None
        self.faults = Faults()  # applied to connections accepted from now on
        self.connections: list[ProxiedConnection] = []
        self.accepted = 0
        self.upstream_failures = 0
        self._numbers = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()  # pumps of live and closing connections
        self._handshakes: set[asyncio.Task[None]] = set()

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._on_client, LOOPBACK, self._listen_port)
        self._listen_port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.reset()
        for task in list(self._handshakes):
            task.cancel()
        await asyncio.gather(*self._handshakes, return_exceptions=True)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("FaultProxy is not started")
        return self._listen_port

    @property
    def url(self) -> str:
        """``nats://127.0.0.1:<port>``: where a NATS client should connect."""
        return f"nats://{LOOPBACK}:{self.port}"

    # -- commands (all connections, current and future) ------------------------------------

    def pause(self) -> None:
        self._set_all(replace(self.faults, paused=True))

    def resume(self) -> None:
        self._set_all(replace(self.faults, paused=False))

    def delay(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("delay must be >= 0")
        self._set_all(replace(self.faults, delay=seconds))

    def throttle(self, bytes_per_second: int | None) -> None:
        if bytes_per_second is not None and bytes_per_second <= 0:
            raise ValueError("throttle rate must be positive (or None to lift it)")
        self._set_all(replace(self.faults, rate=bytes_per_second))

    def blackhole(self) -> None:
        self._set_all(replace(self.faults, blackhole=True))

    def pass_through(self) -> None:
        """Lift every fault everywhere (blackholed connections that lost bytes are reset)."""
        self._set_all(Faults())

    def reset_all(self) -> None:
        """RST every current connection (new ones are accepted as usual)."""
        for conn in list(self.connections):
            conn.reset()

    async def wait_for_connections(self, count: int, timeout: float = 5.0) -> None:
        """Wait until at least ``count`` connections are open through the proxy (AssertionError if not)."""
        await wait_until(
            lambda: len(self.connections) >= count,
            timeout,
            message=lambda: f"{len(self.connections)} connections through the proxy, wanted {count}",
        )

    # -- internals ---------------------------------------------------------------------------

    def _set_all(self, faults: Faults) -> None:
        self.faults = faults
        for conn in list(self.connections):
            conn._set(faults)

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handshakes.add(task)
        try:
            await self._connect_upstream(reader, writer)
        finally:
            self._handshakes.discard(task)

    async def _connect_upstream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            upstream = await asyncio.wait_for(
                asyncio.open_connection(self.target_host, self.target_port), UPSTREAM_CONNECT_TIMEOUT
            )
        except (OSError, TimeoutError):
            # The server is down: the client sees its connection refused (reset), as without a proxy.
            self.upstream_failures += 1
            _rst(writer)
            return
        conn = ProxiedConnection(self, next(self._numbers), (reader, writer), upstream, self.faults)
        self.connections.append(conn)

    def _forget(self, conn: ProxiedConnection) -> None:
        with contextlib.suppress(ValueError):
            self.connections.remove(conn)
