"""Closing a server hands over without dropping start frames already delivered to it.

This is what a credential rotation does: the new connection's server subscribes, then the old
one closes. A start the NATS server delivered to the old subscription before it saw the UNSUB
must still be served, not dropped to wait for its caller's republish.

(nats-server can still deliver a start a moment *after* the UNSUB round trip: the publisher's
side picked the queue member before the UNSUB. The client library drops those; the caller's
republish reaches the new server. So the test asserts on what the subscription was delivered.)
"""

from __future__ import annotations

import asyncio

import tunnel
from cli.nats_server import NatsServer
from tests.helpers import wait_until
from tests.integration.tunnel_harness import EVENT_TIMEOUT, Peers, connect_peers

HOST = "drain.example"
BURST = 10
CYCLES = 12  # without the drain, a cycle drops a queued start every few runs


async def _echo_path(req: tunnel.Request) -> tunnel.Response:
    return tunnel.Response(200, [], req.path.encode())


async def _close_under_load(p: Peers, nats_server: NatsServer) -> None:
    old_nc = await p.connect(nats_server.url, "tunnel-server-old")
    new_nc = await p.connect(nats_server.url, "tunnel-server-new")
    old = await tunnel.serve(old_nc, HOST, _echo_path)
    request_sub = old._request_sub
    assert request_sub is not None
    new = await tunnel.serve(new_nc, HOST, _echo_path)
    client = tunnel.TunnelClient(p.caller_nc, republish_interval=0.2, first_frame_timeout=EVENT_TIMEOUT)
    fetches: list[asyncio.Task[tunnel.Response]] = []
    closed = asyncio.Event()

    async def keep_calling() -> None:
        """Starts keep arriving while the old server closes: some are on their way to it."""
        while not closed.is_set():
            for _ in range(BURST):
                fetches.append(asyncio.create_task(client.fetch(f"tunnel://{HOST}/{len(fetches)}")))
            await asyncio.sleep(0.001)  # pacing the load, not synchronisation

    try:
        caller = asyncio.create_task(keep_calling())
        await wait_until(lambda: old.stats.requests >= BURST, message="the old server got no requests")
        await old.close(timeout=EVENT_TIMEOUT)
        closed.set()
        await caller
        for i, fetch in enumerate(fetches):
            async with await fetch as resp:
                assert resp.status == 200
                assert await resp.read() == f"/{i}".encode()
    finally:
        closed.set()
        await new.close(timeout=1.0)
        await old.close(timeout=0)
    handled = old.stats.requests + old.stats.repeated_starts
    assert request_sub.delivered == handled, "the closing server dropped a start it had been delivered"
    assert old.stats.outcomes.get("server_closing", 0) == 0


async def test_closing_server_serves_every_start_it_was_delivered(nats_server: NatsServer) -> None:
    async with connect_peers(nats_server) as p:
        for _ in range(CYCLES):
            await _close_under_load(p, nats_server)
    assert not p.errors
