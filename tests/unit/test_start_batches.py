"""Start batches (``startBatches``): several compact ``request.start`` frames to one host in one
NATS message (``tunnel._start_batch``).

Sans-IO: the real compact start encoder, a real dispatcher and real server and caller streams,
fake clocks. What is pinned here: a batch keeps its starts, their order and their reply
subjects; anything but a well-formed batch of compact starts is a ``FrameError`` and refused
whole (never another exception); a server takes batches only when it says so in its ack
(``binaryStart`` and ``startBatches``), and a caller believes only an ack; the client's memory
of hosts that take batches ends with what ends its memory of compact starts.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any, Final

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.unit.test_compact_frames import GOOD_EXT, caller, dispatcher
from tests.unit.test_dispatch import Handle
from tests.unit.test_stream import CLIENT_ID, RID, SUBJECTS, FakeClock
from tunnel import _codec as codec
from tunnel import _frames as f
from tunnel import _start_batch as start_batch
from tunnel._caller import CallerPhase
from tunnel._compact_starts import CompactStarts
from tunnel._errors import ErrorCode

ENTRY_HEAD: Final = struct.Struct(">HI")  # replyLength, startLength (the documented layout)
REPLY: Final = SUBJECTS.client_reply(RID, CLIENT_ID)


def rid(i: int) -> str:
    return f"{i:032x}"


def reply_of(request_id: str) -> str:
    return SUBJECTS.client_reply(request_id, CLIENT_ID)


def compact(request_id: str = RID, url: str = "/items") -> bytes:
    """A compact start as the real encoder makes it (no body, no deadline, like a batched one)."""
    return codec.encode_compact_start(
        request_id, "GET", url, [("accept", "text/plain")], False, None, GOOD_EXT
    )


START: Final = compact()


def batch_of(n: int) -> tuple[bytes, list[tuple[str, bytes]]]:
    pairs = [(reply_of(rid(i)), compact(rid(i), f"/items/{i}")) for i in range(n)]
    return start_batch.encode([start_batch.entry(r, s) for r, s in pairs]), pairs


# -- the format ----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 16])
def test_a_batch_gives_back_its_starts_in_order_with_their_reply_subjects(n: int) -> None:
    payload, pairs = batch_of(n)
    assert payload[:2] == start_batch.PREFIX == b"\x00\x06"
    assert start_batch.is_start_batch(payload)
    decoded = start_batch.decode(payload)
    assert decoded == pairs
    for i, (reply, start) in enumerate(decoded):
        frame = codec.decode_compact_start(start, reply, SUBJECTS.base)
        assert frame.request_id == rid(i) and frame.reply_subject == reply_of(rid(i))
        assert frame.url == f"/items/{i}"
    # Nothing but the prefix and the entries: each is ENTRY_OVERHEAD + reply + start.
    overhead = start_batch.ENTRY_OVERHEAD * n + sum(len(r.encode()) for r, _ in pairs)
    assert len(payload) == len(start_batch.PREFIX) + overhead + sum(len(s) for _, s in pairs)


def test_an_entry_is_its_lengths_then_the_reply_then_the_start() -> None:
    reply = "caf\u00e9.reply"  # lengths count UTF-8 bytes, not characters
    entry = start_batch.entry(reply, START)
    assert start_batch.ENTRY_OVERHEAD == ENTRY_HEAD.size == 6
    assert entry == ENTRY_HEAD.pack(len(reply.encode()), len(START)) + reply.encode() + START
    assert start_batch.decode(start_batch.encode([entry])) == [(reply, START)]


def test_is_start_batch_tells_a_batch_from_everything_else() -> None:
    assert start_batch.is_start_batch(batch_of(2)[0])
    assert start_batch.is_start_batch(start_batch.PREFIX)  # an (empty, refused) batch all the same
    for other in (
        START,
        b'{"type":"request.start"}',
        b"",
        b"\x00",
        b"\x06",
        b"\x06\x00",
        b"\x01\x06",
        codec.encode_compact_whole(200, [], None, b"x", None, True),
    ):
        assert not start_batch.is_start_batch(other), other


def test_the_longest_reply_subject_fits_and_a_longer_one_is_a_value_error() -> None:
    longest = "r" * start_batch.MAX_REPLY_LENGTH
    assert start_batch.MAX_REPLY_LENGTH == 65535
    assert start_batch.decode(start_batch.encode([start_batch.entry(longest, START)])) == [(longest, START)]
    with pytest.raises(ValueError, match="too long"):
        start_batch.entry("r" * 65536, START)
    with pytest.raises(ValueError, match="too long"):
        start_batch.entry("\u00e9" * 32768, START)  # 32768 characters, 65536 bytes


def test_a_batch_holds_at_most_max_batched_starts() -> None:
    assert f.MAX_BATCHED_STARTS == 64
    full, pairs = batch_of(f.MAX_BATCHED_STARTS)
    assert start_batch.decode(full) == pairs
    with pytest.raises(f.FrameError, match="more than 64"):
        start_batch.decode(full + start_batch.entry(REPLY, START))


def raw_entry(
    reply: bytes, start: bytes, reply_length: int | None = None, start_length: int | None = None
) -> bytes:
    return (
        ENTRY_HEAD.pack(
            len(reply) if reply_length is None else reply_length,
            len(start) if start_length is None else start_length,
        )
        + reply
        + start
    )


GOOD_ENTRY: Final = raw_entry(REPLY.encode(), START)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (start_batch.PREFIX, "empty start batch"),
        (start_batch.PREFIX + b"\x00\x01\x00", "truncated"),
        (start_batch.PREFIX + GOOD_ENTRY + b"\x00\x01\x00\x00\x00", "truncated"),
        (start_batch.PREFIX + GOOD_ENTRY[:-1], "longer than the batch"),
        (start_batch.PREFIX + raw_entry(b"r", START, start_length=len(START) + 1), "longer than the batch"),
        (start_batch.PREFIX + raw_entry(b"r", START, reply_length=0xFFFF), "longer than the batch"),
        (start_batch.PREFIX + raw_entry(b"r", START, start_length=0xFFFFFFFF), "longer than the batch"),
        (start_batch.PREFIX + GOOD_ENTRY + raw_entry(b"r", b"", start_length=5), "longer than the batch"),
        (start_batch.PREFIX + raw_entry(b"r", b'{"type":"request.start"}'), "other than a compact"),
        (
            start_batch.PREFIX + raw_entry(b"r", codec.encode_compact_whole(200, [], None, b"x", None, True)),
            "other than a compact",
        ),
        (
            start_batch.PREFIX
            + raw_entry(b"r", codec.encode_frame(f.RequestChunk(RID, 0, b"x"), binary=True)),
            "other than a compact",
        ),
        (start_batch.PREFIX + raw_entry(b"r", start_batch.PREFIX + GOOD_ENTRY), "other than a compact"),
        (start_batch.PREFIX + raw_entry(b"r", b""), "other than a compact"),
        (start_batch.PREFIX + raw_entry(b"r", b"\x00"), "other than a compact"),
        (start_batch.PREFIX + raw_entry(b"", START), "without a reply subject"),
        (start_batch.PREFIX + raw_entry(b"\xff\xfe", START), "UTF-8"),
        (start_batch.PREFIX + raw_entry(b"\xed\xa0\x80", START), "UTF-8"),  # an encoded surrogate
        (start_batch.PREFIX + GOOD_ENTRY + raw_entry(b"r\xc3", START), "UTF-8"),
        (START, "not a start batch"),
        (b'{"type":"request.start"}', "not a start batch"),
        (b"", "not a start batch"),
        (b"\x00", "not a start batch"),
    ],
)
def test_a_malformed_batch_is_a_frame_error(payload: bytes, reason: str) -> None:
    with pytest.raises(f.FrameError, match=reason):
        start_batch.decode(payload)


def test_a_batch_cut_at_an_entry_boundary_is_a_shorter_batch_and_anywhere_else_refused() -> None:
    """No count or total length: NATS delivers a message whole, so a cut only comes from a
    hostile sender, and it can only drop whole starts of its own."""
    payload, pairs = batch_of(3)
    boundaries = {len(start_batch.PREFIX)}
    for reply, start in pairs:
        boundaries.add(max(boundaries) + start_batch.ENTRY_OVERHEAD + len(reply.encode()) + len(start))
    for cut in range(len(payload) + 1):
        if cut in boundaries and cut > len(start_batch.PREFIX):
            assert start_batch.decode(payload[:cut]) == pairs[: sorted(boundaries).index(cut)]
        else:
            with pytest.raises(f.FrameError):
                start_batch.decode(payload[:cut])


# -- hostile batches, property-based -------------------------------------------------------

FUZZ_BATCH, FUZZ_PAIRS = batch_of(3)


def check_decoded(payload: bytes, decoded: list[tuple[str, bytes]]) -> None:
    """What ``decode`` returns is sound: at most 64 compact starts with non-empty replies, and
    encoding it again gives exactly the bytes it came from (nothing skipped or invented)."""
    assert 1 <= len(decoded) <= f.MAX_BATCHED_STARTS
    for reply, start in decoded:
        assert reply and start[:2] == b"\x00\x04"
    assert start_batch.encode([start_batch.entry(r, s) for r, s in decoded]) == payload


@given(st.binary(max_size=2048))
def test_any_bytes_after_the_prefix_decode_or_raise_frame_error_only(data: bytes) -> None:
    payload = start_batch.PREFIX + data
    try:
        decoded = start_batch.decode(payload)
    except f.FrameError:
        return
    check_decoded(payload, decoded)


@given(st.integers(0, len(FUZZ_BATCH) - 1), st.integers(0, 255))
def test_one_changed_byte_of_a_batch_never_raises_anything_but_frame_error(at: int, value: int) -> None:
    mutated = bytearray(FUZZ_BATCH)
    mutated[at] = value
    payload = bytes(mutated)
    clock = FakeClock()
    disp = dispatcher(clock)
    try:
        decoded = disp.batched_starts(payload)
    except f.FrameError:
        return
    if decoded is None:  # the prefix changed: the I/O layer then reads it as one start
        assert at < 2 and not start_batch.is_start_batch(payload)
        disp.on_start(payload, REPLY)
        return
    check_decoded(payload, decoded)
    for reply, start in decoded:  # and every start of it is then handled without an exception
        answer = disp.on_start(start, reply)
        if answer.stream is not None:
            assert answer.stream.start_frame.reply_subject == reply


@given(
    st.lists(
        st.tuples(
            st.text(st.characters(codec="utf-8"), min_size=1, max_size=40),
            st.binary(max_size=64).map(lambda tail: b"\x00\x04" + tail),
        ),
        min_size=1,
        max_size=f.MAX_BATCHED_STARTS,
    )
)
def test_any_replies_and_compact_starts_round_trip(pairs: list[tuple[str, bytes]]) -> None:
    payload = start_batch.encode([start_batch.entry(r, s) for r, s in pairs])
    assert start_batch.decode(payload) == pairs


# -- the server ----------------------------------------------------------------------------


def test_a_single_start_is_not_a_batch_for_the_dispatcher() -> None:
    clock = FakeClock()
    for options in ({}, {"start_batches": False}, {"compact_frames": False}):
        disp = dispatcher(clock, **options)
        assert disp.batched_starts(caller(clock).start().payload) is None
        assert disp.batched_starts(caller(clock, compact_start=False).start().payload) is None


def test_the_dispatcher_gives_the_starts_of_a_batch_and_each_is_its_own_request() -> None:
    clock = FakeClock()
    callers = [caller(clock, request_id=rid(i), url=f"/n/{i}") for i in range(3)]
    starts = [c.start() for c in callers]
    for pub, stream in zip(starts, callers, strict=True):
        assert pub.payload[:2] == b"\x00\x04" and pub.reply == stream.reply_subject
    payload = start_batch.encode([start_batch.entry(s.reply or "", s.payload) for s in starts])
    disp = dispatcher(clock)
    pairs = disp.batched_starts(payload)
    assert pairs == [(c.reply_subject, s.payload) for c, s in zip(callers, starts, strict=True)]
    for i, ((reply, start), stream) in enumerate(zip(pairs, callers, strict=True)):
        answer = disp.on_start(start, reply)
        assert answer.malformed is None and answer.stream is not None
        server = answer.stream
        disp.admit(Handle(server))
        assert server.request_id == stream.request_id and server.start_frame.reply_subject == reply
        assert server.start_frame.url == f"/n/{i}"
        whole = server.whole_response(200, [], None, stream.request_id.encode())
        assert whole is not None and whole.subject == reply
        stream.receive(codec.decode_frame(whole.payload, stream.request_id))
        assert stream.phase is CallerPhase.DONE
    assert disp.stats.requests == 3 and len(disp.active) == 3


def test_a_batched_start_with_a_reply_subject_of_another_request_is_dropped_alone() -> None:
    clock = FakeClock()
    good, bad = caller(clock, request_id=rid(1)), caller(clock, request_id=rid(2))
    payload = start_batch.encode(
        [
            start_batch.entry(reply_of(rid(1)), good.start().payload),
            start_batch.entry(reply_of(rid(1)), bad.start().payload),
        ]
    )
    disp = dispatcher(clock)
    (first, second) = disp.batched_starts(payload) or []
    assert disp.on_start(first[1], first[0]).stream is not None
    answer = disp.on_start(second[1], second[0])
    assert answer.stream is None and answer.publishes == () and answer.malformed is not None


@pytest.mark.parametrize("option", ["compact_frames", "start_batches"])
def test_a_server_that_does_not_take_batches_refuses_one_whole(option: str) -> None:
    clock = FakeClock()
    payload, _ = batch_of(2)
    disp = dispatcher(clock)
    assert disp.batched_starts(payload) is not None
    off: dict[str, Any] = {option: False}
    disp.options = dataclasses.replace(disp.options, **off)
    with pytest.raises(f.FrameError, match="does not take"):
        disp.batched_starts(payload)
    with pytest.raises(f.FrameError, match="does not take"):  # refused before it is read
        disp.batched_starts(start_batch.PREFIX + b"garbage")


def test_an_unreadable_batch_is_a_frame_error_from_the_dispatcher() -> None:
    payload, _ = batch_of(2)
    with pytest.raises(f.FrameError, match="longer than the batch"):
        dispatcher(FakeClock()).batched_starts(payload[:-1])


def test_a_whole_batch_given_as_one_start_is_dropped_without_an_answer() -> None:
    """What a server from before batches (and this one's ``on_start``) makes of a batch."""
    clock = FakeClock()
    payload, _ = batch_of(2)
    for options in ({}, {"start_batches": False}, {"compact_frames": False}):
        answer = dispatcher(clock, **options).on_start(payload, reply_of(rid(0)))
        assert answer.stream is None and answer.publishes == () and answer.malformed is not None


# -- negotiation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "batches"),
    [
        ({}, True),
        ({"start_batches": False}, False),
        ({"compact_frames": False}, False),
        ({"compact_frames": False, "start_batches": True}, False),
    ],
)
def test_an_ack_says_whether_the_server_takes_batches_and_the_caller_learns_it(
    options: dict[str, bool], batches: bool
) -> None:
    clock = FakeClock()
    stream = caller(clock, compact_start=False, first_contact=True)
    answer = dispatcher(clock, **options).on_start(stream.start().payload, REPLY)
    assert answer.stream is not None
    ack = codec.decode_frame(answer.stream.ack().payload, RID)
    assert isinstance(ack, f.ResponseAck) and ack.extensions is not None
    assert ack.extensions.start_batches is batches
    assert ack.extensions.binary_start is options.get("compact_frames", True)
    assert stream.server_takes_start_batches is None
    stream.receive(ack)
    assert stream.server_takes_start_batches is batches


def test_start_batches_travels_as_its_json_key_and_only_when_true() -> None:
    on = f.AckExtensions(binary_start=True, start_batches=True)
    text = codec.encode_frame(f.ResponseAck(RID, on))
    assert b'"startBatches":true' in text
    assert codec.decode_frame(text, RID) == f.ResponseAck(RID, on)
    off = codec.encode_frame(f.ResponseAck(RID, f.AckExtensions(binary_start=True)))
    assert b"startBatches" not in off
    for value in (b"false", b'"yes"', b"1", b"null"):
        odd = off.replace(b'"binaryStart":true', b'"binaryStart":true,"startBatches":' + value)
        frame = codec.decode_frame(odd, RID)
        assert isinstance(frame, f.ResponseAck) and frame.extensions is not None
        assert frame.extensions.start_batches is False, value


def test_batches_without_compact_starts_mean_no_batches_to_the_caller() -> None:
    stream = caller(FakeClock(), compact_start=False)
    stream.receive(f.ResponseAck(RID, f.AckExtensions(binary_start=False, start_batches=True)))
    assert stream.server_takes_start_batches is False and stream.server_takes_compact_starts is False


@pytest.mark.parametrize(
    ("compact_start", "compact_frames", "kind"),
    [(True, True, 0x05), (False, True, 0x05), (False, False, 0x03)],
)
def test_a_whole_response_as_the_first_frame_says_nothing_about_batches(
    compact_start: bool, compact_frames: bool, kind: int
) -> None:
    clock = FakeClock()
    stream = caller(clock, compact_start=compact_start)
    answer = dispatcher(clock, compact_frames=compact_frames).on_start(stream.start().payload, REPLY)
    assert answer.stream is not None
    whole = answer.stream.whole_response(200, [], None, b"x")
    assert whole is not None and whole.payload[:2] == bytes((0, kind))
    stream.receive(codec.decode_frame(whole.payload, RID))
    assert stream.phase is CallerPhase.DONE
    assert stream.server_takes_compact_starts is compact_frames
    assert stream.server_takes_start_batches is None


def test_an_error_or_a_plain_v1_ack_says_nothing_about_batches() -> None:
    stream = caller(FakeClock())
    stream.receive(f.ResponseError(RID, ErrorCode.HANDLER_ERROR, "boom"))
    assert stream.server_takes_start_batches is None
    stream = caller(FakeClock(), compact_start=False)
    stream.receive(f.ResponseAck(RID))
    assert stream.server_takes_start_batches is None and stream.server_takes_compact_starts is False


# -- the client's memory of hosts ----------------------------------------------------------


def test_batches_only_after_an_ack_said_so() -> None:
    hosts = CompactStarts(limit=8, cooldown=60.0)
    hosts.learn("desk", True, 0.0)
    assert hosts.use("desk") and not hosts.batch("desk")
    hosts.learn("desk", True, 1.0, batches=False)
    assert not hosts.batch("desk")
    hosts.learn("desk", True, 2.0, batches=True)
    assert hosts.batch("desk") and not hosts.batch("other")
    hosts.learn("desk", True, 3.0, batches=None)  # a response.whole says nothing about batches
    assert hosts.batch("desk")
    hosts.learn("desk", True, 4.0)
    assert hosts.batch("desk")
    hosts.learn("desk", True, 5.0, batches=False)  # an ack of a server that does not take them
    assert hosts.use("desk") and not hosts.batch("desk")


def test_no_compact_starts_means_no_batches() -> None:
    hosts = CompactStarts(limit=8, cooldown=60.0)
    hosts.learn("desk", True, 0.0, batches=True)
    hosts.learn("desk", False, 1.0)
    assert not hosts.use("desk") and not hosts.batch("desk")
    hosts.learn("desk", False, 2.0, batches=True)  # no compact starts: batches cannot follow
    assert not hosts.batch("desk")


def test_an_unanswered_start_ends_batches_for_the_whole_cooldown() -> None:
    hosts = CompactStarts(limit=8, cooldown=60.0)
    hosts.learn("desk", True, 0.0, batches=True)
    hosts.learn("other", True, 0.0, batches=True)
    hosts.unanswered("desk", 10.0)
    assert not hosts.batch("desk") and not hosts.use("desk")
    assert hosts.batch("other")
    hosts.learn("desk", True, 69.9, batches=True)  # still in the cooldown
    assert not hosts.batch("desk") and not hosts.use("desk")
    hosts.learn("desk", True, 70.0, batches=True)
    assert hosts.batch("desk") and hosts.use("desk")


def test_clearing_the_host_memory_at_its_limit_clears_batches_too() -> None:
    hosts = CompactStarts(limit=2, cooldown=60.0)
    hosts.learn("a", True, 0.0, batches=True)
    hosts.learn("b", True, 0.0, batches=True)
    hosts.learn("a", True, 0.0, batches=True)  # known already: nothing cleared
    assert hosts.batch("a") and hosts.batch("b")
    hosts.learn("c", True, 0.0)
    assert hosts.use("c") and not hosts.batch("c")
    assert not any(hosts.use(h) or hosts.batch(h) for h in ("a", "b"))


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["learn", "unanswered"]),
            st.sampled_from(["a", "b", "c", "d", "e"]),
            st.booleans(),
            st.sampled_from([None, True, False]),
            st.floats(0, 200),
        ),
        max_size=60,
    )
)
def test_batches_are_only_ever_for_hosts_that_take_compact_starts(
    ops: list[tuple[str, str, bool, bool | None, float]],
) -> None:
    hosts = CompactStarts(limit=3, cooldown=60.0)
    for op, host, takes, batches, now in ops:
        if op == "learn":
            hosts.learn(host, takes, now, batches)
        else:
            hosts.unanswered(host, now)
        names = "abcde"
        assert all(hosts.use(h) for h in names if hosts.batch(h))
        assert sum(hosts.batch(h) for h in names) <= hosts.limit
