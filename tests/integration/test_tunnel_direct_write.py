"""Publishes written by tunnel._natsio.direct_write: at once on a quiet connection, else once
per event-loop pass.

Checked against a real nats-server: a quiet connection's publish is written at once and a
busy one's when the pass ends (a burst's also every BURST_PUBLISHES), and all arrive in
order; publishes mixed between this path and nats-py's keep their order, also while
nats-py's flusher waits for a full socket; with the server stopped, small publishes wait as
nats-py makes them (no unbounded buffer); payloads over the server's max_payload or
bulk-sized go through nats-py; a disconnected client's publishes go through nats-py's
reconnect buffer and arrive; a client without the known internals gets no writer. Frames
of one batch share a message on the first one's subject and reply; anything else appended
in between ends a batch (nothing changes order), and so do a burst and the server's
max_payload.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import FlushTimeoutError

from cli.nats_server import NatsServer
from tests.helpers import NatsServerFactory, process_stopped, wait_until
from tests.integration.tunnel_harness import log_writes
from tunnel import _batches as batches
from tunnel import _frames as f
from tunnel._events import Publish
from tunnel._natsio.common import Publisher, flush_everything, round_trip
from tunnel._natsio.direct_write import BURST_PUBLISHES, SMALL_PAYLOAD, DirectWriter


async def collect(nc: Client, subject: str) -> list[bytes]:
    seen: list[bytes] = []

    async def on_msg(msg: nats.aio.msg.Msg) -> None:
        seen.append(msg.data)

    await nc.subscribe(subject, cb=on_msg)
    await flush_everything(nc)
    return seen


@contextlib.asynccontextmanager
async def watched(url: str, subject: str) -> AsyncIterator[tuple[Client, list[bytes]]]:
    """A connection to publish on, and what a second connection receives on ``subject``."""
    nc = await nats.connect(url)
    watcher = await nats.connect(url)
    try:
        yield nc, await collect(watcher, subject)
    finally:
        await nc.close()
        await watcher.close()


async def test_a_quiet_connection_writes_at_once_a_busy_one_once_per_pass(nats_server: NatsServer) -> None:
    async with watched(nats_server.url, "dw.pass") as (nc, seen):
        writer = DirectWriter.for_client(nc)
        assert writer is not None
        sent_before = nc.stats["out_msgs"]
        assert writer.try_write("dw.pass", None, b"1")  # quiet: written at once
        assert nc._pending_data_size == 0
        assert writer.try_write("dw.pass", "dw.reply", b"2")  # same pass: into nats-py's buffer
        assert nc._pending_data_size > 0
        await asyncio.sleep(0)  # the pass ends: "2" is written
        assert nc._pending_data_size == 0
        assert writer.try_write("dw.pass", None, b"3")  # the last pass published twice: busy
        assert nc._pending_data_size > 0
        await asyncio.sleep(0)
        assert writer.try_write("dw.pass", None, b"4")  # the last pass published once: quiet again
        assert nc._pending_data_size == 0
        assert nc.stats["out_msgs"] == sent_before + 4 and nc._pending_data_size == 0
        await nc.flush()
        await wait_until(lambda: len(seen) == 4, message="all four publishes")
        assert seen == [b"1", b"2", b"3", b"4"]


async def test_a_burst_is_written_every_burst_publishes_not_only_when_the_pass_ends(
    nats_server: NatsServer,
) -> None:
    """The peer starts on the first part of a burst while this side builds the rest."""
    async with watched(nats_server.url, "dw.burst") as (nc, seen):
        writer = DirectWriter.for_client(nc)
        assert writer is not None
        total = 2 * BURST_PUBLISHES + 3
        for i in range(total):  # one pass: no await in between
            assert writer.try_write("dw.burst", None, str(i).encode())
            in_buffer = nc._pending_data_size > 0
            # Written at once (quiet), then the buffer at every BURST_PUBLISHES-th; held otherwise.
            assert in_buffer == (i != 0 and (i + 1) % BURST_PUBLISHES != 0), i
        await asyncio.sleep(0)  # the pass ends: the last three are written
        assert nc._pending_data_size == 0
        await nc.flush()
        await wait_until(lambda: len(seen) == total, message="the whole burst")
        assert seen == [str(i).encode() for i in range(total)]


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


@pytest.mark.parametrize(
    ("subject", "reply"),
    [
        ("", None),
        ("dw bad", None),
        ("dw.bad\r\n", None),
        ("dw.\u2028", None),
        ("dw.ok", "re ply"),
        ("dw.ok", "\t"),
    ],
)
async def test_subjects_that_would_break_the_protocol_line_are_left_to_nats_py(
    nats_server: NatsServer, subject: str, reply: str | None
) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        writer = DirectWriter.for_client(nc)
        assert writer is not None
        assert not writer.try_write(subject, reply, b"x")
        assert nc._pending_data_size == 0  # nothing written nor queued
        assert writer.try_write("dw.ok", "dw.reply-1_x", b"x")  # a plain one is taken
    finally:
        await nc.close()


async def test_publishes_keep_their_order_across_both_paths(nats_server: NatsServer) -> None:
    async with watched(nats_server.url, "dw.order") as (nc, seen):
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


async def test_publishes_while_disconnected_go_through_nats_py_and_arrive(nats_server: NatsServer) -> None:
    disconnected = asyncio.Event()
    reconnected = asyncio.Event()

    async def on_disconnect() -> None:
        disconnected.set()

    async def on_reconnect() -> None:
        reconnected.set()

    nc = await nats.connect(
        nats_server.url, reconnect_time_wait=0.05, disconnected_cb=on_disconnect, reconnected_cb=on_reconnect
    )
    try:
        # The client's own subscription: on reconnect nats-py sends its SUBs before the
        # buffered publishes, so what was published while down is seen, in order.
        seen = await collect(nc, "dw.reconnect")
        writer = DirectWriter.for_client(nc)
        assert writer is not None
        publisher = Publisher(nc)
        # Down until told: a restart could be over before the client is seen disconnected.
        nats_server.stop()
        await asyncio.wait_for(disconnected.wait(), 10)
        assert not writer.try_write("dw.reconnect", None, b"while down")
        await publisher.send(Publish("dw.reconnect", b"1"))  # into nats-py's reconnect buffer
        nats_server.start()
        await asyncio.wait_for(reconnected.wait(), 10)
        await asyncio.sleep(0)  # a new pass: the direct path is open again
        await publisher.send(Publish("dw.reconnect", b"2"))
        await nc.flush()
        await wait_until(lambda: len(seen) == 2, timeout=10, message="both publishes")
        assert seen == [b"1", b"2"]
    finally:
        await nc.close()


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5, 6])
async def test_order_holds_while_nats_py_waits_for_a_full_socket(nats_server: NatsServer, seed: int) -> None:
    """Small publishes through the writer and 200 KiB ones through nats-py (its flusher then
    waits for the socket to drain, and may write before a pass ends): found by review, where
    an earlier version reordered 2 of 5 such runs; these six caught it in each of 4 tries."""
    rnd = random.Random(seed)
    nc = await nats.connect(nats_server.url)
    watcher = await nats.connect(nats_server.url, pending_size=1 << 30)
    try:
        steps = 400
        seen: list[bytes] = []

        async def on_msg(msg: nats.aio.msg.Msg) -> None:
            seen.append(msg.data[:9])

        await watcher.subscribe("dw.drain", cb=on_msg, pending_msgs_limit=10**7, pending_bytes_limit=1 << 31)
        await flush_everything(watcher)
        publisher = Publisher(nc)
        big = b"B" * (200 * 1024)
        expected: list[bytes] = []
        for i in range(steps):
            await publisher.send(Publish("dw.drain", b"S%07da" % i))
            await publisher.send(Publish("dw.drain", b"S%07db" % i))
            if seed == 6:
                await publisher.send(Publish("dw.drain", b"L%07d" % i + big))  # bulk: nats-py's path
            else:
                await nc.publish("dw.drain", b"L%07d" % i + big)  # another user of the connection
            expected += [b"S%07da" % i, b"S%07db" % i, (b"L%07d" % i + big)[:9]]
            for _ in range(rnd.randrange(4)):
                await asyncio.sleep(0)
        await nc.flush()
        await wait_until(lambda: len(seen) == len(expected), timeout=30, message="every message")
        assert seen == expected
    finally:
        await nc.close()
        await watcher.close()


async def test_small_publishes_wait_like_nats_py_when_the_server_stops_reading(
    nats_server: NatsServer,
) -> None:
    """Backpressure (found by review): with nats-server stopped, small publishes must not pile
    up without bound in the transport; nats-py's pending_size makes the publisher wait."""
    nc = await nats.connect(nats_server.url, pending_size=1 << 20, allow_reconnect=False, ping_interval=600)
    publisher = Publisher(nc)
    sent = 0
    flooding = True

    async def flood() -> None:
        nonlocal sent
        payload = b"x" * 8000
        while flooding:  # (a flag: nats-py's _flush_pending swallows a cancellation)
            await publisher.send(Publish("dw.flood", payload))
            await publisher.send(Publish("dw.flood", payload))
            sent += 2
            await asyncio.sleep(0)

    os.kill(nats_server.pid, signal.SIGSTOP)
    task = asyncio.get_running_loop().create_task(flood())
    try:
        await asyncio.sleep(1.5)  # a load window, not a synchronisation: the flood runs meanwhile
        buffered = nc._transport._io_writer.transport.get_write_buffer_size()  # type: ignore[union-attr]
        assert buffered + nc._pending_data_size < 16 * 2**20, f"{sent} sent, {buffered} bytes buffered"
        assert sent * 8000 < 64 * 2**20  # the publisher was made to wait
    finally:
        flooding = False
        os.kill(nats_server.pid, signal.SIGCONT)
        await asyncio.wait_for(task, 30)  # the server reads again: the waiting publisher goes on
        await nc.close()


def test_a_client_without_the_known_internals_gets_no_direct_writer() -> None:
    assert DirectWriter.for_client(object()) is None  # type: ignore[arg-type]


def _pub(subject: str, i: int) -> Publish:
    return Publish(subject, str(i).encode())


async def test_flush_everything_pings_after_a_sub_still_in_nats_py_buffer(nats_server: NatsServer) -> None:
    """What a PONG proves: nats-py writes a flush's PING straight to the socket, so only a PING
    written after the SUB (flush_everything's last) says NATS has the subscription."""
    nc = await nats.connect(nats_server.url)
    try:
        written = log_writes(nc)
        await nc.subscribe("dw.sub")
        await flush_everything(nc)
        sub_at = next(i for i, data in enumerate(written) if data.startswith(b"SUB dw.sub"))
        assert written[-1] == b"PING\r\n" and len(written) - 1 > sub_at, written
    finally:
        await nc.close()


async def test_a_cancel_that_lands_in_a_nats_py_publish_is_not_lost(nats_server: NatsServer) -> None:
    """nats-py's publish, waiting for its flusher (its buffer full), swallows CancelledError in
    ``Client._flush_pending``; the Publisher raises it again. ``pending_size=1`` makes every
    publish wait there: without the Publisher's check this loop would never end."""
    nc = await nats.connect(nats_server.url, pending_size=1)
    try:
        publisher = Publisher(nc)
        published = 0

        async def publish_forever() -> None:
            nonlocal published
            while True:
                await publisher.send(Publish("dw.cancel", b"x" * (SMALL_PAYLOAD + 1)))  # via nats-py
                published += 1

        task = asyncio.get_running_loop().create_task(publish_forever())
        await wait_until(lambda: published >= 10)
        task.cancel()
        await asyncio.wait([task], timeout=5.0)
        assert task.cancelled()
    finally:
        await nc.close()


@pytest.mark.parametrize("give_up", ["timeout", "cancel"])
async def test_a_round_trip_given_up_leaves_the_connection_hearing(
    nats_server: NatsServer, give_up: str
) -> None:
    """nats-py's flush cancels its PONG's future when it gives up (a timeout, a cancel) but
    leaves it queued; the late PONG then stops nats-py's read loop and the connection hears
    nothing more while it still looks connected. round_trip never cancels that future."""
    nc = await nats.connect(nats_server.url)
    other = await nats.connect(nats_server.url)
    try:
        sub = await nc.subscribe("dw.hearing")
        await flush_everything(nc)
        os.kill(nats_server.pid, signal.SIGSTOP)  # no PONG until it runs again
        try:
            await wait_until(lambda: process_stopped(nats_server.pid))
            if give_up == "timeout":
                with pytest.raises(FlushTimeoutError):
                    await round_trip(nc, timeout=0.2)
            else:
                task = asyncio.get_running_loop().create_task(round_trip(nc))
                await asyncio.sleep(0)  # one pass: the task's first step writes its PING
                assert len(nc._pongs) == 1  # it did: a PONG is awaited
                task.cancel()
                await asyncio.wait([task])
                assert task.cancelled()
        finally:
            os.kill(nats_server.pid, signal.SIGCONT)
        await wait_until(lambda: not nc._pongs, message="the late PONG never came")
        await other.publish("dw.hearing", b"still hearing")
        await flush_everything(other)
        msg = await sub.next_msg(timeout=5.0)  # after the late PONG: nats-py read past it
        assert msg.data == b"still hearing"
    finally:
        await other.close()
        await nc.close()


# -- frames of many requests in one message (start and reply batches) ----------------------

KIND = f.KIND_START_BATCH


@contextlib.asynccontextmanager
async def watched_messages(
    url: str, subject: str, **options: object
) -> AsyncIterator[tuple[Client, list[Msg]]]:
    """Like ``watched``, keeping whole messages (subject, reply, data) in arrival order."""
    nc = await nats.connect(url, **options)  # type: ignore[arg-type]
    watcher = await nats.connect(url)
    seen: list[Msg] = []

    async def on_msg(msg: Msg) -> None:
        seen.append(msg)

    try:
        await watcher.subscribe(subject, cb=on_msg)
        await flush_everything(watcher)
        yield nc, seen
    finally:
        await nc.close()
        await watcher.close()


def labels(msg: Msg) -> list[str]:
    return [label for label, _ in batches.decode(msg.data, KIND, "batch")]


def frames_in(msg: Msg) -> list[bytes]:
    """The frames a message carries: those of a batch, or itself."""
    if batches.is_batch(msg.data, KIND):
        return [frame for _, frame in batches.decode(msg.data, KIND, "batch")]
    return [msg.data]


async def test_frames_of_one_batch_share_a_message_on_the_first_frames_subject_and_reply(
    nats_server: NatsServer,
) -> None:
    async with watched_messages(nats_server.url, "dwb.>") as (nc, seen):
        writer = DirectWriter.for_client(nc)
        assert writer is not None
        sent_before = nc.stats["out_msgs"]
        assert writer.try_write("dwb.alone", None, b"quiet")  # a quiet pass's first: written at once
        owners = [
            writer.try_write_batched(
                "dwb.start",
                f"dwb.reply.{i}",
                f"frame {i}".encode(),
                kind=KIND,
                key="dwb.start",
                label=f"l{i}",
                owner=i,
            )
            for i in range(5)
        ]
        assert owners == [0, 0, 0, 0, 0]  # each went in the message of the first
        sent = nc.stats["out_msgs"]
        await asyncio.sleep(0)  # the pass ends
        await nc.flush()
        await wait_until(lambda: len(seen) == 2, message="the quiet publish and the batch")
        alone, batch = seen
        assert alone.data == b"quiet"
        assert (batch.subject, batch.reply) == ("dwb.start", "dwb.reply.0")
        assert batches.decode(batch.data, KIND, "batch") == [
            (f"l{i}", f"frame {i}".encode()) for i in range(5)
        ]
        assert sent == sent_before + 2  # two messages counted: the quiet one and the batch


async def test_anything_else_in_between_ends_a_batch_so_nothing_changes_order(
    nats_server: NatsServer,
) -> None:
    async with watched_messages(nats_server.url, "dwo.>") as (nc, seen):
        writer = DirectWriter.for_client(nc)
        assert writer is not None
        publisher = Publisher(nc)
        assert writer.try_write("dwo.first", None, b"quiet")

        def batched(label: str, key: str = "dwo.start") -> str | None:
            return writer.try_write_batched(
                key, f"dwo.r.{label}", label.encode(), kind=KIND, key=key, label=label, owner=label
            )

        assert batched("a") == "a" and batched("b") == "a"
        await publisher.send(Publish("dwo.other", b"between"))  # ends the batch
        assert batched("c") == "c"  # alone: a new batch of its own
        await nc.publish("dwo.nats_py", b"through nats-py")  # nats-py's own publish ends it too
        assert batched("d") == "d" and batched("e", key="dwo.elsewhere") == "e"  # another key: another batch
        await nc.flush()  # nats-py's PING after all of it
        await wait_until(lambda: len(seen) == 7, message="all seven messages")
        assert [m.subject for m in seen] == [
            "dwo.first",
            "dwo.start",
            "dwo.other",
            "dwo.start",
            "dwo.nats_py",
            "dwo.start",
            "dwo.elsewhere",
        ]
        assert labels(seen[1]) == ["a", "b"]
        assert [seen[3].data, seen[5].data, seen[6].data] == [b"c", b"d", b"e"]  # alone: plain frames


async def test_a_batch_holds_at_most_a_burst_and_stays_under_the_servers_max_payload(
    nats_server_factory: NatsServerFactory,
) -> None:
    server = nats_server_factory(max_payload=4096)
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    async with watched_messages(server.url, "dwm.>", error_cb=on_error) as (nc, seen):
        writer = DirectWriter.for_client(nc)
        assert writer is not None
        assert writer.try_write("dwm.first", None, b"quiet")
        big = [f"{i:04d}".encode() + bytes(1500) for i in range(6)]  # two fit in 4 KiB, three do not
        for i, frame in enumerate(big):
            writer.try_write_batched("dwm.s", None, frame, kind=KIND, key="dwm.s", label=str(i), owner=i)
        await asyncio.sleep(0)
        small = 2 * BURST_PUBLISHES + 1
        for i in range(small):
            writer.try_write_batched(
                "dwm.t", None, str(i).encode(), kind=KIND, key="dwm.t", label=str(i), owner=i
            )
        await asyncio.sleep(0)
        await nc.flush()
        await wait_until(
            lambda: sum(len(frames_in(m)) for m in seen if m.subject == "dwm.t") == small, message="all"
        )
        assert not errors and nc.is_connected
        sizes = [len(m.data) for m in seen]
        assert max(sizes) <= 4096
        in_big = [frames_in(m) for m in seen if m.subject == "dwm.s"]
        assert [frame for batch in in_big for frame in batch] == big
        assert [len(batch) for batch in in_big] == [2, 2, 2]
        in_small = [frames_in(m) for m in seen if m.subject == "dwm.t"]
        assert [frame for batch in in_small for frame in batch] == [str(i).encode() for i in range(small)]
        assert max(len(batch) for batch in in_small) == BURST_PUBLISHES


async def test_a_batch_does_not_outlive_its_pass_nor_stop_the_passes_that_follow(
    nats_server: NatsServer,
) -> None:
    """The connection drops before a pass with a pending batch ends (nats-py keeps its buffer to
    resend) and is back before nats-py's flusher ran: the next frame must not merge into that
    batch with no end of pass to write it, which left every later publish waiting."""
    async with watched_messages(nats_server.url, "dwr.>") as (nc, seen):
        writer = DirectWriter.for_client(nc)
        assert writer is not None
        assert writer.try_write("dwr.first", None, b"quiet")
        writer.try_write_batched("dwr.s", "dwr.r1", b"one", kind=KIND, key="dwr.s", label="1", owner=1)
        nc._status = Client.RECONNECTING
        await asyncio.sleep(0)  # the pass ends: nothing written while not connected
        assert nc._pending_data_size > 0
        nc._status = Client.CONNECTED
        assert (
            writer.try_write_batched("dwr.s", "dwr.r2", b"two", kind=KIND, key="dwr.s", label="2", owner=2)
            == 2
        )
        await asyncio.sleep(0)  # this pass's end writes both
        assert nc._pending_data_size == 0
        assert writer.try_write("dwr.later", None, b"later")  # the last pass had one publish: at once
        assert nc._pending_data_size == 0
        await nc.flush()
        await wait_until(lambda: len(seen) == 4, message="all four messages")
        assert [(m.subject, m.data) for m in seen] == [
            ("dwr.first", b"quiet"),
            ("dwr.s", b"one"),
            ("dwr.s", b"two"),
            ("dwr.later", b"later"),
        ]
