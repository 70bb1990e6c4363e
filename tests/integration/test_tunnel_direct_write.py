"""Publishes written by tunnel._natsio.direct_write: at once on a quiet connection, else one
write per event-loop pass.

Checked against a real nats-server: a quiet connection's publish is written at once and a busy
one's when the pass ends, and all arrive in order; publishes mixed between this path and
nats-py's keep their order (mutation-checked: without the "nothing pending in nats-py" rule
they do not); payloads over the server's max_payload or bulk-sized go through nats-py; a
disconnected client's publishes go through nats-py's reconnect buffer and arrive; a client
without the known internals gets no writer.
"""

from __future__ import annotations

import asyncio

import nats
from nats.aio.client import Client

from cli.nats_server import NatsServer
from tests.helpers import NatsServerFactory, wait_until
from tunnel._events import Publish
from tunnel._natsio.common import Publisher
from tunnel._natsio.direct_write import SMALL_PAYLOAD, DirectWriter


async def collect(nc: Client, subject: str) -> list[bytes]:
    seen: list[bytes] = []

    async def on_msg(msg: nats.aio.msg.Msg) -> None:
        seen.append(msg.data)

    await nc.subscribe(subject, cb=on_msg)
    await nc.flush()
    return seen


async def test_a_quiet_connection_writes_at_once_a_busy_one_once_per_pass(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    watcher = await nats.connect(nats_server.url)
    try:
        seen = await collect(watcher, "dw.pass")
        writer = DirectWriter.for_client(nc)
        assert writer is not None
        sent_before = nc.stats["out_msgs"]
        assert writer.try_write("dw.pass", None, b"1")  # quiet: written at once
        assert writer._collected == [] and nc._pending_data_size == 0
        assert writer.try_write("dw.pass", "dw.reply", b"2")  # same pass: collected
        assert len(writer._collected) == 1
        await asyncio.sleep(0)  # the pass ends: "2" is written
        assert writer._collected == []
        assert writer.try_write("dw.pass", None, b"3")  # the last pass published twice: busy
        assert len(writer._collected) == 1
        await asyncio.sleep(0)
        assert writer.try_write("dw.pass", None, b"4")  # the last pass published once: quiet again
        assert writer._collected == []
        assert nc.stats["out_msgs"] == sent_before + 4 and nc._pending_data_size == 0
        await nc.flush()
        await wait_until(lambda: len(seen) == 4, message="all four publishes")
        assert seen == [b"1", b"2", b"3", b"4"]
    finally:
        await nc.close()
        await watcher.close()


async def test_payloads_over_the_servers_max_payload_or_bulk_sized_are_left_to_nats_py(
    nats_server_factory: NatsServerFactory,
) -> None:
    server = nats_server_factory(max_payload=4096)
    nc = await nats.connect(server.url)
    try:
        writer = DirectWriter.for_client(nc)
        assert writer is not None
        assert nc.max_payload == 4096
        assert not writer.try_write("dw.big", None, b"x" * 4097)  # nats-py refuses it (MaxPayloadError)
        assert writer.try_write("dw.big", None, b"x" * 4096)
    finally:
        await nc.close()
    nc = await nats.connect(nats_server_factory().url)
    try:
        writer = DirectWriter.for_client(nc)
        assert writer is not None
        assert not writer.try_write("dw.bulk", None, b"x" * (SMALL_PAYLOAD + 1))
    finally:
        await nc.close()


async def test_publishes_keep_their_order_across_both_paths(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    watcher = await nats.connect(nats_server.url)
    try:
        seen = await collect(watcher, "dw.order")
        publisher = Publisher(nc)
        count = 3_000  # a multiple of 4
        i = 0
        while i < count:
            await asyncio.sleep(0)  # a pass with one publish: the next pass starts quiet
            await publisher.send(_pub("dw.order", i))
            await asyncio.sleep(0)
            await nc.publish("dw.order", str(i + 1).encode())  # nats-py's pending list, not yet written
            await publisher.send(_pub("dw.order", i + 2))  # must not overtake it
            await publisher.send(_pub("dw.order", i + 3))
            i += 4
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


async def test_collected_publishes_go_to_nats_py_if_the_connection_drops_before_the_pass_ends(
    nats_server: NatsServer,
) -> None:
    """White-box: the status flips between collecting and writing (as when nats-py's read loop
    sees the socket close in the same pass); what was collected goes first into nats-py's buffer."""
    nc = await nats.connect(nats_server.url)
    try:
        seen = await collect(nc, "dw.drop")
        writer = DirectWriter.for_client(nc)
        assert writer is not None
        assert writer.try_write("dw.drop", None, b"1")  # quiet: written at once
        assert writer.try_write("dw.drop", None, b"2")  # collected
        assert writer.try_write("dw.drop", None, b"3")
        nc._pending.append(b"PUB dw.drop 1\r\n4\r\n")  # something nats-py had buffered
        nc._pending_data_size += 14
        nc._status = Client.RECONNECTING
        await asyncio.sleep(0)  # the pass ends while "not connected"
        assert writer._collected == []
        assert [c.split(b"\r\n")[1] for c in nc._pending] == [b"2", b"3", b"4"]
        nc._status = Client.CONNECTED
        await nc.flush()
        await wait_until(lambda: len(seen) == 4, message="all four publishes")
        assert seen == [b"1", b"2", b"3", b"4"]
    finally:
        await nc.close()


def test_a_client_without_the_known_internals_gets_no_direct_writer() -> None:
    assert DirectWriter.for_client(object()) is None  # type: ignore[arg-type]


def _pub(subject: str, i: int) -> Publish:
    return Publish(subject, str(i).encode())
