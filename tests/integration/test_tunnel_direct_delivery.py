"""The caller's reply and the server's start and up subscriptions hand each message over in
nats-py's read loop (no queue, no task).

Checked against a real nats-server: order kept, no subscription task, nats-py's pending
counters stay at zero (so a long, fast reply stream is never cut as a slow consumer), a
handler bug does not stop the connection, and unsubscribe/drain still work.
"""

from __future__ import annotations

import nats
from nats.aio.msg import Msg

import tunnel
from cli.nats_server import NatsServer
from tests.helpers import wait_until
from tunnel._natsio.common import flush_everything
from tunnel._natsio.direct import subscribe_direct


async def test_messages_arrive_in_order_without_a_task_or_pending_bytes(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        seen: list[bytes] = []
        sub = await subscribe_direct(nc, "direct.test", lambda msg: seen.append(msg.data))
        assert sub._wait_for_msgs_task is None  # nothing between the read loop and us
        payload = b"x" * 60_000
        count = 2_000  # 120 MB: past nats-py's 64 MiB pending-bytes limit if nothing were subtracted
        pub = await nats.connect(nats_server.url)
        try:
            for i in range(count):
                await pub.publish("direct.test", i.to_bytes(4, "big") + payload)
            await pub.flush()
        finally:
            await pub.close()
        await wait_until(lambda: len(seen) == count, timeout=30, message=f"{count} messages")
        assert [int.from_bytes(d[:4], "big") for d in seen] == list(range(count))
        assert sub._pending_size == 0 and sub.pending_msgs == 0
        await sub.unsubscribe()
        await nc.publish("direct.test", b"after")
        await flush_everything(nc)
        assert len(seen) == count
    finally:
        await nc.close()


async def test_a_failing_handler_is_logged_and_the_connection_keeps_reading(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        seen: list[bytes] = []

        def deliver(msg: Msg) -> None:
            if msg.data == b"boom":
                raise RuntimeError("a bug in a handler")
            seen.append(msg.data)

        await subscribe_direct(nc, "direct.fail", deliver)
        for data in (b"one", b"boom", b"two"):
            await nc.publish("direct.fail", data)
        await flush_everything(nc)
        await wait_until(lambda: seen == [b"one", b"two"], message="the messages around the failure")
        assert nc.is_connected
    finally:
        await nc.close()


async def test_drain_of_a_direct_subscription_completes(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    seen: list[bytes] = []
    await subscribe_direct(nc, "direct.drain", lambda msg: seen.append(msg.data))
    await nc.publish("direct.drain", b"last")
    await flush_everything(nc)
    await wait_until(lambda: seen == [b"last"], message="the message")
    await nc.drain()  # waits on each subscription's pending queue: ours is always empty
    assert nc.is_closed


async def test_tunnel_replies_use_the_direct_path(nats_server: NatsServer) -> None:
    async def ok(request: tunnel.Request) -> tunnel.Response:
        return tunnel.Response(200, [], b"here")

    snc = await nats.connect(nats_server.url)
    cnc = await nats.connect(nats_server.url)
    try:
        server = await tunnel.serve(snc, "direct.example", ok)
        client = tunnel.TunnelClient(cnc)
        response = await client.fetch("tunnel://direct.example/")
        assert (response.status, await response.read()) == (200, b"here")
        reply_subs = [s for s in cnc._subs.values() if s.subject.endswith(".reply") or "reply" in s.subject]
        assert reply_subs and all(s._wait_for_msgs_task is None for s in reply_subs)
        await client.aclose()
        await server.close()
    finally:
        await cnc.close()
        await snc.close()


async def test_request_body_frames_reach_the_server_on_the_direct_path(nats_server: NatsServer) -> None:
    """Upload chunks go from nats-py's read loop to the handler: no subscription task, no queue."""

    async def count(request: tunnel.Request) -> tunnel.Response:
        return tunnel.Response(200, [], str(len(await request.read())).encode())

    snc = await nats.connect(nats_server.url)
    cnc = await nats.connect(nats_server.url)
    try:
        server = await tunnel.serve(snc, "direct.example", count)
        client = tunnel.TunnelClient(cnc)
        body = bytes(3 * 1024 * 1024)
        response = await client.fetch("tunnel://direct.example/", method="PUT", body=body)
        assert (response.status, await response.read()) == (200, str(len(body)).encode())
        up_subs = [s for s in snc._subs.values() if ".up." in s.subject]
        assert len(up_subs) == 1 and up_subs[0]._wait_for_msgs_task is None
        assert up_subs[0].pending_bytes == 0
        await client.aclose()
        await server.close()
    finally:
        await cnc.close()
        await snc.close()
