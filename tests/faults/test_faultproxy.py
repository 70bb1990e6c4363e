"""The fault proxy itself, against a local echo server: each fault does what it says, quickly.

These tests prove the tool before the chaos scenarios rely on it: a pass-through is exact,
a pause builds real TCP backpressure and loses nothing, delay is added latency (not
serialisation), throttle bounds the rate, a blackhole swallows bytes and closes without
blocking the sender and resets on healing, and resets are RSTs on both ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from tests.faultproxy import PIPE_LIMIT, FaultProxy
from tests.helpers import wait_until

# Every wait here is on loopback: seconds are very generous.
EVENT_TIMEOUT = 5.0
# "Nothing arrives" is checked over this window: long next to loopback latency (microseconds).
QUIET_WINDOW = 0.2


@dataclass
class EchoServer:
    """Echoes every byte back; remembers what it received and how each connection ended."""

    port: int = 0
    received: bytearray = field(default_factory=bytearray)
    connections: int = 0
    endings: list[str] = field(default_factory=list)  # "eof" or an exception name, per connection
    echo: bool = True

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while data := await reader.read(65536):
                self.received += data
                if self.echo:
                    writer.write(data)
                    await writer.drain()
            self.endings.append("eof")
        except OSError as exc:
            self.endings.append(type(exc).__name__)
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def echo_server(echo: bool = True) -> AsyncIterator[EchoServer]:
    state = EchoServer(echo=echo)
    server = await asyncio.start_server(state.handle, "127.0.0.1", 0)
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        server.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def proxied_echo(echo: bool = True) -> AsyncIterator[tuple[EchoServer, FaultProxy]]:
    async with echo_server(echo) as echo_state, FaultProxy(echo_state.port) as proxy:
        yield echo_state, proxy


async def dial(proxy: FaultProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    count = len(proxy.connections)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    await proxy.wait_for_connections(count + 1, EVENT_TIMEOUT)
    return reader, writer


async def read_exactly(reader: asyncio.StreamReader, n: int) -> bytes:
    return await asyncio.wait_for(reader.readexactly(n), EVENT_TIMEOUT)


async def nothing_arrives(reader: asyncio.StreamReader) -> bool:
    try:
        data = await asyncio.wait_for(reader.read(1), QUIET_WINDOW)
    except TimeoutError:
        return True
    raise AssertionError(f"expected silence, got {data!r}")


async def test_pass_through_is_exact_for_bulk_data_both_ways() -> None:
    payload = os.urandom(3 * 1024 * 1024)
    async with proxied_echo() as (echo, proxy):
        reader, writer = await dial(proxy)

        async def send() -> None:
            writer.write(payload)
            await writer.drain()

        sender = asyncio.create_task(send())
        assert await read_exactly(reader, len(payload)) == payload
        await sender
        assert proxy.url == f"nats://127.0.0.1:{proxy.port}"
        writer.close()
        await wait_until(lambda: echo.endings == ["eof"], EVENT_TIMEOUT, message="close not forwarded")
        await wait_until(lambda: not proxy.connections, EVENT_TIMEOUT, message="connection not released")


async def test_pause_holds_everything_builds_backpressure_and_resume_delivers_all_in_order() -> None:
    async with proxied_echo() as (echo, proxy):
        reader, writer = await dial(proxy)
        writer.write(b"before")
        assert await read_exactly(reader, 6) == b"before"
        proxy.pause()
        flood = os.urandom(32 * 1024 * 1024)  # far more than kernel and proxy buffers hold
        writer.write(b"during" + flood)
        drained = asyncio.create_task(writer.drain())
        assert await nothing_arrives(reader)
        assert len(echo.received) == 6, "bytes crossed a paused proxy"
        assert not drained.done(), "the sender never felt backpressure"
        assert proxy.connections[0].bytes_buffered <= PIPE_LIMIT
        proxy.resume()
        assert await read_exactly(reader, 6 + len(flood)) == b"during" + flood
        await asyncio.wait_for(drained, EVENT_TIMEOUT)
        writer.close()


async def test_pause_applies_to_connections_accepted_later_until_resumed() -> None:
    async with proxied_echo() as (echo, proxy):
        proxy.pause()
        reader, writer = await dial(proxy)
        writer.write(b"hello")
        assert await nothing_arrives(reader)
        assert echo.received == b""
        proxy.resume()
        assert await read_exactly(reader, 5) == b"hello"
        writer.close()


async def test_faults_can_target_one_connection() -> None:
    async with proxied_echo() as (_, proxy):
        reader_a, writer_a = await dial(proxy)
        reader_b, writer_b = await dial(proxy)
        proxy.connections[0].pause()
        writer_a.write(b"a")
        writer_b.write(b"b")
        assert await read_exactly(reader_b, 1) == b"b"
        assert await nothing_arrives(reader_a)
        proxy.connections[0].resume()
        assert await read_exactly(reader_a, 1) == b"a"
        proxy.connections[1].reset()
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            await read_exactly(reader_b, 1)
        writer_a.write(b"still here")
        assert await read_exactly(reader_a, 10) == b"still here"
        writer_a.close()
        writer_b.close()


async def test_delay_adds_latency_each_way_without_serialising_messages() -> None:
    delay = 0.5  # well above a loaded machine's scheduling hiccups (the fast check below)
    messages = 20
    async with proxied_echo() as (_, proxy):
        reader, writer = await dial(proxy)
        proxy.delay(delay)
        loop = asyncio.get_running_loop()
        began = loop.time()
        for i in range(messages):
            writer.write(b"%03d" % i)
            await asyncio.sleep(0.005)  # separate segments, as separate messages would be
        writing = loop.time() - began  # 20 short sleeps: longer on a loaded machine, so measured
        got = await read_exactly(reader, 3 * messages)
        took = loop.time() - began
        assert got == b"".join(b"%03d" % i for i in range(messages))
        # Out and back: two delays; pipelined, so nowhere near one delay per message (10 s).
        assert 2 * delay <= took < writing + 2 * delay + 0.5, (took, writing)
        proxy.delay(0)
        began = loop.time()
        writer.write(b"fast")
        assert await read_exactly(reader, 4) == b"fast"
        assert loop.time() - began < delay
        writer.close()


async def test_throttle_bounds_the_rate_and_keeps_the_bytes() -> None:
    rate = 1_000_000
    size = 300_000
    payload = os.urandom(size)
    async with proxied_echo() as (_, proxy):
        reader, writer = await dial(proxy)
        proxy.throttle(rate)
        loop = asyncio.get_running_loop()
        began = loop.time()
        writer.write(payload)
        assert await read_exactly(reader, size) == payload
        took = loop.time() - began
        # Each direction is throttled; the two are pipelined, so the total is about size/rate.
        assert took >= 0.8 * size / rate, f"{size} bytes at {rate} B/s took only {took:.3f} s"
        assert took < 4 * size / rate + 0.5
        proxy.throttle(None)
        writer.close()


async def test_throttle_rejects_nonsense() -> None:
    async with proxied_echo() as (_, proxy):
        with pytest.raises(ValueError):
            proxy.throttle(0)
        with pytest.raises(ValueError):
            proxy.delay(-1)


async def test_blackhole_swallows_bytes_and_closes_without_blocking_the_sender() -> None:
    async with proxied_echo() as (echo, proxy):
        reader, writer = await dial(proxy)
        writer.write(b"ok")
        assert await read_exactly(reader, 2) == b"ok"
        proxy.blackhole()
        flood = os.urandom(16 * 1024 * 1024)
        writer.write(flood)
        # Unlike a pause, the sender's writes keep succeeding: the far end "reads" everything.
        await asyncio.wait_for(writer.drain(), EVENT_TIMEOUT)
        await wait_until(
            lambda: proxy.connections[0].bytes_discarded >= len(flood), EVENT_TIMEOUT, message="not swallowed"
        )
        assert echo.received == b"ok"
        assert await nothing_arrives(reader)
        conn = proxy.connections[0]
        assert conn.damaged


async def test_blackhole_hides_a_close_and_healing_resets_the_half_open_connection() -> None:
    async with proxied_echo() as (echo, proxy):
        _, writer = await dial(proxy)
        proxy.blackhole()
        writer.close()  # the server must not learn of this: it is half-open now
        await wait_until(lambda: proxy.connections[0].damaged, EVENT_TIMEOUT, message="close not seen")
        await asyncio.sleep(QUIET_WINDOW)  # the absence of an event is the point here
        assert echo.endings == []
        proxy.pass_through()  # healed: the server's side learns the truth, as an RST
        await wait_until(lambda: len(echo.endings) == 1, EVENT_TIMEOUT, message="server never told")
        assert echo.endings == ["ConnectionResetError"]
        assert not proxy.connections


async def test_blackhole_then_pass_through_resets_a_damaged_connection_but_new_ones_work() -> None:
    async with proxied_echo() as (_, proxy):
        reader, writer = await dial(proxy)
        proxy.blackhole()
        writer.write(b"lost")
        await wait_until(lambda: proxy.connections[0].damaged, EVENT_TIMEOUT, message="not swallowed")
        proxy.pass_through()
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            await read_exactly(reader, 1)
        writer.close()
        reader2, writer2 = await dial(proxy)
        writer2.write(b"fresh")
        assert await read_exactly(reader2, 5) == b"fresh"
        writer2.close()


async def test_blackhole_lifted_before_any_loss_keeps_the_connection() -> None:
    async with proxied_echo() as (_, proxy):
        reader, writer = await dial(proxy)
        proxy.blackhole()
        proxy.pass_through()
        writer.write(b"intact")
        assert await read_exactly(reader, 6) == b"intact"
        writer.close()


async def test_reset_all_sends_rst_to_both_ends_and_new_connections_still_work() -> None:
    async with proxied_echo() as (echo, proxy):
        readers = [await dial(proxy) for _ in range(3)]
        for reader, writer in readers:
            writer.write(b"x")
            assert await read_exactly(reader, 1) == b"x"
        proxy.reset_all()
        for reader, _ in readers:
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(1), EVENT_TIMEOUT)
        await wait_until(lambda: len(echo.endings) == 3, EVENT_TIMEOUT, message="server side not reset")
        assert set(echo.endings) == {"ConnectionResetError"}
        assert not proxy.connections
        reader, writer = await dial(proxy)
        writer.write(b"again")
        assert await read_exactly(reader, 5) == b"again"
        writer.close()


async def test_reset_works_on_a_paused_connection() -> None:
    async with proxied_echo() as (_, proxy):
        reader, writer = await dial(proxy)
        proxy.pause()
        writer.write(b"held")
        proxy.reset_all()
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(1), EVENT_TIMEOUT)


async def test_upstream_down_refuses_the_client_promptly() -> None:
    async with echo_server() as echo:
        port = echo.port
    async with FaultProxy(port) as proxy:  # nothing listens there any more
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            await read_exactly(reader, 1)
        assert proxy.upstream_failures == 1
        writer.close()


async def test_close_resets_everything_and_is_quick() -> None:
    async with echo_server() as echo:
        proxy = FaultProxy(echo.port)
        await proxy.start()
        reader, _ = await dial(proxy)
        proxy.pause()
        await asyncio.wait_for(proxy.close(), EVENT_TIMEOUT)
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            await read_exactly(reader, 1)
