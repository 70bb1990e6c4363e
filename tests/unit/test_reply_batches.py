"""Reply batches (``replyBatches``): several complete responses to one caller in one NATS
message (``tunnel._reply_batch``), and when a server may put a response in one
(``ServerStream.reply_batch_key``).

Sans-IO: the real encoders, a real dispatcher and real streams, a fake clock.
"""

from __future__ import annotations

from typing import Final

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.unit.test_compact_frames import GOOD_EXT, dispatcher
from tests.unit.test_dispatch import Handle
from tests.unit.test_stream import CLIENT_ID, SUBJECTS, FakeClock, make_caller
from tunnel import _batches as batches
from tunnel import _codec as codec
from tunnel import _frames as f
from tunnel import _reply_batch as reply_batch
from tunnel._caller import CallerPhase
from tunnel._server_stream import ServerStream

HEADERS: Final = [("content-type", "text/plain")]


def rid(i: int) -> str:
    return f"{i:032x}"


def served(clock: FakeClock, request_id: str, **options: object) -> tuple[ServerStream, object]:
    """A caller's (compact) start taken by a real dispatcher: the server's stream, and the caller."""
    caller = make_caller(clock, request_id=request_id, compact_start=True, url=f"/r/{request_id}")
    disp = dispatcher(clock, **options)
    start = caller.start()
    answer = disp.on_start(start.payload, start.reply or "")
    assert answer.stream is not None
    disp.admit(Handle(answer.stream))
    return answer.stream, caller


def whole_of(stream: ServerStream, body: bytes) -> bytes:
    pub = stream.whole_response(200, HEADERS, None, body)
    assert pub is not None
    return pub.payload


def test_a_reply_batch_gives_back_each_response_for_its_own_request() -> None:
    clock = FakeClock()
    pairs = []
    callers = []
    for i in range(3):
        stream, caller = served(clock, rid(i))
        pairs.append((rid(i), whole_of(stream, f"body {i}".encode())))
        callers.append(caller)
    payload = reply_batch.encode([reply_batch.entry(r, w) for r, w in pairs])
    assert payload[:2] == reply_batch.PREFIX == b"\x00\x07"
    assert reply_batch.is_reply_batch(payload) and not reply_batch.is_reply_batch(pairs[0][1])
    decoded = reply_batch.decode(payload)
    assert decoded == pairs
    for (request_id, frame), caller in zip(decoded, callers, strict=True):
        event = caller.receive(codec.decode_frame(frame, request_id))  # type: ignore[attr-defined]
        assert caller.phase is CallerPhase.DONE  # type: ignore[attr-defined]
        assert event is not None and event.complete_body == f"body {int(request_id, 16)}".encode()


WHOLE: Final = bytes.fromhex("0005") + bytes(20)
CHUNK: Final = bytes.fromhex("0002") + bytes(8)
JSON_HEAD: Final = b'{"type":"response.start"}'


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (reply_batch.PREFIX, "empty"),
        (reply_batch.PREFIX + batches.entry("not an id!", WHOLE), "invalid request id"),
        (reply_batch.PREFIX + batches.entry("", WHOLE), "invalid request id"),
        (
            reply_batch.PREFIX + batches.entry(rid(1), b'{"type":"response.start"}'),
            "other than a response.whole",
        ),
        (
            reply_batch.PREFIX + batches.entry(rid(1), bytes.fromhex("0002") + bytes(8)),
            "other than",
        ),  # a chunk
        (reply_batch.PREFIX + batches.entry(rid(1), reply_batch.PREFIX), "other than"),  # a batch in a batch
        (reply_batch.PREFIX + batches.entry(rid(1), b""), "other than"),
        (reply_batch.PREFIX + batches.entry(rid(1), WHOLE)[:-1], "longer than the batch"),
        (reply_batch.PREFIX + b"\x00", "truncated"),
        (WHOLE, "not a reply batch"),
        (b"\x00\x06" + batches.entry(rid(1), WHOLE), "not a reply batch"),  # a start batch
    ],
)
def test_a_malformed_reply_batch_is_refused_whole(payload: bytes, reason: str) -> None:
    with pytest.raises(f.FrameError, match=reason):
        reply_batch.decode(payload)


def test_a_binary_whole_with_a_json_head_may_travel_in_a_reply_batch() -> None:
    frame = bytes.fromhex("0003") + bytes(8)
    assert reply_batch.decode(reply_batch.PREFIX + batches.entry(rid(2), frame)) == [(rid(2), frame)]


@given(st.binary(max_size=300))
def test_any_bytes_after_the_prefix_decode_or_raise_frame_error_only(data: bytes) -> None:
    try:
        pairs = reply_batch.decode(reply_batch.PREFIX + data)
    except f.FrameError:
        return
    assert pairs and all(frame[:2] in (b"\x00\x03", b"\x00\x05") for _, frame in pairs)


# -- when a server batches a response ------------------------------------------------------


def test_a_response_to_an_offering_callers_own_reply_subject_may_be_batched() -> None:
    stream, _ = served(FakeClock(), rid(1))
    assert stream.reply_subject == SUBJECTS.client_reply(rid(1), CLIENT_ID)
    assert stream.reply_batch_key() == f"reply.{CLIENT_ID}"


def test_responses_to_two_callers_have_different_keys() -> None:
    clock = FakeClock()
    stream, _ = served(clock, rid(1))
    other_caller = make_caller(clock, request_id=rid(2), compact_start=True)
    other_caller.reply_subject = SUBJECTS.client_reply(rid(2), "0dd0dd0dd0dd0dd0")
    start = other_caller.start()
    other = dispatcher(clock).on_start(start.payload, start.reply or "").stream
    assert other is not None
    assert other.reply_batch_key() == "reply.0dd0dd0dd0dd0dd0" != stream.reply_batch_key()


@pytest.mark.parametrize(
    "options",
    [{"reply_batches": False}, {"reference_replies": True}],
    ids=["server option off", "reference replies"],
)
def test_a_response_goes_alone_when_the_server_may_not_batch_it(options: dict[str, object]) -> None:
    stream, _ = served(FakeClock(), rid(1), **options)
    assert stream.reply_batch_key() is None


def test_a_response_goes_alone_to_a_caller_that_did_not_offer_reply_batches() -> None:
    clock = FakeClock()
    reply = SUBJECTS.client_reply(rid(1), CLIENT_ID)
    for ext, batched in (
        ('{"binaryData":true,"wholeResponse":true,"replyBatches":true}', True),
        (GOOD_EXT, False),
    ):
        start = codec.encode_compact_start(rid(1), "GET", "/x", [], False, None, ext)
        stream = dispatcher(clock).on_start(start, reply).stream
        assert stream is not None
        assert (stream.reply_batch_key() is not None) is batched


def test_the_offer_carries_reply_batches_as_its_json_key() -> None:
    caller = make_caller(FakeClock(), first_contact=True)
    frame = codec.decode_frame(caller.start().payload)
    assert isinstance(frame, f.RequestStart) and frame.extensions is not None
    assert frame.extensions.reply_batches
    assert b'"replyBatches":true' in caller.start().payload
