"""Frames of many requests in one NATS message, against a real nats-server.

- Start batches (``startBatches``, kind 0x06): after a first contact whose ack says so, a
  client sends the compact starts of a burst to one host several to a message; reply batches
  (``replyBatches``, kind 0x07): the server answers a burst of one caller several complete
  responses to a message. Every request still ends on its own (200, 404, handler error).
- NATS's no-responders for a start batch reaches its first start only: the client passes it
  on to the batch's other starts, so each is reported unreachable at once, not after a
  republish interval.
- An older server (no batches), a plain v1 caller: no batch either way.
- Hostile batches (malformed, overlong, replies outside the host, forged or unknown ids)
  are dropped without disturbing anything else.
- A small max_payload: batches stay under it and the connections never fail.
- The reference daemon permissions: start batches still go; the server may publish only to
  ``P.req.<id>.reply``, so it sends no reply batch, and no publish is refused.

Observation is by a tap on a second connection (``Tap``): a wire_tap would turn batching
off (``Publisher.send_batched`` batches only without one). A tap on the request subject
hides NATS's no-responders answer, so the no-responders tests log the client's socket
writes instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import struct
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Final

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

import tunnel
from cli.nats_server import NatsServer
from tests.helpers import NatsServerFactory
from tests.integration.gateway_harness import (
    OperatorServer,
    connect_daemon,
    creds_auth,
    start_operator_server,
)
from tests.integration.test_tunnel_reference_permissions import reference_daemon_permissions
from tests.integration.tunnel_harness import log_writes
from tunnel import _batches as batches
from tunnel import _codec as codec
from tunnel import _frames as frames
from tunnel import _reply_batch as reply_batch
from tunnel import _start_batch as start_batch
from tunnel._natsio.common import flush_everything, round_trip
from tunnel._subjects import new_request_id, parse_request_subject

HOST: Final = "desk.example"  # the host the reference permissions name
SUBJECTS: Final = tunnel.HostSubjects.for_host(HOST)
PREFIX: Final = tunnel.DEFAULT_PREFIX
EVENT_TIMEOUT: Final = 10.0  # a burst on a loaded 2-core machine; a local server answers in ms
BURST: Final = 32
START_BATCH: Final = start_batch.PREFIX  # b"\x00\x06"
REPLY_BATCH: Final = reply_batch.PREFIX  # b"\x00\x07"
COMPACT_START: Final = b"\x00\x04"
OFFER: Final = codec.extensions_json(frames.StartExtensions(binary=True, whole=True, binary_head=True))


# -------------------------------------------------------------------- helpers


@dataclasses.dataclass
class Conn:
    """A connection whose asynchronous trouble (errors, disconnects, closes) is recorded."""

    nc: Client
    trouble: list[str]


async def _connect(url: str, name: str) -> Conn:
    trouble: list[str] = []

    async def on_error(exc: Exception) -> None:
        trouble.append(f"{name}: error {exc!r}")

    async def on_disconnect() -> None:
        trouble.append(f"{name}: disconnected")

    async def on_close() -> None:
        trouble.append(f"{name}: closed")

    nc = await nats.connect(
        url,
        name=name,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        closed_cb=on_close,
        connect_timeout=EVENT_TIMEOUT,
    )
    return Conn(nc, trouble)


@contextlib.asynccontextmanager
async def peers(url: str) -> AsyncIterator[tuple[Conn, Conn]]:
    """The server's connection and the caller's."""
    server = await _connect(url, "tunnel-server")
    caller = await _connect(url, "tunnel-caller")
    try:
        yield server, caller
    finally:
        await caller.nc.close()
        await server.nc.close()


class Tap:
    """What a separate connection hears under the prefix (subject and payload of each message).

    ``caught_up(nc, ...)`` returns once the tap heard everything each ``nc`` published before:
    NATS keeps one publisher's messages in order for a subscriber, so a marker that arrives
    comes after them.
    """

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.seen: list[tuple[str, bytes]] = []
        self._markers: dict[str, asyncio.Event] = {}
        self._count = itertools.count()

    @classmethod
    async def start(cls, url: str, **connect: Any) -> Tap:
        tap = cls(await nats.connect(url, connect_timeout=EVENT_TIMEOUT, pending_size=1 << 26, **connect))
        await tap.nc.subscribe(f"{PREFIX}.>", cb=tap._on_msg, pending_msgs_limit=10**6)
        await flush_everything(tap.nc)
        return tap

    async def _on_msg(self, msg: Msg) -> None:
        marker = self._markers.get(msg.subject)
        if marker is not None:
            marker.set()
        else:
            self.seen.append((msg.subject, msg.data))

    async def caught_up(self, *publishers: Client) -> None:
        for nc in publishers:
            subject = f"{PREFIX}.tap-marker.{next(self._count)}"
            event = self._markers[subject] = asyncio.Event()
            await nc.publish(subject, b"")
            await flush_everything(nc)
            await asyncio.wait_for(event.wait(), EVENT_TIMEOUT)

    def clear(self) -> None:
        self.seen.clear()

    def on_request_subject(self) -> list[bytes]:
        return [data for subject, data in self.seen if subject == SUBJECTS.request]

    def replies(self) -> list[tuple[str, bytes]]:
        """Messages on reply subjects (``P.req.<id>.reply[.<client>]``)."""
        out = []
        for subject, data in self.seen:
            parsed = parse_request_subject(subject, PREFIX)
            if parsed is not None and parsed[2] == "reply":
                out.append((subject, data))
        return out

    def kinds(self) -> set[bytes]:
        return {data[:2] for _, data in self.seen}

    async def close(self) -> None:
        await self.nc.close()


@contextlib.asynccontextmanager
async def tapped(url: str) -> AsyncIterator[Tap]:
    tap = await Tap.start(url)
    try:
        yield tap
    finally:
        await tap.close()


async def echo_path(req: tunnel.Request) -> tunnel.Response:
    return tunnel.Response(200, [("content-type", "text/plain")], f"path {req.url}".encode())


Outcome = tuple[int, bytes] | BaseException


async def burst(
    client: tunnel.TunnelClient, paths: Sequence[str], headers: list[tuple[str, str]] | None = None
) -> list[Outcome]:
    """Fetch every path at once (one task each, all started in one event-loop pass)."""

    async def one(path: str) -> tuple[int, bytes]:
        async with await client.fetch(f"tunnel://{HOST}{path}", headers=headers) as resp:
            return resp.status, await resp.read()

    async with asyncio.timeout(EVENT_TIMEOUT):
        return await asyncio.gather(*(one(path) for path in paths), return_exceptions=True)


async def first_contact(client: tunnel.TunnelClient) -> None:
    """A JSON start, whose ack tells the client what the host's server takes."""
    async with asyncio.timeout(EVENT_TIMEOUT), await client.fetch(f"tunnel://{HOST}/first") as resp:
        assert resp.status == 200
        await resp.read()


async def burst_after_first_contact(
    server_conn: Conn,
    caller: Conn,
    tap: Tap,
    handler: tunnel.Handler = echo_path,
    *,
    server_options: dict[str, Any] | None = None,
    forget_first_contact: bool = False,
    **client_options: Any,
) -> tuple[list[Outcome], tunnel.TunnelServer, tunnel.TunnelClient]:
    """Serve the host (with ``server_options`` replaced, to play an older server), make the
    first contact, then a burst of ``BURST`` GETs of ``/item/<i>``; the tap has caught up with
    both connections when it returns (``forget_first_contact``: it keeps only the burst)."""
    server = await tunnel.serve(server_conn.nc, HOST, handler)
    if server_options:
        server.dispatch.options = dataclasses.replace(server.dispatch.options, **server_options)
    try:
        client = tunnel.TunnelClient(caller.nc, **client_options)
        await first_contact(client)
        if forget_first_contact:
            await tap.caught_up(caller.nc, server_conn.nc)
            tap.clear()
        outcomes = await burst(client, [f"/item/{i}" for i in range(BURST)])
        await tap.caught_up(caller.nc, server_conn.nc)
    finally:
        await server.close(timeout=1.0)
    return outcomes, server, client


def start_batch_sizes(payloads: list[bytes]) -> list[int]:
    """How many starts each message on the request subject carried."""
    return [len(start_batch.decode(p)) if start_batch.is_start_batch(p) else 1 for p in payloads]


def answered_ids(replies: list[tuple[str, bytes]]) -> list[str]:
    """The request ids the complete responses among ``replies`` answered, batched or not."""
    ids = []
    for subject, data in replies:
        if reply_batch.is_reply_batch(data):
            for request_id, frame in reply_batch.decode(data):
                assert isinstance(codec.decode_frame(frame, request_id), frames.ResponseWhole)
                ids.append(request_id)
            continue
        parsed = parse_request_subject(subject, PREFIX)
        assert parsed is not None
        if isinstance(codec.decode_frame(data, parsed[1]), frames.ResponseWhole):
            ids.append(parsed[1])
    return ids


def compact_start(request_id: str, path: str = "/hostile") -> bytes:
    return codec.encode_compact_start(request_id, "GET", path, [], False, None, OFFER)


def whole(status: int, body: bytes) -> bytes:
    return codec.encode_compact_whole(status, [], None, body, None, False)


# -------------------------------------------------------------------- 1. a burst, batched both ways


async def test_a_burst_after_first_contact_goes_in_start_batches_and_comes_back_in_reply_batches(
    nats_server: NatsServer,
) -> None:
    async with peers(nats_server.url) as (server_conn, caller), tapped(nats_server.url) as tap:
        outcomes, server, client = await burst_after_first_contact(
            server_conn, caller, tap, forget_first_contact=True
        )
        assert server_conn.trouble == [] and caller.trouble == []
    assert outcomes == [(200, f"path /item/{i}".encode()) for i in range(BURST)]
    starts = tap.on_request_subject()
    sizes = start_batch_sizes(starts)
    assert len(starts) < BURST, sizes
    assert any(p.startswith(START_BATCH) for p in starts), sizes
    assert sum(sizes) == BURST  # every start went exactly once, batched or alone
    replies = tap.replies()
    assert any(data.startswith(REPLY_BATCH) for _, data in replies), [d[:2] for _, d in replies]
    answered = answered_ids(replies)
    assert len(answered) == BURST and len(set(answered)) == BURST  # each answered once
    assert server.stats.start_batches >= 1
    assert server.stats.requests == BURST + 1 and server.stats.malformed_frames == 0
    assert client.stats.frames_dropped == 0


# -------------------------------------------------------------------- 2. each request ends on its own


async def test_requests_of_one_batch_each_get_their_own_outcome(nats_server: NatsServer) -> None:
    async def mixed(req: tunnel.Request) -> tunnel.Response:
        kind = req.path.split("/")[1]
        if kind == "missing":
            return tunnel.Response(404, [], f"no {req.path}".encode())
        if kind == "raise":
            raise RuntimeError(f"handler failed for {req.path}")
        return tunnel.Response(200, [], f"ok {req.path}".encode())

    kinds = ["ok", "missing", "raise"]
    paths = [f"/{kinds[i % 3]}/{i}" for i in range(BURST)]
    async with peers(nats_server.url) as (server_conn, caller):
        server = await tunnel.serve(server_conn.nc, HOST, mixed)
        try:
            client = tunnel.TunnelClient(caller.nc)
            await first_contact(client)
            outcomes = await burst(client, paths)
        finally:
            await server.close(timeout=1.0)
    for path, outcome in zip(paths, outcomes, strict=True):
        if path.startswith("/raise/"):
            assert isinstance(outcome, tunnel.RemoteError), (path, outcome)
            assert outcome.code == "tunnel_handler_error", (path, outcome)
        elif path.startswith("/missing/"):
            assert outcome == (404, f"no {path}".encode()), path
        else:
            assert outcome == (200, f"ok {path}".encode()), path
    raised = sum(p.startswith("/raise/") for p in paths)
    assert server.stats.handler_errors == raised
    assert server.stats.start_batches >= 1  # the outcomes above did come from batched starts
    assert client.in_flight == 0


# -------------------------------------------------------------------- 3. no-responders for a batch


async def _served_then_gone(server_conn: Conn, client: tunnel.TunnelClient) -> None:
    """The client saw the host serving (and learnt start batches); then its server left."""
    server = await tunnel.serve(server_conn.nc, HOST, echo_path)
    try:
        await first_contact(client)
    finally:
        await server.close(timeout=1.0)
    await flush_everything(server_conn.nc)  # NATS has the UNSUBs: nobody serves the host now


async def timed_fetch(client: tunnel.TunnelClient, path: str) -> tuple[tunnel.TunnelError | None, float]:
    """How a fetch failed (None: it did not), and how long it took to."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    try:
        await client.fetch(f"tunnel://{HOST}{path}")
    except tunnel.TunnelError as exc:
        return exc, loop.time() - began
    return None, loop.time() - began


def _start_batches_written(written: list[bytes]) -> int:
    head = f"PUB {SUBJECTS.request} ".encode()
    return sum(1 for data in written if data.startswith(head) and b"\r\n" + START_BATCH in data)


async def test_no_responders_for_a_start_batch_reaches_every_start_in_it(nats_server: NatsServer) -> None:
    """The batch's message has its first start's reply subject, so NATS's no-responders reaches
    that request only; the client hands it on. Without that, the others would wait for their
    republish (10 s here) and only then learn that nobody serves the host."""
    first_frame = 20.0
    timeouts = tunnel.Timeouts(first_frame=first_frame, unreachable_grace=0.2, republish_interval=10.0)
    count = 16
    async with peers(nats_server.url) as (server_conn, caller):
        client = tunnel.TunnelClient(caller.nc, timeouts=timeouts)
        await _served_then_gone(server_conn, client)
        written = log_writes(caller.nc)

        async with asyncio.timeout(first_frame + 5):
            results = await asyncio.gather(*(timed_fetch(client, f"/gone/{i}") for i in range(count)))
        assert _start_batches_written(written) >= 1  # the burst did go in a batch
    for error, elapsed in results:
        assert isinstance(error, tunnel.TunnelUnreachable), (error, elapsed)
        assert elapsed < 5.0, elapsed  # not the republish interval, nor the first-frame timeout
    assert max(elapsed for _, elapsed in results) < first_frame
    assert client.in_flight == 0


async def test_a_no_responders_status_from_another_hosts_subject_leaves_a_batch_alone(
    nats_server: NatsServer,
) -> None:
    """A 503 status on the lead's id under another host's prefix fails nothing and does not
    make the client forget the batch (a real one for it must still reach every start)."""
    release = asyncio.Event()

    async def held(req: tunnel.Request) -> tunnel.Response:
        if req.path != "/first":
            await release.wait()
        return tunnel.Response(200, [], req.path.encode())

    async with peers(nats_server.url) as (server_conn, caller):
        server = await tunnel.serve(server_conn.nc, HOST, held)
        try:
            client = tunnel.TunnelClient(caller.nc)
            await first_contact(client)
            tasks = [asyncio.ensure_future(client.fetch(f"tunnel://{HOST}/held/{i}")) for i in range(8)]
            await asyncio.sleep(0)  # one pass: every fetch publishes its start
            assert len(client._start_batches) == 1, "the burst did not go in one start batch"
            (lead_id,) = client._start_batches
            other_host = tunnel.HostSubjects.for_host("other.example", client.prefix)
            forged = other_host.client_reply(lead_id, client.client_id)
            await server_conn.nc.publish(forged, b"", headers={"Status": "503"})
            await round_trip(server_conn.nc)
            await round_trip(caller.nc)  # the forged status has reached the client by now
            assert lead_id in client._start_batches
            assert all(not task.done() for task in tasks)
            release.set()
            async with asyncio.timeout(EVENT_TIMEOUT):
                responses = await asyncio.gather(*tasks)
            assert [r.status for r in responses] == [200] * 8
            for r in responses:
                await r.aclose()
        finally:
            release.set()
            await server.close(timeout=1.0)


async def test_no_responders_for_a_start_batch_still_reaches_its_starts_when_the_first_was_cancelled(
    nats_server: NatsServer,
) -> None:
    republish = 1.5
    timeouts = tunnel.Timeouts(first_frame=20.0, unreachable_grace=0.0, republish_interval=republish)
    count = 8
    async with peers(nats_server.url) as (server_conn, caller):
        client = tunnel.TunnelClient(caller.nc, timeouts=timeouts)
        await _served_then_gone(server_conn, client)

        tasks = [asyncio.ensure_future(timed_fetch(client, f"/gone/{i}")) for i in range(count)]
        await asyncio.sleep(0)  # one pass: every fetch publishes its start (no reply can be read yet)
        requests = list(client._streams.values())  # in the order of the tasks
        leads = [i for i, req in enumerate(requests) if req.batch_lead == req.stream.request_id]
        assert len(leads) == 1, "the burst did not go in one start batch"
        lead = leads[0]
        # Its caller gives up at once: the cancel runs before nats-py reads the 503.
        tasks[lead].cancel()
        async with asyncio.timeout(30):
            results = await asyncio.gather(*tasks, return_exceptions=True)
    others = [r for i, r in enumerate(results) if i > lead]
    assert others
    for result in others:
        assert isinstance(result, tuple)
        error, elapsed = result
        assert isinstance(error, tunnel.TunnelUnreachable), result
        assert elapsed < republish / 2, elapsed


# -------------------------------------------------------------------- 4, 5. no batches for older peers


@pytest.mark.parametrize(
    "older",
    [
        pytest.param({"start_batches": False, "reply_batches": False}, id="pre-batches"),
        pytest.param(
            {"compact_frames": False, "start_batches": False, "reply_batches": False}, id="pre-compact"
        ),
        # Compact frames off alone is a pre-compact server too: no batches either way.
        pytest.param({"compact_frames": False}, id="compact-frames-off"),
    ],
)
async def test_an_older_server_gets_no_batches_and_sends_none(
    nats_server: NatsServer, older: dict[str, Any]
) -> None:
    async with peers(nats_server.url) as (server_conn, caller), tapped(nats_server.url) as tap:
        outcomes, server, _ = await burst_after_first_contact(server_conn, caller, tap, server_options=older)
    assert outcomes == [(200, f"path /item/{i}".encode()) for i in range(BURST)]
    kinds = tap.kinds()
    assert START_BATCH not in kinds and REPLY_BATCH not in kinds, kinds
    starts = tap.on_request_subject()
    assert len(starts) == BURST + 1  # one message per start
    # The pre-batches server still takes compact starts: it is batches alone that stay off.
    assert (COMPACT_START in kinds) == older.get("compact_frames", True)
    assert server.stats.start_batches == 0 and server.stats.malformed_frames == 0


async def test_a_plain_v1_caller_gets_no_reply_batches(nats_server: NatsServer) -> None:
    async with peers(nats_server.url) as (server_conn, caller), tapped(nats_server.url) as tap:
        outcomes, server, _ = await burst_after_first_contact(server_conn, caller, tap, fast_path=False)
    assert outcomes == [(200, f"path /item/{i}".encode()) for i in range(BURST)]
    kinds = tap.kinds()
    assert REPLY_BATCH not in kinds and START_BATCH not in kinds, kinds
    assert len(tap.replies()) >= BURST + 1  # the answers were on the wire, one message each at least
    assert server.stats.start_batches == 0 and server.stats.malformed_frames == 0


# -------------------------------------------------------------------- 6. hostile batches


def _reply_for(request_id: str) -> str:
    return SUBJECTS.client_reply(request_id, "rogue")


async def test_hostile_start_batches_are_counted_malformed_and_the_server_keeps_serving(
    nats_server: NatsServer,
) -> None:
    ids = [new_request_id() for _ in range(frames.MAX_BATCHED_FRAMES + 1)]
    valid = [start_batch.entry(_reply_for(rid), compact_start(rid)) for rid in ids]
    refused = {
        "bare prefix": START_BATCH,
        "garbage after the prefix": START_BATCH + b"\xff" * 9,
        "an entry cut short": START_BATCH + valid[0][:-3],
        "one entry too many": start_batch.encode(valid),
        "a label that is not UTF-8": START_BATCH
        + struct.pack(">HI", 1, len(compact_start(ids[0])))
        + b"\xff"
        + compact_start(ids[0]),
        "a JSON start in it": start_batch.encode(
            [start_batch.entry(_reply_for(ids[0]), b'{"type":"request.start"}')]
        ),
        "an entry without a reply subject": start_batch.encode(
            [start_batch.entry("", compact_start(ids[0]))]
        ),
    }
    # Readable as a batch, but its start's reply subject lies outside the host: never answered.
    outside = start_batch.encode([start_batch.entry("evil.inbox", compact_start(ids[1]))])
    async with peers(nats_server.url) as (server_conn, caller):
        rogue = await nats.connect(nats_server.url, connect_timeout=EVENT_TIMEOUT)
        server = await tunnel.serve(server_conn.nc, HOST, echo_path)
        try:
            client = tunnel.TunnelClient(caller.nc)
            await first_contact(client)
            before = dataclasses.replace(server.stats)
            for payload in [*refused.values(), outside]:
                await rogue.publish(SUBJECTS.request, payload)
            # NATS delivers them to the server before anything published after this returns.
            await flush_everything(rogue)
            async with asyncio.timeout(EVENT_TIMEOUT), await client.fetch(f"tunnel://{HOST}/after") as resp:
                assert (resp.status, await resp.read()) == (200, b"path /after")
            after = server.stats
        finally:
            await server.close(timeout=1.0)
            await rogue.close()
        assert server_conn.trouble == [] and caller.trouble == []
    assert after.malformed_frames - before.malformed_frames == len(refused) + 1
    assert after.start_batches - before.start_batches == 1  # the readable one only
    assert after.requests - before.requests == 1  # none of the rogue starts was served


async def test_a_start_batch_of_the_most_starts_a_server_takes_is_served_whole(
    nats_server: NatsServer,
) -> None:
    """The limit is exact: 64 starts in one batch are 64 requests (one more is refused above)."""
    ids = [new_request_id() for _ in range(frames.MAX_BATCHED_FRAMES)]
    payload = start_batch.encode([start_batch.entry(_reply_for(rid), compact_start(rid)) for rid in ids])
    async with peers(nats_server.url) as (server_conn, _):
        rogue = await nats.connect(nats_server.url, connect_timeout=EVENT_TIMEOUT)
        answers: list[str] = []
        all_answered = asyncio.Event()

        async def on_answer(msg: Msg) -> None:
            parsed = parse_request_subject(msg.subject, PREFIX)
            assert parsed is not None
            frame = codec.decode_frame(msg.data, parsed[1])
            if isinstance(frame, frames.ResponseWhole):
                answers.append(parsed[1])
            if len(answers) == len(ids):
                all_answered.set()

        await rogue.subscribe(f"{SUBJECTS.base}.req.*.reply.rogue", cb=on_answer)
        await flush_everything(rogue)
        server = await tunnel.serve(server_conn.nc, HOST, echo_path)
        try:
            await rogue.publish(SUBJECTS.request, payload)
            await flush_everything(rogue)
            await asyncio.wait_for(all_answered.wait(), EVENT_TIMEOUT)
        finally:
            await server.close(timeout=1.0)
            await rogue.close()
    assert sorted(answers) == sorted(ids)
    assert server.stats.start_batches == 1 and server.stats.requests == len(ids)
    assert server.stats.malformed_frames == 0


async def test_rogue_reply_batches_are_dropped_without_disturbing_a_request(nats_server: NatsServer) -> None:
    entered = asyncio.Event()
    release = asyncio.Event()

    async def held(req: tunnel.Request) -> tunnel.Response:
        if req.path == "/held":
            entered.set()
            await release.wait()
            return tunnel.Response(200, [], b"the real answer")
        return await echo_path(req)

    other_host = tunnel.HostSubjects.for_host("elsewhere.example")
    async with peers(nats_server.url) as (server_conn, caller):
        rogue = await nats.connect(nats_server.url, connect_timeout=EVENT_TIMEOUT)
        server = await tunnel.serve(server_conn.nc, HOST, held)
        try:
            client = tunnel.TunnelClient(caller.nc)
            await first_contact(client)

            async def fetch_held() -> tuple[int, bytes]:
                async with await client.fetch(f"tunnel://{HOST}/held") as resp:
                    return resp.status, await resp.read()

            task = asyncio.ensure_future(fetch_held())
            await asyncio.wait_for(entered.wait(), EVENT_TIMEOUT)
            (rid,) = client._streams  # the one request in flight
            subject = SUBJECTS.client_reply(rid, client.client_id)  # its own reply subject
            forged = reply_batch.entry(rid, whole(201, b"forged"))
            malformed = {
                "bare prefix": REPLY_BATCH,
                "garbage after the prefix": REPLY_BATCH + b"\xff" * 9,
                "one entry too many": reply_batch.encode([forged] * (frames.MAX_BATCHED_FRAMES + 1)),
                "an invalid request id": reply_batch.encode([batches.entry("no such id!", whole(201, b"x"))]),
                "an empty frame": reply_batch.encode([batches.entry(rid, b"")]),
            }
            dropped_before = client.stats.frames_dropped
            for payload in malformed.values():
                await rogue.publish(subject, payload)
            # Well-formed, for requests the client does not have: dropped quietly.
            unknown = [reply_batch.entry(new_request_id(), whole(201, b"x")) for _ in range(3)]
            await rogue.publish(subject, reply_batch.encode(unknown))
            # Well-formed, naming the real request, from under another host's prefix: forged.
            await rogue.publish(other_host.client_reply(rid, client.client_id), reply_batch.encode([forged]))
            await flush_everything(rogue)
            await round_trip(caller.nc)  # its PONG comes after the rogue messages: all handled
            assert client.stats.frames_dropped - dropped_before == len(malformed) + 1
            assert rid in client._streams and not task.done()  # undisturbed, still waiting
            release.set()
            async with asyncio.timeout(EVENT_TIMEOUT):
                assert await task == (200, b"the real answer")
        finally:
            release.set()
            await server.close(timeout=1.0)
            await rogue.close()
        assert caller.trouble == []
    assert client.in_flight == 0


# -------------------------------------------------------------------- 7. a small max_payload


async def test_batches_stay_under_a_small_max_payload(nats_server_factory: NatsServerFactory) -> None:
    max_payload = 4096
    nats_server = nats_server_factory(max_payload=max_payload)

    async def padded(req: tunnel.Request) -> tunnel.Response:
        pad = req.header("x-pad") or ""
        return tunnel.Response(200, [("x-pad", pad)], f"{req.url} {len(pad)}".encode())

    # ~1.3 to ~2.1 KB of headers each way: two fit in a message, three never do.
    sizes = [1300 + 25 * i for i in range(BURST)]
    async with peers(nats_server.url) as (server_conn, caller), tapped(nats_server.url) as tap:
        server = await tunnel.serve(server_conn.nc, HOST, padded)
        try:
            client = tunnel.TunnelClient(caller.nc)
            assert caller.nc.max_payload == max_payload
            await first_contact(client)

            async def one(i: int) -> tuple[int, str | None, bytes]:
                pad = chr(ord("a") + i % 26) * sizes[i]
                url = f"tunnel://{HOST}/pad/{i}"
                async with await client.fetch(url, headers=[("x-pad", pad)]) as resp:
                    return resp.status, resp.header("x-pad"), await resp.read()

            async with asyncio.timeout(EVENT_TIMEOUT):
                outcomes = await asyncio.gather(*(one(i) for i in range(BURST)), return_exceptions=True)
            await tap.caught_up(caller.nc, server_conn.nc)
        finally:
            await server.close(timeout=1.0)
        assert caller.trouble == [] and server_conn.trouble == []  # no error, no reconnect
        assert caller.nc.is_connected and server_conn.nc.is_connected
        assert caller.nc.stats["reconnects"] == 0 and server_conn.nc.stats["reconnects"] == 0
    for i, outcome in enumerate(outcomes):
        pad = chr(ord("a") + i % 26) * sizes[i]
        assert outcome == (200, pad, f"/pad/{i} {sizes[i]}".encode()), (i, outcome)
    assert max(len(data) for _, data in tap.seen) <= max_payload
    assert any(data.startswith(START_BATCH) for data in tap.on_request_subject())
    assert any(data.startswith(REPLY_BATCH) for _, data in tap.replies())
    assert sum(start_batch_sizes(tap.on_request_subject())) == BURST + 1
    assert server.stats.malformed_frames == 0 and client.stats.frames_dropped == 0


async def test_reply_batches_stay_under_the_callers_max_frame(nats_server: NatsServer) -> None:
    """A caller whose connection takes smaller payloads than the server's (it offers that as
    ``maxFrame``) gets reply batches no larger: each frame of the protocol respects it."""
    max_frame = 4096

    async def padded(req: tunnel.Request) -> tunnel.Response:
        return tunnel.Response(200, [("x-pad", "p" * 1500)], req.url.encode())

    async with peers(nats_server.url) as (server_conn, caller), tapped(nats_server.url) as tap:
        caller.nc._max_payload = max_frame  # what a caller on a NATS node with a smaller limit has
        outcomes, _, _ = await burst_after_first_contact(server_conn, caller, tap, padded)
    assert outcomes == [(200, f"/item/{i}".encode()) for i in range(BURST)]
    replies = [data for _, data in tap.replies()]
    assert any(data.startswith(REPLY_BATCH) for data in replies)  # still batched, only smaller
    assert max(len(data) for data in replies) <= max_frame


# -------------------------------------------------------------------- 8. the reference daemon permissions


@pytest.fixture
def op(nats_server_factory: NatsServerFactory, tmp_path: Path) -> OperatorServer:
    return start_operator_server(nats_server_factory, tmp_path)


async def test_a_burst_under_the_reference_daemon_permissions(op: OperatorServer) -> None:
    daemon = await connect_daemon(
        op.server.url, **creds_auth(op.setup.user_creds("daemon", permissions=reference_daemon_permissions()))
    )
    caller = await connect_daemon(op.server.url, **creds_auth(op.setup.user_creds("caller")))
    tap = await Tap.start(op.server.url, **creds_auth(op.setup.user_creds("caller")))
    server = await tunnel.serve(daemon.nc, HOST, echo_path)
    try:
        denied_at_serve = list(daemon.errors)  # its fallbacks, checked once each at serve()
        client = tunnel.TunnelClient(caller.nc)
        await first_contact(client)
        outcomes = await burst(client, [f"/item/{i}" for i in range(BURST)])
        await flush_everything(daemon.nc)  # a refused publish's -ERR would have come by now
        # The daemon may not publish a marker; the caller's comes after the answers it had (NATS
        # queued each answer for the tap before the caller could have it).
        await tap.caught_up(caller.nc)
    finally:
        await server.close(timeout=1.0)
        await daemon.nc.close()
        await caller.nc.close()
        await tap.close()
    assert outcomes == [(200, f"path /item/{i}".encode()) for i in range(BURST)]
    assert any(data.startswith(START_BATCH) for data in tap.on_request_subject())
    assert server.stats.start_batches >= 1
    # Answers on the reference reply subject, one message each: never a batch.
    replies = tap.replies()
    assert REPLY_BATCH not in {data[:2] for _, data in replies}
    assert {subject.rsplit(".", 1)[1] for subject, _ in replies} == {"reply"}
    assert len(set(answered_ids(replies))) == BURST + 1
    assert len(denied_at_serve) == 3 and daemon.errors == denied_at_serve, daemon.errors
    assert caller.errors == []
