"""One request as the server sees it (sans-IO state machine).

Frames in, events out, as in :mod:`tunnel._caller`. The request body's lifecycle is
``SERVER_BODY_TRANSITIONS``, keyed by (body phase, the caller's frame type); a frame the
table does not allow is a ``RemoteProtocolError``. The rules across requests (repeated
starts, early aborts, the busy answer, remembered finals) are :mod:`tunnel._dispatch`.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from . import _codec as codec
from . import _frames as f
from ._config import (
    DEFERRED_ACK_DELAY,
    MAX_HEARTBEAT_INTERVAL,
    MIN_HEARTBEAT_INTERVAL,
    PEER_SILENCE_HEARTBEATS,
)
from ._errors import (
    DeadlineExceeded,
    IdleTimeout,
    LocalProtocolError,
    RemoteProtocolError,
    StallTimeout,
    TunnelAborted,
    TunnelError,
    error_from_remote,
)
from ._events import (
    NO_BODY_STATUSES,
    V1_MAX_CHUNK,
    BodyEnded,
    Clock,
    CreditGranted,
    DataReceived,
    Event,
    PeerFailed,
    Publish,
)
from ._flow import GrowthBudget, Pacer, ReceiveWindow, SendCredit
from ._integrity import BodyDigest, checksum, supported
from ._subjects import HostSubjects

# ----------------------------------------------------------------------------- server


class ServerPhase(enum.Enum):
    ACKED = "acked"  # ack sent, handler running, response not started
    RESPONDING = "responding"  # response.start sent
    DONE = "done"  # response.end or an error sent
    FAILED = "failed"  # caller aborted or broke the protocol


class BodyPhase(enum.Enum):
    NONE = "none"  # request has no body
    OPEN = "open"
    ENDED = "ended"
    FAILED = "failed"

    # Members are singletons: hash by identity (C), not Enum's hash of the name (Python), as
    # every caller frame looks its (phase, type) up in SERVER_BODY_TRANSITIONS.
    __hash__ = object.__hash__


_NONE, _OPEN, _ENDED, _FAILED = BodyPhase.NONE, BodyPhase.OPEN, BodyPhase.ENDED, BodyPhase.FAILED
# (request body phase, caller frame type) -> the body phase after it; a pair not here is a
# protocol error. Aborts, credit reports and repeated starts may come at any time; body
# frames only while the body is open. (The response side is driven by what we send.)
SERVER_BODY_TRANSITIONS: Final[dict[tuple[BodyPhase, str], BodyPhase]] = {
    **{(phase, "abort"): (_FAILED if phase is _OPEN else phase) for phase in BodyPhase},
    **{(phase, "request.credit"): phase for phase in BodyPhase},
    **{(phase, "request.start"): phase for phase in BodyPhase},
    (_OPEN, "request.chunk"): _OPEN,
    (_OPEN, "request.end"): _ENDED,
    (_OPEN, "request.error"): _FAILED,
}
_BODY_FRAMES: Final = (f.RequestChunk, f.RequestEnd)
_CALLER_FRAME_TYPES: Final = frozenset(kind for _, kind in SERVER_BODY_TRANSITIONS)


@dataclass(frozen=True, slots=True)
class ServerOptions:
    window: int
    max_chunk: int
    max_payload: int
    stall_timeout: float | None
    fast_path: bool = True
    # A plain v1 caller reads at an unknown speed: after ``v1_burst`` bytes at full speed its
    # response body goes at ``v1_pace`` bytes/s (None: unpaced). See :class:`_flow.Pacer`.
    v1_pace: float | None = None
    v1_burst: int = 0
    # The reference daemon permissions (publish ``P.req.*.reply`` only; subscribe
    # ``P.req.*.body``, not ``P.req.*.up.<server>``): answer on the reference reply subject
    # whatever the caller named, and take extension frames on the body subject.
    reference_replies: bool = False
    up_via_body: bool = False
    max_window: int | None = None  # None: the request-body window never grows
    # Compact frames (docs/protocol.md section 2): take binary request.start frames, and answer
    # response.whole with a binary head to a caller that offers ``binaryHead``. Off: this
    # server speaks as the versions before them did (tests use it as such an older server).
    compact_frames: bool = True
    # Batches of compact starts in one message (``startBatches``, docs/protocol.md section 2).
    # Off: as the versions before them (tests use it as such an older server).
    start_batches: bool = True
    # ... and complete responses to one caller in one message, to callers that offer
    # ``replyBatches``. Off: as the versions before them.
    reply_batches: bool = True
    # Shared by every request of one server (mutable: not part of equality or hashing).
    growth_budget: GrowthBudget | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class _ServerTerms:
    """What a server derives from one caller offer and its own options."""

    binary: bool
    heartbeat_interval: float | None
    frame_limit: int
    chunk_limit: int
    offers_whole: bool
    compact_head: bool  # response.whole goes with a binary head
    integrity: str | None  # the checksum both ends put in their end frames, if any


@functools.lru_cache(maxsize=256)
def _server_terms(offer: f.StartExtensions | None, options: ServerOptions, rid_length: int) -> _ServerTerms:
    """Negotiation results, cached: a caller sends the same offer with every request."""
    if offer is not None:
        binary = offer.binary
        heartbeat: float | None = min(
            MAX_HEARTBEAT_INTERVAL, max(MIN_HEARTBEAT_INTERVAL, (offer.heartbeat_ms or 10_000) / 1000)
        )
        frame_limit = min(options.max_payload, offer.max_frame or options.max_payload)
        credit = offer.window
    else:
        binary = False
        heartbeat = None
        frame_limit = options.max_payload
        credit = None
    chunk_limit = max(1, min(options.max_chunk, codec.max_chunk_data(frame_limit, binary, rid_length)))
    if not binary:
        chunk_limit = min(chunk_limit, V1_MAX_CHUNK)
    if credit is not None:
        chunk_limit = min(chunk_limit, max(1, credit // 2))
    offers_whole = offer is not None and offer.whole and offer.binary
    compact_head = offers_whole and offer is not None and offer.binary_head and options.compact_frames
    integrity = offer.integrity if offer is not None and supported(offer.integrity) else None
    return _ServerTerms(binary, heartbeat, frame_limit, chunk_limit, offers_whole, compact_head, integrity)


def _check_status_text(status_text: str) -> None:
    """What a caller accepts (CR, LF or NUL would split or cut a head; surrogates cannot travel)."""
    if not f.status_text_ok(status_text):
        raise LocalProtocolError("invalid status text")


class ServerStream:
    """One request as the server sees it."""

    # One per request: slots make it smaller and quicker to build than a dict-backed object.
    __slots__ = (
        "_body_progress_at",
        "_credit_blocked_since",
        "_last_heard_at",
        "_last_sent_at",
        "_repaired_end_seq",
        "ack_due",
        "acked",
        "binary",
        "body_phase",
        "caller_gone",
        "chunk_limit",
        "clock",
        "compact_head",
        "created_at",
        "deadline",
        "error",
        "extended",
        "frame_limit",
        "heartbeat_interval",
        "integrity",
        "offers_whole",
        "options",
        "pacer",
        "phase",
        "published_seq",
        "receive_window",
        "received_digest",
        "reply_subject",
        "request_id",
        "response_has_body",
        "send",
        "sent_digest",
        "start_frame",
        "subjects",
        "up_subject",
        "upgrade",
    )

    def __init__(
        self,
        start: f.RequestStart,
        *,
        subjects: HostSubjects,
        server_id: str,
        options: ServerOptions,
        clock: Clock,
        deadline: float | None = None,
    ) -> None:
        self.request_id = start.request_id
        self.start_frame = start
        self.subjects = subjects
        self.options = options
        self.clock = clock
        self.phase = ServerPhase.ACKED
        self.body_phase = BodyPhase.OPEN if start.body_subject is not None else BodyPhase.NONE
        self.error: TunnelError | None = None
        self.caller_gone = False  # the caller aborted or failed its body: nobody to answer
        self.deadline = deadline
        rid = start.request_id
        # One prefix string for the three subject checks (hot path: every request).
        head = f"{subjects.base}.req.{rid}."
        if (
            not subjects.reply_subject_ok(start.reply_subject, rid, head)
            or start.abort_subject != head + "abort"
            or (start.body_subject is not None and start.body_subject != head + "body")
        ):
            raise f.FrameError("request names subjects that are not its own", rid)
        offer = start.extensions if options.fast_path else None
        self.extended = offer is not None
        #: The caller asked for an upgraded stream (and we can carry one: we said so in the ack).
        #: A 101 then opens both directions; neither direction has a stall rule (a quiet
        #: WebSocket is normal), and a caller silent past PEER_SILENCE_HEARTBEATS is gone.
        self.upgrade = offer is not None and offer.upgrade
        self.reply_subject = head + "reply" if options.reference_replies else start.reply_subject
        self.response_has_body = True
        # The negotiated limits depend only on the caller's offer (the same object for every
        # request of one caller: see _codec._start_ext) and our options: computed once each.
        terms = _server_terms(offer, options, len(rid))
        self.binary = terms.binary
        self.heartbeat_interval: float | None = terms.heartbeat_interval
        self.frame_limit = terms.frame_limit
        self.chunk_limit = terms.chunk_limit
        self.offers_whole = terms.offers_whole
        self.compact_head = terms.compact_head
        # Integrity extension: running byte count and CRC-32 of each body direction (or None):
        # the request body's if there is one; the response body's once a streamed response starts
        # (a one-message answer carries the CRC of its data, no running digest).
        self.integrity = terms.integrity
        self.sent_digest: BodyDigest | None = None
        self.received_digest: BodyDigest | None = (
            BodyDigest(terms.integrity) if terms.integrity and start.body_subject is not None else None
        )
        if offer is not None:
            self.up_subject: str | None = f"{head}body" if options.up_via_body else f"{head}up.{server_id}"
            self.send = SendCredit(offer.window)
            self.receive_window = ReceiveWindow(
                options.window, max_window=options.max_window, budget=options.growth_budget
            )
        else:
            self.up_subject = None
            self.send = SendCredit(None)
            self.receive_window = ReceiveWindow(None)
        self.pacer: Pacer | None = (
            Pacer(options.v1_pace, options.v1_burst, clock())
            if offer is None and options.v1_pace is not None
            else None
        )
        self.acked = False
        now = self.created_at = clock()
        # A body-less request from an extended caller is acked only if the handler is slow:
        # otherwise response.start (or response.whole) is the first frame.
        self.ack_due: float | None = (
            now + DEFERRED_ACK_DELAY
            if offer is not None and start.body_subject is None and not offer.ack_now
            else None
        )
        self._last_sent_at = now
        self._last_heard_at = now  # upgraded streams: the caller's last frame of any kind
        # Request-body progress: the last data frame, or the last grant that let the caller send more.
        self._body_progress_at = now
        self._credit_blocked_since: float | None = None
        # Response-body chunks handed to NATS (see ``mark_published``); heartbeats report it.
        self.published_seq = 0
        # The request.end a caller's report let us presume lost (see ``_on_credit``).
        self._repaired_end_seq: int | None = None

    # -- outgoing ---------------------------------------------------------------

    @property
    def ack_now(self) -> bool:
        """Must the ack go out at once? (v1 callers and request bodies need it first.)"""
        return self.ack_due is None

    def _ack_extensions(self) -> f.AckExtensions | None:
        if not self.extended:
            return None
        return f.AckExtensions(
            binary=self.binary,
            window=self.options.window,
            heartbeat_ms=int(self.heartbeat_interval * 1000) if self.heartbeat_interval else None,
            max_frame=self.options.max_payload,
            up_subject=self.up_subject,
            upgrade=self.upgrade,
            integrity=self.integrity,
            binary_start=self.options.compact_frames,
            start_batches=self.options.compact_frames and self.options.start_batches,
        )

    def ack(self) -> Publish:
        """The ack (sent first, and again for every repeated start)."""
        self.acked = True
        self.ack_due = None
        return self._out(f.ResponseAck(self.request_id, self._ack_extensions()))

    def start_response(self, status: int, headers: f.Headers, status_text: str | None = None) -> Publish:
        if self.phase is not ServerPhase.ACKED:
            raise LocalProtocolError(f"response already started ({self.phase.value})")
        if not isinstance(status, int) or not 100 <= status <= 599:
            raise LocalProtocolError(f"invalid status {status!r}")
        headers = f.validate_headers(headers)
        if status_text is not None:
            _check_status_text(status_text)
        self.phase = ServerPhase.RESPONDING
        self.response_has_body = self._allows_body(status)
        if self.integrity:
            self.sent_digest = BodyDigest(self.integrity)
        # Always repeat the negotiation: if the ack was lost, this is the caller's first frame.
        ext = self._ack_extensions()
        self.acked = True
        self.ack_due = None
        return self._out(f.ResponseStart(self.request_id, status, headers, status_text, ext))

    def _allows_body(self, status: int) -> bool:
        if status == 101 and self.upgrade:
            return True  # the stream's server->caller direction
        return not (self.start_frame.method == "HEAD" or status in NO_BODY_STATUSES or 100 <= status < 200)

    def reply_batch_key(self) -> str | None:
        """What a complete response of this request has in common with those it may share a
        message with (``replyBatches``): its reply subject's tail (``reply.<caller token>``:
        one caller), or None when it must go alone (not offered; the reference reply subject,
        which names no caller)."""
        offer = self.start_frame.extensions
        options = self.options
        if offer is None or not offer.reply_batches or self.upgrade:
            return None
        if not (options.reply_batches and options.compact_frames):  # an older server: none
            return None
        tail = self.reply_subject[len(self.subjects.base) + len(self.request_id) + 6 :]  # "<base>.req.<id>."
        return tail if tail.startswith("reply.") else None

    def whole_response(
        self, status: int, headers: f.Headers, status_text: str | None, data: bytes | bytearray | memoryview
    ) -> Publish | None:
        """The complete response as one message, when the caller offered it and it fits; else None."""
        if not self.offers_whole or self.phase is not ServerPhase.ACKED:
            return None
        if status == 101 and self.upgrade:
            return None  # a 101 opens a stream: never "complete in one message"
        if not isinstance(status, int) or not 100 <= status <= 599:
            raise LocalProtocolError(f"invalid status {status!r}")
        if not self._allows_body(status):
            data = b""
        size = len(data)
        if size > self.frame_limit or size > self.send.available():
            return None
        headers = f.validate_headers(headers)
        if status_text is not None:
            _check_status_text(status_text)
        # Encoded straight from the parts: no ResponseStart/ResponseWhole objects per response.
        digest = checksum(self.integrity, data) if self.integrity else None
        if self.compact_head:
            payload = codec.encode_compact_whole(status, headers, status_text, data, digest, True)
        else:
            payload = codec.encode_whole(self.request_id, status, headers, status_text, data, digest)
        if len(payload) > self.frame_limit:
            return None
        self.phase = ServerPhase.DONE
        self.acked = True
        self.ack_due = None
        self.send.sent_bytes += size
        self._last_sent_at = self.clock()
        return Publish(self.reply_subject, payload)

    def send_body(self, data: bytes | memoryview) -> tuple[list[Publish], int]:
        """Frames for as much of ``data`` as credit allows; returns (frames, bytes taken)."""
        if self.phase is not ServerPhase.RESPONDING:
            raise LocalProtocolError(f"cannot send body in phase {self.phase.value}")
        if not self.response_has_body:
            return [], len(data)  # HEAD / 204 / 304: bytes are dropped, as HTTP requires
        frames: list[Publish] = []
        taken = 0
        total = len(data)
        pacer = self.pacer
        allowed = self.send.available() if pacer is None else pacer.available(self.clock())
        while taken < total:
            n = min(total - taken, self.chunk_limit, allowed - taken)
            if n <= 0:
                break
            piece = data[taken : taken + n]
            seq = self.send.spend(n)
            if self.sent_digest is not None:
                self.sent_digest.update(piece)
            if self.binary:
                payload = codec.encode_binary_chunk(True, seq, piece)
            else:
                payload = codec.encode_chunk(f.ResponseChunk(self.request_id, seq, bytes(piece)), False)
            frames.append(Publish(self.reply_subject, payload))
            taken += n
        now = self.clock()
        if frames:
            self._last_sent_at = now
        if pacer is not None:
            pacer.spend(taken, now)  # waiting for the pace is not waiting for the caller: no stall
        elif taken < total:
            if self._credit_blocked_since is None:
                self._credit_blocked_since = now
        else:
            self._credit_blocked_since = None
        return frames, taken

    def pace_delay(self, pending: int) -> float:
        """Seconds the I/O layer should wait before offering ``pending`` more body bytes
        (0: send now or wait for credit as usual). Only a paced plain v1 caller waits here."""
        if self.pacer is None:
            return 0.0
        return self.pacer.delay_for(min(pending, self.chunk_limit), self.clock())

    def mark_published(self) -> None:
        """The I/O layer handed every body frame built so far to NATS, in order.

        A heartbeat claims only these, so it can never overtake a frame it counts.
        """
        self.published_seq = self.send.next_seq

    def end_response(self) -> Publish:
        if self.phase is not ServerPhase.RESPONDING:
            raise LocalProtocolError(f"cannot end response in phase {self.phase.value}")
        self.phase = ServerPhase.DONE
        digest = self.sent_digest
        if digest is None:
            return self._out(f.ResponseEnd(self.request_id, self.send.next_seq))
        return self._out(f.ResponseEnd(self.request_id, self.send.next_seq, digest.size, digest.result()))

    def error_response(self, code: str, message: str) -> Publish | None:
        """An error frame for the caller, unless the response ended or the caller is gone."""
        if self.phase is ServerPhase.DONE or self.caller_gone:
            return None
        if self.phase is not ServerPhase.FAILED:
            self.phase = ServerPhase.DONE
        return self._out(f.ResponseError(self.request_id, code, message))

    def consumed(self, n: int) -> Publish | None:
        """The handler read ``n`` request-body bytes; maybe grant the caller more credit."""
        grant = self.receive_window.on_consumed(n)
        if grant is None or not self.extended or self.phase in (ServerPhase.DONE, ServerPhase.FAILED):
            return None
        self._body_progress_at = self.clock()  # the caller may send again: its stall clock starts now
        return self._out(f.ResponseCredit(self.request_id, grant))

    def _out(self, frame: f.Frame) -> Publish:
        self._last_sent_at = self.clock()
        return Publish(self.reply_subject, codec.encode_frame(frame, self.binary))

    # -- incoming ---------------------------------------------------------------

    def receive(self, frame: f.Frame) -> Event | None:
        """Apply one frame from the caller; returns what the handler should see."""
        if self.phase in (ServerPhase.DONE, ServerPhase.FAILED) or self.caller_gone:
            # Late frames (a re-sent credit, an abort racing our end, a stray chunk) are harmless:
            # the response is complete, and turning it into a failure would send response.error
            # after response.end.
            return None
        nxt = SERVER_BODY_TRANSITIONS.get((self.body_phase, frame.type))
        if nxt is None:
            self._refuse(frame)
            return None
        if self.upgrade:
            self._last_heard_at = self.clock()
        self.body_phase = nxt
        return _RECEIVERS[frame.type](self, frame)

    def _refuse(self, frame: f.Frame) -> None:
        """A frame the table does not allow: a protocol error (one harmless repeat aside)."""
        if isinstance(frame, f.RequestEnd) and frame.seq == self._repaired_end_seq:
            return  # the end we presumed lost arrived after all (reordered): nothing new
        if frame.type not in _CALLER_FRAME_TYPES:
            raise self._fail(RemoteProtocolError(f"unexpected {frame.type} from a caller"))
        if self.body_phase is BodyPhase.NONE or not isinstance(frame, _BODY_FRAMES):
            raise self._fail(
                RemoteProtocolError(f"unexpected {frame.type} (request body {self.body_phase.value})")
            )
        raise self._fail(RemoteProtocolError(f"{frame.type} after the request body ended"))

    def _on_abort(self, frame: f.Frame) -> Event:
        assert isinstance(frame, f.Abort)
        self.caller_gone = True
        return PeerFailed(self._fail(TunnelAborted(f"caller aborted: {frame.reason or 'no reason'}")))

    def _on_repeated_start(self, frame: f.Frame) -> None:
        return None  # repeats are answered by the dispatcher with another ack

    def _on_chunk(self, frame: f.Frame) -> Event:
        assert isinstance(frame, f.RequestChunk)
        try:
            self.receive_window.on_chunk(frame.seq, len(frame.data))
        except TunnelError as exc:
            raise self._fail(exc) from None
        if self.received_digest is not None:
            self.received_digest.update(frame.data)
        self._body_progress_at = self.clock()
        return DataReceived(frame.data)

    def _on_end(self, frame: f.Frame) -> Event:
        assert isinstance(frame, f.RequestEnd)
        return self._on_request_end(frame, check=True)

    def _on_request_error(self, frame: f.Frame) -> Event:
        assert isinstance(frame, f.RequestError)
        self.caller_gone = True
        return PeerFailed(self._fail(error_from_remote(frame.code, frame.message)))

    def _on_request_end(self, frame: f.RequestEnd, *, check: bool) -> Event:
        """The request body is complete; ``check``: against the checksum in the caller's end frame
        (a presumed-lost end repaired from a credit report has none: its chunks are all here)."""
        try:
            self.receive_window.on_end(frame.seq)
            if check and self.received_digest is not None:
                self.received_digest.check(frame.size, frame.checksum, "request body")
        except TunnelError as exc:
            self.body_phase = BodyPhase.FAILED
            raise self._fail(exc) from None
        self.body_phase = BodyPhase.ENDED
        return BodyEnded()

    def _on_credit(self, frame: f.Frame) -> Event:
        assert isinstance(frame, f.RequestCredit)
        before = self.send.limit
        self.send.grant(frame.limit)
        if self._credit_blocked_since is not None and self.send.limit != before:
            # Only a grant that lets us send more restarts the stall clock: a re-sent, unchanged
            # limit (every heartbeat repeats it) proves the caller is alive, not that it reads.
            self._credit_blocked_since = self.clock()
        if frame.seq is not None and self.body_phase is BodyPhase.OPEN:
            lost = frame.seq - self.receive_window.expected_seq
            if lost > 0:
                # The caller published this after those chunks on the same connection: they are gone.
                raise self._fail(
                    RemoteProtocolError(
                        f"request body data lost: the caller sent {frame.seq} data frames, "
                        f"{self.receive_window.expected_seq} arrived"
                    )
                )
            if frame.ended and lost == 0:
                # Every chunk arrived and the caller published its end before this: only the
                # end frame was lost, and the body is complete. Repair it instead of stalling.
                self._repaired_end_seq = frame.seq
                return self._on_request_end(f.RequestEnd(self.request_id, frame.seq), check=False)
        return CreditGranted()

    def _body_stalled_since(self) -> float | None:
        """When the request body stopped moving although the caller could send, or None."""
        if self.body_phase is not BodyPhase.OPEN or self.upgrade:
            return None
        window = self.receive_window
        if window.granted is not None and window.received_bytes >= window.granted:
            return None  # the caller spent its credit: the wait is on our handler, not on the caller
        return self._body_progress_at

    # -- timers -----------------------------------------------------------------

    def next_deadline(self) -> float | None:
        if self.phase in (ServerPhase.DONE, ServerPhase.FAILED):
            return None
        # Runs for every request: a running minimum instead of building and filtering lists.
        due = self.deadline
        if self.ack_due is not None and (due is None or self.ack_due < due):
            due = self.ack_due
        if self.heartbeat_interval is not None:
            beat = self._last_sent_at + self.heartbeat_interval
            if due is None or beat < due:
                due = beat
        if self.upgrade and self.heartbeat_interval is not None:
            gone = self._last_heard_at + PEER_SILENCE_HEARTBEATS * self.heartbeat_interval
            if due is None or gone < due:
                due = gone
        stall = self.options.stall_timeout
        if stall is not None:
            if self._credit_blocked_since is not None and not self.upgrade:
                at = self._credit_blocked_since + stall
                if due is None or at < due:
                    due = at
            body_since = self._body_stalled_since()
            if body_since is not None:
                at = body_since + stall
                if due is None or at < due:
                    due = at
        return due

    def poll(self) -> list[Publish]:
        """Send a heartbeat if one is due; raise when the deadline or a stall expired."""
        if self.phase in (ServerPhase.DONE, ServerPhase.FAILED):
            return []
        now = self.clock()
        if self.deadline is not None and now >= self.deadline:
            raise self._fail(DeadlineExceeded("the caller's deadline passed"))
        if self.upgrade and self.heartbeat_interval is not None:
            silent = now - self._last_heard_at
            if silent >= PEER_SILENCE_HEARTBEATS * self.heartbeat_interval:
                raise self._fail(
                    IdleTimeout(f"the caller of an upgraded stream was silent {silent:.3g} s: it is gone")
                )
        stall = self.options.stall_timeout
        if stall is not None:
            if (
                self._credit_blocked_since is not None
                and not self.upgrade
                and now - self._credit_blocked_since >= stall
            ):
                raise self._fail(
                    StallTimeout(
                        f"the caller stopped granting flow-control credit: it read none of the response "
                        f"for {stall:g} s"
                    )
                )
            body_since = self._body_stalled_since()
            if body_since is not None and now - body_since >= stall:
                raise self._fail(
                    StallTimeout(
                        f"the caller sent no request-body bytes for {stall:g} s although it had credit"
                    )
                )
        if self.ack_due is not None and now >= self.ack_due:
            return [self.ack()]
        if self.heartbeat_interval is not None and now - self._last_sent_at >= self.heartbeat_interval:
            seq = (
                self.published_seq
                if self.phase is ServerPhase.RESPONDING and self.response_has_body
                else None
            )
            out = [self._out(f.ResponseHeartbeat(self.request_id, seq))]
            if self.extended and self.body_phase is BodyPhase.OPEN:
                # Quiet while the body is open: the caller may be stuck on a lost grant.
                limit = self.receive_window.regrant()
                if limit is not None:
                    out.append(self._out(f.ResponseCredit(self.request_id, limit)))
            return out
        return []

    def fail(self, error: TunnelError) -> TunnelError:
        """Mark the stream failed from outside; a finished response stays finished."""
        if self.phase in (ServerPhase.DONE, ServerPhase.FAILED):
            return self.error or error
        return self._fail(error)

    def _fail(self, error: TunnelError) -> TunnelError:
        self.phase = ServerPhase.FAILED
        self.error = error
        if self.body_phase is BodyPhase.OPEN:
            self.body_phase = BodyPhase.FAILED
        return error

    @property
    def finished(self) -> bool:
        return self.phase in (ServerPhase.DONE, ServerPhase.FAILED)


# Frame type -> what the server stream does with it (after SERVER_BODY_TRANSITIONS allowed it).
_RECEIVERS: Final[dict[str, Callable[[ServerStream, f.Frame], Event | None]]] = {
    "abort": ServerStream._on_abort,
    "request.credit": ServerStream._on_credit,
    "request.start": ServerStream._on_repeated_start,
    "request.chunk": ServerStream._on_chunk,
    "request.end": ServerStream._on_end,
    "request.error": ServerStream._on_request_error,
}
