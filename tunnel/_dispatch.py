"""The serving side's rules across requests (sans-IO): which start runs a handler.

One :class:`ServerDispatcher` per server decides, for every ``request.start``, abort and
stray body frame, what the server does; the I/O layer (:mod:`tunnel._natsio.server`)
only sends what it returns and runs handlers for the streams it admits. The rules:

- a repeated start of a request in flight gets another ack (the caller republished
  because our ack was lost);
- a repeated start of a request we already answered: an extended caller is told its
  answer was lost (instead of waiting for its first-frame timeout), a plain v1 caller
  gets another ack, as the reference server sends;
- an abort that overtakes its own start is remembered, and the start is then dropped;
- at ``max_concurrent`` requests in flight a start gets a plain HTTP 503 with
  ``Retry-After`` (an ordinary "try again shortly"), the handler never runs;
- a start whose deadline passed on the way is answered ``tunnel_timeout``;
- the final frame of each streamed response is remembered for a while, so a caller that
  probes a silence (its ``response.end`` was lost) gets it again;
- a malformed start is answered ``tunnel_protocol_error`` when its caller can be told safely.

Time comes from injected clocks, so every rule runs in unit tests without a server.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Final, Generic, Protocol, TypeVar

from . import _codec as codec
from . import _frames as f
from . import _start_batch as start_batch
from ._config import (
    BUSY_RETRY_AFTER,
    EARLY_ABORT_TTL,
    FINAL_FRAME_LIMIT,
    FINAL_FRAME_TTL,
    SEEN_REQUEST_LIMIT,
    SEEN_REQUEST_TTL,
)
from ._diagnostics import TunnelCounters
from ._errors import ErrorCode
from ._events import Clock, Publish
from ._record import record
from ._server_stream import ServerOptions, ServerStream
from ._subjects import HostSubjects, is_valid_request_id

#: The ``error.code`` in the JSON body of the 503 a server at its concurrency limit answers.
TOO_MANY_REQUESTS: Final = "too_many_requests"
# Expired ids are swept every this many additions (membership checks the expiry anyway).
PRUNE_EVERY: Final = 256


@dataclass
class ServerStats(TunnelCounters):
    """Counters for diagnostics and metrics (the common ones, plus server specifics)."""

    completed: int = 0
    handler_errors: int = 0
    aborted: int = 0
    timeouts: int = 0
    protocol_errors: int = 0
    malformed_frames: int = 0
    repeated_starts: int = 0
    #: Final frames (response.end / response.error) sent again to a caller that probed a silence.
    repeated_finals: int = 0
    #: Requests answered 503 + Retry-After without running the handler (max_concurrent reached).
    overloaded: int = 0
    #: The most requests in flight at once so far (compare with ``TunnelServer.max_concurrent``).
    peak_active: int = 0
    #: Messages that carried several starts at once (``startBatches``); their starts count in
    #: ``requests`` one by one.
    start_batches: int = 0


class RecentIds:
    """Ids with an expiry, bounded in size (oldest dropped first)."""

    def __init__(self, ttl: float, limit: int, clock: Clock) -> None:
        self.ttl = ttl
        self.limit = limit
        self.clock = clock
        self._items: OrderedDict[str, float] = OrderedDict()
        self._adds = 0

    def add(self, key: str) -> None:
        now = self.clock()
        items = self._items
        if key in items:
            items.move_to_end(key)
        items[key] = now + self.ttl
        if len(items) > self.limit:
            items.popitem(last=False)
        self._adds += 1
        if self._adds % PRUNE_EVERY == 0:
            self.prune(now)

    def __contains__(self, key: str) -> bool:
        expiry = self._items.get(key)
        return expiry is not None and expiry > self.clock()

    def __len__(self) -> int:
        return len(self._items)

    def pop(self, key: str) -> bool:
        """Forget ``key``; whether it was remembered and not yet expired."""
        expiry = self._items.pop(key, None)
        return expiry is not None and expiry > self.clock()

    def prune(self, now: float) -> None:
        while self._items:
            _, expiry = next(iter(self._items.items()))
            if expiry > now:
                break
            self._items.popitem(last=False)


class RecentFinals:
    """The final frame of each recently finished streamed response (bounded, expiring).

    A caller whose ``response.end`` (or ``response.error``) was lost hears nothing more and
    probes; this is what we send it again. Small frames only (never a whole response).
    """

    def __init__(self, ttl: float, limit: int, clock: Clock) -> None:
        self.ttl = ttl
        self.limit = limit
        self.clock = clock
        self._items: OrderedDict[str, tuple[float, Publish]] = OrderedDict()

    def put(self, request_id: str, final: Publish) -> None:
        items = self._items
        items[request_id] = (self.clock() + self.ttl, final)
        items.move_to_end(request_id)
        while len(items) > self.limit:
            items.popitem(last=False)

    def get(self, request_id: str) -> Publish | None:
        entry = self._items.get(request_id)
        if entry is None or entry[0] <= self.clock():
            return None
        return entry[1]

    def __len__(self) -> int:
        return len(self._items)


@record
class StartAnswer:
    """What to do with one ``request.start``: send ``publishes`` (best effort), then, if
    ``stream`` is set, run a handler for it (after :meth:`ServerDispatcher.admit`).
    ``malformed`` names what was wrong with an unusable frame (to count and log)."""

    publishes: tuple[Publish, ...] = ()
    stream: ServerStream | None = None
    malformed: str | None = None


_IGNORE: Final = StartAnswer()


class HasStream(Protocol):
    """What the dispatcher needs of the I/O layer's handle of a request in flight."""

    @property
    def stream(self) -> ServerStream: ...


H = TypeVar("H", bound=HasStream)


class ServerDispatcher(Generic[H]):
    """The rules across one server's requests; ``H`` is the I/O layer's handle of one request."""

    def __init__(
        self,
        *,
        hostname: str,
        subjects: HostSubjects,
        server_id: str,
        options: ServerOptions,
        max_concurrent: int,
        clock: Clock,
        wall_clock: Clock,
        stats: ServerStats | None = None,
    ) -> None:
        if isinstance(max_concurrent, bool) or not isinstance(max_concurrent, int) or max_concurrent < 1:
            raise ValueError(f"max_concurrent must be a positive integer, got {max_concurrent!r}")
        self.hostname = hostname
        self.subjects = subjects
        self.server_id = server_id
        self.options = options
        self.max_concurrent = max_concurrent
        self.clock = clock
        self.wall_clock = wall_clock
        self.stats = stats if stats is not None else ServerStats()
        self.active: dict[str, H] = {}
        #: False once the server stopped taking requests (closing): new starts are dropped.
        self.accepting = True
        self.seen = RecentIds(SEEN_REQUEST_TTL, SEEN_REQUEST_LIMIT, clock)
        self.early_aborts = RecentIds(EARLY_ABORT_TTL, SEEN_REQUEST_LIMIT, clock)
        self.finals = RecentFinals(FINAL_FRAME_TTL, FINAL_FRAME_LIMIT, clock)

    def use_clock(self, clock: Clock) -> None:
        """Read time from ``clock`` from now on (the I/O layer's event loop, once it runs)."""
        self.clock = self.seen.clock = self.early_aborts.clock = self.finals.clock = clock

    def use_reference_permissions(self, *, replies: bool, up_via_body: bool) -> None:
        """Fit what the connection may do (found out by the I/O layer when it subscribed)."""
        self.options = replace(self.options, reference_replies=replies, up_via_body=up_via_body)

    def set_max_payload(self, max_payload: int) -> None:
        """The connection's payload limit (it changes when it reconnects to another server)."""
        if max_payload != self.options.max_payload:
            self.options = replace(self.options, max_payload=max_payload)

    # -- request.start ---------------------------------------------------------------

    def on_start(self, data: bytes, reply: str = "") -> StartAnswer:
        """Decide what one message on the request subject gets (``reply``: its NATS reply)."""
        try:
            if self.options.compact_frames and codec.is_compact_start(data):
                frame: f.Frame = codec.decode_compact_start(data, reply, self.subjects.base)
            else:
                frame = codec.decode_frame(data)
        except f.FrameError as exc:
            return StartAnswer(self._reject_malformed(data, reply, exc), malformed=exc.message)
        if not isinstance(frame, f.RequestStart):
            return StartAnswer(malformed=f"{frame.type} on the request subject")
        stats = self.stats
        rid = frame.request_id
        active = self.active.get(rid)
        if active is not None:
            stats.repeated_starts += 1
            return StartAnswer((active.stream.ack(),))
        if rid in self.seen:
            stats.repeated_starts += 1
            return StartAnswer(self._finished_repeat(frame))
        if self.early_aborts.pop(rid) or not self.accepting:
            return _IGNORE
        now = self.clock()
        deadline = None
        if frame.deadline_unix_ms is not None:
            deadline = now + (frame.deadline_unix_ms / 1000.0 - self.wall_clock())
        try:
            stream = ServerStream(
                frame,
                subjects=self.subjects,
                server_id=self.server_id,
                options=self.options,
                clock=self.clock,
                deadline=deadline,
            )
        except f.FrameError as exc:
            return StartAnswer(malformed=exc.message)  # subjects outside the host: never publish there
        stats.requests += 1
        self.seen.add(rid)
        if len(self.active) >= self.max_concurrent:
            stats.overloaded += 1
            stats.outcomes[TOO_MANY_REQUESTS] += 1
            return StartAnswer(self._busy(stream))
        if deadline is not None and deadline <= now:
            stats.timeouts += 1
            stats.outcomes[ErrorCode.TIMEOUT] += 1
            pub = stream.error_response(ErrorCode.TIMEOUT, "deadline passed before the request arrived")
            return StartAnswer(() if pub is None else (pub,))
        return StartAnswer(stream=stream)

    def batched_starts(self, data: bytes) -> list[tuple[str, bytes]] | None:
        """The ``(reply subject, compact start)`` pairs of a start batch (``startBatches``), or
        None when ``data`` is not one: the message is then a single start.

        Raises ``FrameError`` for a batch this server does not take or cannot read (it is
        dropped whole: which of its starts could be trusted?)."""
        if not start_batch.is_start_batch(data):
            return None
        if not (self.options.compact_frames and self.options.start_batches):
            raise f.FrameError("a start batch, which this server does not take")
        return start_batch.decode(data)

    def admit(self, handle: H) -> None:
        """Count ``handle``'s request in flight (at once after :meth:`on_start` gave its stream)."""
        self.active[handle.stream.request_id] = handle
        stats = self.stats
        stats.active = len(self.active)
        if stats.active > stats.peak_active:
            stats.peak_active = stats.active

    def release(self, request_id: str) -> None:
        """The request is over (whatever the outcome): it no longer counts in flight."""
        self.active.pop(request_id, None)
        self.stats.active = len(self.active)

    def _finished_repeat(self, frame: f.RequestStart) -> tuple[Publish, ...]:
        rid = frame.request_id
        if not self.subjects.reply_subject_ok(frame.reply_subject, rid):
            return ()
        reply = self.subjects.reply(rid) if self.options.reference_replies else frame.reply_subject
        if frame.extensions is not None and self.options.fast_path:
            answer: f.Frame = f.ResponseError(
                rid, ErrorCode.PROTOCOL_ERROR, "the response was already sent and did not arrive; retry"
            )
        else:
            answer = f.ResponseAck(rid)
        return (Publish(reply, codec.encode_frame(answer)),)

    def _busy(self, stream: ServerStream) -> tuple[Publish, ...]:
        body = json.dumps(
            {
                "error": {
                    "code": TOO_MANY_REQUESTS,
                    "message": f"{self.hostname} is handling {self.max_concurrent} requests at once "
                    f"(its limit); retry after {BUSY_RETRY_AFTER} s",
                }
            },
            separators=(",", ":"),
        ).encode()
        headers = [
            ("content-type", "application/json"),
            ("retry-after", str(BUSY_RETRY_AFTER)),
            ("content-length", str(len(body))),
        ]
        whole = stream.whole_response(503, headers, "Service Unavailable", body)
        if whole is not None:
            pubs = [whole]
        else:
            pubs = [stream.ack(), stream.start_response(503, headers, "Service Unavailable")]
            frames, _ = stream.send_body(body)  # fits any window: a few hundred bytes
            pubs += frames
            if not stream.finished:
                pubs.append(stream.end_response())
                self.finals.put(stream.request_id, pubs[-1])
        self.stats.bytes_out += stream.send.sent_bytes
        return tuple(pubs)

    def _reject_malformed(self, data: bytes, reply: str, exc: f.FrameError) -> tuple[Publish, ...]:
        """Tell a caller its start was unusable, when we can safely tell who it is."""
        rid = exc.request_id
        if rid is None:
            try:
                candidate = json.loads(data).get("requestId")
            except (ValueError, RecursionError, AttributeError, TypeError):
                candidate = None
            rid = candidate if is_valid_request_id(candidate) else None
        if rid is None or not reply or not self.subjects.owns(reply):
            return ()
        frame = f.ResponseError(rid, ErrorCode.PROTOCOL_ERROR, f"malformed request.start: {exc.message}")
        return (Publish(reply, codec.encode_frame(frame)),)

    # -- other frames ------------------------------------------------------------------

    def on_abort(self, request_id: str) -> H | None:
        """The request the abort is for, if in flight; else remember it if its start may follow."""
        handle = self.active.get(request_id)
        if handle is None and request_id not in self.seen:
            self.early_aborts.add(request_id)
        return handle

    def remember_final(self, request_id: str, final: Publish) -> None:
        """A streamed response's last frame, kept to answer a caller's probe if it was lost."""
        self.finals.put(request_id, final)

    def on_stray(self, request_id: str, data: bytes) -> Publish | None:
        """A body or credit frame for no request in flight: a probe after we finished gets our
        final frame again; anything else is late and dropped."""
        final = self.finals.get(request_id)
        if final is None:
            return None
        try:
            frame = codec.decode_frame(data, request_id)
        except f.FrameError:
            return None
        if isinstance(frame, f.RequestCredit) and frame.probe:
            self.stats.repeated_finals += 1
            return final
        return None


__all__ = [
    "PRUNE_EVERY",
    "TOO_MANY_REQUESTS",
    "HasStream",
    "RecentFinals",
    "RecentIds",
    "ServerDispatcher",
    "ServerStats",
    "StartAnswer",
]
