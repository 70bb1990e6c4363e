"""Per-request stream state machines for both ends (sans-IO).

Frames in, events out; every method that must put something on the wire returns
``Publish`` values for the I/O layer to send. Time comes from an injected clock
and timers are plain numbers (``next_deadline()`` / ``poll()``), so everything
here runs in unit tests with a fake clock and no event loop.

Each end's lifecycle is a transition table keyed by (phase, their frame type);
a frame the table does not allow is a ``RemoteProtocolError``.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from . import _frames as f
from ._config import (
    DEFERRED_ACK_DELAY,
    MAX_HEARTBEAT_INTERVAL,
    MIN_HEARTBEAT_INTERVAL,
    PROBE_AFTER_HEARTBEATS,
    UNREACHABLE_RETRY_INTERVAL,
)
from ._errors import (
    DeadlineExceeded,
    ErrorCode,
    IdleTimeout,
    LocalProtocolError,
    NoFirstFrameTimeout,
    RemoteProtocolError,
    StallTimeout,
    TunnelAborted,
    TunnelError,
    TunnelUnreachable,
    error_from_remote,
)
from ._flow import ReceiveWindow, SendCredit
from ._subjects import HostSubjects, hostname_from_token

Clock = Callable[[], float]

# Plain v1 JSON chunks carry at most what the reference caller sends (64 KiB of data), so a
# v1 peer never sees a frame larger than it would produce itself.
V1_MAX_CHUNK: Final = 64 * 1024
# Responses that never carry a body (RFC 9110): the caller does not wait for one.
NO_BODY_STATUSES: Final = frozenset({204, 205, 304})


@dataclass(frozen=True, slots=True)
class Publish:
    """One NATS message to send."""

    subject: str
    payload: bytes
    reply: str = ""


# ----------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Acked:
    """A server took the request; the request body may flow now."""


@dataclass(frozen=True, slots=True)
class ResponseHead:
    status: int
    status_text: str | None
    headers: f.Headers
    has_body: bool
    complete_body: bytes | None = None  # set when the whole body came with the head


@dataclass(frozen=True, slots=True)
class DataReceived:
    data: bytes


@dataclass(frozen=True, slots=True)
class BodyEnded:
    """The peer's body is complete (every frame arrived, in order)."""


@dataclass(frozen=True, slots=True)
class CreditGranted:
    """We may send more body bytes."""


@dataclass(frozen=True, slots=True)
class PeerFailed:
    """The peer ended the stream with an error frame or an abort."""

    error: TunnelError


@dataclass(frozen=True, slots=True)
class HeartbeatReceived:
    """The server is alive but sent nothing else lately: it may be waiting on a lost grant."""


Event = Acked | ResponseHead | DataReceived | BodyEnded | CreditGranted | PeerFailed | HeartbeatReceived


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
    # Derived once per options object (a client caches these): the extensions offered in every
    # request.start and their JSON text, so no request hashes or encodes them again.
    offer: f.StartExtensions | None = field(init=False, repr=False, compare=False)
    offer_json: str | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        offer = _offer_for(self)
        object.__setattr__(self, "offer", offer)
        object.__setattr__(self, "offer_json", None if offer is None else f.extensions_json(offer))


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
    )


class _Unnegotiated(SendCredit):
    """Placeholder flow state before the first frame (shared; never mutated, never used to send)."""

    def spend(self, n: int) -> int:
        raise LocalProtocolError("no body may be sent before the server answered")


_NO_CREDIT_LIMIT: Final = _Unnegotiated(None)
_NO_WINDOW: Final = ReceiveWindow(None)


class CallerStream:
    """One request as the caller sees it."""

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
    ) -> None:
        self.request_id = request_id
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
        # Encoded from the parts (no RequestStart object); byte-identical to encode_frame of one.
        self._start_payload = f.encode_request_start(
            request_id,
            method,
            url,
            headers,
            reply_subject,
            f"{subjects.base}.req.{request_id}.abort",
            self._body_subject,
            deadline_unix_ms,
            options.offer_json,
        )
        if len(self._start_payload) > options.max_payload:
            raise LocalProtocolError(
                f"request head is {len(self._start_payload)} bytes, over the connection's "
                f"max_payload of {options.max_payload}: send fewer or shorter headers"
            )
        # Negotiated after the first frame.
        self.binary = False
        self.heartbeats = False
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
        self._last_frame_at = now
        self._retry_at: float | None = None
        self._first_frame_deadline = (
            now + options.first_frame_timeout if options.first_frame_timeout else None
        )
        self._total_deadline = now + options.total_timeout if options.total_timeout else None

    # -- outgoing ---------------------------------------------------------------

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
            piece = bytes(data[taken : taken + n])
            seq = self.send.spend(n)
            frames.append(
                Publish(subject, f.encode_chunk(f.RequestChunk(self.request_id, seq, piece), self.binary))
            )
            taken += n
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
        return Publish(subject, f.encode_frame(f.RequestEnd(self.request_id, self.send.next_seq)))

    def fail_body(self, code: str, message: str) -> Publish | None:
        """Tell the server our request body failed (our iterator raised)."""
        subject = self.up_subject or self._body_subject
        if subject is None or self.phase in (CallerPhase.DONE, CallerPhase.FAILED):
            return None
        return Publish(subject, f.encode_frame(f.RequestError(self.request_id, code, message)))

    def consumed(self, n: int) -> Publish | None:
        """The application read ``n`` response bytes; maybe grant the server more credit."""
        grant = self.receive_window.on_consumed(n)
        if grant is None or self.up_subject is None or self.phase is not CallerPhase.RESPONDING:
            return None
        return Publish(self.up_subject, f.encode_frame(f.RequestCredit(self.request_id, grant)))

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
        return Publish(self.up_subject, f.encode_frame(f.RequestCredit(self.request_id, limit, seq, ended)))

    def abort(self, reason: str = ErrorCode.ABORTED) -> Publish | None:
        """Stop the server side: returns the abort frame unless the stream already ended cleanly."""
        if self.phase is CallerPhase.DONE or self._abort_sent:
            return None
        if self.phase is not CallerPhase.FAILED:
            self._fail(TunnelAborted(f"request aborted: {reason}"))
        elif self.error is not None and self.error.code == ErrorCode.UNREACHABLE:
            return None  # nobody to tell
        self._abort_sent = True
        return Publish(self.subjects.abort(self.request_id), f.encode_frame(f.Abort(self.request_id, reason)))

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
            return DataReceived(frame.data)
        if isinstance(frame, f.ResponseEnd):
            try:
                self.receive_window.on_end(frame.seq)
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
        if ext is not None and opts.fast_path:
            up = ext.up_subject
            if up is not None and not (
                self.subjects.owns(up) and up.startswith(self.subjects.base + f".req.{self.request_id}.up.")
            ):
                raise self._fail(RemoteProtocolError("server named an up subject outside its request"))
            self.up_subject = up
            self.binary = ext.binary and up is not None
            self.heartbeats = ext.heartbeat_ms is not None
            if ext.heartbeat_ms is not None and up is not None:
                self._heartbeat_interval = ext.heartbeat_ms / 1000
            self.send = SendCredit(ext.window if up is not None else None)
            self.receive_window = ReceiveWindow(opts.window if up is not None else None)
            peer_max = ext.max_frame or opts.max_payload
            frame_limit = min(opts.max_payload, peer_max)
        else:
            self.send = SendCredit(None)
            self.receive_window = ReceiveWindow(None)
            if type(frame) is f.ResponseWhole:
                return  # the response is complete: no body of ours will ever need a chunk limit
            frame_limit = opts.max_payload
        self.chunk_limit = max(
            1, min(opts.max_chunk, f.max_chunk_data(frame_limit, self.binary, len(self.request_id)))
        )
        if not self.binary:
            self.chunk_limit = min(self.chunk_limit, V1_MAX_CHUNK)
        if self.send.credit is not None:
            self.chunk_limit = min(self.chunk_limit, max(1, self.send.credit // 2))

    def _on_response_start(self, frame: f.ResponseStart) -> ResponseHead:
        has_body = not (
            self.method == "HEAD" or frame.status in NO_BODY_STATUSES or 100 <= frame.status < 200
        )
        if not has_body:
            self.phase = CallerPhase.DONE
        return ResponseHead(frame.status, frame.status_text, frame.headers, has_body)

    def _on_whole(self, frame: f.ResponseWhole) -> ResponseHead:
        if not self.options.fast_path:
            raise self._fail(RemoteProtocolError("response.whole from a server we did not offer it to"))
        if len(frame.data) > self.options.window:
            raise self._fail(RemoteProtocolError("response.whole larger than our flow-control window"))
        start = frame.start
        status = start.status
        has_body = not (self.method == "HEAD" or status in NO_BODY_STATUSES or 100 <= status < 200)
        self.phase = CallerPhase.DONE
        # One ResponseHead (not one from _on_response_start and a copy): every small response.
        return ResponseHead(status, start.status_text, start.headers, has_body, frame.data)

    def no_responders(self) -> Publish | None:
        """NATS said nobody is subscribed: retry within the grace period, else fail."""
        if self.phase is not CallerPhase.STARTING:
            return None
        now = self.clock()
        if now - self.started_at + UNREACHABLE_RETRY_INTERVAL <= self.options.unreachable_grace:
            self._retry_at = now + UNREACHABLE_RETRY_INTERVAL
            return None
        token = self.subjects.token
        try:
            host = hostname_from_token(token)
        except LocalProtocolError:
            host = "?"
        raise self._fail(
            TunnelUnreachable(
                f"no server is serving host {host!r} (host token {token}, prefix {self.subjects.prefix})"
            )
        )

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
        elif self._idle_applies():
            assert self.options.idle_timeout is not None
            idle = self._last_frame_at + self.options.idle_timeout
            if due is None or idle < due:
                due = idle
            probe = self._probe_due()
            if probe is not None and probe < due:
                due = probe
        return due

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
        return Publish(self.up_subject, f.encode_frame(f.RequestCredit(self.request_id, granted, probe=True)))

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
            due = self._retry_at or self._last_publish_at + self.options.republish_interval
            if now >= due:
                self._retry_at = None
                self._last_publish_at = now
                return [self.start()]
        elif self._idle_applies():
            assert self.options.idle_timeout is not None
            if now - self._last_frame_at >= self.options.idle_timeout:
                raise self._fail(
                    IdleTimeout(f"server silent for {self.options.idle_timeout:g} s (no data, no heartbeat)")
                )
            probe_at = self._probe_due()
            if probe_at is not None and now >= probe_at:
                self._probed_at = now
                probe = self._probe()
                return [probe] if probe is not None else []
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


@dataclass(frozen=True, slots=True)
class ServerOptions:
    window: int
    max_chunk: int
    max_payload: int
    stall_timeout: float | None
    fast_path: bool = True


@dataclass(frozen=True, slots=True)
class _ServerTerms:
    """What a server derives from one caller offer and its own options."""

    binary: bool
    heartbeat_interval: float | None
    frame_limit: int
    chunk_limit: int
    offers_whole: bool


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
    chunk_limit = max(1, min(options.max_chunk, f.max_chunk_data(frame_limit, binary, rid_length)))
    if not binary:
        chunk_limit = min(chunk_limit, V1_MAX_CHUNK)
    if credit is not None:
        chunk_limit = min(chunk_limit, max(1, credit // 2))
    offers_whole = offer is not None and offer.whole and offer.binary
    return _ServerTerms(binary, heartbeat, frame_limit, chunk_limit, offers_whole)


class ServerStream:
    """One request as the server sees it."""

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
            not subjects.request_subject_ok(start.reply_subject, rid, head)
            or start.abort_subject != head + "abort"
            or (start.body_subject is not None and start.body_subject != head + "body")
        ):
            raise f.FrameError("request names subjects that are not its own", rid)
        offer = start.extensions if options.fast_path else None
        self.extended = offer is not None
        self.reply_subject = start.reply_subject
        self.response_has_body = True
        # The negotiated limits depend only on the caller's offer (the same object for every
        # request of one caller: see _frames._start_ext) and our options: computed once each.
        terms = _server_terms(offer, options, len(rid))
        self.binary = terms.binary
        self.heartbeat_interval: float | None = terms.heartbeat_interval
        self.frame_limit = terms.frame_limit
        self.chunk_limit = terms.chunk_limit
        self.offers_whole = terms.offers_whole
        if offer is not None:
            self.up_subject: str | None = f"{head}up.{server_id}"
            self.send = SendCredit(offer.window)
            self.receive_window = ReceiveWindow(options.window)
        else:
            self.up_subject = None
            self.send = SendCredit(None)
            self.receive_window = ReceiveWindow(None)
        self.acked = False
        now = clock()
        # A body-less request from an extended caller is acked only if the handler is slow:
        # otherwise response.start (or response.whole) is the first frame.
        self.ack_due: float | None = (
            now + DEFERRED_ACK_DELAY if self.extended and start.body_subject is None else None
        )
        self._last_sent_at = now
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
        if status_text is not None and (
            len(status_text) > 1024 or "\r" in status_text or "\n" in status_text
        ):
            raise LocalProtocolError("invalid status text")
        self.phase = ServerPhase.RESPONDING
        self.response_has_body = self._allows_body(status)
        # Always repeat the negotiation: if the ack was lost, this is the caller's first frame.
        ext = self._ack_extensions()
        self.acked = True
        self.ack_due = None
        return self._out(f.ResponseStart(self.request_id, status, headers, status_text, ext))

    def _allows_body(self, status: int) -> bool:
        return not (self.start_frame.method == "HEAD" or status in NO_BODY_STATUSES or 100 <= status < 200)

    def whole_response(
        self, status: int, headers: f.Headers, status_text: str | None, data: bytes | bytearray | memoryview
    ) -> Publish | None:
        """The complete response as one message, when the caller offered it and it fits; else None."""
        if not self.offers_whole or self.phase is not ServerPhase.ACKED:
            return None
        if not isinstance(status, int) or not 100 <= status <= 599:
            raise LocalProtocolError(f"invalid status {status!r}")
        if not self._allows_body(status):
            data = b""
        size = len(data)
        if size > self.frame_limit or size > self.send.available():
            return None
        headers = f.validate_headers(headers)
        if status_text is not None and (
            len(status_text) > 1024 or "\r" in status_text or "\n" in status_text
        ):
            raise LocalProtocolError("invalid status text")
        # Encoded straight from the parts: no ResponseStart/ResponseWhole objects per response.
        payload = f.encode_whole(self.request_id, status, headers, status_text, data)
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
        while taken < total:
            n = min(total - taken, self.chunk_limit, self.send.available())
            if n <= 0:
                break
            piece = bytes(data[taken : taken + n])
            seq = self.send.spend(n)
            frames.append(
                Publish(
                    self.reply_subject,
                    f.encode_chunk(f.ResponseChunk(self.request_id, seq, piece), self.binary),
                )
            )
            taken += n
        now = self.clock()
        if frames:
            self._last_sent_at = now
        if taken < total:
            if self._credit_blocked_since is None:
                self._credit_blocked_since = now
        else:
            self._credit_blocked_since = None
        return frames, taken

    def mark_published(self) -> None:
        """The I/O layer handed every body frame built so far to NATS, in order.

        A heartbeat claims only these, so it can never overtake a frame it counts.
        """
        self.published_seq = self.send.next_seq

    def end_response(self) -> Publish:
        if self.phase is not ServerPhase.RESPONDING:
            raise LocalProtocolError(f"cannot end response in phase {self.phase.value}")
        self.phase = ServerPhase.DONE
        return self._out(f.ResponseEnd(self.request_id, self.send.next_seq))

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
        return Publish(self.reply_subject, f.encode_frame(frame, self.binary))

    # -- incoming ---------------------------------------------------------------

    def receive(self, frame: f.Frame) -> Event | None:
        if self.phase in (ServerPhase.DONE, ServerPhase.FAILED) or self.caller_gone:
            # Late frames (a re-sent credit, an abort racing our end, a stray chunk) are harmless:
            # the response is complete, and turning it into a failure would send response.error
            # after response.end.
            return None
        if isinstance(frame, f.Abort):
            self.caller_gone = True
            return PeerFailed(self._fail(TunnelAborted(f"caller aborted: {frame.reason or 'no reason'}")))
        if isinstance(frame, f.RequestCredit):
            return self._on_credit(frame)
        if isinstance(frame, f.RequestStart):
            return None  # repeats are answered by the dispatcher with another ack
        if self.body_phase is not BodyPhase.OPEN:
            if isinstance(frame, f.RequestEnd) and frame.seq == self._repaired_end_seq:
                return None  # the end we presumed lost arrived after all (reordered): nothing new
            if self.body_phase is BodyPhase.NONE or not isinstance(frame, f.RequestChunk | f.RequestEnd):
                raise self._fail(
                    RemoteProtocolError(f"unexpected {frame.type} (request body {self.body_phase.value})")
                )
            raise self._fail(RemoteProtocolError(f"{frame.type} after the request body ended"))
        if isinstance(frame, f.RequestChunk):
            try:
                self.receive_window.on_chunk(frame.seq, len(frame.data))
            except TunnelError as exc:
                raise self._fail(exc) from None
            self._body_progress_at = self.clock()
            return DataReceived(frame.data)
        if isinstance(frame, f.RequestEnd):
            return self._on_request_end(frame)
        if isinstance(frame, f.RequestError):
            self.body_phase = BodyPhase.FAILED
            self.caller_gone = True
            return PeerFailed(self._fail(error_from_remote(frame.code, frame.message)))
        raise self._fail(RemoteProtocolError(f"unexpected {frame.type} from a caller"))

    def _on_request_end(self, frame: f.RequestEnd) -> Event:
        try:
            self.receive_window.on_end(frame.seq)
        except TunnelError as exc:
            raise self._fail(exc) from None
        self.body_phase = BodyPhase.ENDED
        return BodyEnded()

    def _on_credit(self, frame: f.RequestCredit) -> Event:
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
                return self._on_request_end(f.RequestEnd(self.request_id, frame.seq))
        return CreditGranted()

    def _body_stalled_since(self) -> float | None:
        """When the request body stopped moving although the caller could send, or None."""
        if self.body_phase is not BodyPhase.OPEN:
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
        stall = self.options.stall_timeout
        if stall is not None:
            if self._credit_blocked_since is not None:
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
        stall = self.options.stall_timeout
        if stall is not None:
            if self._credit_blocked_since is not None and now - self._credit_blocked_since >= stall:
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
