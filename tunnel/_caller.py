"""One request as the caller sees it (sans-IO state machine).

Frames in, events out; every method that must put something on the wire returns
``Publish`` values for the I/O layer to send. Time comes from an injected clock and
timers are plain numbers (``next_deadline()`` / ``poll()``), so this runs in unit tests
with a fake clock and no event loop. The lifecycle is ``CALLER_TRANSITIONS``, keyed by
(phase, the server's frame type); a frame the table does not allow is a
``RemoteProtocolError``.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Final

from . import _codec as codec
from . import _frames as f
from ._config import (
    FIRST_CONTACT_RETRY,
    PROBE_AFTER_HEARTBEATS,
    UNREACHABLE_RETRY_INTERVAL,
    UPGRADED_KEEPALIVE_HEARTBEATS,
)
from ._errors import (
    DeadlineExceeded,
    ErrorCode,
    IdleTimeout,
    LocalProtocolError,
    NoFirstFrameTimeout,
    RemoteProtocolError,
    TunnelAborted,
    TunnelError,
    TunnelUnreachable,
    UpgradeUnsupported,
    error_from_remote,
)
from ._events import (
    NO_BODY_STATUSES,
    V1_MAX_CHUNK,
    Acked,
    BodyEnded,
    Clock,
    CreditGranted,
    DataReceived,
    Event,
    HeartbeatReceived,
    PeerFailed,
    Publish,
    ResponseHead,
)
from ._flow import GrowthBudget, ReceiveWindow, SendCredit
from ._integrity import PREFERRED, BodyDigest, check_whole
from ._subjects import HostSubjects, hostname_from_token

# ----------------------------------------------------------------------------- caller


# Prebuilt: an inline ``A | B`` in isinstance builds the union on every call (hot path).
_ACK_OR_START: Final = (f.ResponseAck, f.ResponseStart)


class CallerPhase(enum.Enum):
    STARTING = "starting"  # start published, no frame from a server yet
    ACKED = "acked"  # a server answered: request body may flow, response not started
    RESPONDING = "responding"  # response.start received, body flowing
    DONE = "done"  # response complete
    FAILED = "failed"  # error, timeout or abort; nothing more flows


_S, _A, _R, _D = CallerPhase.STARTING, CallerPhase.ACKED, CallerPhase.RESPONDING, CallerPhase.DONE
# (phase, frame type) -> next phase. Repeated acks are normal (we republish the start).
CALLER_TRANSITIONS: Final[dict[tuple[CallerPhase, str], CallerPhase]] = {
    (_S, "response.ack"): _A,
    # A heartbeat first means our ack was lost: keep republishing until one carries the negotiation.
    (_S, "response.heartbeat"): _S,
    (_S, "response.start"): _R,
    (_S, "response.whole"): _D,
    (_A, "response.ack"): _A,
    (_A, "response.heartbeat"): _A,
    (_A, "response.credit"): _A,
    (_A, "response.start"): _R,
    (_A, "response.whole"): _D,
    (_R, "response.ack"): _R,
    (_R, "response.heartbeat"): _R,
    (_R, "response.credit"): _R,
    (_R, "response.chunk"): _R,
    (_R, "response.end"): _D,
}


class PresenceEvidence(enum.Enum):
    """What NATS says about a silent host on first contact (see ``CallerStream.on_presence_check``)."""

    #: Nothing but servers subscribes the host's subjects: the interest NATS saw is a (slow) server's.
    UNWATCHED = "unwatched"
    #: Something else watches them, and a server holds the host's readiness subject.
    SERVER_READY = "server_ready"
    #: Something else watches them, and nobody holds the readiness subject (nor taps those).
    NO_SERVER = "no_server"
    #: Something else watches them, and NATS cannot tell about readiness (tapped, or refused).
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class CallerOptions:
    first_frame_timeout: float | None
    idle_timeout: float | None
    total_timeout: float | None
    republish_interval: float
    unreachable_grace: float
    window: int
    max_chunk: int
    max_payload: int
    heartbeat_interval: float
    fast_path: bool = True
    presence_timeout: float | None = None
    presence_fallback: float | None = None
    max_window: int | None = None  # None: the window never grows
    # Shared by every request of one client (mutable: not part of equality or hashing).
    growth_budget: GrowthBudget | None = field(default=None, compare=False)
    # Derived once per options object (a client caches these): the extensions offered in every
    # request.start and their JSON text, so no request hashes or encodes them again.
    offer: f.StartExtensions | None = field(init=False, repr=False, compare=False)
    offer_json: str | None = field(init=False, repr=False, compare=False)
    # The offer's JSON for each (upgrade, ack_now) a request may add to it.
    offer_variants: dict[tuple[bool, bool], str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        offer = _offer_for(self)
        object.__setattr__(self, "offer", offer)
        object.__setattr__(self, "offer_json", None if offer is None else codec.extensions_json(offer))
        variants = {}
        if offer is not None:
            for upgrade in (False, True):
                for ack_now in (False, True):
                    variant = dataclasses.replace(offer, upgrade=upgrade, ack_now=ack_now)
                    variants[upgrade, ack_now] = codec.extensions_json(variant)
        object.__setattr__(self, "offer_variants", variants)


def _offer_for(options: CallerOptions) -> f.StartExtensions | None:
    """The extensions a caller offers: the same for every request with the same options."""
    if not options.fast_path:
        return None
    return f.StartExtensions(
        binary=True,
        window=options.window,
        heartbeat_ms=max(1, int(options.heartbeat_interval * 1000)),
        max_frame=options.max_payload,
        whole=True,
        integrity=PREFERRED,
        binary_head=True,
        reply_batches=True,
    )


class _Unnegotiated(SendCredit):
    """Placeholder flow state before the first frame (shared; never mutated, never used to send)."""

    def spend(self, n: int) -> int:
        raise LocalProtocolError("no body may be sent before the server answered")


_NO_CREDIT_LIMIT: Final = _Unnegotiated(None)
_NO_WINDOW: Final = ReceiveWindow(None)


class CallerStream:
    """One request as the caller sees it."""

    # One per request: slots make it smaller and quicker to build than a dict-backed object.
    __slots__ = (
        "_abort_sent",
        "_body_subject",
        "_first_contact_retried",
        "_first_frame_deadline",
        "_heartbeat_interval",
        "_json_start_parts",
        "_last_frame_at",
        "_last_publish_at",
        "_last_up_at",
        "_presence_checked",
        "_presence_deadline",
        "_probed_at",
        "_retry_at",
        "_start_payload",
        "_total_deadline",
        "binary",
        "body_ended",
        "chunk_limit",
        "clock",
        "compact_start",
        "compact_start_unanswered",
        "end_published",
        "error",
        "first_contact",
        "has_body",
        "heartbeats",
        "liveness_check_pending",
        "method",
        "options",
        "phase",
        "presence_check_pending",
        "published_seq",
        "receive_window",
        "received_digest",
        "reply_subject",
        "request_id",
        "send",
        "sent_digest",
        "server_takes_compact_starts",
        "server_takes_start_batches",
        "started_at",
        "subjects",
        "up_subject",
        "upgrade",
        "upgraded",
    )

    def __init__(
        self,
        *,
        request_id: str,
        subjects: HostSubjects,
        reply_subject: str,
        method: str,
        url: str,
        headers: f.Headers,
        has_body: bool,
        options: CallerOptions,
        clock: Clock,
        deadline_unix_ms: int | None = None,
        upgrade: bool = False,
        first_contact: bool = False,
        compact_start: bool = False,
    ) -> None:
        if upgrade and not options.fast_path:
            raise LocalProtocolError("an upgraded stream needs the protocol extensions (fast_path=True)")
        self.request_id = request_id
        #: This request asks for an upgraded stream: a 101 answer opens both directions.
        self.upgrade = upgrade
        #: The server answered 101 to it: the response body and our request body are now the
        #: two directions of one stream.
        self.upgraded = False
        #: This client has not seen the host serving lately: NATS's no-responders answer is
        #: final after one second look 1 ms later (no daemon of it was just here to be
        #: reconnecting), and the server is asked to ack at once so that a silence can be timed
        #: (see ``presence_check_due``).
        self.first_contact = first_contact
        #: Set by ``poll`` when the I/O layer should find out whether something other than a
        #: server watches this host's subjects (then a silence means nobody serves it).
        self.presence_check_pending = False
        self._presence_checked = False
        #: NATS could not tell whether a server is ready: a server must answer by then.
        self._presence_deadline: float | None = None
        self._first_contact_retried = False
        #: Set by ``poll`` when a plain v1 server (no heartbeats) was silent for the idle timeout:
        #: the I/O layer should check that the host still has a server (``on_liveness_check``).
        self.liveness_check_pending = False
        self.subjects = subjects
        self.options = options
        self.clock = clock
        self.phase = CallerPhase.STARTING
        self.method = method
        self.has_body = has_body
        self.reply_subject = reply_subject
        self.error: TunnelError | None = None
        self._abort_sent = False
        self._body_subject = subjects.body(request_id) if has_body else None
        #: The start goes compact (binary): the I/O layer knows the host takes them. Never on
        #: first contact (its ack tells whether the host does) nor without extensions.
        self.compact_start = compact_start and not first_contact and options.offer is not None
        #: A compact start went unanswered for a republish interval and went again as JSON.
        self.compact_start_unanswered = False
        #: What the server's first frame said about compact starts (see ``_first_frame``);
        #: None: nothing (no first frame yet, or it was an error).
        self.server_takes_compact_starts: bool | None = None
        #: What its ack said about batches of compact starts (``startBatches``); None: nothing
        #: (a ``response.whole`` does not say, nor does an error).
        self.server_takes_start_batches: bool | None = None
        self._json_start_parts: tuple[str, f.Headers, int | None] | None = None
        if self.compact_start:
            try:
                self._start_payload = codec.encode_compact_start(
                    request_id,
                    method,
                    url,
                    headers,
                    has_body,
                    deadline_unix_ms,
                    options.offer_variants[upgrade, False],
                )
                self._json_start_parts = (url, headers, deadline_unix_ms)
            except UnicodeEncodeError:  # unvalidated text: JSON carries it as escapes
                self.compact_start = False
        if not self.compact_start:
            self._start_payload = self._json_start(url, headers, deadline_unix_ms)
        if len(self._start_payload) > options.max_payload:
            raise LocalProtocolError(
                f"request head is {len(self._start_payload)} bytes, over the connection's "
                f"max_payload of {options.max_payload}: send fewer or shorter headers"
            )
        # Negotiated after the first frame.
        self.binary = False
        self.heartbeats = False
        # Integrity extension: running byte count and CRC-32 of each body direction (or None).
        self.sent_digest: BodyDigest | None = None
        self.received_digest: BodyDigest | None = None
        # The server's heartbeat interval (from its ack), and when we last probed a silence.
        self._heartbeat_interval: float | None = None
        self._probed_at: float | None = None
        self.up_subject: str | None = None
        self.send: SendCredit = _NO_CREDIT_LIMIT
        self.receive_window: ReceiveWindow = _NO_WINDOW
        self.chunk_limit = 0
        # Request-body chunks handed to NATS (see ``mark_published``) and whether the end went out.
        self.published_seq = 0
        self.body_ended = False
        self.end_published = False
        # Timers, as data.
        now = clock()
        self.started_at = now
        self._last_publish_at = now
        # Upgraded streams only: when we last sent the server anything on its up subject (our
        # keepalives prove we are still there; the server gives up on a silent caller).
        self._last_up_at = now
        self._last_frame_at = now
        self._retry_at: float | None = None
        self._first_frame_deadline = (
            now + options.first_frame_timeout if options.first_frame_timeout else None
        )
        self._total_deadline = now + options.total_timeout if options.total_timeout else None

    # -- outgoing ---------------------------------------------------------------

    def _json_start(self, url: str, headers: f.Headers, deadline_unix_ms: int | None) -> bytes:
        """The JSON start, encoded from the parts (byte-identical to encode_frame of one)."""
        rid = self.request_id
        return codec.encode_request_start(
            rid,
            self.method,
            url,
            headers,
            self.reply_subject,
            f"{self.subjects.base}.req.{rid}.abort",
            self._body_subject,
            deadline_unix_ms,
            self.options.offer_variants.get((self.upgrade, self.first_contact)),
        )

    def _fall_back_to_json_start(self) -> None:
        """A compact start got no frame: the host may have an older server that drops them."""
        assert self._json_start_parts is not None
        payload = self._json_start(*self._json_start_parts)
        if len(payload) <= self.options.max_payload:
            self._start_payload = payload
            self.compact_start = False
            self.compact_start_unanswered = True

    def start(self) -> Publish:
        """The start frame; published with a NATS reply so no-responders reaches us."""
        return Publish(self.subjects.request, self._start_payload, self.reply_subject)

    @property
    def can_send_body(self) -> bool:
        return self.phase in (CallerPhase.ACKED, CallerPhase.RESPONDING)

    def send_body(self, data: bytes | memoryview) -> tuple[list[Publish], int]:
        """Frames for as much of ``data`` as credit allows; returns (frames, bytes taken)."""
        if not self.can_send_body:
            raise LocalProtocolError(f"cannot send body in phase {self.phase.value}")
        frames: list[Publish] = []
        taken = 0
        total = len(data)
        subject = self.up_subject or self._body_subject
        assert subject is not None, "request declared without a body"
        while taken < total:
            n = min(total - taken, self.chunk_limit, self.send.available())
            if n <= 0:
                break
            piece = data[taken : taken + n]
            seq = self.send.spend(n)
            if self.sent_digest is not None:
                self.sent_digest.update(piece)
            if self.binary:
                payload = codec.encode_binary_chunk(False, seq, piece)
            else:
                payload = codec.encode_chunk(f.RequestChunk(self.request_id, seq, bytes(piece)), False)
            frames.append(Publish(subject, payload))
            taken += n
        if frames and self.upgrade:
            self._last_up_at = self.clock()
        return frames, taken

    def mark_published(self) -> None:
        """The I/O layer handed every body frame built so far to NATS, in order.

        Only these count in the ``seq`` we report to the server: a frame built but not yet
        published must never be claimed, or a probe overtaking it would look like a loss.
        Called after the end frame too: from then on the reports say the body ended.
        """
        self.published_seq = self.send.next_seq
        self.end_published = self.body_ended

    def end_body(self) -> Publish:
        subject = self.up_subject or self._body_subject
        assert subject is not None, "request declared without a body"
        self.body_ended = True
        if self.upgrade:
            self._last_up_at = self.clock()
        digest = self.sent_digest
        end = (
            f.RequestEnd(self.request_id, self.send.next_seq)
            if digest is None
            else f.RequestEnd(self.request_id, self.send.next_seq, digest.size, digest.result())
        )
        return Publish(subject, codec.encode_frame(end))

    def fail_body(self, code: str, message: str) -> Publish | None:
        """Tell the server our request body failed (our iterator raised)."""
        subject = self.up_subject or self._body_subject
        if subject is None or self.phase in (CallerPhase.DONE, CallerPhase.FAILED):
            return None
        return Publish(subject, codec.encode_frame(f.RequestError(self.request_id, code, message)))

    def consumed(self, n: int) -> Publish | None:
        """The application read ``n`` response bytes; maybe grant the server more credit."""
        grant = self.receive_window.on_consumed(n)
        if grant is None or self.up_subject is None or self.phase is not CallerPhase.RESPONDING:
            return None
        if self.upgrade:
            self._last_up_at = self.clock()
        return Publish(self.up_subject, codec.encode_frame(f.RequestCredit(self.request_id, grant)))

    def refresh_credit(self) -> Publish | None:
        """Answer a heartbeat: re-send our limit and, during an upload, how far we got.

        Grants are cumulative, so re-sending the limit repairs a lost one. While our request
        body waits for credit (or has ended), the ``seq`` of chunks we published lets the
        server see at once that some never arrived, instead of both ends waiting for credit.
        """
        if self.up_subject is None or self.phase not in (CallerPhase.ACKED, CallerPhase.RESPONDING):
            return None
        limit = self.receive_window.regrant() if self.phase is CallerPhase.RESPONDING else None
        seq = None
        all_published = self.published_seq == self.send.next_seq
        if self.has_body and all_published and (self.body_ended or self.send.available() == 0):
            seq = self.published_seq
        if seq is not None and limit is None:
            limit = self.receive_window.granted  # unchanged: carries the seq, grants nothing new
        if limit is None:
            return None
        ended = seq is not None and self.end_published
        if self.upgrade:
            self._last_up_at = self.clock()
        return Publish(
            self.up_subject, codec.encode_frame(f.RequestCredit(self.request_id, limit, seq, ended))
        )

    def abort(self, reason: str = ErrorCode.ABORTED) -> Publish | None:
        """Stop the server side: returns the abort frame unless the stream already ended cleanly."""
        if self.phase is CallerPhase.DONE or self._abort_sent:
            return None
        if self.phase is not CallerPhase.FAILED:
            self._fail(TunnelAborted(f"request aborted: {reason}"))
        elif self.error is not None and self.error.code == ErrorCode.UNREACHABLE:
            return None  # nobody to tell
        self._abort_sent = True
        return Publish(
            self.subjects.abort(self.request_id), codec.encode_frame(f.Abort(self.request_id, reason))
        )

    # -- incoming ---------------------------------------------------------------

    def receive(self, frame: f.Frame) -> Event | None:
        """Apply one frame from the server; returns what the application should see."""
        if self.phase in (CallerPhase.DONE, CallerPhase.FAILED):
            return None  # late frames (heartbeats, re-acks, an end after HEAD) are harmless
        if frame.request_id != self.request_id:
            raise self._fail(RemoteProtocolError("frame for another request"))
        if isinstance(frame, f.ResponseError):
            return PeerFailed(self._fail(error_from_remote(frame.code, frame.message)))
        nxt = CALLER_TRANSITIONS.get((self.phase, frame.type))
        if nxt is None:
            raise self._fail(RemoteProtocolError(f"unexpected {frame.type} while {self.phase.value}"))
        self._last_frame_at = self.clock()
        first = self.phase is CallerPhase.STARTING and nxt is not CallerPhase.STARTING
        self.phase = nxt
        if first:
            self._first_frame(frame)
        if isinstance(frame, f.ResponseStart):
            return self._on_response_start(frame)
        if isinstance(frame, f.ResponseWhole):
            return self._on_whole(frame)
        if isinstance(frame, f.ResponseChunk):
            try:
                self.receive_window.on_chunk(frame.seq, len(frame.data))
            except TunnelError as exc:
                raise self._fail(exc) from None
            if self.received_digest is not None:
                self.received_digest.update(frame.data)
            return DataReceived(frame.data)
        if isinstance(frame, f.ResponseEnd):
            try:
                self.receive_window.on_end(frame.seq)
                if self.received_digest is not None:
                    self.received_digest.check(frame.size, frame.checksum, "response body")
            except TunnelError as exc:
                raise self._fail(exc) from None
            return BodyEnded()
        if isinstance(frame, f.ResponseCredit):
            self.send.grant(frame.limit)
            return CreditGranted()
        if first:
            return Acked()
        if isinstance(frame, f.ResponseHeartbeat):
            if frame.seq is not None and self.phase is CallerPhase.RESPONDING:
                lost = frame.seq - self.receive_window.expected_seq
                if lost > 0:
                    # The heartbeat left after those frames on the same connection: they are gone.
                    raise self._fail(
                        RemoteProtocolError(
                            f"response body data lost: the server sent {frame.seq} data frames, "
                            f"{self.receive_window.expected_seq} arrived"
                        )
                    )
            if self.phase is CallerPhase.RESPONDING or self.has_body:
                return HeartbeatReceived()  # we may owe the server a credit refresh or our upload seq
        return None

    def _first_frame(self, frame: f.Frame) -> None:
        """Negotiate from the server's first frame; a plain v1 server sends no extensions."""
        self._retry_at = None
        ext = None
        if isinstance(frame, _ACK_OR_START):
            ext = frame.extensions
        elif isinstance(frame, f.ResponseWhole):
            ext = frame.start.extensions
        opts = self.options
        if type(frame) is f.ResponseWhole:
            # Only a compact head says: a JSON one (to our binaryHead offer) is an older server's.
            self.server_takes_compact_starts = frame.compact_head and frame.binary_start
        else:
            self.server_takes_compact_starts = ext is not None and ext.binary_start
            if isinstance(ext, f.AckExtensions):
                self.server_takes_start_batches = ext.binary_start and ext.start_batches
        if self.upgrade and (ext is None or not ext.upgrade or ext.up_subject is None):
            kind = "a plain v1 server" if ext is None else "a server without the upgrade extension"
            raise self._fail(
                UpgradeUnsupported(
                    f"{kind} took this request: it cannot carry an upgraded stream (WebSocket); "
                    "upgrade the daemon serving the host"
                )
            )
        if ext is not None and opts.fast_path:
            up = ext.up_subject
            head = f"{self.subjects.base}.req.{self.request_id}."
            if up is not None and not (
                # Its own (``up.<server>``), or the body subject: a server under the reference
                # daemon permissions may subscribe nothing else.
                (up.startswith(head + "up.") and self.subjects.owns(up)) or up == head + "body"
            ):
                raise self._fail(RemoteProtocolError("server named an up subject outside its request"))
            self.up_subject = up
            self.binary = ext.binary and up is not None
            self.heartbeats = ext.heartbeat_ms is not None
            if ext.heartbeat_ms is not None and up is not None:
                self._heartbeat_interval = ext.heartbeat_ms / 1000
            self.send = SendCredit(ext.window if up is not None else None)
            self.receive_window = (
                ReceiveWindow(opts.window, max_window=opts.max_window, budget=opts.growth_budget)
                if up is not None
                else ReceiveWindow(None)
            )
            if ext.integrity == PREFERRED and up is not None:
                self.sent_digest = BodyDigest(PREFERRED) if self.has_body else None
                self.received_digest = BodyDigest(PREFERRED)
            peer_max = ext.max_frame or opts.max_payload
            frame_limit = min(opts.max_payload, peer_max)
        else:
            self.send = SendCredit(None)
            self.receive_window = ReceiveWindow(None)
            if type(frame) is f.ResponseWhole:
                return  # the response is complete: no body of ours will ever need a chunk limit
            frame_limit = opts.max_payload
        self.chunk_limit = max(
            1, min(opts.max_chunk, codec.max_chunk_data(frame_limit, self.binary, len(self.request_id)))
        )
        if not self.binary:
            self.chunk_limit = min(self.chunk_limit, V1_MAX_CHUNK)
        if self.send.credit is not None:
            self.chunk_limit = min(self.chunk_limit, max(1, self.send.credit // 2))

    def _on_response_start(self, frame: f.ResponseStart) -> ResponseHead:
        if self.upgrade and frame.status == 101:
            # The stream is open both ways now: its server->caller direction is the "body".
            self.upgraded = True
            return ResponseHead(frame.status, frame.status_text, frame.headers, True)
        has_body = not (
            self.method == "HEAD" or frame.status in NO_BODY_STATUSES or 100 <= frame.status < 200
        )
        if not has_body:
            self.phase = CallerPhase.DONE
        return ResponseHead(frame.status, frame.status_text, frame.headers, has_body)

    def _on_whole(self, frame: f.ResponseWhole) -> ResponseHead:
        offer = self.options.offer
        if offer is None or (frame.compact_head and not offer.binary_head):
            raise self._fail(RemoteProtocolError("response.whole from a server we did not offer it to"))
        if len(frame.data) > self.options.window:
            raise self._fail(RemoteProtocolError("response.whole larger than our flow-control window"))
        start = frame.start
        status = start.status
        if self.upgrade and status == 101:
            raise self._fail(RemoteProtocolError("a 101 that opens a stream cannot come as response.whole"))
        has_body = not (self.method == "HEAD" or status in NO_BODY_STATUSES or 100 <= status < 200)
        if frame.checksum is not None:
            # The whole frame's head names no extensions; a server that has the integrity
            # extension always puts the checksum there (an older one: none to check).
            try:
                check_whole(frame.data, frame.checksum)
            except TunnelError as exc:
                raise self._fail(exc) from None
        self.phase = CallerPhase.DONE
        if has_body:
            self.receive_window.received_bytes += len(frame.data)  # counted like chunks (diagnostics)
        # One ResponseHead (not one from _on_response_start and a copy): every small response.
        return ResponseHead(status, start.status_text, start.headers, has_body, frame.data)

    def no_responders(self) -> Publish | None:
        """NATS said nobody is subscribed: final at first contact; for a host seen serving
        lately (its daemon may be reconnecting), retry within the grace period, then fail."""
        if self.phase is not CallerPhase.STARTING:
            return None
        now = self.clock()
        if self.first_contact:
            # One quick second look: a server that subscribed a moment ago may not be known yet
            # to the NATS node we talk to (interest travels between cluster nodes) or its SUB
            # may still be in its client's buffer. Then it is final: milliseconds, not a grace.
            if not self._first_contact_retried:
                self._first_contact_retried = True
                self._retry_at = now + FIRST_CONTACT_RETRY
                return None
        elif now - self.started_at + UNREACHABLE_RETRY_INTERVAL <= self.options.unreachable_grace:
            self._retry_at = now + UNREACHABLE_RETRY_INTERVAL
            return None
        raise self._fail(TunnelUnreachable(f"no server is serving {self._host_description()}"))

    def _host_description(self) -> str:
        token = self.subjects.token
        try:
            host = hostname_from_token(token)
        except LocalProtocolError:
            host = "?"
        return f"host {host!r} (host token {token}, prefix {self.subjects.prefix})"

    def on_liveness_check(self, host_has_server: bool) -> None:
        """The I/O layer's answer about a silent plain v1 server: gone only if no server of the
        host is subscribed any more (NATS said no-responders to a probe on its abort subject)."""
        if self.finished or host_has_server:
            return
        raise self._fail(
            IdleTimeout(
                f"the server of this request left: {self._host_description()} has no server any more "
                f"(a plain v1 server sends no heartbeats, so its silence alone is not taken as gone)"
            )
        )

    def presence_check_due(self) -> float | None:
        """First contact: when a start still unanswered (no frame, no no-responders) makes us
        ask whether a non-server subscriber (a monitoring tap) is hiding NATS's answer."""
        timeout = self.options.presence_timeout
        if not self.first_contact or timeout is None or self._presence_checked:
            return None
        return self.started_at + timeout

    def on_presence_check(self, evidence: PresenceEvidence) -> None:
        """The I/O layer's answer. Unwatched, the interest NATS saw is a (slow) server's; a
        server holding the readiness subject is there too: keep waiting. Nobody holding it: a
        plain server without one would have acked by now, so nobody serves the host. NATS
        cannot tell: a server gets until ``presence_fallback`` to answer."""
        if self.phase is not CallerPhase.STARTING:
            return
        if evidence is PresenceEvidence.NO_SERVER:
            timeout = self.options.presence_timeout or 0.0
            raise self._fail(
                TunnelUnreachable(
                    f"nobody serves {self._host_description()}: no server holds its readiness "
                    f"subject and none answered within {timeout * 1000:g} ms (a subscriber that is "
                    "not a server, such as a monitoring tap on the prefix, receives its requests, "
                    "so NATS cannot say so itself)"
                )
            )
        if evidence is PresenceEvidence.UNKNOWN:
            self._presence_deadline = self.started_at + self._presence_fallback()

    def _presence_fallback(self) -> float:
        return self.options.presence_fallback or self.options.presence_timeout or 0.0

    # -- timers -----------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When ``poll`` next has something to do (monotonic seconds)."""
        phase = self.phase
        if phase is CallerPhase.DONE or phase is CallerPhase.FAILED:
            return None
        # Runs for every request: a running minimum instead of building and filtering lists.
        due = self._total_deadline
        if phase is CallerPhase.STARTING:
            first = self._first_frame_deadline
            if first is not None and (due is None or first < due):
                due = first
            retry = self._retry_at or self._last_publish_at + self.options.republish_interval
            if due is None or retry < due:
                due = retry
            presence = self.presence_check_due()
            if presence is not None and presence < due:
                due = presence
            presence = self._presence_deadline
            if presence is not None and presence < due:
                due = presence
        elif self._idle_applies():
            assert self.options.idle_timeout is not None
            idle = self._last_frame_at + self.options.idle_timeout
            if due is None or idle < due:
                due = idle
            probe = self._probe_due()
            if probe is not None and probe < due:
                due = probe
        keepalive = self._keepalive_due()
        if keepalive is not None and (due is None or keepalive < due):
            due = keepalive
        return due

    def _keepalive_due(self) -> float | None:
        """Upgraded streams: when we owe the server a sign of life (we sent it nothing lately).

        A quiet WebSocket may carry nothing our way for hours; the server must still tell a
        caller that is gone from one that has nothing to say, so we speak up every heartbeat
        interval (an unchanged credit limit: it grants nothing new).
        """
        interval = self._heartbeat_interval
        if not self.upgrade or interval is None or self.up_subject is None:
            return None
        if self.phase is not CallerPhase.ACKED and self.phase is not CallerPhase.RESPONDING:
            return None
        return self._last_up_at + UPGRADED_KEEPALIVE_HEARTBEATS * interval

    def _keepalive(self) -> Publish | None:
        granted = self.receive_window.granted
        if self.up_subject is None or granted is None:
            return None
        self._last_up_at = self.clock()
        return Publish(self.up_subject, codec.encode_frame(f.RequestCredit(self.request_id, granted)))

    def _probe_due(self) -> float | None:
        """When to probe a silent server: two heartbeat intervals without a frame while the
        response body is open means its ``response.end`` (or error) may have been lost."""
        interval = self._heartbeat_interval
        if interval is None or self.phase is not CallerPhase.RESPONDING:
            return None
        since = self._last_frame_at
        if self._probed_at is not None and self._probed_at > since:
            since = self._probed_at
        return since + PROBE_AFTER_HEARTBEATS * interval

    def _probe(self) -> Publish | None:
        granted = self.receive_window.granted
        if self.up_subject is None or granted is None:
            return None
        return Publish(
            self.up_subject, codec.encode_frame(f.RequestCredit(self.request_id, granted, probe=True))
        )

    def _idle_applies(self) -> bool:
        if self.options.idle_timeout is None:
            return False
        # Without heartbeats (plain v1 server) silence before the response is normal.
        return self.heartbeats or self.phase is CallerPhase.RESPONDING

    def poll(self) -> list[Publish]:
        """Fire due timers: republish the start, or fail with the timeout that expired."""
        if self.phase in (CallerPhase.DONE, CallerPhase.FAILED):
            return []
        now = self.clock()
        if self._total_deadline is not None and now >= self._total_deadline:
            raise self._fail(
                DeadlineExceeded(f"no complete response within {self.options.total_timeout:g} s")
            )
        if self.phase is CallerPhase.STARTING:
            if self._first_frame_deadline is not None and now >= self._first_frame_deadline:
                raise self._fail(
                    NoFirstFrameTimeout(
                        f"no frame from the server within {self.options.first_frame_timeout:g} s"
                    )
                )
            presence = self.presence_check_due()
            if presence is not None and now >= presence:
                self._presence_checked = True
                self.presence_check_pending = True
            if self._presence_deadline is not None and now >= self._presence_deadline:
                fallback_ms = self._presence_fallback() * 1000
                raise self._fail(
                    TunnelUnreachable(
                        f"no server answered for {self._host_description()} within {fallback_ms:g} ms "
                        "(something that is not a server, such as a monitoring subscriber on the "
                        "prefix, receives its requests, so NATS cannot say that nobody serves it)"
                    )
                )
            due = self._retry_at or self._last_publish_at + self.options.republish_interval
            if now >= due:
                if self.compact_start and self._retry_at is None:
                    self._fall_back_to_json_start()
                self._retry_at = None
                self._last_publish_at = now
                return [self.start()]
        elif self._idle_applies():
            assert self.options.idle_timeout is not None
            if now - self._last_frame_at >= self.options.idle_timeout:
                if not self.heartbeats:
                    # A plain v1 server sends no heartbeats: its silence proves nothing (an SSE
                    # stream may be quiet for minutes). Ask the I/O layer whether the host still
                    # has a server at all, and check again after another idle period.
                    self._last_frame_at = now
                    self.liveness_check_pending = True
                    return []
                raise self._fail(
                    IdleTimeout(f"server silent for {self.options.idle_timeout:g} s (no data, no heartbeat)")
                )
            probe_at = self._probe_due()
            if probe_at is not None and now >= probe_at:
                self._probed_at = now
                probe = self._probe()
                if probe is not None:
                    if self.upgrade:
                        self._last_up_at = now
                    return [probe]
        keepalive_at = self._keepalive_due()
        if keepalive_at is not None and now >= keepalive_at:
            keepalive = self._keepalive()
            return [keepalive] if keepalive is not None else []
        return []

    def fail(self, error: TunnelError) -> TunnelError:
        """Mark the stream failed from outside (connection lost, body iterator error)."""
        if self.phase in (CallerPhase.DONE, CallerPhase.FAILED):
            return self.error or error
        return self._fail(error)

    def _fail(self, error: TunnelError) -> TunnelError:
        self.phase = CallerPhase.FAILED
        self.error = error
        return error

    @property
    def finished(self) -> bool:
        return self.phase in (CallerPhase.DONE, CallerPhase.FAILED)
