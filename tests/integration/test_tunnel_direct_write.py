"""The first publish of each event-loop pass goes to the socket at once (tunnel._natsio.direct_write).

Checked against a real nats-server: a lone publish skips nats-py's pending list and flusher
yet arrives; publishes mixed between the direct path and nats-py's keep their order, in one
pass and across passes; a disconnected client's publishes go through nats-py's reconnect
buffer and still arrive; a client without the known internals gets no direct writer.
"""

from __future__ import annotations

import asyncio

import nats
from nats.aio.client import Client

from cli.nats_server import NatsServer
from tests.helpers import wait_until
from tunnel._events import Publish
from tunnel._natsio.common import Publisher
from tunnel._natsio.direct_write import DirectWriter


async def collect(nc: Client, subject: str) -> list[bytes]:
    seen: list[bytes] = []

    async def on_msg(msg: nats.aio.msg.Msg) -> None:
        seen.append(msg.data)

    await nc.subscribe(subject, cb=on_msg)
    await nc.flush()
    return seen


async def test_a_lone_publish_is_written_at_once_and_arrives(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    watcher = await nats.connect(nats_server.url)
    try:
        seen = await collect(watcher, "dw.lone")
        writer = DirectWriter.for_client(nc)
        assert writer is not None
        sent_before = nc.stats["out_msgs"]
        assert writer.try_write("dw.lone", None, b"first")
        assert nc._pending_data_size == 0 and nc.stats["out_msgs"] == sent_before + 1
        assert not writer.try_write("dw.lone", None, b"second")  # one per pass: nats-py batches the rest
        await asyncio.sleep(0)  # the next pass
        await asyncio.sleep(0)
        assert writer.try_write("dw.lone", "dw.reply", b"third")
        await nc.flush()
        await wait_until(lambda: len(seen) == 2, message="both direct publishes")
        assert seen == [b"first", b"third"]
    finally:
        await nc.close()
        await watcher.close()


async def test_publishes_keep_their_order_across_both_paths(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    watcher = await nats.connect(nats_server.url)
    try:
        seen = await collect(watcher, "dw.order")
        publisher = Publisher(nc)
        count = 3_000
        for i in range(count):
            if i % 5 == 0:
                await asyncio.sleep(0)  # a new pass: the direct path is open again
            if i % 5 == 0 or i % 7 == 0:
                await nc.publish("dw.order", str(i).encode())  # nats-py's pending list, not yet written
            else:
                await publisher.send(_pub("dw.order", i))
        await nc.flush()
        await wait_until(lambda: len(seen) == count, timeout=20, message=f"{count} messages")
        assert [int(d) for d in seen] == list(range(count))
    finally:
        await nc.close()
        await watcher.close()


async def test_publishes_while_disconnected_go_through_nats_py_and_arrive(nats_server: NatsServer) -> None:
    reconnected = asyncio.Event()

    async def on_reconnect() -> None:
        reconnected.set()

    nc = await nats.connect(nats_server.url, reconnect_time_wait=0.05, reconnected_cb=on_reconnect)
    try:
        # The client's own subscription: on reconnect nats-py sends its SUBs before the
        # buffered publishes, so what was published while down is seen, in order.
        seen = await collect(nc, "dw.reconnect")
        writer = DirectWriter.for_client(nc)
        assert writer is not None
        publisher = Publisher(nc)
        nats_server.restart()
        await wait_until(lambda: not nc.is_connected, message="client noticed the restart")
        assert not writer.try_write("dw.reconnect", None, b"while down")
        await publisher.send(Publish("dw.reconnect", b"1"))  # into nats-py's reconnect buffer
        await asyncio.wait_for(reconnected.wait(), 10)
        await asyncio.sleep(0)  # a new pass: the direct path is open again
        await publisher.send(Publish("dw.reconnect", b"2"))
        await nc.flush()
        await wait_until(lambda: len(seen) == 2, timeout=10, message="both publishes")
        assert seen == [b"1", b"2"]
    finally:
        await nc.close()


def test_a_client_without_the_known_internals_gets_no_direct_writer() -> None:
    assert DirectWriter.for_client(object()) is None  # type: ignore[arg-type]


def _pub(subject: str, i: int) -> Publish:
    return Publish(subject, str(i).encode())
