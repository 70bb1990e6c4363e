"""The serving side's rules across requests (tunnel._dispatch), without a server: fake clocks.

Each test drives a ``ServerDispatcher`` with the bytes a caller would publish (built by a
real ``CallerStream``) and checks what it answers: repeated starts, early aborts, the busy
503, deadlines that passed on the way, probes after a finish, malformed starts, and the
expiry of what it remembers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from tests.unit.test_stream import CLIENT_ID, RID, SERVER_ID, SUBJECTS, FakeClock, make_caller, server_options
from tunnel import _codec as codec
from tunnel import _frames as f
from tunnel._config import EARLY_ABORT_TTL, FINAL_FRAME_LIMIT, FINAL_FRAME_TTL, SEEN_REQUEST_TTL
from tunnel._dispatch import TOO_MANY_REQUESTS, RecentIds, ServerDispatcher, StartAnswer
from tunnel._errors import ErrorCode
from tunnel._events import Publish
from tunnel._server_stream import ServerStream

OTHER = "fedcba9876543210fedcba9876543210"
WALL_START = 1_700_000_000.0


@dataclass
class Handle:
    """The I/O layer's handle of a request in flight (all the dispatcher needs is its stream)."""

    stream: ServerStream


class Wall:
    """Unix time moving together with a ``FakeClock``."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.offset = WALL_START - clock.now

    def __call__(self) -> float:
        return self.clock.now + self.offset


def dispatcher(
    clock: FakeClock, *, max_concurrent: int = 4, fast_path: bool = True
) -> ServerDispatcher[Handle]:
    return ServerDispatcher(
        hostname="desk.example",
        subjects=SUBJECTS,
        server_id=SERVER_ID,
        options=server_options(fast_path=fast_path),
        max_concurrent=max_concurrent,
        clock=clock,
        wall_clock=Wall(clock),
    )


def start_bytes(
    clock: FakeClock, request_id: str = RID, *, fast_path: bool = True, **kwargs: object
) -> bytes:
    caller = make_caller(clock, request_id=request_id, fast_path=fast_path, **kwargs)  # type: ignore[arg-type]
    return caller.start().payload


def frames(answer: StartAnswer) -> list[f.Frame]:
    return [codec.decode_frame(pub.payload, RID) for pub in answer.publishes]


def admit(d: ServerDispatcher[Handle], answer: StartAnswer) -> Handle:
    assert answer.stream is not None, answer
    handle = Handle(answer.stream)
    d.admit(handle)
    return handle


def test_a_new_start_is_admitted_once_and_counted() -> None:
    clock = FakeClock()
    d = dispatcher(clock)
    answer = d.on_start(start_bytes(clock))
    assert answer.publishes == () and answer.malformed is None
    admit(d, answer)
    assert d.stats.requests == 1 and d.stats.active == 1 and d.stats.peak_active == 1
    d.release(RID)
    assert d.stats.active == 0 and d.active == {}


def test_a_repeated_start_in_flight_gets_another_ack_and_runs_nothing() -> None:
    clock = FakeClock()
    d = dispatcher(clock)
    admit(d, d.on_start(start_bytes(clock)))
    again = d.on_start(start_bytes(clock))
    assert again.stream is None
    assert [type(fr) for fr in frames(again)] == [f.ResponseAck]
    assert d.stats.repeated_starts == 1 and d.stats.requests == 1


@pytest.mark.parametrize(("fast_path", "expected"), [(True, f.ResponseError), (False, f.ResponseAck)])
def test_a_start_repeated_after_the_answer_tells_an_extended_caller_and_acks_a_v1_one(
    fast_path: bool, expected: type
) -> None:
    clock = FakeClock()
    d = dispatcher(clock)
    admit(d, d.on_start(start_bytes(clock, fast_path=fast_path)))
    d.release(RID)
    again = d.on_start(start_bytes(clock, fast_path=fast_path))
    assert again.stream is None
    (reply,) = frames(again)
    assert type(reply) is expected
    if isinstance(reply, f.ResponseError):
        assert reply.code == ErrorCode.PROTOCOL_ERROR and "did not arrive" in reply.message


def test_seen_ids_expire_so_a_much_later_start_with_the_same_id_is_new() -> None:
    clock = FakeClock()
    d = dispatcher(clock)
    admit(d, d.on_start(start_bytes(clock)))
    d.release(RID)
    clock.advance(SEEN_REQUEST_TTL + 1)
    assert d.on_start(start_bytes(clock)).stream is not None


def test_an_abort_that_overtakes_its_start_drops_the_start() -> None:
    clock = FakeClock()
    d = dispatcher(clock)
    assert d.on_abort(RID) is None
    answer = d.on_start(start_bytes(clock))
    assert answer == StartAnswer()
    assert d.stats.requests == 0
    # The early abort was used up: a republished start is served.
    assert d.on_start(start_bytes(clock)).stream is not None


def test_an_early_abort_is_forgotten_after_its_ttl() -> None:
    clock = FakeClock()
    d = dispatcher(clock)
    d.on_abort(RID)
    clock.advance(EARLY_ABORT_TTL + 1)
    assert d.on_start(start_bytes(clock)).stream is not None


def test_an_abort_for_a_request_in_flight_returns_its_handle_and_remembers_nothing() -> None:
    clock = FakeClock()
    d = dispatcher(clock)
    handle = admit(d, d.on_start(start_bytes(clock)))
    assert d.on_abort(RID) is handle
    assert len(d.early_aborts) == 0


def test_an_abort_after_the_finish_is_not_kept_as_early() -> None:
    clock = FakeClock()
    d = dispatcher(clock)
    admit(d, d.on_start(start_bytes(clock)))
    d.release(RID)
    assert d.on_abort(RID) is None
    assert len(d.early_aborts) == 0


def test_at_the_limit_an_extended_caller_gets_one_whole_503_with_retry_after() -> None:
    clock = FakeClock()
    d = dispatcher(clock, max_concurrent=1)
    admit(d, d.on_start(start_bytes(clock, OTHER)))
    busy = d.on_start(start_bytes(clock))
    assert busy.stream is None
    (whole,) = frames(busy)
    assert isinstance(whole, f.ResponseWhole)
    assert whole.start.status == 503 and ("retry-after", "1") in whole.start.headers
    assert json.loads(whole.data)["error"]["code"] == TOO_MANY_REQUESTS
    assert d.stats.overloaded == 1 and d.stats.outcomes[TOO_MANY_REQUESTS] == 1
    assert d.stats.bytes_out == len(whole.data)  # body bytes, not frame bytes


def test_at_the_limit_a_v1_caller_gets_a_streamed_503_whose_end_is_remembered() -> None:
    clock = FakeClock()
    d = dispatcher(clock, max_concurrent=1)
    admit(d, d.on_start(start_bytes(clock, OTHER)))
    busy = d.on_start(start_bytes(clock, fast_path=False))
    kinds = [type(fr) for fr in frames(busy)]
    assert kinds == [f.ResponseAck, f.ResponseStart, f.ResponseChunk, f.ResponseEnd]
    assert d.finals.get(RID) == busy.publishes[-1]


def test_a_start_whose_deadline_passed_on_the_way_is_a_timeout_without_a_handler() -> None:
    clock = FakeClock()
    d = dispatcher(clock)
    caller = make_caller(clock)
    wall = Wall(clock)
    payload = codec.encode_request_start(
        RID,
        "GET",
        "/",
        [],
        SUBJECTS.client_reply(RID, CLIENT_ID),
        SUBJECTS.abort(RID),
        None,
        int((wall() - 1.0) * 1000),
        caller.options.offer_json,
    )
    answer = d.on_start(payload)
    assert answer.stream is None
    (error,) = frames(answer)
    assert isinstance(error, f.ResponseError) and error.code == ErrorCode.TIMEOUT
    assert d.stats.timeouts == 1 and d.active == {}


def test_a_start_with_time_left_carries_its_deadline_on_the_local_clock() -> None:
    clock = FakeClock()
    d = dispatcher(clock)
    payload = codec.encode_request_start(
        RID,
        "GET",
        "/",
        [],
        SUBJECTS.reply(RID),
        SUBJECTS.abort(RID),
        None,
        int((Wall(clock)() + 5) * 1000),
        None,
    )
    answer = d.on_start(payload)
    assert answer.stream is not None and answer.stream.deadline == pytest.approx(clock.now + 5, abs=0.002)


def test_a_server_that_stopped_accepting_drops_new_starts_but_acks_repeats() -> None:
    clock = FakeClock()
    d = dispatcher(clock)
    admit(d, d.on_start(start_bytes(clock)))
    d.accepting = False
    assert d.on_start(start_bytes(clock, OTHER)) == StartAnswer()
    assert [type(fr) for fr in frames(d.on_start(start_bytes(clock)))] == [f.ResponseAck]


def test_a_probe_after_the_finish_gets_the_remembered_final_until_it_expires() -> None:
    clock = FakeClock()
    d = dispatcher(clock)
    handle = admit(d, d.on_start(start_bytes(clock)))
    stream = handle.stream
    stream.ack()
    stream.start_response(200, [])
    final = stream.end_response()
    d.remember_final(RID, final)
    d.release(RID)
    probe = codec.encode_frame(f.RequestCredit(RID, 1024, probe=True))
    assert d.on_stray(RID, probe) == final and d.stats.repeated_finals == 1
    # Anything but a probe (a late credit, a chunk) is dropped.
    assert d.on_stray(RID, codec.encode_frame(f.RequestCredit(RID, 1024))) is None
    assert d.on_stray(RID, b"{not json") is None
    clock.advance(FINAL_FRAME_TTL + 1)
    assert d.on_stray(RID, probe) is None
    assert d.stats.repeated_finals == 1


def test_remembered_finals_are_bounded_oldest_first() -> None:
    clock = FakeClock()
    d = dispatcher(clock)
    ids = [f"{i:032x}" for i in range(FINAL_FRAME_LIMIT + 1)]
    for rid in ids:
        d.remember_final(rid, Publish(SUBJECTS.reply(rid), codec.encode_frame(f.ResponseEnd(rid, 0))))
    assert len(d.finals) == FINAL_FRAME_LIMIT
    assert d.finals.get(ids[0]) is None and d.finals.get(ids[-1]) is not None


def test_a_malformed_start_is_answered_when_its_reply_is_safely_ours() -> None:
    clock = FakeClock()
    d = dispatcher(clock)
    reply = SUBJECTS.client_reply(RID, CLIENT_ID)
    data = json.dumps({"type": "request.start", "requestId": RID, "method": "GET"}).encode()
    answer = d.on_start(data, reply)
    assert answer.stream is None and answer.malformed is not None
    (error,) = frames(answer)
    assert isinstance(error, f.ResponseError) and error.code == ErrorCode.PROTOCOL_ERROR
    assert answer.publishes[0].subject == reply
    # A reply outside the host's subjects is never published to.
    assert d.on_start(data, "_INBOX.elsewhere").publishes == ()
    # Without a usable request id there is nobody to tell.
    assert d.on_start(b"\xff\xfe", reply).publishes == ()


def test_a_frame_that_is_not_a_start_on_the_request_subject_is_malformed() -> None:
    clock = FakeClock()
    d = dispatcher(clock)
    answer = d.on_start(codec.encode_frame(f.Abort(RID, "x")))
    assert answer.malformed == "abort on the request subject" and answer.publishes == ()


def test_a_start_naming_subjects_outside_its_request_is_dropped_silently() -> None:
    clock = FakeClock()
    d = dispatcher(clock)
    payload = codec.encode_request_start(
        RID, "GET", "/", [], SUBJECTS.client_reply(RID, CLIENT_ID), SUBJECTS.abort(OTHER), None, None, None
    )
    answer = d.on_start(payload, SUBJECTS.client_reply(RID, CLIENT_ID))
    assert answer.stream is None and answer.publishes == () and answer.malformed is not None


def test_max_payload_changes_reach_new_streams() -> None:
    clock = FakeClock()
    d = dispatcher(clock)
    d.set_max_payload(4096)
    answer = d.on_start(start_bytes(clock))
    assert answer.stream is not None and answer.stream.options.max_payload == 4096


@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_max_concurrent_must_be_a_positive_integer(bad: object) -> None:
    with pytest.raises(ValueError, match="max_concurrent"):
        dispatcher(FakeClock(), max_concurrent=bad)  # type: ignore[arg-type]


def test_recent_ids_are_bounded_and_pruned_by_age() -> None:
    clock = FakeClock()
    ids = RecentIds(ttl=10.0, limit=3, clock=clock)
    for key in "abcd":
        ids.add(key)
    assert "a" not in ids and len(ids) == 3
    clock.advance(11)
    assert "d" not in ids
    ids.prune(clock())
    assert len(ids) == 0
