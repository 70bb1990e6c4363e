"""A daemon protects itself: callers that stop making progress, and floods of requests.

Against a real nats-server. A caller that never grants credit (never reads the response,
a slow-loris) or never sends the request body it announced is timed out by the server's
stall timeout with ``tunnel_stalled``, and everything the server held for it is released.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

import tunnel
from cli.nats_server import NatsServer
from tests.helpers import wait_until
from tests.integration.tunnel_harness import EVENT_TIMEOUT, KiB, connect_peers, serving
from tests.integration.v1_peer import V1Caller

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
        serving(p.server_nc, HOST, handler, config=tunnel.ServerConfig(stall_timeout=STALL)) as server,
    ):
        # No idle timeout on our side: only the server's stall timeout can end this.
        client = tunnel.TunnelClient(
            p.caller_nc, limits=tunnel.Limits(window=WINDOW), timeouts=tunnel.Timeouts(idle=None)
        )
        resp = await client.fetch(f"tunnel://{HOST}/endless")
        assert server.in_flight == 1
        # Never read: the server spends its window, then waits for credit that never comes.
        await wait_until(
            lambda: server.in_flight == 0 and server.stats.active == 0,
            timeout=STALL + EVENT_TIMEOUT,
            message="the server still holds a request whose caller stopped reading",
        )
        assert server.stats.outcomes["tunnel_stalled"] == 1
        assert server.dispatch.active == {}
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
        client = tunnel.TunnelClient(p.caller_nc, limits=tunnel.Limits(window=WINDOW))
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
        serving(p.server_nc, HOST, handler, config=tunnel.ServerConfig(stall_timeout=STALL)) as server,
    ):
        client = tunnel.TunnelClient(p.caller_nc, timeouts=tunnel.Timeouts(idle=None))
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
            assert server.max_concurrent == 256  # the default bounds a flood
            async with await tunnel.TunnelClient(p.caller_nc).fetch(f"tunnel://{HOST}/") as resp:
                assert resp.status == 204
        finally:
            await server.close(timeout=1.0)


@pytest.mark.parametrize(
    ("fast_path", "method"), [(True, "GET"), (True, "POST"), (False, "GET"), (False, "POST")]
)
async def test_a_flood_beyond_max_concurrent_is_answered_503_with_retry_after(
    nats_server: NatsServer, fast_path: bool, method: str
) -> None:
    limit = 4
    release = asyncio.Event()
    running = 0
    ran = 0

    async def handler(req: tunnel.Request) -> tunnel.Response:
        nonlocal running, ran
        running += 1
        ran += 1
        try:
            body = await req.read()
            await release.wait()  # slow: holds its slot until the test lets go
            return tunnel.Response(200, [], b"done:" + body)
        finally:
            running -= 1

    async with (
        connect_peers(nats_server) as p,
        serving(p.server_nc, HOST, handler, config=tunnel.ServerConfig(max_concurrent=limit)) as server,
    ):
        assert server.max_concurrent == limit
        client = tunnel.TunnelClient(p.caller_nc, fast_path=fast_path)
        body = b"payload" if method == "POST" else None

        async def call(i: int) -> tuple[int, str | None, bytes]:
            async with await client.fetch(f"tunnel://{HOST}/slow/{i}", method=method, body=body) as resp:
                return resp.status, resp.header("retry-after"), await resp.read()

        tasks = [asyncio.create_task(call(i)) for i in range(2 * limit)]
        # The refused half is answered while the admitted half is still running: no waiting for a slot.
        await wait_until(lambda: sum(t.done() for t in tasks) == limit, timeout=EVENT_TIMEOUT)
        assert running == limit and server.in_flight == limit
        refused = [t.result() for t in tasks if t.done()]
        for status, retry_after, payload in refused:
            assert (status, retry_after) == (503, "1")
            assert json.loads(payload)["error"]["code"] == "too_many_requests"
        release.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks), EVENT_TIMEOUT)
        expected_ok = b"done:" + (body or b"")
        assert sorted(r[0] for r in results) == [200] * limit + [503] * limit
        assert all(r[2] == expected_ok for r in results if r[0] == 200)
        assert ran == limit  # the refused requests never ran the handler
        stats = server.stats
        assert stats.overloaded == limit and stats.peak_active == limit
        assert stats.outcomes["too_many_requests"] == limit
        await wait_until(lambda: server.in_flight == 0 and stats.active == 0, timeout=EVENT_TIMEOUT)
        # Healthy afterwards: a full batch of `limit` runs without a single 503.
        again = await asyncio.wait_for(asyncio.gather(*(call(i) for i in range(limit))), EVENT_TIMEOUT)
        assert [r[0] for r in again] == [200] * limit
        assert client.in_flight == 0
    assert p.errors == []


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, None])
async def test_max_concurrent_must_be_a_positive_integer(nats_server: NatsServer, bad: object) -> None:
    async def handler(req: tunnel.Request) -> tunnel.Response:
        return tunnel.Response(204)

    async with connect_peers(nats_server) as p:
        with pytest.raises(ValueError, match="max_concurrent"):
            await tunnel.serve(p.server_nc, HOST, handler, config=tunnel.ServerConfig(max_concurrent=bad))  # type: ignore[arg-type]


async def test_a_reference_v1_caller_over_the_limit_gets_a_plain_v1_503(nats_server: NatsServer) -> None:
    release = asyncio.Event()

    async def handler(req: tunnel.Request) -> tunnel.Response:
        await release.wait()
        return tunnel.Response(200, [], b"ok")

    async with (
        connect_peers(nats_server) as p,
        serving(p.server_nc, HOST, handler, config=tunnel.ServerConfig(max_concurrent=1)) as server,
    ):
        caller = V1Caller(p.caller_nc)
        busy = asyncio.create_task(caller.request(f"tunnel://{HOST}/first"))
        await wait_until(lambda: server.in_flight == 1, timeout=EVENT_TIMEOUT)
        async with asyncio.timeout(EVENT_TIMEOUT):
            refused = await caller.request(f"tunnel://{HOST}/second", method="POST", body=b"data")
        assert refused.status == 503
        assert ("retry-after", "1") in refused.headers
        assert json.loads(refused.body)["error"]["code"] == "too_many_requests"
        release.set()
        first = await asyncio.wait_for(busy, EVENT_TIMEOUT)
        assert (first.status, first.body) == (200, b"ok")
        assert caller.unknown_frames == [] and caller.log.violations == []  # plain v1 frames only
    assert p.errors == []
