"""Upgraded streams end to end through a real nats-server (the core under tunnel.websocket).

A handler that answers ``Response(101, body=...)`` to a request with ``request.upgrade``
opens a byte stream in both directions; these tests use raw bytes (no WebSocket framing) to
check the stream itself: both directions at once, byte-exact under flow control, half-close,
a quiet stream outliving the stall timeout, either end vanishing, and the typed refusal of a
server that cannot carry upgrades.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

import tunnel
from cli.nats_server import NatsServer
from tests.helpers import wait_until
from tests.integration.tunnel_harness import EVENT_TIMEOUT, MiB, WireLog, connect_peers, serving
from tunnel import _frames as frames

HOST = "desk.example"
URL = f"tunnel://{HOST}/socket?room=1"
UPGRADE_HEADERS = [("upgrade", "x-raw"), ("connection", "Upgrade")]


class Pipe:
    """An async iterable fed by the test: the caller->server direction of a stream."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=4)

    async def send(self, data: bytes) -> None:
        await self.queue.put(data)

    async def close(self) -> None:
        await self.queue.put(None)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while (item := await self.queue.get()) is not None:
            yield item


async def echo(request: tunnel.Request) -> tunnel.Response:
    """Echo every byte back; the stream ends when the caller half-closes."""
    if not request.upgrade:
        return tunnel.Response(426, [("content-type", "text/plain")], b"upgrade required")

    async def back() -> AsyncIterator[bytes]:
        async for chunk in request.stream():
            yield chunk

    return tunnel.Response(101, [("upgrade", "x-raw"), ("x-path", request.url)], back())


async def test_bytes_flow_both_ways_at_once_byte_exact_and_a_half_close_ends_the_stream(
    nats_server: NatsServer,
) -> None:
    async with connect_peers(nats_server) as peers, serving(peers.server_nc, HOST, echo):
        client = tunnel.TunnelClient(peers.caller_nc, limits=tunnel.Limits(window=256 * 1024))
        pipe = Pipe()
        resp = await client.fetch(URL, headers=UPGRADE_HEADERS, body=pipe, upgrade=True)
        assert resp.status == 101 and resp.upgraded
        assert resp.header("x-path") == "/socket?room=1"
        total = 8 * MiB  # 32 windows each way: flow control in both directions at once
        sent, got = hashlib.sha256(), hashlib.sha256()

        async def produce() -> None:
            for i in range(total // (64 * 1024)):
                piece = i.to_bytes(4, "big") * (16 * 1024)
                sent.update(piece)
                await pipe.send(piece)
            await pipe.close()  # half-close: the echo ends, and with it the stream

        producer = asyncio.create_task(produce())
        received = 0
        async for chunk in resp.aiter_bytes():
            got.update(chunk)
            received += len(chunk)
        await producer
        assert received == total and got.digest() == sent.digest()
        await client.aclose()


async def test_the_server_pushes_while_the_caller_says_nothing(nats_server: NatsServer) -> None:
    async def push(request: tunnel.Request) -> tunnel.Response:
        async def updates() -> AsyncIterator[bytes]:
            for i in range(3):
                yield f"update {i}\n".encode()

        return tunnel.Response(101, [], updates())

    async with connect_peers(nats_server) as peers, serving(peers.server_nc, HOST, push):
        resp = await tunnel.fetch(peers.caller_nc, URL, headers=UPGRADE_HEADERS, upgrade=True)
        assert resp.upgraded
        assert await resp.read() == b"update 0\nupdate 1\nupdate 2\n"


async def test_a_refused_upgrade_arrives_as_the_ordinary_response(nats_server: NatsServer) -> None:
    async def refuse(request: tunnel.Request) -> tunnel.Response:
        assert request.upgrade
        return tunnel.Response(403, [("content-type", "text/plain")], b"not you")

    async with connect_peers(nats_server) as peers, serving(peers.server_nc, HOST, refuse):
        resp = await tunnel.fetch(peers.caller_nc, URL, headers=UPGRADE_HEADERS, body=Pipe(), upgrade=True)
        assert resp.status == 403 and not resp.upgraded
        assert await resp.read() == b"not you"


async def test_a_server_in_plain_v1_mode_is_refused_with_a_typed_error_and_its_handler_stopped(
    nats_server: NatsServer,
) -> None:
    ran = asyncio.Event()
    stopped = asyncio.Event()

    async def v1_handler(request: tunnel.Request) -> tunnel.Response:
        ran.set()
        try:
            await asyncio.Event().wait()
        finally:
            stopped.set()
        raise AssertionError("unreachable")

    config = tunnel.ServerConfig(fast_path=False)
    async with connect_peers(nats_server) as peers, serving(peers.server_nc, HOST, v1_handler, config=config):
        try:
            await tunnel.fetch(peers.caller_nc, URL, headers=UPGRADE_HEADERS, body=Pipe(), upgrade=True)
        except tunnel.UpgradeUnsupported as exc:
            assert exc.code == "tunnel_upgrade_unsupported" and "plain v1" in exc.message
        else:
            raise AssertionError("a v1 server cannot carry an upgrade")
        # The caller's abort reaches the v1 server: its handler does not run on.
        if ran.is_set():
            await asyncio.wait_for(stopped.wait(), EVENT_TIMEOUT)


async def test_a_quiet_stream_outlives_the_stall_timeout_many_times_over(nats_server: NatsServer) -> None:
    tap = WireLog()
    async with (
        connect_peers(nats_server) as peers,
        serving(peers.server_nc, HOST, echo, config=tunnel.ServerConfig(stall_timeout=0.2), wire_tap=tap),
    ):
        # Heartbeats every 0.4 s (a third of the idle timeout): a stall of a loaded machine
        # (caller and server share this process) up to ~0.8 s costs nothing.
        client = tunnel.TunnelClient(peers.caller_nc, timeouts=tunnel.Timeouts(idle=1.2))
        pipe = Pipe()
        resp = await client.fetch(URL, headers=UPGRADE_HEADERS, body=pipe, upgrade=True)
        assert resp.upgraded

        def heartbeats() -> int:
            return sum(isinstance(fr, frames.ResponseHeartbeat) for fr in tap.frames())

        # 8 heartbeats at 0.4 s: 16 stall timeouts of silence in both directions.
        await wait_until(lambda: heartbeats() >= 8, timeout=EVENT_TIMEOUT * 2)
        await pipe.send(b"still there?")
        chunks = resp.aiter_bytes()
        assert await anext(chunks) == b"still there?"
        await pipe.close()
        assert [c async for c in chunks] == []
        await client.aclose()


async def test_the_server_stops_the_handler_of_a_caller_that_vanished(nats_server: NatsServer) -> None:
    cancelled = asyncio.Event()

    async def hold(request: tunnel.Request) -> tunnel.Response:
        async def wait_for_cancel() -> AsyncIterator[bytes]:
            yield b"ready"
            try:
                await asyncio.Event().wait()
            finally:  # the server cancels the handler's task: the body sees CancelledError here
                if request.is_cancelled:
                    cancelled.set()

        return tunnel.Response(101, [], wait_for_cancel())

    async with connect_peers(nats_server) as peers, serving(peers.server_nc, HOST, hold) as server:
        caller_nc = await peers.connect(nats_server.url, "vanishing-caller")
        client = tunnel.TunnelClient(caller_nc, timeouts=tunnel.Timeouts(idle=0.6))
        resp = await client.fetch(URL, headers=UPGRADE_HEADERS, body=Pipe(), upgrade=True)
        assert await anext(resp.aiter_bytes()) == b"ready"
        assert server.in_flight == 1
        # No abort, no goodbye: the connection just goes (a laptop lid closing).
        await caller_nc.close()
        await asyncio.wait_for(cancelled.wait(), EVENT_TIMEOUT)
        await wait_until(lambda: server.in_flight == 0, timeout=EVENT_TIMEOUT)
        assert server.stats.outcomes["tunnel_idle_timeout"] == 1


async def test_the_caller_learns_within_its_idle_timeout_that_the_server_vanished(
    nats_server: NatsServer,
) -> None:
    async def hold(request: tunnel.Request) -> tunnel.Response:
        async def forever() -> AsyncIterator[bytes]:
            yield b"ready"
            await asyncio.Event().wait()

        return tunnel.Response(101, [], forever())

    async with connect_peers(nats_server) as peers:
        server_nc = await peers.connect(nats_server.url, "vanishing-desktop")
        await tunnel.serve(server_nc, HOST, hold)
        client = tunnel.TunnelClient(peers.caller_nc, timeouts=tunnel.Timeouts(idle=0.5))
        resp = await client.fetch(URL, headers=UPGRADE_HEADERS, body=Pipe(), upgrade=True)
        chunks = resp.aiter_bytes()
        assert await anext(chunks) == b"ready"
        await server_nc.close()  # the desktop's connection is gone, no frames follow
        try:
            await asyncio.wait_for(anext(chunks), EVENT_TIMEOUT)
        except tunnel.IdleTimeout:
            pass
        else:
            raise AssertionError("a vanished server must end the stream with a typed error")
