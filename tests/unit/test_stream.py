"""Caller and server stream state machines driven against each other (sans-IO, fake clock).

A tiny in-test ``Link`` plays the NATS I/O layer: it takes the ``Publish`` values
one side returns, checks where they go, decodes each payload with
``decode_frame`` (request id from the subject, as the real demultiplexer does)
and feeds the frame to the other side. Like h11's ``tests/helpers.py``.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Iterable
from typing import Any

import pytest

from tunnel import _codec as codec
from tunnel import _frames as f
from tunnel._caller import CallerOptions, CallerPhase, CallerStream
from tunnel._config import DEFERRED_ACK_DELAY, MAX_HEARTBEAT_INTERVAL, MIN_HEARTBEAT_INTERVAL
from tunnel._config import UNREACHABLE_RETRY_INTERVAL as RETRY
from tunnel._errors import (
    DeadlineExceeded,
    ErrorCode,
    IdleTimeout,
    LocalProtocolError,
    NoFirstFrameTimeout,
    RemoteError,
    RemoteProtocolError,
    StallTimeout,
    TunnelAborted,
    TunnelError,
    TunnelTimeout,
    TunnelUnreachable,
)
from tunnel._events import (
    Acked,
    BodyEnded,
    CreditGranted,
    DataReceived,
    Event,
    PeerFailed,
    Publish,
    ResponseHead,
)
from tunnel._server_stream import BodyPhase, ServerOptions, ServerPhase, ServerStream
from tunnel._subjects import DEFAULT_PREFIX, HostSubjects, parse_request_subject

RID = "0123456789abcdef0123456789abcdef"
OTHER_RID = "fedcba9876543210fedcba9876543210"
CLIENT_ID = "c11e47c11e47c11e"
SERVER_ID = "5e7e75e7e75e7e75"
SUBJECTS = HostSubjects.for_host("desk.example")
HEADERS: f.Headers = [("content-type", "text/plain"), ("set-cookie", "a=1"), ("set-cookie", "b=2")]


class FakeClock:
    """Monotonic time that moves only when a test says so."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def caller_options(**overrides: Any) -> CallerOptions:
    values: dict[str, Any] = {
        "first_frame_timeout": 30.0,
        "idle_timeout": 20.0,
        "total_timeout": None,
        "republish_interval": 1.0,
        "unreachable_grace": 0.2,
        "window": 64 * 1024,
        "max_chunk": 16 * 1024,
        "max_payload": 1024 * 1024,
        "heartbeat_interval": 5.0,
        "fast_path": True,
    }
    values.update(overrides)
    return CallerOptions(**values)


def server_options(**overrides: Any) -> ServerOptions:
    values: dict[str, Any] = {
        "window": 64 * 1024,
        "max_chunk": 16 * 1024,
        "max_payload": 1024 * 1024,
        "stall_timeout": 60.0,
        "fast_path": True,
    }
    values.update(overrides)
    return ServerOptions(**values)


def make_caller(
    clock: FakeClock,
    *,
    method: str = "GET",
    has_body: bool = False,
    url: str = "/api/items?q=1",
    headers: f.Headers | None = None,
    request_id: str = RID,
    deadline_unix_ms: int | None = None,
    first_contact: bool = False,
    compact_start: bool = False,
    **options: Any,
) -> CallerStream:
    return CallerStream(
        request_id=request_id,
        subjects=SUBJECTS,
        reply_subject=SUBJECTS.client_reply(request_id, CLIENT_ID),
        method=method,
        url=url,
        headers=list(HEADERS if headers is None else headers),
        has_body=has_body,
        options=caller_options(**options),
        clock=clock,
        deadline_unix_ms=deadline_unix_ms,
        first_contact=first_contact,
        compact_start=compact_start,
    )


class Link:
    """Carries publishes between one caller and one server, decoding them like the I/O layer."""

    def __init__(self, caller: CallerStream, server: ServerStream) -> None:
        self.caller = caller
        self.server = server
        self.to_caller_frames: list[f.Frame] = []
        self.to_server_frames: list[f.Frame] = []

    def _decode(self, pub: Publish, kinds: tuple[str, ...], max_payload: int) -> f.Frame:
        assert SUBJECTS.owns(pub.subject), pub.subject
        parsed = parse_request_subject(pub.subject, DEFAULT_PREFIX)
        assert parsed is not None, pub.subject
        token, rid, kind = parsed
        assert token == SUBJECTS.token
        assert kind in kinds, pub.subject
        assert len(pub.payload) <= max_payload, (
            f"{len(pub.payload)} byte frame over max_payload {max_payload}"
        )
        return codec.decode_frame(pub.payload, rid)

    def to_caller(self, pubs: Iterable[Publish]) -> list[Event]:
        events: list[Event] = []
        for pub in pubs:
            assert pub.subject == self.caller.reply_subject
            frame = self._decode(pub, ("reply",), self.caller.options.max_payload)
            self.to_caller_frames.append(frame)
            event = self.caller.receive(frame)
            if event is not None:
                events.append(event)
        return events

    def to_server(self, pubs: Iterable[Publish]) -> list[Event]:
        events: list[Event] = []
        for pub in pubs:
            frame = self._decode(pub, ("up", "body", "abort"), self.server.options.max_payload)
            if self.server.up_subject is not None and isinstance(frame, f.RequestChunk | f.RequestEnd):
                assert pub.subject == self.server.up_subject
            self.to_server_frames.append(frame)
            event = self.server.receive(frame)
            if event is not None:
                events.append(event)
        return events


def connect(
    clock: FakeClock,
    *,
    method: str = "GET",
    has_body: bool = False,
    caller: dict[str, Any] | None = None,
    server: dict[str, Any] | None = None,
    server_deadline: float | None = None,
    ack: bool = True,
    request_id: str = RID,
) -> Link:
    """Caller publishes its start, a server takes it, and (by default) the ack reaches the caller."""
    stream = make_caller(clock, method=method, has_body=has_body, request_id=request_id, **(caller or {}))
    start = stream.start()
    assert start.subject == SUBJECTS.request
    assert start.reply == stream.reply_subject
    frame = codec.decode_frame(start.payload)
    assert isinstance(frame, f.RequestStart)
    link = Link(
        stream,
        ServerStream(
            frame,
            subjects=SUBJECTS,
            server_id=SERVER_ID,
            options=server_options(**(server or {})),
            clock=clock,
            deadline=server_deadline,
        ),
    )
    if ack:
        assert link.to_caller([link.server.ack()]) == [Acked()]
    return link


def data_of(events: Iterable[Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, DataReceived))


def consume_all(caller: CallerStream, events: Iterable[Event]) -> list[Publish]:
    """The application reads every received chunk; returns the credit grants that produces."""
    grants = []
    for event in events:
        if isinstance(event, DataReceived) and (grant := caller.consumed(len(event.data))) is not None:
            grants.append(grant)
    return grants


def body_bytes(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


# ============================================================================ full exchanges


def test_full_get_delivers_head_body_and_end() -> None:
    clock = FakeClock()
    link = connect(clock)
    caller, server = link.caller, link.server
    start = server.start_frame
    assert (start.method, start.url, start.headers) == ("GET", "/api/items?q=1", HEADERS)
    assert start.body_subject is None
    assert link.to_caller([server.start_response(200, HEADERS, "OK")]) == [
        ResponseHead(200, "OK", HEADERS, True)
    ]
    assert caller.phase is CallerPhase.RESPONDING
    frames, taken = server.send_body(b"hello, world")
    assert taken == 12
    assert all(p.payload[0] == 0 for p in frames)  # binary data frames were negotiated
    events = link.to_caller(frames)
    assert data_of(events) == b"hello, world"
    assert link.to_caller([server.end_response()]) == [BodyEnded()]
    assert caller.phase is CallerPhase.DONE and caller.finished
    assert server.phase is ServerPhase.DONE and server.finished
    assert caller.next_deadline() is None and server.next_deadline() is None
    assert caller.poll() == [] and server.poll() == []
    assert caller.error is None and server.error is None


def test_repeated_start_and_ack_do_not_restart_anything() -> None:
    clock = FakeClock()
    link = connect(clock)
    start_frame = codec.decode_frame(link.caller.start().payload)
    assert link.server.receive(start_frame) is None
    assert link.to_caller([link.server.ack()]) == []  # a second ack is no second Acked
    assert link.caller.phase is CallerPhase.ACKED


def test_post_body_larger_than_the_window_waits_for_credit() -> None:
    clock = FakeClock()
    window = 4096
    link = connect(clock, method="POST", has_body=True, caller={"max_chunk": 1024}, server={"window": window})
    caller, server = link.caller, link.server
    assert caller.up_subject == server.up_subject == SUBJECTS.server_up(RID, SERVER_ID)
    assert caller.send.available() == window
    body = body_bytes(10 * window + 123)
    sent = 0
    received = bytearray()
    stalls = 0
    for _ in range(1000):
        if sent == len(body):
            break
        frames, taken = caller.send_body(body[sent:])
        assert taken == sum(len(fr.data) for fr in map(_request_chunk, frames))
        sent += taken
        events = link.to_server(frames)
        assert server.receive_window.buffered <= window
        if sent < len(body):
            # Sender stopped exactly at its credit and sends nothing more until granted.
            assert caller.send.available() == 0
            assert caller.send_body(body[sent:]) == ([], 0)
            stalls += 1
        grants: list[Publish] = []
        for event in events:
            assert isinstance(event, DataReceived)
            received += event.data
            grant = server.consumed(len(event.data))
            if grant is not None:
                grants.append(grant)
        assert all(isinstance(e, CreditGranted) for e in link.to_caller(grants))
    assert sent == len(body)
    assert stalls >= 9
    assert link.to_server([caller.end_body()]) == [BodyEnded()]
    assert bytes(received) == body
    assert server.body_phase is BodyPhase.ENDED
    assert link.to_caller([server.start_response(201, [])]) == [ResponseHead(201, None, [], True)]
    assert link.to_caller([server.end_response()]) == [BodyEnded()]


def _request_chunk(pub: Publish) -> f.RequestChunk:
    parsed = parse_request_subject(pub.subject, DEFAULT_PREFIX)
    assert parsed is not None
    frame = codec.decode_frame(pub.payload, parsed[1])
    assert isinstance(frame, f.RequestChunk)
    return frame


def test_response_body_larger_than_the_window_waits_for_credit() -> None:
    clock = FakeClock()
    window = 4096
    link = connect(clock, caller={"window": window}, server={"max_chunk": 1024})
    caller, server = link.caller, link.server
    link.to_caller([server.start_response(200, [])])
    body = body_bytes(10 * window + 77)
    sent = 0
    received = bytearray()
    stalls = 0
    for _ in range(1000):
        if sent == len(body):
            break
        frames, taken = server.send_body(body[sent:])
        sent += taken
        events = link.to_caller(frames)
        assert caller.receive_window.buffered <= window
        if sent < len(body):
            assert server.send.available() == 0
            assert server.send_body(body[sent:]) == ([], 0)
            stalls += 1
        grants: list[Publish] = []
        for event in events:
            assert isinstance(event, DataReceived)
            received += event.data
            grant = caller.consumed(len(event.data))
            if grant is not None:
                assert grant.subject == server.up_subject
                grants.append(grant)
        assert all(isinstance(e, CreditGranted) for e in link.to_server(grants))
    assert sent == len(body)
    assert stalls >= 9
    assert link.to_caller([server.end_response()]) == [BodyEnded()]
    assert bytes(received) == body


@pytest.mark.parametrize(("caller_max", "server_max"), [(2048, 1 << 20), (1 << 20, 2048)])
def test_chunks_respect_the_smaller_max_payload_of_the_two_ends(caller_max: int, server_max: int) -> None:
    """Each end tells the other its connection's max_payload; data frames never exceed either."""
    clock = FakeClock()
    link = connect(
        clock,
        method="POST",
        has_body=True,
        caller={"max_payload": caller_max, "max_chunk": 1 << 20},
        server={"max_payload": server_max, "max_chunk": 1 << 20},
    )
    caller, server = link.caller, link.server
    frames, _ = caller.send_body(body_bytes(20_000))
    assert len(frames) > 1
    link.to_server(frames)
    link.to_caller([server.start_response(200, [])])
    frames, _ = server.send_body(body_bytes(20_000))
    assert len(frames) > 1
    link.to_caller(frames)
    assert all(len(p.payload) <= 2048 for p in frames)


def test_json_chunks_fit_max_payload_even_with_long_request_ids() -> None:
    """A v1 caller may use any id up to 128 characters; every JSON chunk must still fit."""
    clock = FakeClock()
    long_id = "a" * 128
    link = connect(
        clock,
        request_id=long_id,
        caller={"fast_path": False, "max_payload": 4096, "max_chunk": 1 << 20},
        server={"max_payload": 4096, "max_chunk": 1 << 20},
    )
    link.to_caller([link.server.start_response(200, [])])
    frames, _ = link.server.send_body(body_bytes(50_000))
    assert frames
    for pub in frames:
        assert len(pub.payload) <= 4096, f"{len(pub.payload)} byte response.chunk over max_payload 4096"


@pytest.mark.parametrize(
    ("method", "status"),
    [("HEAD", 200), ("HEAD", 404), ("GET", 204), ("GET", 205), ("GET", 304), ("POST", 204)],
)
def test_head_204_205_304_have_no_body(method: str, status: int) -> None:
    clock = FakeClock()
    link = connect(clock, method=method, has_body=method == "POST")
    caller, server = link.caller, link.server
    if method == "POST":
        link.to_server([caller.end_body()])
    events = link.to_caller([server.start_response(status, [("content-length", "5")])])
    assert events == [ResponseHead(status, None, [("content-length", "5")], False)]
    assert caller.phase is CallerPhase.DONE
    assert caller.next_deadline() is None
    # The server drops body bytes instead of sending them.
    assert server.send_body(b"hello") == ([], 5)
    assert link.to_caller([server.end_response()]) == []
    assert caller.phase is CallerPhase.DONE and caller.error is None
    assert caller.abort() is None


def test_frames_after_the_response_ended_are_not_delivered() -> None:
    clock = FakeClock()
    link = connect(clock)
    link.to_caller([link.server.start_response(200, [])])
    frames, _ = link.server.send_body(b"abc")
    link.to_caller(frames)
    link.to_caller([link.server.end_response()])
    assert link.caller.phase is CallerPhase.DONE
    assert link.caller.receive(f.ResponseChunk(RID, 1, b"late")) is None
    assert link.caller.receive(f.ResponseStart(RID, 500, [])) is None
    assert link.caller.phase is CallerPhase.DONE and link.caller.error is None


# ============================================================================ protocol violations


def _ack(extensions: f.AckExtensions | None = None) -> f.ResponseAck:
    return f.ResponseAck(RID, extensions)


CALLER_VIOLATIONS: dict[str, list[f.Frame]] = {
    "chunk before any frame": [f.ResponseChunk(RID, 0, b"x")],
    "end before any frame": [f.ResponseEnd(RID, 0)],
    "credit before any frame": [f.ResponseCredit(RID, 10)],
    "chunk before response.start": [_ack(), f.ResponseChunk(RID, 0, b"x")],
    "end before response.start": [_ack(), f.ResponseEnd(RID, 0)],
    "second response.start": [_ack(), f.ResponseStart(RID, 200, []), f.ResponseStart(RID, 200, [])],
    "request frame from the server": [_ack(), f.RequestChunk(RID, 0, b"x")],
    "request.start from the server": [
        f.RequestStart(RID, "GET", "/", [], SUBJECTS.reply(RID), SUBJECTS.abort(RID))
    ],
    "abort frame on the reply subject": [_ack(), f.Abort(RID)],
    "frame for another request": [f.ResponseAck(OTHER_RID)],
    "response.whole after response.start": [
        _ack(),
        f.ResponseStart(RID, 200, []),
        f.ResponseWhole(RID, f.ResponseStart(RID, 200, []), b""),
    ],
}


@pytest.mark.parametrize("frames", list(CALLER_VIOLATIONS.values()), ids=list(CALLER_VIOLATIONS))
def test_caller_transition_table_violations_raise_remote_protocol_error(frames: list[f.Frame]) -> None:
    caller = make_caller(FakeClock())
    *allowed, bad = frames
    for frame in allowed:
        caller.receive(frame)
    with pytest.raises(RemoteProtocolError) as info:
        caller.receive(bad)
    assert caller.phase is CallerPhase.FAILED
    assert caller.error is info.value
    assert caller.next_deadline() is None
    assert caller.receive(f.ResponseHeartbeat(RID)) is None  # nothing more after failure


def test_server_rejects_a_request_chunk_when_the_request_has_no_body() -> None:
    link = connect(FakeClock())
    with pytest.raises(RemoteProtocolError):
        link.server.receive(f.RequestChunk(RID, 0, b"x"))
    assert link.server.phase is ServerPhase.FAILED


def test_server_rejects_a_chunk_after_the_request_body_ended() -> None:
    link = connect(FakeClock(), method="POST", has_body=True)
    frames, _ = link.caller.send_body(b"abc")
    link.to_server(frames)
    assert link.to_server([link.caller.end_body()]) == [BodyEnded()]
    with pytest.raises(RemoteProtocolError):
        link.server.receive(f.RequestChunk(RID, 1, b"more"))
    assert link.server.phase is ServerPhase.FAILED


def test_server_rejects_a_second_request_end() -> None:
    link = connect(FakeClock(), method="POST", has_body=True)
    link.to_server([link.caller.end_body()])
    with pytest.raises(RemoteProtocolError):
        link.server.receive(f.RequestEnd(RID, 0))


@pytest.mark.parametrize(
    "frame",
    [
        f.ResponseChunk(RID, 0, b"x"),
        f.ResponseAck(RID),
        f.ResponseStart(RID, 200, []),
        f.ResponseHeartbeat(RID),
    ],
    ids=lambda fr: fr.type,
)
def test_server_rejects_response_frames_from_a_caller(frame: f.Frame) -> None:
    link = connect(FakeClock(), method="POST", has_body=True)
    with pytest.raises(RemoteProtocolError):
        link.server.receive(frame)


@pytest.mark.parametrize("fast_path", [True, False], ids=["binary", "v1-json"])
@pytest.mark.parametrize(
    ("name", "order"),
    [
        ("dropped", [0, 2]),
        ("duplicated", [0, 0]),
        ("duplicated later", [0, 1, 2, 1]),
        ("reordered (second before first)", [1]),
        ("first two missing", [2]),
    ],
)
def test_response_chunk_loss_or_duplication_is_a_protocol_error(
    fast_path: bool, name: str, order: list[int]
) -> None:
    """Frames arrive in ``order``; the last one listed is the first the caller can tell is wrong."""
    link = connect(FakeClock(), caller={"fast_path": fast_path}, server={"max_chunk": 4})
    link.to_caller([link.server.start_response(200, [])])
    frames, _ = link.server.send_body(b"aaaabbbbcccc")
    assert len(frames) == 3
    *good, bad = [frames[i] for i in order]
    delivered = data_of(link.to_caller(good))
    with pytest.raises(RemoteProtocolError):
        link.to_caller([bad])
    assert link.caller.phase is CallerPhase.FAILED
    assert b"aaaabbbbcccc".startswith(delivered)  # never wrong bytes, only a prefix
    # The caller tells the server, which stops.
    abort = link.caller.abort(ErrorCode.PROTOCOL_ERROR)
    assert abort is not None and abort.subject == SUBJECTS.abort(RID)
    events = link.to_server([abort])
    assert len(events) == 1 and isinstance(events[0], PeerFailed)
    assert isinstance(events[0].error, TunnelAborted)
    assert link.server.error_response(ErrorCode.PROTOCOL_ERROR, "x") is None  # caller is gone


@pytest.mark.parametrize("fast_path", [True, False], ids=["binary", "v1-json"])
def test_response_end_after_a_lost_last_chunk_is_a_protocol_error(fast_path: bool) -> None:
    link = connect(FakeClock(), caller={"fast_path": fast_path}, server={"max_chunk": 4})
    link.to_caller([link.server.start_response(200, [])])
    frames, _ = link.server.send_body(b"aaaabbbbcccc")
    link.to_caller(frames[:2])
    with pytest.raises(RemoteProtocolError):
        link.to_caller([link.server.end_response()])
    assert link.caller.phase is CallerPhase.FAILED


@pytest.mark.parametrize("fast_path", [True, False], ids=["binary", "v1-json"])
@pytest.mark.parametrize(("name", "order"), [("dropped", [0, 2]), ("duplicated", [0, 1, 1])])
def test_request_chunk_loss_or_duplication_is_a_protocol_error(
    fast_path: bool, name: str, order: list[int]
) -> None:
    link = connect(
        FakeClock(),
        method="POST",
        has_body=True,
        caller={"fast_path": fast_path, "max_chunk": 4},
    )
    frames, _ = link.caller.send_body(b"aaaabbbbcccc")
    assert len(frames) == 3
    *good, bad = [frames[i] for i in order]
    link.to_server(good)
    with pytest.raises(RemoteProtocolError):
        link.to_server([bad])
    assert link.server.phase is ServerPhase.FAILED
    assert link.server.body_phase is BodyPhase.FAILED


@pytest.mark.parametrize("fast_path", [True, False], ids=["binary", "v1-json"])
def test_request_end_after_a_lost_chunk_is_a_protocol_error(fast_path: bool) -> None:
    link = connect(FakeClock(), method="POST", has_body=True, caller={"fast_path": fast_path, "max_chunk": 4})
    frames, _ = link.caller.send_body(b"aaaabbbb")
    link.to_server(frames[:1])
    with pytest.raises(RemoteProtocolError):
        link.to_server([link.caller.end_body()])


def test_caller_rejects_credit_overrun_by_the_server() -> None:
    link = connect(FakeClock(), caller={"window": 100})
    link.to_caller([link.server.start_response(200, [])])
    link.caller.receive(f.ResponseChunk(RID, 0, b"x" * 100))
    with pytest.raises(RemoteProtocolError):
        link.caller.receive(f.ResponseChunk(RID, 1, b"x"))


# ============================================================================ caller timers


def test_start_is_republished_every_interval_while_starting() -> None:
    clock = FakeClock()
    t0 = clock.now
    caller = make_caller(clock, republish_interval=1.0)
    start = caller.start()
    assert caller.next_deadline() == pytest.approx(t0 + 1.0)
    clock.advance(0.999)
    assert caller.poll() == []
    clock.advance(0.001)
    assert caller.poll() == [start]
    assert caller.next_deadline() == pytest.approx(t0 + 2.0)
    for _ in range(5):
        clock.advance(1.0)
        assert caller.poll() == [start]
    # Once any server answered, republishing stops.
    caller.receive(f.ResponseAck(RID))
    for _ in range(5):
        clock.advance(1.0)
        assert caller.poll() == []


def test_no_first_frame_timeout() -> None:
    clock = FakeClock()
    caller = make_caller(clock, first_frame_timeout=3.0, republish_interval=1.0)
    for _ in range(2):
        clock.advance(1.0)
        caller.poll()
    clock.advance(0.999)
    caller.poll()
    assert caller.next_deadline() is not None
    clock.advance(0.001)
    with pytest.raises(NoFirstFrameTimeout) as info:
        caller.poll()
    assert info.value.code == ErrorCode.NO_FIRST_FRAME
    assert caller.phase is CallerPhase.FAILED
    abort = caller.abort(ErrorCode.NO_FIRST_FRAME)  # a server may still hold the start
    assert abort is not None
    assert codec.decode_frame(abort.payload, RID) == f.Abort(RID, ErrorCode.NO_FIRST_FRAME)


def test_first_frame_timeout_is_disarmed_by_any_frame() -> None:
    clock = FakeClock()
    caller = make_caller(clock, first_frame_timeout=3.0, idle_timeout=None)
    caller.receive(f.ResponseAck(RID))
    clock.advance(100.0)
    assert caller.poll() == []


def test_idle_timeout_does_not_apply_before_the_response_from_a_v1_server() -> None:
    """A v1 server sends no heartbeats: silence after its ack is a busy handler, not death."""
    clock = FakeClock()
    link = connect(clock, caller={"idle_timeout": 2.0}, server={"fast_path": False})
    assert not link.caller.heartbeats
    clock.advance(100.0)
    assert link.caller.poll() == []
    assert link.caller.next_deadline() is None
    link.to_caller([link.server.start_response(200, [])])
    clock.advance(1.999)
    assert link.caller.poll() == []
    assert not link.caller.liveness_check_pending
    clock.advance(0.001)
    # Silence from a server without heartbeats is not death: the I/O layer is asked to check
    # that the host still has a server, once per idle period.
    assert link.caller.poll() == []
    assert link.caller.liveness_check_pending
    link.caller.liveness_check_pending = False
    link.caller.on_liveness_check(True)  # it does: the stream goes on
    assert not link.caller.finished
    assert link.caller.next_deadline() == clock.now + 2.0
    clock.advance(2.0)
    link.caller.poll()
    assert link.caller.liveness_check_pending
    with pytest.raises(IdleTimeout, match="has no server any more"):
        link.caller.on_liveness_check(False)
    assert link.caller.phase is CallerPhase.FAILED


def test_idle_timeout_applies_before_the_response_once_heartbeats_are_negotiated() -> None:
    clock = FakeClock()
    link = connect(clock, caller={"idle_timeout": 2.0, "heartbeat_interval": 0.5})
    assert link.caller.heartbeats
    assert link.caller.next_deadline() == pytest.approx(clock.now + 2.0)
    clock.advance(1.999)
    assert link.caller.poll() == []
    clock.advance(0.001)
    with pytest.raises(IdleTimeout) as info:
        link.caller.poll()
    assert info.value.code == ErrorCode.IDLE_TIMEOUT


def test_server_heartbeats_keep_an_idle_caller_alive_until_they_stop() -> None:
    clock = FakeClock()
    link = connect(clock, caller={"idle_timeout": 1.5, "heartbeat_interval": 0.5})
    assert link.server.heartbeat_interval == pytest.approx(0.5)
    beats = 0
    for _ in range(40):  # 10 s of a busy handler
        clock.advance(0.25)
        pubs = link.server.poll()
        beats += len(pubs)
        assert link.to_caller(pubs) == []
        assert link.caller.poll() == []
    assert 15 <= beats <= 21
    assert all(isinstance(fr, f.ResponseHeartbeat) for fr in link.to_caller_frames[1:])
    clock.advance(1.5)  # the server died: no more heartbeats
    with pytest.raises(IdleTimeout):
        link.caller.poll()


def test_a_silent_response_body_is_probed_and_a_re_sent_end_completes_it() -> None:
    """The server's response.end was lost: two heartbeat intervals of silence while the body is
    open make the caller probe (a credit frame marked ``probe``); the end sent again finishes it."""
    clock = FakeClock()
    link = connect(clock, caller={"idle_timeout": 1.5, "heartbeat_interval": 0.5})
    caller, server = link.caller, link.server
    link.to_caller([server.start_response(200, [])])
    frames, _ = server.send_body(b"abc")
    link.to_caller(frames)
    server.mark_published()
    end = server.end_response()  # lost on the way
    assert caller.next_deadline() == pytest.approx(clock.now + 1.0)  # before the idle timeout
    clock.advance(0.999)
    assert caller.poll() == []
    clock.advance(0.001)
    probes = caller.poll()
    assert len(probes) == 1
    probe = codec.decode_frame(probes[0].payload, RID)
    assert isinstance(probe, f.RequestCredit) and probe.probe and probe.limit == caller.receive_window.granted
    assert caller.poll() == []  # one probe per two intervals, not one per poll
    assert link.to_caller([end]) == [BodyEnded()]
    assert caller.phase is CallerPhase.DONE


def test_probes_repeat_every_two_intervals_and_the_idle_timeout_still_ends_a_dead_server() -> None:
    clock = FakeClock()
    link = connect(clock, caller={"idle_timeout": 2.5, "heartbeat_interval": 0.5})
    link.to_caller([link.server.start_response(200, [])])
    sent = []
    for _ in range(24):
        clock.advance(0.1)
        sent += link.caller.poll()
    assert len(sent) == 2  # at 1.0 s and 2.0 s of silence
    clock.advance(0.1)
    with pytest.raises(IdleTimeout):
        link.caller.poll()


def test_no_probe_before_the_response_or_without_heartbeats() -> None:
    clock = FakeClock()
    link = connect(clock, caller={"idle_timeout": 5.0, "heartbeat_interval": 0.5})
    clock.advance(4.9)  # acked, handler busy: heartbeats are the server's job, nothing to probe
    assert link.caller.poll() == []
    v1 = connect(clock, caller={"idle_timeout": 5.0, "heartbeat_interval": 0.5}, server={"fast_path": False})
    v1.to_caller([v1.server.start_response(200, [])])
    clock.advance(4.9)
    assert v1.caller.poll() == []


def test_data_frames_reset_the_idle_timer() -> None:
    clock = FakeClock()
    link = connect(clock, caller={"idle_timeout": 2.0})
    link.to_caller([link.server.start_response(200, [])])
    for i in range(10):
        clock.advance(1.5)
        frames, _ = link.server.send_body(b"x")
        link.to_caller(frames)
        assert link.caller.poll() == [], i


@pytest.mark.parametrize("phase", ["starting", "acked", "responding"])
def test_overall_deadline_is_exceeded_whatever_the_phase(phase: str) -> None:
    clock = FakeClock()
    t0 = clock.now
    link = connect(
        clock,
        caller={"total_timeout": 5.0, "idle_timeout": 2.0, "heartbeat_interval": 0.5},
        ack=phase != "starting",
    )
    if phase == "responding":
        link.to_caller([link.server.start_response(200, [])])
    for _ in range(9):  # frames keep flowing, so neither idle nor first-frame timeouts fire
        clock.advance(0.5)
        if phase != "starting":
            link.to_caller(link.server.poll())
        if phase == "responding":
            link.to_caller(link.server.send_body(b"x")[0])
        link.caller.poll()
    clock.now = t0 + 4.999
    link.caller.poll()
    clock.now = t0 + 5.0
    with pytest.raises(DeadlineExceeded) as info:
        link.caller.poll()
    assert info.value.code == ErrorCode.TIMEOUT
    assert link.caller.phase is CallerPhase.FAILED


def test_no_responders_within_the_grace_schedules_a_retry() -> None:
    clock = FakeClock()
    t0 = clock.now
    caller = make_caller(clock, unreachable_grace=0.2, republish_interval=1.0)
    assert caller.no_responders() is None
    assert caller.phase is CallerPhase.STARTING
    assert caller.next_deadline() == pytest.approx(t0 + RETRY)
    clock.advance(RETRY)
    assert caller.poll() == [caller.start()]
    assert caller.next_deadline() == pytest.approx(t0 + RETRY + 1.0)  # back to the normal republish


def test_no_responders_after_the_grace_raises_unreachable() -> None:
    clock = FakeClock()
    caller = make_caller(clock, unreachable_grace=0.2)
    retries = 0
    with pytest.raises(TunnelUnreachable) as info:
        for _ in range(100):
            caller.no_responders()
            retries += 1
            deadline = caller.next_deadline()
            assert deadline is not None
            clock.now = deadline
            assert caller.poll() == [caller.start()]
    assert 2 <= retries <= 4
    assert info.value.code == ErrorCode.UNREACHABLE
    assert "'desk.example'" in info.value.message and SUBJECTS.token in info.value.message
    assert clock.now - 1000.0 <= 0.2 + 1e-9
    assert caller.phase is CallerPhase.FAILED
    assert caller.abort() is None  # nobody to tell


def test_no_responders_with_no_grace_fails_at_once() -> None:
    caller = make_caller(FakeClock(), unreachable_grace=0.0)
    with pytest.raises(TunnelUnreachable):
        caller.no_responders()


def test_no_responders_after_a_server_answered_is_ignored() -> None:
    caller = make_caller(FakeClock(), unreachable_grace=0.0)
    caller.receive(f.ResponseAck(RID))
    assert caller.no_responders() is None
    assert caller.phase is CallerPhase.ACKED


# ============================================================================ server timers


def test_server_heartbeat_is_due_after_the_interval_since_the_last_frame_sent() -> None:
    clock = FakeClock()
    link = connect(clock, caller={"heartbeat_interval": 0.5})
    server = link.server
    t_ack = clock.now
    assert server.next_deadline() == pytest.approx(t_ack + 0.5)
    clock.advance(0.499)
    assert server.poll() == []
    clock.advance(0.001)
    (beat,) = server.poll()
    assert beat.subject == link.caller.reply_subject
    assert codec.decode_frame(beat.payload, RID) == f.ResponseHeartbeat(RID)
    assert server.next_deadline() == pytest.approx(clock.now + 0.5)
    # Any frame sent counts as proof of life and pushes the next heartbeat back.
    clock.advance(0.4)
    server.start_response(200, [])
    clock.advance(0.4)
    assert server.poll() == []
    clock.advance(0.1)
    assert len(server.poll()) == 1


@pytest.mark.parametrize(
    ("asked", "expected"),
    [(0.001, MIN_HEARTBEAT_INTERVAL), (2.0, 2.0), (3600.0, MAX_HEARTBEAT_INTERVAL)],
)
def test_server_heartbeat_interval_is_what_the_caller_asked_within_bounds(
    asked: float, expected: float
) -> None:
    link = connect(FakeClock(), caller={"heartbeat_interval": asked})
    assert link.server.heartbeat_interval == pytest.approx(expected)


def test_server_fails_when_the_caller_grants_no_credit_for_the_stall_timeout() -> None:
    clock = FakeClock()
    link = connect(clock, caller={"window": 4096}, server={"stall_timeout": 10.0})
    server = link.server
    link.to_caller([server.start_response(200, [])])
    _, taken = server.send_body(body_bytes(20_000))
    assert taken == 4096
    blocked_at = clock.now
    deadline = server.next_deadline()
    assert deadline is not None and deadline <= blocked_at + 10.0
    clock.now = blocked_at + 9.99
    server.poll()  # heartbeats only
    clock.now = blocked_at + 10.0
    with pytest.raises(StallTimeout, match="stopped granting flow-control credit") as caught:
        server.poll()
    assert server.phase is ServerPhase.FAILED
    # Not "your deadline passed" (the caller set none) nor "the server is gone": its own code.
    assert caught.value.code == ErrorCode.STALLED == "tunnel_stalled"
    assert isinstance(caught.value, TunnelTimeout) and caught.value.http_status == 504
    error = server.error_response(caught.value.code, caught.value.message)
    assert error is not None
    events = link.to_caller([error])
    assert len(events) == 1 and isinstance(events[0], PeerFailed)
    assert isinstance(events[0].error, StallTimeout) and events[0].error.code == "tunnel_stalled"


def test_server_credit_stall_timer_restarts_whenever_credit_arrives() -> None:
    """A slow but steady reader is not a stalled one: each grant restarts the stall timer."""
    clock = FakeClock()
    window = 4096
    link = connect(clock, caller={"window": window}, server={"stall_timeout": 10.0, "max_chunk": 1024})
    caller, server = link.caller, link.server
    link.to_caller([server.start_response(200, [])])
    body = body_bytes(6 * window)  # one big piece, as a handler returning bytes gives it
    sent = 0
    for _ in range(5):
        frames, taken = server.send_body(body[sent:])
        sent += taken
        events = link.to_caller(frames)
        clock.advance(6.0)  # the reader takes 6 s per window: slow, but well within 10 s
        server.poll()
        grants = consume_all(caller, events)
        assert link.to_server(grants)
    assert sent < len(body)
    clock.advance(6.0)
    server.poll()  # 6 s since the last credit: must not have timed out
    assert server.phase is ServerPhase.RESPONDING


def test_server_fails_when_the_request_body_stalls() -> None:
    clock = FakeClock()
    link = connect(clock, method="POST", has_body=True, server={"stall_timeout": 10.0})
    t0 = clock.now
    clock.advance(6.0)
    frames, _ = link.caller.send_body(b"some")
    link.to_server(frames)
    clock.now = t0 + 15.99
    link.server.poll()
    clock.now = t0 + 16.0
    with pytest.raises(StallTimeout, match="no request-body bytes"):
        link.server.poll()


def test_no_body_stall_once_the_request_body_ended() -> None:
    clock = FakeClock()
    link = connect(clock, method="POST", has_body=True, server={"stall_timeout": 10.0})
    link.to_server([link.caller.end_body()])
    for _ in range(10):
        clock.advance(10.0)
        link.server.poll()
    assert link.server.phase is ServerPhase.ACKED


def test_server_deadline_exceeded() -> None:
    clock = FakeClock()
    link = connect(clock, server_deadline=clock.now + 5.0)
    assert link.server.next_deadline() == pytest.approx(clock.now + 5.0)
    clock.advance(4.99)
    link.server.poll()
    clock.advance(0.01)
    with pytest.raises(DeadlineExceeded):
        link.server.poll()


# ============================================================================ negotiation


@pytest.mark.parametrize(
    ("caller_fast", "server_fast"), [(False, True), (True, False), (False, False)], ids=str
)
def test_v1_mode_uses_json_chunks_no_credit_and_no_heartbeats(caller_fast: bool, server_fast: bool) -> None:
    clock = FakeClock()
    window = 4096
    link = connect(
        clock,
        method="POST",
        has_body=True,
        caller={"fast_path": caller_fast, "window": window},
        server={"fast_path": server_fast, "window": window},
        ack=False,
    )
    caller, server = link.caller, link.server
    start_obj = json.loads(caller.start().payload)
    assert ("extensions" in start_obj) is caller_fast
    assert server.ack_now
    ack = server.ack()
    assert json.loads(ack.payload) == {"type": "response.ack", "requestId": RID}
    assert link.to_caller([ack]) == [Acked()]
    assert not caller.binary and not caller.heartbeats and caller.up_subject is None
    assert caller.send.unlimited
    assert server.up_subject is None and server.heartbeat_interval is None and server.send.unlimited
    # Request body: JSON chunks on the v1 body subject, no credit needed or granted.
    body = body_bytes(5 * window)
    frames, taken = caller.send_body(body)
    assert taken == len(body)
    assert {p.subject for p in frames} == {SUBJECTS.body(RID)}
    assert all(p.payload[:1] == b"{" for p in frames)
    events = link.to_server(frames)
    assert data_of(events) == body
    assert all(server.consumed(len(e.data)) is None for e in events if isinstance(e, DataReceived))
    end = caller.end_body()
    assert end.subject == SUBJECTS.body(RID)
    assert link.to_server([end]) == [BodyEnded()]
    # Response body: JSON chunks, no credit.
    link.to_caller([server.start_response(200, [])])
    frames, taken = server.send_body(body)
    assert taken == len(body)
    assert all(json.loads(p.payload)["type"] == "response.chunk" for p in frames)
    events = link.to_caller(frames)
    assert data_of(events) == body
    assert all(caller.consumed(len(e.data)) is None for e in events if isinstance(e, DataReceived))
    # No heartbeats from a v1 server, however long the wait.
    clock.advance(1000.0)
    assert server.poll() == []
    assert link.to_caller([server.end_response()]) == [BodyEnded()]


def test_fast_path_negotiates_binary_credit_and_heartbeats() -> None:
    link = connect(
        FakeClock(), method="POST", has_body=True, caller={"window": 1000}, server={"window": 2000}
    )
    caller, server = link.caller, link.server
    assert caller.binary and server.binary
    assert caller.heartbeats and server.heartbeat_interval is not None
    assert caller.send.available() == 2000  # the server's window
    assert server.send.available() == 1000  # the caller's window
    assert caller.up_subject == SUBJECTS.server_up(RID, SERVER_ID)


def test_body_less_request_is_acked_only_if_the_handler_is_slow() -> None:
    clock = FakeClock()
    link = connect(clock, ack=False)
    server = link.server
    assert not server.ack_now
    assert server.next_deadline() == pytest.approx(clock.now + DEFERRED_ACK_DELAY)
    clock.advance(DEFERRED_ACK_DELAY)
    (ack,) = server.poll()
    assert link.to_caller([ack]) == [Acked()]
    assert server.ack_now


def test_response_start_as_first_frame_carries_the_negotiation() -> None:
    clock = FakeClock()
    link = connect(clock, ack=False, caller={"window": 4096}, server={"max_chunk": 1024})
    caller, server = link.caller, link.server
    assert link.to_caller([server.start_response(200, [])]) == [ResponseHead(200, None, [], True)]
    assert caller.binary and caller.up_subject == server.up_subject
    frames, taken = server.send_body(body_bytes(10_000))
    assert taken == 4096
    events = link.to_caller(frames)
    grants = consume_all(caller, events)
    assert grants and all(g.subject == server.up_subject for g in grants)
    assert link.to_server(grants)
    assert server.send.available() == 4096


def test_request_with_a_body_is_acked_at_once() -> None:
    link = connect(FakeClock(), method="POST", has_body=True, ack=False)
    assert link.server.ack_now


def test_small_response_travels_as_one_whole_frame() -> None:
    clock = FakeClock()
    link = connect(clock, ack=False)
    whole = link.server.whole_response(200, HEADERS, "OK", b"tiny body")
    assert whole is not None
    assert whole.payload[:2] == b"\x00\x05"  # our caller offers binaryHead: a compact head
    assert link.to_caller([whole]) == [ResponseHead(200, "OK", HEADERS, True, b"tiny body")]
    assert link.caller.phase is CallerPhase.DONE
    assert link.server.phase is ServerPhase.DONE


def test_whole_response_is_not_used_when_it_does_not_fit_or_was_not_offered() -> None:
    too_big = connect(FakeClock(), caller={"window": 100})
    assert too_big.server.whole_response(200, [], None, b"x" * 101) is None
    assert too_big.server.phase is ServerPhase.ACKED
    v1 = connect(FakeClock(), caller={"fast_path": False})
    assert v1.server.whole_response(200, [], None, b"x") is None


def test_caller_rejects_a_whole_response_it_cannot_accept() -> None:
    caller = make_caller(FakeClock(), window=10)
    with pytest.raises(RemoteProtocolError):
        caller.receive(f.ResponseWhole(RID, f.ResponseStart(RID, 200, []), b"x" * 11))
    v1 = make_caller(FakeClock(), fast_path=False)
    with pytest.raises(RemoteProtocolError):
        v1.receive(f.ResponseWhole(RID, f.ResponseStart(RID, 200, []), b"x"))


@pytest.mark.parametrize(
    "up_subject",
    [
        SUBJECTS.server_up(OTHER_RID, SERVER_ID),
        HostSubjects.for_host("other.example").server_up(RID, SERVER_ID),
        SUBJECTS.reply(RID),
        "_INBOX.stolen",
    ],
)
def test_caller_rejects_an_up_subject_outside_its_request(up_subject: str) -> None:
    caller = make_caller(FakeClock())
    with pytest.raises(RemoteProtocolError):
        caller.receive(f.ResponseAck(RID, f.AckExtensions(up_subject=up_subject)))
    assert caller.phase is CallerPhase.FAILED


# ============================================================================ subjects a start may name


def _start(**changes: Any) -> f.RequestStart:
    base = f.RequestStart(
        RID,
        "POST",
        "/",
        [],
        SUBJECTS.client_reply(RID, CLIENT_ID),
        SUBJECTS.abort(RID),
        body_subject=SUBJECTS.body(RID),
    )
    return dataclasses.replace(base, **changes)


def _server_for(start: f.RequestStart) -> ServerStream:
    # Decode the encoded start first, as a server does: validation may live in either step.
    frame = codec.decode_frame(codec.encode_frame(start))
    assert isinstance(frame, f.RequestStart)
    return ServerStream(
        frame, subjects=SUBJECTS, server_id=SERVER_ID, options=server_options(), clock=FakeClock()
    )


def test_server_accepts_reference_and_client_reply_subjects() -> None:
    _server_for(_start())
    _server_for(_start(reply_subject=SUBJECTS.reply(RID)))
    _server_for(_start(body_subject=None))


OTHER_HOST = HostSubjects.for_host("other.example")


@pytest.mark.parametrize(
    "changes",
    [
        {"reply_subject": OTHER_HOST.reply(RID)},
        {"abort_subject": OTHER_HOST.abort(RID)},
        {"body_subject": OTHER_HOST.body(RID)},
        {"reply_subject": "_INBOX.abc"},
        {"reply_subject": SUBJECTS.base},
        {"body_subject": "other.subject"},
    ],
    ids=str,
)
def test_server_rejects_a_start_naming_subjects_outside_the_host_prefix(changes: dict[str, Any]) -> None:
    with pytest.raises(f.FrameError):
        _server_for(_start(**changes))


@pytest.mark.parametrize(
    "changes",
    [
        # Wildcards: a v1 body subject of P.> would make the server subscribe to every
        # frame of every request of the host (and fail them as malformed).
        {"body_subject": SUBJECTS.all_subjects},
        {"body_subject": f"{SUBJECTS.base}.req.*.body"},
        {"reply_subject": f"{SUBJECTS.base}.req.*.reply.{CLIENT_ID}"},
        {"reply_subject": f"{SUBJECTS.base}.req.{RID}.reply.>"},
        # Another request's subjects: answers or body frames would land in someone else's stream.
        {"reply_subject": SUBJECTS.client_reply(OTHER_RID, CLIENT_ID)},
        {"body_subject": SUBJECTS.body(OTHER_RID)},
        {"body_subject": SUBJECTS.server_up(OTHER_RID, SERVER_ID)},
        {"abort_subject": SUBJECTS.abort(OTHER_RID)},
        # Not a subject at all.
        {"reply_subject": f"{SUBJECTS.base}.req.{RID}.reply x"},
        {"reply_subject": f"{SUBJECTS.base}.req.{RID}.reply\r\nPUB x 1"},
        {"reply_subject": f"{SUBJECTS.base}..req.{RID}.reply"},
    ],
    ids=str,
)
def test_server_rejects_a_start_naming_subjects_outside_its_own_request(changes: dict[str, Any]) -> None:
    with pytest.raises(f.FrameError):
        _server_for(_start(**changes))


# ============================================================================ errors, aborts, local misuse


def test_abort_after_done_returns_none() -> None:
    link = connect(FakeClock())
    link.to_caller([link.server.start_response(200, [])])
    link.to_caller([link.server.end_response()])
    assert link.caller.phase is CallerPhase.DONE
    assert link.caller.abort() is None
    assert link.caller.phase is CallerPhase.DONE and link.caller.error is None


def test_abort_while_responding_stops_both_ends_once() -> None:
    link = connect(FakeClock(), caller={"heartbeat_interval": 0.5})
    link.to_caller([link.server.start_response(200, [])])
    abort = link.caller.abort("client went away")
    assert abort is not None
    assert abort.subject == SUBJECTS.abort(RID)
    assert codec.decode_frame(abort.payload, RID) == f.Abort(RID, "client went away")
    assert isinstance(link.caller.error, TunnelAborted)
    assert link.caller.abort() is None  # only once
    (event,) = link.to_server([abort])
    assert isinstance(event, PeerFailed) and isinstance(event.error, TunnelAborted)
    assert link.server.finished and link.server.caller_gone
    assert link.server.error_response(ErrorCode.HANDLER_ERROR, "x") is None
    assert link.server.poll() == [] and link.server.next_deadline() is None


def test_abort_before_any_server_answered_is_still_sent() -> None:
    caller = make_caller(FakeClock())
    abort = caller.abort()
    assert abort is not None and abort.subject == SUBJECTS.abort(RID)
    assert caller.phase is CallerPhase.FAILED


@pytest.mark.parametrize(
    ("code", "error_type"),
    [
        (ErrorCode.HANDLER_ERROR, RemoteError),
        (ErrorCode.OVERLOADED, RemoteError),
        (ErrorCode.TIMEOUT, DeadlineExceeded),
        (ErrorCode.PROTOCOL_ERROR, RemoteProtocolError),
        (ErrorCode.BAD_REQUEST, RemoteError),  # the peer's verdict, not our local misuse
        ("some_future_code", RemoteError),
    ],
)
def test_server_error_reaches_the_caller_as_a_typed_error(code: str, error_type: type[TunnelError]) -> None:
    link = connect(FakeClock())
    pub = link.server.error_response(code, "it broke")
    assert pub is not None
    assert link.server.error_response(code, "again") is None
    (event,) = link.to_caller([pub])
    assert isinstance(event, PeerFailed)
    assert type(event.error) is error_type
    assert event.error.code == code and event.error.message == "it broke"
    assert not isinstance(event.error, LocalProtocolError)
    assert link.caller.phase is CallerPhase.FAILED


def test_server_error_as_the_very_first_frame_fails_the_caller() -> None:
    link = connect(FakeClock(), ack=False)
    pub = link.server.error_response(ErrorCode.OVERLOADED, "busy")
    assert pub is not None
    (event,) = link.to_caller([pub])
    assert isinstance(event, PeerFailed) and event.error.code == ErrorCode.OVERLOADED


def test_request_body_failure_reaches_the_server() -> None:
    link = connect(FakeClock(), method="POST", has_body=True)
    pub = link.caller.fail_body(ErrorCode.BODY_ERROR, "iterator raised")
    assert pub is not None
    (event,) = link.to_server([pub])
    assert isinstance(event, PeerFailed) and event.error.code == ErrorCode.BODY_ERROR
    assert link.server.caller_gone and link.server.body_phase is BodyPhase.FAILED


def test_caller_local_misuse_raises_local_protocol_error() -> None:
    caller = make_caller(FakeClock(), method="POST", has_body=True)
    with pytest.raises(LocalProtocolError):
        caller.send_body(b"before any server answered")
    with pytest.raises(LocalProtocolError):
        make_caller(FakeClock(), headers=[("x-big", "v" * 5000)], max_payload=4096)


def test_server_local_misuse_raises_local_protocol_error() -> None:
    server = connect(FakeClock()).server
    with pytest.raises(LocalProtocolError):
        server.send_body(b"before the response started")
    with pytest.raises(LocalProtocolError):
        server.end_response()
    for status in (99, 600, "200"):
        with pytest.raises(LocalProtocolError):
            server.start_response(status, [])  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        server.start_response(200, [("bad header", "v")])
    with pytest.raises(LocalProtocolError):
        server.start_response(200, [], "OK\r\nX-Evil: 1")
    server.start_response(200, [])
    with pytest.raises(LocalProtocolError):
        server.start_response(200, [])


# ============================================================================ lost windows of data


def _heartbeats(pubs: Iterable[Publish], rid: str = RID) -> list[f.ResponseHeartbeat]:
    frames = [codec.decode_frame(p.payload, rid) for p in pubs]
    return [fr for fr in frames if isinstance(fr, f.ResponseHeartbeat)]


def test_server_credit_stall_clock_ignores_a_re_sent_unchanged_limit() -> None:
    """Every heartbeat makes the caller repeat its limit: that proves it is alive, not that it reads."""
    clock = FakeClock()
    link = connect(clock, caller={"window": 4096, "heartbeat_interval": 1.0}, server={"stall_timeout": 10.0})
    caller, server = link.caller, link.server
    link.to_caller([server.start_response(200, [])])
    frames, taken = server.send_body(body_bytes(20_000))
    server.mark_published()
    assert taken == 4096
    link.to_caller(frames)  # delivered, but the application never reads: no new credit
    blocked_at = clock.now
    for _ in range(9):
        clock.advance(1.0)
        link.to_caller(server.poll())  # heartbeats
        refresh = caller.refresh_credit()
        if refresh is not None:
            link.to_server([refresh])
    clock.now = blocked_at + 10.0
    with pytest.raises(StallTimeout):
        server.poll()


def test_a_grant_that_raises_the_limit_restarts_the_credit_stall_clock() -> None:
    clock = FakeClock()
    link = connect(clock, caller={"window": 4096}, server={"stall_timeout": 10.0})
    caller, server = link.caller, link.server
    link.to_caller([server.start_response(200, [])])
    frames, _ = server.send_body(body_bytes(20_000))
    events = link.to_caller(frames)
    clock.advance(9.0)
    assert CreditGranted() in link.to_server(consume_all(caller, events))
    clock.advance(9.0)  # 18 s blocked in total, 9 s since the limit grew
    frames, taken = server.send_body(body_bytes(20_000))
    assert taken > 0 and server.phase is ServerPhase.RESPONDING


def test_heartbeat_reports_published_response_chunks_and_a_caller_behind_fails_at_once() -> None:
    clock = FakeClock()
    link = connect(clock, caller={"window": 4096, "heartbeat_interval": 0.5})
    caller, server = link.caller, link.server
    link.to_caller([server.start_response(200, [])])
    frames, _ = server.send_body(body_bytes(20_000))
    server.mark_published()
    assert len(frames) >= 2
    link.to_caller(frames[:1])  # the rest of the window is lost on the wire
    clock.advance(0.5)
    beats = _heartbeats(server.poll())
    assert [hb.seq for hb in beats] == [len(frames)]
    with pytest.raises(RemoteProtocolError, match="response body data lost"):
        caller.receive(beats[0])
    assert caller.phase is CallerPhase.FAILED
    assert caller.error is not None and caller.error.code == ErrorCode.PROTOCOL_ERROR
    assert caller.abort() is not None  # the I/O layer tells the server to stop


def test_heartbeat_never_claims_chunks_that_were_built_but_not_yet_published() -> None:
    """A heartbeat can overtake frames still on their way to NATS: it must not count them."""
    clock = FakeClock()
    link = connect(clock, caller={"heartbeat_interval": 0.5})
    caller, server = link.caller, link.server
    link.to_caller([server.start_response(200, [])])
    first, _ = server.send_body(b"a" * 100)
    server.mark_published()
    link.to_caller(first)
    pending, _ = server.send_body(b"b" * 100)  # built, publish still in progress
    clock.advance(0.5)
    beats = _heartbeats(server.poll())
    assert [hb.seq for hb in beats] == [len(first)]
    assert caller.receive(beats[0]) is not None and caller.phase is CallerPhase.RESPONDING
    assert data_of(link.to_caller(pending)) == b"b" * 100


def test_heartbeat_before_the_response_body_carries_no_seq() -> None:
    clock = FakeClock()
    link = connect(clock, caller={"heartbeat_interval": 0.5})
    clock.advance(0.5)
    beats = _heartbeats(link.server.poll())
    assert [hb.seq for hb in beats] == [None]
    assert link.server.poll() == []


def test_caller_stuck_on_credit_reports_published_chunks_and_a_server_behind_fails() -> None:
    clock = FakeClock()
    link = connect(
        clock,
        method="POST",
        has_body=True,
        caller={"heartbeat_interval": 0.5},
        server={"window": 4096, "stall_timeout": 60.0},
    )
    caller, server = link.caller, link.server
    frames, taken = caller.send_body(body_bytes(20_000))
    caller.mark_published()
    assert taken == 4096 and caller.send.available() == 0
    link.to_server(frames[:1])  # the rest of the window is lost
    clock.advance(0.5)
    beats = server.poll()
    assert _heartbeats(beats)
    link.to_caller(beats)
    probe = caller.refresh_credit()
    assert probe is not None
    frame = codec.decode_frame(probe.payload, RID)
    assert isinstance(frame, f.RequestCredit) and frame.seq == len(frames)
    with pytest.raises(RemoteProtocolError, match="request body data lost"):
        server.receive(frame)
    assert server.phase is ServerPhase.FAILED
    err = server.error_response(ErrorCode.PROTOCOL_ERROR, "lost")
    assert err is not None  # the caller is told


def test_caller_sends_no_upload_seq_while_it_still_has_credit_or_has_unpublished_frames() -> None:
    clock = FakeClock()
    link = connect(clock, method="POST", has_body=True, server={"window": 4096})
    caller = link.caller
    caller.send_body(b"x" * 100)
    caller.mark_published()
    assert caller.refresh_credit() is None  # not blocked: nothing to prove
    caller.send_body(body_bytes(20_000))
    assert caller.send.available() == 0
    assert caller.refresh_credit() is None  # blocked, but the frames are not all published yet
    caller.mark_published()
    probe = caller.refresh_credit()
    assert probe is not None
    frame = codec.decode_frame(probe.payload, RID)
    assert isinstance(frame, f.RequestCredit) and frame.seq == caller.send.next_seq


def test_upload_seq_after_the_body_ended_catches_lost_tail_chunks() -> None:
    clock = FakeClock()
    link = connect(clock, method="POST", has_body=True)
    caller = link.caller
    caller.send_body(b"x" * 100)
    caller.mark_published()
    caller.end_body()  # chunk and end both lost
    probe = caller.refresh_credit()
    assert probe is not None
    with pytest.raises(RemoteProtocolError):
        link.to_server([probe])


def test_a_lost_request_end_alone_is_repaired_by_the_callers_report() -> None:
    """Every chunk arrived, the end did not; the caller's report (sent after the end on the same
    connection) says it ended after those chunks: the server ends the body instead of stalling."""
    clock = FakeClock()
    link = connect(clock, method="POST", has_body=True)
    caller, server = link.caller, link.server
    frames, _ = caller.send_body(b"x" * 100)
    caller.mark_published()
    link.to_server(frames)
    caller.end_body()  # built; not yet handed to NATS: not claimed
    probe = caller.refresh_credit()
    assert probe is not None
    report = codec.decode_frame(probe.payload, RID)
    assert isinstance(report, f.RequestCredit) and report.seq == 1 and not report.ended
    caller.mark_published()  # the end went out (and was lost)
    probe = caller.refresh_credit()
    assert probe is not None
    report = codec.decode_frame(probe.payload, RID)
    assert isinstance(report, f.RequestCredit) and report.seq == 1 and report.ended
    assert link.to_server([probe]) == [BodyEnded()]
    assert server.body_phase is BodyPhase.ENDED
    assert link.to_server([probe]) == [CreditGranted()]  # a repeated report changes nothing more
    # The end was only late (reordered by a reconnect): it changes nothing either.
    assert server.receive(f.RequestEnd(RID, 1)) is None
    assert server.phase is ServerPhase.ACKED
    with pytest.raises(RemoteProtocolError):  # any other end after the body ended still fails
        server.receive(f.RequestEnd(RID, 2))


def test_an_ended_report_with_chunks_missing_is_still_lost_data() -> None:
    clock = FakeClock()
    link = connect(clock, method="POST", has_body=True)
    caller = link.caller
    caller.send_body(b"x" * 100)  # this chunk is lost
    caller.end_body()
    caller.mark_published()
    probe = caller.refresh_credit()
    assert probe is not None
    assert codec.decode_frame(probe.payload, RID) == f.RequestCredit(
        RID, caller.receive_window.granted, 1, True
    )
    with pytest.raises(RemoteProtocolError, match="request body data lost"):
        link.to_server([probe])


def test_an_upload_seq_that_matches_what_arrived_changes_nothing() -> None:
    clock = FakeClock()
    link = connect(clock, method="POST", has_body=True, server={"window": 4096})
    caller, server = link.caller, link.server
    frames, _ = caller.send_body(body_bytes(20_000))
    caller.mark_published()
    link.to_server(frames)
    probe = caller.refresh_credit()
    assert probe is not None
    assert link.to_server([probe]) == [CreditGranted()]
    assert server.phase is ServerPhase.ACKED and server.body_phase is BodyPhase.OPEN


def test_no_body_stall_while_the_caller_waits_for_our_handler_to_read() -> None:
    """The caller spent its credit and our handler is slow: the wait is ours, not a stalled caller."""
    clock = FakeClock()
    link = connect(clock, method="POST", has_body=True, server={"window": 4096, "stall_timeout": 10.0})
    caller, server = link.caller, link.server
    frames, _ = caller.send_body(body_bytes(20_000))
    events = link.to_server(frames)
    for _ in range(5):
        clock.advance(10.0)
        server.poll()
    assert server.phase is ServerPhase.ACKED
    grant = server.consumed(sum(len(e.data) for e in events if isinstance(e, DataReceived)))
    assert grant is not None
    clock.advance(9.99)
    server.poll()
    clock.advance(0.01)  # the caller had credit for 10 s and sent nothing
    with pytest.raises(StallTimeout):
        server.poll()
