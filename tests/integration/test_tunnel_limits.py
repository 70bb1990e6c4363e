"""A daemon protects itself: callers that stop making progress, and floods of requests.

Against a real nats-server. A caller that never grants credit (never reads the response,
a slow-loris) or never sends the request body it announced is timed out by the server's
stall timeout with ``tunnel_stalled``, and everything the server held for it is released.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

import tunnel
from cli.nats_server import NatsServer
from tests.helpers import wait_until
from tests.integration.tunnel_harness import EVENT_TIMEOUT, KiB, connect_peers, serving

HOST = "limits.example"
STALL = 1.0
WINDOW = 64 * KiB


class EndlessBody:
    """An async-iterator response body that never ends; records that the server closed it."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()
        self.sent = 0
        # Held here, so only an explicit aclose() (not the garbage collector) can run its finally.
        self.gen = self._gen()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self.gen

    async def _gen(self) -> AsyncIterator[bytes]:
        try:
            while True:
                self.sent += 16 * KiB
                yield b"x" * (16 * KiB)
        finally:
            self.closed.set()


async def test_caller_that_never_reads_is_stalled_out_and_its_memory_released(
    nats_server: NatsServer,
) -> None:
    body = EndlessBody()

    async def handler(req: tunnel.Request) -> tunnel.Response:
        return tunnel.Response(200, [], body)

    async with (
        connect_peers(nats_server) as p,
        serving(p.server_nc, HOST, handler, stall_timeout=STALL) as server,
    ):
        # No idle timeout on our side: only the server's stall timeout can end this.
        client = tunnel.TunnelClient(p.caller_nc, window=WINDOW, idle_timeout=None)
        resp = await client.fetch(f"tunnel://{HOST}/endless")
        assert server.in_flight == 1
        # Never read: the server spends its window, then waits for credit that never comes.
        await wait_until(
            lambda: server.in_flight == 0 and server.stats.active == 0,
            timeout=STALL + EVENT_TIMEOUT,
            message="the server still holds a request whose caller stopped reading",
        )
        assert server.stats.outcomes["tunnel_stalled"] == 1
        assert server._active == {}
        # The handler's endless body was closed, not left suspended forever.
        await asyncio.wait_for(body.closed.wait(), EVENT_TIMEOUT)
        assert body.sent <= WINDOW + 64 * KiB  # it never produced far past the window
        # The caller learns why, with its own code: not a deadline it never set.
        with pytest.raises(tunnel.StallTimeout, match="stopped granting flow-control credit") as caught:
            await resp.read()
        assert caught.value.code == "tunnel_stalled"
        assert client.in_flight == 0
        # The server is fine afterwards.
        async with await client.fetch(f"tunnel://{HOST}/again") as again:
            assert again.status == 200
            await again.aclose()
    assert p.errors == []


async def test_caller_leaving_mid_body_closes_the_handlers_body_iterator(nats_server: NatsServer) -> None:
    body = EndlessBody()

    async def handler(req: tunnel.Request) -> tunnel.Response:
        return tunnel.Response(200, [], body)

    async with connect_peers(nats_server) as p, serving(p.server_nc, HOST, handler) as server:
        client = tunnel.TunnelClient(p.caller_nc, window=WINDOW)
        async with await client.fetch(f"tunnel://{HOST}/endless") as resp:
            got = 0
            async for chunk in resp.aiter_bytes():
                got += len(chunk)
                if got >= 4 * WINDOW:
                    break  # leave early: the async with aborts the server side
        await asyncio.wait_for(body.closed.wait(), EVENT_TIMEOUT)
        await wait_until(lambda: server.in_flight == 0, timeout=EVENT_TIMEOUT)
        assert server.stats.outcomes["tunnel_aborted"] == 1
    assert p.errors == []


async def test_caller_that_never_sends_its_announced_body_is_stalled_out(nats_server: NatsServer) -> None:
    handler_saw: list[BaseException] = []

    async def handler(req: tunnel.Request) -> tunnel.Response:
        try:
            return tunnel.Response(200, [], await req.read())
        except BaseException as exc:
            handler_saw.append(exc)
            raise

    never = asyncio.Event()

    async def silent_body() -> AsyncIterator[bytes]:
        yield b"first"
        await never.wait()  # a slow-loris upload: one piece, then nothing, forever
        yield b"never"

    async with (
        connect_peers(nats_server) as p,
        serving(p.server_nc, HOST, handler, stall_timeout=STALL) as server,
    ):
        client = tunnel.TunnelClient(p.caller_nc, idle_timeout=None)
        with pytest.raises(tunnel.StallTimeout, match="no request-body bytes") as caught:
            await asyncio.wait_for(
                client.fetch(f"tunnel://{HOST}/upload", method="POST", body=silent_body()),
                STALL + EVENT_TIMEOUT,
            )
        assert caught.value.code == "tunnel_stalled"
        await wait_until(lambda: server.in_flight == 0 and server.stats.active == 0, timeout=EVENT_TIMEOUT)
        assert server.stats.outcomes["tunnel_stalled"] == 1
        assert handler_saw and isinstance(handler_saw[0], tunnel.TunnelError | asyncio.CancelledError)
        assert client.in_flight == 0
    assert p.errors == []


async def test_serve_instantiates_the_server_class_it_is_given(nats_server: NatsServer) -> None:
    class CountingServer(tunnel.TunnelServer):
        started = 0

        async def start(self) -> None:
            type(self).started += 1
            await super().start()

    async def handler(req: tunnel.Request) -> tunnel.Response:
        return tunnel.Response(204)

    async with connect_peers(nats_server) as p:
        server = await tunnel.serve(p.server_nc, HOST, handler, server_class=CountingServer)
        try:
            assert type(server) is CountingServer and CountingServer.started == 1
            async with await tunnel.TunnelClient(p.caller_nc).fetch(f"tunnel://{HOST}/") as resp:
                assert resp.status == 204
        finally:
            await server.close(timeout=1.0)
