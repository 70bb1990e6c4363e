"""Closing a server hands over without dropping start frames already delivered to it.

This is what a credential rotation does: the new connection's server subscribes, then the old
one closes. A start the NATS server delivered to the old subscription before it saw the UNSUB
must still be served, not dropped to wait for its caller's republish. And when the drain
cannot finish (the link is down), the closed server's subscription must be gone for good:
nats-py would otherwise subscribe it again on the next reconnect.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import tunnel
import tunnel._natsio.server as server_module
from cli.nats_server import NatsServer
from tests.faultproxy import FaultProxy
from tests.helpers import wait_until
from tests.integration.tunnel_harness import EVENT_TIMEOUT, connect_peers, log_writes
from tunnel._natsio.common import drain_subscription, flush_everything

HOST = "drain.example"
QUEUED = 20


async def _echo_path(req: tunnel.Request) -> tunnel.Response:
    return tunnel.Response(200, [], req.path.encode())


class GatedServer(tunnel.TunnelServer):
    """Starts reach it at once (in nats-py's read loop), but what they need on the wire before
    their handler runs (the ack a request body waits for) waits for ``gate``: the requests are
    ours, not yet running, while close() begins."""

    gate: asyncio.Event

    async def _accept(self, req: Any, publishes: list[Any], needs_body_sub: bool) -> None:
        await self.gate.wait()
        await super()._accept(req, publishes, needs_body_sub)


async def test_closing_server_serves_the_starts_it_already_received(
    nats_server: NatsServer,
) -> None:
    GatedServer.gate = asyncio.Event()
    async with connect_peers(nats_server) as p:
        server = await tunnel.serve(p.server_nc, HOST, _echo_path, server_class=GatedServer)
        request_sub = server._request_sub
        assert request_sub is not None
        # No other server and no republish: a dropped start would end in a first-frame timeout.
        client = tunnel.TunnelClient(
            p.caller_nc, timeouts=tunnel.Timeouts(republish_interval=60.0, first_frame=EVENT_TIMEOUT)
        )
        fetches = [
            asyncio.ensure_future(client.fetch(f"tunnel://{HOST}/{i}", method="POST", body=b"x"))
            for i in range(QUEUED)
        ]
        await wait_until(lambda: request_sub.delivered == QUEUED, message="the starts never arrived")
        closing = asyncio.ensure_future(server.close(timeout=EVENT_TIMEOUT))
        # close() has drained its start subscription, with every request accepted and none running.
        await wait_until(lambda: request_sub._id not in p.server_nc._subs, message="the drain never ended")
        GatedServer.gate.set()
        await closing
        for i, fetch in enumerate(fetches):
            async with await fetch as resp:
                assert resp.status == 200 and await resp.read() == f"/{i}".encode()
        assert server.stats.requests == QUEUED
        await client.aclose()
    assert not p.errors


async def test_a_drain_that_cannot_finish_still_removes_the_subscription(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_module, "REQUEST_DRAIN_LIMIT", 0.3)
    async with FaultProxy(nats_server.port) as proxy, connect_peers(nats_server) as p:
        server_nc = await p.connect(proxy.url, "tunnel-server-behind-proxy")
        server = await tunnel.serve(server_nc, HOST, _echo_path)
        request_sub = server._request_sub
        assert request_sub is not None
        proxy.pause()  # the drain's flush gets no answer
        await server.close(timeout=EVENT_TIMEOUT)
        assert request_sub._id not in server_nc._subs, "the closed server's subscription would come back"
        proxy.pass_through()
        proxy.reset_all()  # nats-py reconnects and re-subscribes what it still knows
        # nats-py waits out reconnect_time_wait (2 s, plus jitter) since its last attempt first.
        await wait_until(lambda: server_nc.is_connected and server_nc.stats["reconnects"] >= 1, 10.0)
        await flush_everything(server_nc)
        # Nobody serves the host now: the caller learns it at once instead of a first-frame timeout.
        client = tunnel.TunnelClient(p.caller_nc, timeouts=tunnel.Timeouts(unreachable_grace=0))
        with pytest.raises(tunnel.TunnelUnreachable):
            await client.fetch(f"tunnel://{HOST}/")
        await client.aclose()


async def test_close_returns_only_after_nats_has_the_unsub(nats_server: NatsServer) -> None:
    """nats-py's drain flushes with a PING written ahead of its UNSUB: its PONG proved nothing,
    so close() could return with NATS still routing starts to the closed server (CI: a caller's
    next start was lost there and cost a republish). A PING must follow the UNSUB."""
    async with connect_peers(nats_server) as p:
        server = await tunnel.serve(p.server_nc, HOST, _echo_path)
        request_sub = server._request_sub
        assert request_sub is not None
        written = log_writes(p.server_nc)
        await server.close(timeout=EVENT_TIMEOUT)
        unsub = [b"UNSUB", str(request_sub._id).encode()]
        first_unsub = next(i for i, data in enumerate(written) if data.split() == unsub)
        assert b"PING\r\n" in written[first_unsub + 1 :], written
        assert request_sub._id not in p.server_nc._subs
    assert not p.errors


async def test_draining_a_callback_subscription_hands_every_queued_message_to_its_callback(
    nats_server: NatsServer,
) -> None:
    """drain_subscription on an ordinary (queued) subscription: what NATS delivered before the
    UNSUB goes through the callback before it returns; then the subscription is gone."""
    async with connect_peers(nats_server) as p:
        got: list[bytes] = []

        async def slow_callback(msg: Any) -> None:
            await asyncio.sleep(0)  # (a callback that yields: messages wait in the queue)
            got.append(msg.data)

        sub = await p.server_nc.subscribe("drain.queued", cb=slow_callback)
        await flush_everything(p.server_nc)
        for i in range(50):
            await p.caller_nc.publish("drain.queued", str(i).encode())
        await flush_everything(p.caller_nc)  # NATS has routed all 50 before the UNSUB below
        await drain_subscription(p.server_nc, sub)
        assert got == [str(i).encode() for i in range(50)]
        assert sub._id not in p.server_nc._subs
    assert not p.errors
