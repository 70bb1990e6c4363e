"""The stream state machines under random frame sequences, property-based (hypothesis).

Sans-IO, fake clock, no event loop. Two families:

1. Hostile peer: random frames -- valid, reordered, duplicated, with wrong sequence numbers,
   wrong types for the phase, foreign request ids, absurd credit -- interleaved with the
   application reading, sending and time passing, fed straight into one ``CallerStream`` or
   ``ServerStream``.
2. Faulty network: a real caller and a real server stream talk through a link that drops,
   duplicates, reorders and delays frames (or, in the control case, carries them faithfully).

Invariants checked after every step:

- only ``tunnel.TunnelError`` subclasses are ever raised (a frame from the peer never raises
  ``LocalProtocolError``, which means *we* misused the API); a stream that raised is FAILED
  and remembers that error; a finished stream ignores anything further without raising;
- data is delivered in order or not at all: each ``DataReceived`` is the chunk with the next
  sequence number, byte for byte; ``BodyEnded`` only when the end frame counts exactly the
  chunks delivered; over a faulty link what was delivered is always a prefix of what the
  peer's application sent, and equal to it when the stream reports success;
- bytes buffered on the receiving side never exceed the window (the buffer limit for peers
  without flow control);
- faithful link: the exchange completes, with exactly the bytes each application sent;
- liveness: once the network goes silent, advancing the clock ends every stream with a typed
  error (timeouts and stall timeouts are data, so a hang would show as an armed-less stream).
"""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import Final

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from tunnel import _codec as codec
from tunnel import _frames as f
from tunnel._caller import CallerOptions, CallerPhase, CallerStream
from tunnel._config import DEFERRED_ACK_DELAY
from tunnel._errors import LocalProtocolError, RemoteProtocolError, TunnelError
from tunnel._events import BodyEnded, DataReceived, HeartbeatReceived, Publish, ResponseHead
from tunnel._flow import UNFLOWED_BUFFER_LIMIT
from tunnel._server_stream import BodyPhase, ServerOptions, ServerPhase, ServerStream
from tunnel._subjects import DEFAULT_PREFIX, HostSubjects, parse_request_subject

RID: Final = "0123456789abcdef0123456789abcdef"
OTHER_RID: Final = "fedcba9876543210fedcba9876543210"
CLIENT_ID: Final = "c11e47c11e47c11e"
SERVER_ID: Final = "5e7e75e7e75e7e75"
SUBJECTS: Final = HostSubjects.for_host("fuzz.example")
# Small windows so that credit runs out and is granted many times within a short body.
WINDOWS: Final = (512, 2048, 8192)
MAX_PAYLOAD: Final = 1024 * 1024


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def caller_options(window: int, fast_path: bool, total: float | None = None) -> CallerOptions:
    return CallerOptions(
        first_frame_timeout=30.0,
        idle_timeout=20.0,
        total_timeout=total,
        republish_interval=1.0,
        unreachable_grace=0.2,
        window=window,
        max_chunk=window,
        max_payload=MAX_PAYLOAD,
        heartbeat_interval=5.0,
        fast_path=fast_path,
    )


def server_options(window: int, fast_path: bool) -> ServerOptions:
    return ServerOptions(
        window=window, max_chunk=window, max_payload=MAX_PAYLOAD, stall_timeout=60.0, fast_path=fast_path
    )


def make_caller(clock: FakeClock, method: str, has_body: bool, options: CallerOptions) -> CallerStream:
    return CallerStream(
        request_id=RID,
        subjects=SUBJECTS,
        reply_subject=SUBJECTS.client_reply(RID, CLIENT_ID),
        method=method,
        url="/fuzz",
        headers=[("x-fuzz", "1")],
        has_body=has_body,
        options=options,
        clock=clock,
    )


def decode(pub: Publish) -> f.Frame:
    """What the I/O layer does: the request id comes from the subject."""
    parsed = parse_request_subject(pub.subject, DEFAULT_PREFIX)
    return codec.decode_frame(pub.payload, parsed[1] if parsed else None)


def chunk_data(pub: Publish) -> bytes:
    frame = decode(pub)
    assert isinstance(frame, f.RequestChunk | f.ResponseChunk), frame
    return frame.data


def assert_window(stream: CallerStream | ServerStream) -> None:
    window = stream.receive_window
    limit = window.window if window.window is not None else UNFLOWED_BUFFER_LIMIT
    assert 0 <= window.buffered <= limit, f"{window.buffered} bytes buffered, window {limit}"


# =========================================================================== checkers


class Receiver:
    """Feeds frames to one stream and checks what it makes of them."""

    def __init__(self, stream: CallerStream | ServerStream) -> None:
        self.stream = stream
        self.delivered = bytearray()
        self.chunks = 0
        self.unconsumed = 0
        self.ended = False  # BodyEnded seen (or a complete body with the head)
        self.head: ResponseHead | None = None

    @property
    def finished(self) -> bool:
        return self.stream.finished

    def failed(self) -> bool:
        return self.stream.phase in (CallerPhase.FAILED, ServerPhase.FAILED)

    def feed(self, frame: f.Frame) -> list[Publish]:
        """Give one frame to the stream; returns what the I/O layer would send in answer."""
        stream = self.stream
        # A server may answer before reading the request body: that body still flows afterwards.
        body_open = isinstance(stream, ServerStream) and stream.body_phase is BodyPhase.OPEN
        was_finished = stream.finished and not body_open
        try:
            event = stream.receive(frame)
        except TunnelError as exc:
            assert not was_finished, "a finished stream raised on a late frame"
            assert not isinstance(exc, LocalProtocolError), f"peer's frame raised a local error: {exc!r}"
            assert self.failed() and stream.error is exc, "raised without failing the stream"
            assert_window(stream)
            return []
        if was_finished:
            assert event is None, f"a finished stream produced {event!r}"
        if isinstance(event, DataReceived):
            assert isinstance(frame, f.RequestChunk | f.ResponseChunk)
            assert frame.seq == self.chunks, f"chunk {frame.seq} delivered as chunk {self.chunks}"
            assert event.data == frame.data
            assert not self.ended
            self.chunks += 1
            self.delivered += event.data
            self.unconsumed += len(event.data)
        elif isinstance(event, BodyEnded):
            assert isinstance(frame, f.RequestEnd | f.ResponseEnd)
            assert frame.seq == self.chunks, f"end after {frame.seq} chunks, {self.chunks} delivered"
            assert not self.ended
            self.ended = True
        elif isinstance(event, ResponseHead):
            assert self.head is None, "two response heads"
            self.head = event
            if event.complete_body is not None:
                assert isinstance(frame, f.ResponseWhole) and event.complete_body == frame.data
                if event.has_body:
                    self.delivered += event.complete_body
                self.ended = True
            elif not event.has_body:
                self.ended = True
        assert_window(stream)
        replies: list[Publish] = []
        if isinstance(stream, ServerStream) and isinstance(frame, f.RequestStart):
            replies.append(stream.ack())  # the dispatcher answers a repeated start with an ack
        if isinstance(stream, CallerStream) and isinstance(event, HeartbeatReceived):
            # As the I/O layer does: re-send our limit, and our upload seq while stuck or done.
            refresh = stream.refresh_credit()
            if refresh is not None:
                replies.append(refresh)
        return replies

    def consume(self, n: int) -> list[Publish]:
        """The application reads ``n`` delivered bytes."""
        n = min(n, self.unconsumed)
        if n <= 0:
            return []
        self.unconsumed -= n
        grant = self.stream.consumed(n)
        assert_window(self.stream)
        return [] if grant is None else [grant]

    def poll(self) -> list[Publish]:
        try:
            return self.stream.poll()
        except TunnelError as exc:
            assert not isinstance(exc, LocalProtocolError)
            assert self.failed() and self.stream.error is exc
            return []


# =========================================================================== hostile peer

SEQ_NEAR: Final = st.integers(-1, 3)  # offset from the next expected sequence number


def _seq(draw: st.DrawFn, expected: int) -> int:
    """Mostly the next sequence number or a neighbour (duplicate, gap); sometimes anything."""
    if draw(st.integers(0, 7)):
        return max(0, expected + draw(SEQ_NEAR))
    return draw(st.integers(0, 2**53 - 1))


def _credit(draw: st.DrawFn, window: int) -> int:
    return draw(st.one_of(st.integers(1, 4 * window), st.integers(1, 2**53 - 1)))


@st.composite
def ack_extensions(draw: st.DrawFn, window: int) -> f.AckExtensions | None:
    if draw(st.integers(0, 3)) == 0:
        return None
    up = SUBJECTS.server_up(RID, SERVER_ID)
    return f.AckExtensions(
        binary=draw(st.booleans()),
        window=draw(st.one_of(st.none(), st.integers(1, 4 * window))),
        heartbeat_ms=draw(st.one_of(st.none(), st.integers(1, 20_000))),
        max_frame=draw(st.one_of(st.none(), st.integers(1, MAX_PAYLOAD))),
        up_subject=draw(
            st.sampled_from([up, up, up, None, SUBJECTS.server_up(OTHER_RID, SERVER_ID), "elsewhere.up"])
        ),
    )


SERVER_FRAME_KINDS: Final = (
    "ack", "start", "whole", "chunk", "chunk", "chunk", "end", "error", "credit", "heartbeat",
    "request.chunk", "request.credit", "abort",
)  # fmt: skip


@st.composite
def server_frames(draw: st.DrawFn, expected_seq: int, window: int) -> f.Frame:
    """Something a (possibly hostile) server sends a caller."""
    rid = RID if draw(st.integers(0, 15)) else OTHER_RID
    kind = draw(st.sampled_from(SERVER_FRAME_KINDS))
    if kind in ("chunk", "request.chunk"):
        cls = f.ResponseChunk if kind == "chunk" else f.RequestChunk
        return cls(rid, _seq(draw, expected_seq), draw(st.binary(max_size=window + 16)))
    if kind == "end":
        return f.ResponseEnd(rid, _seq(draw, expected_seq))
    if kind in ("ack", "start", "whole"):
        ext = draw(ack_extensions(window))
        if kind == "ack":
            return f.ResponseAck(rid, ext)
        start = f.ResponseStart(
            rid, draw(st.sampled_from([100, 200, 204, 304, 404, 500])), [("x", "y")], None, ext
        )
        if kind == "start":
            return start
        return f.ResponseWhole(rid, start, draw(st.binary(max_size=window + 16)))
    if kind == "error":
        code = draw(st.sampled_from(["tunnel_handler_error", "tunnel_timeout", "x"]))
        return f.ResponseError(rid, code, "boom")
    if kind == "credit":
        return f.ResponseCredit(rid, _credit(draw, window))
    if kind == "request.credit":
        return f.RequestCredit(rid, _credit(draw, window))
    if kind == "heartbeat":
        return f.ResponseHeartbeat(rid)
    return f.Abort(rid, "why not")


@given(data=st.data())
def test_caller_stream_under_random_server_frames_raises_only_typed_errors_and_keeps_order(
    data: st.DataObject,
) -> None:
    clock = FakeClock()
    method = data.draw(st.sampled_from(["GET", "HEAD", "POST"]), label="method")
    has_body = method == "POST"
    window = data.draw(st.sampled_from(WINDOWS), label="window")
    options = caller_options(window, data.draw(st.booleans(), label="fast_path"))
    caller = make_caller(clock, method, has_body, options)
    receiver = Receiver(caller)
    sent = 0
    for _ in range(data.draw(st.integers(1, 40), label="steps")):
        action = data.draw(
            st.sampled_from(["frame", "frame", "frame", "consume", "send", "time", "no_responders", "abort"])
        )
        if action == "frame":
            receiver.feed(data.draw(server_frames(receiver.chunks, window)))
        elif action == "consume":
            receiver.consume(data.draw(st.integers(1, window)))
        elif action == "send" and has_body and caller.can_send_body:
            # The caller never sends more than the server allowed (or a v1 server's unlimited).
            before = caller.send.available()
            pubs, taken = caller.send_body(bytes(data.draw(st.integers(0, 2 * window))))
            assert taken <= before and sum(len(chunk_data(p)) for p in pubs) == taken
            sent += taken
            assert caller.send.sent_bytes == sent
        elif action == "time":
            clock.now += data.draw(st.sampled_from([0.01, 0.5, 3.0, 25.0, 100.0]))
            receiver.poll()
        elif action == "no_responders":
            try:
                caller.no_responders()
            except TunnelError as exc:
                assert caller.phase is CallerPhase.FAILED and caller.error is exc
        elif action == "abort":
            caller.abort("fuzz")
            assert caller.finished
    if caller.phase is CallerPhase.DONE and receiver.head is not None and receiver.head.has_body:
        assert receiver.ended


CALLER_FRAME_KINDS: Final = (
    "chunk", "chunk", "chunk", "end", "error", "credit", "abort",
    "response.chunk", "response.credit", "heartbeat", "ack",
)  # fmt: skip


@st.composite
def caller_frames(draw: st.DrawFn, expected_seq: int, window: int) -> f.Frame:
    """Something a (possibly hostile) caller sends a server; the subject fixes the request id."""
    kind = draw(st.sampled_from(CALLER_FRAME_KINDS))
    if kind in ("chunk", "response.chunk"):
        cls = f.RequestChunk if kind == "chunk" else f.ResponseChunk
        return cls(RID, _seq(draw, expected_seq), draw(st.binary(max_size=window + 16)))
    if kind == "end":
        return f.RequestEnd(RID, _seq(draw, expected_seq))
    if kind == "error":
        return f.RequestError(RID, "tunnel_body_error", "source failed")
    if kind == "credit":
        return f.RequestCredit(RID, _credit(draw, window))
    if kind == "response.credit":
        return f.ResponseCredit(RID, _credit(draw, window))
    if kind == "abort":
        return f.Abort(RID, None)
    if kind == "heartbeat":
        return f.ResponseHeartbeat(RID)
    return f.ResponseAck(RID, None)


@st.composite
def request_starts(draw: st.DrawFn) -> f.RequestStart:
    method = draw(st.sampled_from(["GET", "HEAD", "POST", "PUT"]))
    has_body = method in ("POST", "PUT") and draw(st.booleans())
    ext = draw(
        st.one_of(
            st.none(),
            st.builds(
                f.StartExtensions,
                binary=st.booleans(),
                window=st.one_of(st.none(), st.sampled_from(WINDOWS)),
                heartbeat_ms=st.one_of(st.none(), st.integers(1, 20_000)),
                max_frame=st.one_of(st.none(), st.integers(1, MAX_PAYLOAD)),
                whole=st.booleans(),
            ),
        )
    )
    return f.RequestStart(
        request_id=RID,
        method=method,
        url="/fuzz",
        headers=[],
        reply_subject=SUBJECTS.client_reply(RID, CLIENT_ID),
        abort_subject=SUBJECTS.abort(RID),
        body_subject=SUBJECTS.body(RID) if has_body else None,
        deadline_unix_ms=None,
        extensions=ext,
    )


@given(data=st.data())
def test_server_stream_under_random_caller_frames_raises_only_typed_errors_and_keeps_order(
    data: st.DataObject,
) -> None:
    clock = FakeClock()
    start = data.draw(request_starts(), label="start")
    window = data.draw(st.sampled_from(WINDOWS), label="window")
    deadline = data.draw(st.one_of(st.none(), st.just(clock.now + 50.0)), label="deadline")
    server = ServerStream(
        start,
        subjects=SUBJECTS,
        server_id=SERVER_ID,
        options=server_options(window, data.draw(st.booleans(), label="fast_path")),
        clock=clock,
        deadline=deadline,
    )
    if server.ack_now:
        server.ack()
    receiver = Receiver(server)
    initial_credit = server.send.available()
    for _ in range(data.draw(st.integers(1, 40), label="steps")):
        action = data.draw(st.sampled_from(["frame", "frame", "frame", "consume", "respond", "send", "time"]))
        if action == "frame":
            receiver.feed(data.draw(caller_frames(receiver.chunks, window)))
        elif action == "consume":
            receiver.consume(data.draw(st.integers(1, window)))
        elif action == "respond" and server.phase is ServerPhase.ACKED:
            status = data.draw(st.sampled_from([200, 204, 404]))
            if server.whole_response(status, [], None, b"whole") is None:
                server.start_response(status, [])
        elif action == "send" and server.phase is ServerPhase.RESPONDING:
            before = server.send.available()
            _, taken = server.send_body(bytes(data.draw(st.integers(0, 2 * window))))
            assert taken <= before or not server.response_has_body
            if data.draw(st.booleans()) and server.phase is ServerPhase.RESPONDING:
                server.end_response()
        elif action == "time":
            clock.now += data.draw(st.sampled_from([0.01, DEFERRED_ACK_DELAY, 5.0, 30.0, 100.0]))
            receiver.poll()
    if server.body_phase.value == "ended":
        assert receiver.ended
    assert initial_credit >= 0


@pytest.mark.parametrize(
    "stray",
    [f.RequestEnd(RID, 0), f.RequestChunk(RID, 0, b"late"), f.ResponseHeartbeat(RID), f.Abort(RID, "late")],
    ids=lambda frame: frame.type,
)
def test_server_stream_that_finished_its_response_ignores_a_stray_frame(stray: f.Frame) -> None:
    clock = FakeClock()
    start = f.RequestStart(
        RID, "GET", "/", [], SUBJECTS.client_reply(RID, CLIENT_ID), SUBJECTS.abort(RID), None, None, None
    )
    server = ServerStream(
        start, subjects=SUBJECTS, server_id=SERVER_ID, options=server_options(512, True), clock=clock
    )
    server.ack()
    server.start_response(200, [])
    server.end_response()
    assert server.phase is ServerPhase.DONE
    assert server.receive(stray) is None  # as the caller does: late frames are harmless
    assert server.phase is ServerPhase.DONE and server.error is None
    # The I/O layer failing it afterwards (e.g. a malformed late frame) changes nothing either,
    # and no response.error can follow the response.end.
    server.fail(RemoteProtocolError("late garbage"))
    assert server.phase is ServerPhase.DONE and server.error is None
    assert server.error_response("tunnel_protocol_error", "late garbage") is None
    assert server.poll() == [] and server.next_deadline() is None


# =========================================================================== faulty network


class Network:
    """Two one-way queues of publishes; a faulty one may drop, duplicate, reorder or hold them."""

    def __init__(self) -> None:
        self.to_server: deque[Publish] = deque()
        self.to_caller: deque[Publish] = deque()

    def send(self, pubs: list[Publish], *, to_server: bool) -> None:
        (self.to_server if to_server else self.to_caller).extend(pubs)


@dataclasses.dataclass
class Exchange:
    """One request between a real caller and a real server, over a ``Network``."""

    clock: FakeClock
    caller: CallerStream
    server: ServerStream | None
    caller_rx: Receiver
    server_rx: Receiver | None
    request_body: bytes
    response_body: bytes
    status: int
    server_window: int
    server_fast: bool
    net: Network = dataclasses.field(default_factory=Network)
    uploaded: int = 0
    body_closed: bool = False
    response_sent: int = 0
    server_notified: bool = False

    # -- the applications: they do whatever the protocol currently allows ----------------

    def caller_app(self) -> None:
        caller = self.caller
        if not (self.request_body and caller.can_send_body) or self.body_closed:
            return
        if self.uploaded < len(self.request_body):
            pubs, taken = caller.send_body(self.request_body[self.uploaded :])
            self.uploaded += taken
            self.net.send(pubs, to_server=True)
            caller.mark_published()  # queued on the link in order, as nats-py does
        if self.uploaded == len(self.request_body):
            self.net.send([caller.end_body()], to_server=True)
            self.body_closed = True

    def server_app(self) -> None:
        server, rx = self.server, self.server_rx
        if server is None or rx is None:
            return
        if rx.unconsumed:
            self.net.send(rx.consume(rx.unconsumed), to_server=False)
        request_read = server.start_frame.body_subject is None or rx.ended
        if server.phase is ServerPhase.ACKED and request_read:
            assert rx.delivered == self.request_body, "the handler got a wrong body as complete"
            whole = server.whole_response(self.status, [], None, self.response_body)
            if whole is not None:
                self.net.send([whole], to_server=False)
                return
            self.net.send([server.start_response(self.status, [])], to_server=False)
        if server.phase is ServerPhase.RESPONDING:
            pubs, taken = server.send_body(self.response_body[self.response_sent :])
            self.response_sent += taken
            self.net.send(pubs, to_server=False)
            server.mark_published()
            if self.response_sent == len(self.response_body) and server.phase is ServerPhase.RESPONDING:
                self.net.send([server.end_response()], to_server=False)

    def reader_app(self) -> None:
        if self.caller_rx.unconsumed:
            self.net.send(self.caller_rx.consume(self.caller_rx.unconsumed), to_server=True)

    # -- delivery ---------------------------------------------------------------------------

    def deliver_to_server(self, pub: Publish) -> None:
        if pub.subject == SUBJECTS.request:
            start = codec.decode_frame(pub.payload)
            assert isinstance(start, f.RequestStart)
            if self.server is None:
                self.server = ServerStream(
                    start,
                    subjects=SUBJECTS,
                    server_id=SERVER_ID,
                    options=server_options(self.server_window, self.server_fast),
                    clock=self.clock,
                )
                self.server_rx = Receiver(self.server)
                if self.server.ack_now:
                    self.net.send([self.server.ack()], to_server=False)
                return
        if self.server_rx is None:
            return  # a frame for a request this server never saw: dropped, as the dispatcher does
        self.net.send(self.server_rx.feed(decode(pub)), to_server=False)

    def deliver_to_caller(self, pub: Publish) -> None:
        assert pub.subject == self.caller.reply_subject
        self.net.send(self.caller_rx.feed(decode(pub)), to_server=True)

    def poll(self) -> None:
        self.net.send(self.caller_rx.poll(), to_server=True)
        if self.server_rx is not None:
            self.net.send(self.server_rx.poll(), to_server=False)

    def report_failures(self) -> None:
        """What the I/O layers do when their stream fails: tell the peer (abort / error frame)."""
        if self.caller.phase is CallerPhase.FAILED and self.caller.error is not None:
            abort = self.caller.abort(self.caller.error.code)
            if abort is not None:
                self.net.send([abort], to_server=True)
        server = self.server
        failed = server is not None and server.phase is ServerPhase.FAILED and server.error is not None
        if failed and not self.server_notified:
            assert server is not None and server.error is not None
            self.server_notified = True
            pub = server.error_response(server.error.code, server.error.message)
            if pub is not None:
                self.net.send([pub], to_server=False)

    def step_apps(self) -> None:
        self.report_failures()
        self.caller_app()
        self.server_app()
        self.reader_app()
        self.check_prefixes()

    def check_prefixes(self) -> None:
        """Whatever was delivered is what the other application sent, in order."""
        head = self.caller_rx.head
        delivered = bytes(self.caller_rx.delivered)
        if head is None or head.has_body:
            assert self.response_body.startswith(delivered), "caller: bytes the server never sent"
        else:
            assert not delivered, "caller: a body for a response that has none"
        if self.caller.phase is CallerPhase.DONE:
            expected = self.response_body if head is not None and head.has_body else b""
            assert delivered == expected, "caller: wrong body delivered as complete"
        if self.server_rx is not None:
            assert self.request_body.startswith(bytes(self.server_rx.delivered))
            if self.server_rx.ended:
                assert bytes(self.server_rx.delivered) == self.request_body


def new_exchange(data: st.DataObject) -> Exchange:
    clock = FakeClock()
    method = data.draw(st.sampled_from(["GET", "HEAD", "POST"]), label="method")
    caller_fast = data.draw(st.booleans(), label="caller_fast")
    server_fast = data.draw(st.booleans(), label="server_fast")
    caller_window = data.draw(st.sampled_from(WINDOWS), label="caller_window")
    server_window = data.draw(st.sampled_from(WINDOWS), label="server_window")
    request_body = (
        data.draw(st.binary(max_size=3 * server_window), label="request_body") if method == "POST" else b""
    )
    # Without heartbeats (a plain v1 end) nothing but an overall deadline ends a silent wait.
    total = None if caller_fast and server_fast else 150.0
    caller = make_caller(clock, method, bool(request_body), caller_options(caller_window, caller_fast, total))
    return Exchange(
        clock=clock,
        caller=caller,
        server=None,
        caller_rx=Receiver(caller),
        server_rx=None,
        request_body=request_body,
        response_body=data.draw(st.binary(max_size=3 * caller_window), label="response_body"),
        status=data.draw(st.sampled_from([200, 204, 404]), label="status"),
        server_window=server_window,
        server_fast=server_fast,
    )


def _pick(queue: deque[Publish], roll: int, data: st.DataObject, faulty: bool) -> Publish | None:
    """Take the next message; a faulty link may take another one, drop it or keep a copy.

    ``roll`` (0..99) picks the fate, so a step costs one draw (two when reordering).
    """
    if not queue:
        return None
    index = 0
    if faulty and roll % 4 == 0 and len(queue) > 1:
        index = data.draw(st.integers(0, len(queue) - 1), label="reorder")
    pub = queue[index]
    fate = roll % 10 if faulty else 9
    if fate == 0:
        del queue[index]
        return None  # dropped
    if fate != 1:
        del queue[index]  # fate 1: duplicated (a copy stays queued)
    return pub


MAX_STEPS: Final = 150


@given(data=st.data())
def test_caller_and_server_over_a_faulty_link_never_deliver_wrong_bytes_and_always_end(
    data: st.DataObject,
) -> None:
    faulty = data.draw(st.booleans(), label="faulty")
    ex = new_exchange(data)
    ex.net.send([ex.caller.start()], to_server=True)
    for _ in range(MAX_STEPS):
        if ex.caller.finished and (ex.server is None or ex.server.finished):
            break
        roll = data.draw(st.integers(0, 99), label="step")
        if roll < 40:
            pub = _pick(ex.net.to_server, roll, data, faulty)
            if pub is not None:
                ex.deliver_to_server(pub)
        elif roll < 80:
            pub = _pick(ex.net.to_caller, roll, data, faulty)
            if pub is not None:
                ex.deliver_to_caller(pub)
        else:
            # Time passes a little (a lot only on a faulty link, where timeouts are fair game).
            steps = (0.005, 0.05, 2.0, 30.0) if faulty else (0.005, 0.02)
            ex.clock.now += steps[roll % len(steps)]
            ex.poll()
        ex.step_apps()
    event(f"{'faulty' if faulty else 'faithful'} link: caller {ex.caller.phase.value} after the steps")
    if not faulty:
        # Drain whatever is still queued, in order, then everything must have succeeded.
        for _ in range(10_000):
            if not (ex.net.to_server or ex.net.to_caller):
                break
            if ex.net.to_server:
                ex.deliver_to_server(ex.net.to_server.popleft())
            if ex.net.to_caller:
                ex.deliver_to_caller(ex.net.to_caller.popleft())
            ex.step_apps()
        assert ex.caller.error is None, f"faithful link, yet the caller failed: {ex.caller.error!r}"
        assert ex.caller.phase is CallerPhase.DONE
        assert ex.server is not None and ex.server.phase is ServerPhase.DONE
        assert ex.server_rx is not None and bytes(ex.server_rx.delivered) == ex.request_body
        return
    # Liveness: the network goes silent; the clock alone must end both ends with typed errors.
    ex.net.to_server.clear()
    ex.net.to_caller.clear()
    for _ in range(40):
        ex.clock.now += 5.0
        ex.poll()
        ex.step_apps()
        ex.net.to_server.clear()
        ex.net.to_caller.clear()
    event(f"faulty link: caller ended with {ex.caller.error.code if ex.caller.error else 'success'}")
    assert ex.caller.finished, f"caller still {ex.caller.phase.value} 200 s after the network went silent"
    assert ex.server is None or ex.server.finished, (
        f"server still {ex.server.phase.value} 200 s after the network went silent"
    )
    ex.check_prefixes()
