"""The server: ``serve(nc, hostname, handler)``.

Subscriptions per server: ``P.request`` in the host's queue group (several
servers share load), ``P.req.*.abort`` (every server hears aborts), and
``P.req.*.up.<serverId>`` for body and credit frames of the requests this
server acked. A plain v1 caller sends its body on ``P.req.<id>.body``, which
gets a per-request subscription.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterable, Coroutine, Iterable
from dataclasses import dataclass, replace
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError

from .. import _codec as codec
from .. import _frames as f
from .._config import (
    BUSY_RETRY_AFTER,
    DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_MAX_CHUNK,
    DEFAULT_MAX_CONCURRENT,
    DEFAULT_STALL_TIMEOUT,
    DEFAULT_WINDOW,
    EARLY_ABORT_TTL,
    FINAL_FRAME_LIMIT,
    FINAL_FRAME_TTL,
    REQUEST_DRAIN_LIMIT,
    SEEN_REQUEST_LIMIT,
    SEEN_REQUEST_TTL,
)
from .._diagnostics import (
    FRAME_DROPPED,
    OUTCOME_OK,
    REQUEST_ENDED,
    REQUEST_STARTED,
    EventHook,
    TunnelCounters,
    TunnelEvent,
    emit,
)
from .._errors import ErrorCode, LocalProtocolError, TunnelAborted, TunnelError
from .._events import BodyEnded, CreditGranted, DataReceived, PeerFailed, Publish
from .._handler import Handler, Request, Response
from .._server_stream import ServerOptions, ServerStream
from .._subjects import (
    DEFAULT_PREFIX,
    HostSubjects,
    is_valid_request_id,
    new_endpoint_id,
    parse_request_subject,
)
from .common import LazyTimer, Publisher, TimedRequest, TimerHub, WireTap, map_nats_error

log = logging.getLogger("tunnel.server")

#: The ``error.code`` in the JSON body of the 503 a server at its concurrency limit answers.
TOO_MANY_REQUESTS = "too_many_requests"

# Prebuilt: an inline ``A | B`` in isinstance builds the union on every call (hot path).
_BYTES_LIKE = (bytes, bytearray, memoryview)
# Expired ids are swept every this many additions (membership checks the expiry anyway).
PRUNE_EVERY = 256
# Warn about malformed frames at most this often; count all of them.
MALFORMED_LOG_INTERVAL = 1.0


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


class _ServerRequest(TimedRequest):
    """The I/O side of one request: the handler task, flow control waits, the timer."""

    def __init__(
        self,
        server: TunnelServer,
        stream: ServerStream,
        loop: asyncio.AbstractEventLoop | None = None,
        now: float | None = None,
    ) -> None:
        # ``loop``/``now``: the dispatcher already has both (saves two lookups per request).
        self.server = server
        self.stream = stream
        start = stream.start_frame
        self.request = Request(
            request_id=stream.request_id,
            hostname=server.hostname,
            method=start.method,
            url=start.url,
            headers=start.headers,
            has_body=start.body_subject is not None,
            deadline=stream.deadline,
            on_consumed=self._on_consumed,
        )
        self.task: asyncio.Task[None] | None = None
        self.body_sub: Subscription | None = None
        self._credit: asyncio.Future[None] | None = None
        if loop is None:
            loop = asyncio.get_running_loop()
        self._loop = loop
        self._timer: LazyTimer | None = None
        self.released = False
        self.status: int | None = None
        self.started_at = loop.time() if now is None else now

    async def _on_consumed(self, n: int) -> None:
        grant = self.stream.consumed(n)
        if grant is not None:
            await self.server.publisher.send(grant)

    async def on_frame(self, frame: f.Frame) -> None:
        try:
            event = self.stream.receive(frame)
        except TunnelError as exc:
            self.server.stats.protocol_errors += 1
            await self.fail(exc, notify=True)
            return
        if isinstance(event, DataReceived):
            self.server.stats.bytes_in += len(event.data)
            self.request._feed(event.data)
        elif isinstance(event, BodyEnded):
            self.request._end()
            if isinstance(frame, f.RequestCredit):  # a lost end repaired by a credit report
                self._wake_credit_waiter()
        elif isinstance(event, CreditGranted):
            self._wake_credit_waiter()
        elif isinstance(event, PeerFailed):
            self.server.stats.aborted += 1
            await self.fail(event.error, notify=False)

    def _wake_credit_waiter(self) -> None:
        if self._credit is not None and not self._credit.done():
            self._credit.set_result(None)

    def _on_timer(self) -> float | None:
        if self.released:
            return None
        try:
            self.server.publisher.send_soon(self.stream.poll())
        except TunnelError as exc:
            self.server.stats.timeouts += 1
            self.server._spawn(self.fail(exc, notify=True))
            return None
        return self.stream.next_deadline()

    async def fail(self, error: TunnelError, *, notify: bool) -> None:
        """Stop the handler; tell the caller unless it is the one who left."""
        self.stream.fail(error)
        self.request._fail(error)
        if self._credit is not None and not self._credit.done():
            self._credit.set_exception(error)
            self._credit.exception()
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()
        if notify:
            pub = self.stream.error_response(error.code, error.message)
            if pub is not None:
                self.server._finals.put(self.stream.request_id, pub)
                with contextlib.suppress(TunnelError):
                    await self.server.publisher.send(pub)
        await self.release()

    async def run(self, handler: Handler) -> None:
        """Run the handler and stream its response with flow control."""
        stats = self.server.stats
        try:
            response = await handler(self.request)
            if not isinstance(response, Response):
                raise TypeError(f"handler returned {type(response).__name__}, not tunnel.Response")
            body = response.body
            if isinstance(body, str):
                body = body.encode("utf-8")
            try:
                whole = None
                if body is None or isinstance(body, _BYTES_LIKE):
                    whole = self.stream.whole_response(
                        response.status, response.headers, response.status_text, body or b""
                    )
                if whole is not None:
                    self.status = response.status
                    stats.bytes_out += len(whole.payload)
                    await self.server.publisher.send(whole)
                    stats.completed += 1
                    return
                start = self.stream.start_response(response.status, response.headers, response.status_text)
            except LocalProtocolError as exc:
                raise TypeError(f"handler returned an invalid response: {exc.message}") from exc
            self.status = response.status
            await self.server.publisher.send(start)
            await self._send_body(body)
            if not self.stream.finished:
                end = self.stream.end_response()
                self.server._finals.put(self.stream.request_id, end)
                await self.server.publisher.send(end)
                stats.completed += 1
        except asyncio.CancelledError:
            pass  # aborted, timed out or server closing: fail() already told whoever needed telling
        except TunnelError as exc:
            await self.fail(exc, notify=True)
        except Exception as exc:
            stats.handler_errors += 1
            log.exception("handler for %s %s failed", self.request.method, self.request.path)
            message = f"handler raised {type(exc).__name__}"
            await self.fail(TunnelError(message, code=ErrorCode.HANDLER_ERROR), notify=True)
        finally:
            if self.body_sub is None:
                self.release_now()
            else:
                await self.release()

    async def _send_body(self, body: object) -> None:
        if body is None:
            return
        if not self.stream.response_has_body:
            # HEAD / 204 / 304: never drain a (possibly endless) body nobody will read.
            await _close_body(body)
            return
        if isinstance(body, str):
            body = body.encode("utf-8")
        if isinstance(body, bytes | bytearray | memoryview):
            await self._send_bytes(memoryview(body))
        elif isinstance(body, AsyncIterable):
            iterator = aiter(body)
            try:
                async for piece in iterator:
                    await self._send_bytes(memoryview(_as_bytes(piece)))
            finally:
                # Aborted, stalled or failed mid-stream: let the body's own cleanup run now
                # (close a file, an upstream response), not whenever the garbage collector gets to it.
                await _close_body(iterator)
        elif isinstance(body, Iterable):
            sync_iterator = iter(body)
            try:
                for piece in sync_iterator:
                    await self._send_bytes(memoryview(_as_bytes(piece)))
            finally:
                await _close_body(sync_iterator)
        else:
            raise TypeError(f"unsupported response body type {type(body).__name__}")

    async def _send_bytes(self, view: memoryview) -> None:
        while view:
            if self.stream.finished:
                raise self.stream.error or TunnelAborted("request ended")
            frames, taken = self.stream.send_body(view)
            for frame in frames:
                self.server.stats.bytes_out += len(frame.payload)
            await self.server.publisher.send_all(frames)
            self.stream.mark_published()
            view = view[taken:]
            if view:
                self.timer.arm(self.stream.next_deadline())  # credit-stall deadline
                await self._wait_credit()

    async def _wait_credit(self) -> None:
        if self.stream.send.available() > 0:
            return
        self._credit = asyncio.get_running_loop().create_future()
        try:
            await self._credit
        finally:
            self._credit = None

    def release_now(self) -> None:
        """The synchronous part of releasing (everything but unsubscribing a v1 body)."""
        if not self.released:
            self.released = True
            self._cancel_timer()
            server = self.server
            server._active.pop(self.stream.request_id, None)
            stats = server.stats
            stats.active = len(server._active)
            error = self.stream.error
            outcome = OUTCOME_OK if error is None else error.code
            stats.outcomes[outcome] += 1
            if server.on_event is not None:
                stream = self.stream
                emit(
                    server.on_event,
                    TunnelEvent(
                        REQUEST_ENDED,
                        "server",
                        server.hostname,
                        stream.request_id,
                        self.request.method,
                        self.request.path,
                        self.status,
                        outcome,
                        asyncio.get_running_loop().time() - self.started_at,
                        stream.receive_window.received_bytes,
                        stream.send.sent_bytes,
                    ),
                )

    async def release(self) -> None:
        self.release_now()
        if self.body_sub is not None:
            sub, self.body_sub = self.body_sub, None
            with contextlib.suppress(NatsError, OSError):
                await sub.unsubscribe()


def _forget(nc: NATS, sub: Subscription) -> None:
    """Make sure nats-py forgets ``sub``, whatever a failed drain left behind.

    A drain that timed out or failed marks the subscription closed without removing it,
    so ``unsubscribe()`` refuses, and the client would subscribe it again (same queue
    group) on its next reconnect: a closed server taking starts it then drops. nats-py has
    no public call for this; these two are what its own successful drain does.
    """
    sub._stop_processing()
    nc._remove_sub(sub._id)


async def _close_body(body: object) -> None:
    """Close a response body (``aclose`` or ``close``) if it has either; its errors are logged."""
    close = getattr(body, "aclose", None) or getattr(body, "close", None)
    if not callable(close):
        return
    try:
        result = close()
        if asyncio.iscoroutine(result):
            await result
    except Exception:
        log.warning("closing a handler's response body failed", exc_info=True)


def _as_bytes(piece: object) -> bytes | bytearray | memoryview:
    if isinstance(piece, str):
        return piece.encode("utf-8")
    if isinstance(piece, bytes | bytearray | memoryview):
        return piece
    raise TypeError(f"response body yielded {type(piece).__name__}, not bytes")


class _RecentIds:
    """Ids with an expiry, bounded in size (oldest dropped first)."""

    def __init__(self, ttl: float, limit: int) -> None:
        self.ttl = ttl
        self.limit = limit
        self._items: OrderedDict[str, float] = OrderedDict()
        self._adds = 0

    def add(self, key: str, now: float) -> None:
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
        return expiry is not None and expiry > time.monotonic()

    def pop(self, key: str) -> bool:
        return self._items.pop(key, None) is not None

    def prune(self, now: float) -> None:
        while self._items:
            _, expiry = next(iter(self._items.items()))
            if expiry > now:
                break
            self._items.popitem(last=False)


class _RecentFinals:
    """The final frame of each recently finished streamed response (bounded, expiring).

    A caller whose ``response.end`` (or ``response.error``) was lost hears nothing more and
    probes; this is what we send it again. Small frames only (never a whole response).
    """

    def __init__(self, ttl: float, limit: int) -> None:
        self.ttl = ttl
        self.limit = limit
        self._items: OrderedDict[str, tuple[float, Publish]] = OrderedDict()

    def put(self, request_id: str, final: Publish) -> None:
        items = self._items
        items[request_id] = (time.monotonic() + self.ttl, final)
        items.move_to_end(request_id)
        while len(items) > self.limit:
            items.popitem(last=False)

    def get(self, request_id: str) -> Publish | None:
        entry = self._items.get(request_id)
        if entry is None or entry[0] <= time.monotonic():
            return None
        return entry[1]


class TunnelServer:
    """Serves one hostname over one NATS connection. Use :func:`serve` to create and start one."""

    def __init__(
        self,
        nc: NATS,
        hostname: str,
        handler: Handler,
        *,
        prefix: str = DEFAULT_PREFIX,
        window: int = DEFAULT_WINDOW,
        max_chunk: int = DEFAULT_MAX_CHUNK,
        stall_timeout: float | None = DEFAULT_STALL_TIMEOUT,
        max_concurrent: int = DEFAULT_MAX_CONCURRENT,
        fast_path: bool = True,
        wire_tap: WireTap | None = None,
        on_event: EventHook | None = None,
    ) -> None:
        self.nc = nc
        self.on_event = on_event
        self.subjects = HostSubjects.for_host(hostname, prefix)
        self.hostname = hostname.strip().lower()
        if self.hostname != hostname.strip():
            log.warning(
                "serving %r as %r: hostnames are case-insensitive here, but reference v1 callers "
                "must then use the lower-case name",
                hostname,
                self.hostname,
            )
        self.handler = handler
        self.window = window
        self.max_chunk = max_chunk
        self.stall_timeout = stall_timeout
        if isinstance(max_concurrent, bool) or not isinstance(max_concurrent, int) or max_concurrent < 1:
            raise ValueError(f"max_concurrent must be a positive integer, got {max_concurrent!r}")
        self.max_concurrent = max_concurrent
        self.fast_path = fast_path
        self.server_id = new_endpoint_id()
        self.publisher = Publisher(nc, wire_tap)
        self.stats = ServerStats()
        self._active: dict[str, _ServerRequest] = {}
        self._seen = _RecentIds(SEEN_REQUEST_TTL, SEEN_REQUEST_LIMIT)
        self._early_aborts = _RecentIds(EARLY_ABORT_TTL, SEEN_REQUEST_LIMIT)
        self._finals = _RecentFinals(FINAL_FRAME_TTL, FINAL_FRAME_LIMIT)
        self._subs: list[Subscription] = []
        self._request_sub: Subscription | None = None
        self._closing = False
        self._accepting = True  # false once close() has drained the request subscription
        self._last_malformed_log = 0.0
        self._background: set[asyncio.Task[None]] = set()
        self._options = ServerOptions(
            window=window,
            max_chunk=max_chunk,
            max_payload=nc.max_payload,
            stall_timeout=stall_timeout,
            fast_path=fast_path,
        )
        self._timers: TimerHub | None = None

    @property
    def in_flight(self) -> int:
        return len(self._active)

    async def start(self) -> None:
        """Subscribe; on return the NATS server knows us, so callers never see no-responders."""
        self._timers = TimerHub(asyncio.get_running_loop())
        try:
            self._request_sub = await self.nc.subscribe(
                self.subjects.request, queue=self.subjects.queue_group, cb=self._on_start
            )
            self._subs = [
                self._request_sub,
                await self.nc.subscribe(self.subjects.all_aborts, cb=self._on_abort),
                await self.nc.subscribe(self.subjects.all_server_up(self.server_id), cb=self._on_up),
            ]
            # A flush right after SUB can be overtaken by its PING: yield first, then flush.
            await asyncio.sleep(0)
            await self.nc.flush()
        except (NatsError, OSError) as exc:
            raise map_nats_error(exc) from exc

    async def close(self, timeout: float = DEFAULT_DRAIN_TIMEOUT) -> None:
        """Stop taking requests, let in-flight ones finish for up to ``timeout`` s, then cancel the rest."""
        if self._closing:
            return
        self._closing = True
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + timeout
        await self._stop_taking_requests(timeout)
        tasks = [r.task for r in self._active.values() if r.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=max(0.0, give_up_at - loop.time()))
        for req in list(self._active.values()):
            await req.fail(TunnelError("server is shutting down", code=ErrorCode.SERVER_CLOSING), notify=True)
        for sub in self._subs[1:]:
            with contextlib.suppress(NatsError, OSError):
                await sub.unsubscribe()
        self._subs = []

    async def _stop_taking_requests(self, budget: float) -> None:
        """Unsubscribe from start frames; with time to spare, drain rather than drop.

        Starts the NATS server delivered before it saw our UNSUB are still served: dropped,
        their callers would wait for a republish (about a second) to reach another server of
        the queue group, which is what a credential rotation's make-before-break hands over to.
        """
        sub, self._request_sub = self._request_sub, None
        try:
            if sub is not None and not await self._drain(sub, min(budget, REQUEST_DRAIN_LIMIT)):
                with contextlib.suppress(NatsError, OSError):
                    await sub.unsubscribe()
                _forget(self.nc, sub)
        finally:
            self._accepting = False  # also when close() itself is cancelled mid-drain

    async def _drain(self, sub: Subscription, limit: float) -> bool:
        if limit <= 0 or not self.nc.is_connected:
            return False
        try:
            await asyncio.wait_for(sub.drain(), limit)  # type: ignore[no-untyped-call]
        except (NatsError, OSError, TimeoutError):
            return False
        except asyncio.CancelledError:  # close() cancelled mid-drain: still leave no zombie
            _forget(self.nc, sub)
            raise
        return True

    async def __aenter__(self) -> TunnelServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- diagnostics -----------------------------------------------------------------

    def _malformed(self, subject: str, problem: str) -> None:
        self.stats.malformed_frames += 1
        self.stats.frames_dropped += 1
        emit(
            self.on_event, TunnelEvent(FRAME_DROPPED, "server", self.hostname, detail=f"{subject}: {problem}")
        )
        now = time.monotonic()
        level = logging.WARNING if now - self._last_malformed_log >= MALFORMED_LOG_INTERVAL else logging.DEBUG
        if level == logging.WARNING:
            self._last_malformed_log = now
        log.log(
            level,
            "dropped malformed frame on %s: %s (%d so far)",
            subject,
            problem,
            self.stats.malformed_frames,
        )

    # -- message handlers --------------------------------------------------------------

    async def _on_start(self, msg: Msg) -> None:
        try:
            frame = codec.decode_frame(msg.data)
        except f.FrameError as exc:
            self._malformed(msg.subject, exc.message)
            await self._reject_malformed_start(msg, exc)
            return
        if not isinstance(frame, f.RequestStart):
            self._malformed(msg.subject, f"{frame.type} on the request subject")
            return
        rid = frame.request_id
        active = self._active.get(rid)
        if active is not None:
            self.stats.repeated_starts += 1
            await self._send_quietly(active.stream.ack())
            return
        if rid in self._seen:
            self.stats.repeated_starts += 1
            await self._answer_finished_repeat(frame)
            return
        if self._early_aborts.pop(rid) or not self._accepting:
            return
        loop = asyncio.get_running_loop()
        deadline = None
        if frame.deadline_unix_ms is not None:
            deadline = loop.time() + (frame.deadline_unix_ms / 1000.0 - time.time())
        options = self._options
        if options.max_payload != self.nc.max_payload:  # reconnected to a server with other limits
            options = self._options = replace(options, max_payload=self.nc.max_payload)
        try:
            stream = ServerStream(
                frame,
                subjects=self.subjects,
                server_id=self.server_id,
                options=options,
                clock=loop.time,
                deadline=deadline,
            )
        except f.FrameError as exc:
            self._malformed(msg.subject, exc.message)  # subjects outside the host: never publish there
            return
        self.stats.requests += 1
        self._seen.add(rid, time.monotonic())
        if len(self._active) >= self.max_concurrent:
            self.stats.overloaded += 1
            self.stats.outcomes[TOO_MANY_REQUESTS] += 1
            await self._answer_busy(stream)
            return
        now = loop.time()
        if deadline is not None and deadline <= now:
            self.stats.timeouts += 1
            self.stats.outcomes[ErrorCode.TIMEOUT] += 1
            pub = stream.error_response(ErrorCode.TIMEOUT, "deadline passed before the request arrived")
            if pub is not None:
                await self._send_quietly(pub)
            return
        req = _ServerRequest(self, stream, loop, now)
        self._active[rid] = req
        stats = self.stats
        stats.active = len(self._active)
        if stats.active > stats.peak_active:
            stats.peak_active = stats.active
        if self.on_event is not None:
            emit(
                self.on_event,
                TunnelEvent(REQUEST_STARTED, "server", self.hostname, rid, frame.method, req.request.path),
            )
        try:
            if frame.body_subject is not None and stream.up_subject is None:
                req.body_sub = await self.nc.subscribe(frame.body_subject, cb=self._on_v1_body)
            if stream.ack_now:
                await self.publisher.send(stream.ack())
        except (NatsError, OSError, TunnelError) as exc:
            log.warning("could not accept request %s: %s", rid, exc)
            await req.release()
            return
        if self._timers is None:
            self._timers = TimerHub(loop)
        self._timers.add(req, stream.next_deadline())
        req.task = loop.create_task(req.run(self.handler))

    async def _answer_busy(self, stream: ServerStream) -> None:
        """At the concurrency limit: a plain HTTP 503 with Retry-After, the handler never runs.

        A normal response, not a tunnel error: the caller (and an HTTP client behind a gateway)
        sees an ordinary "try again shortly", and the request costs us one or four small frames.
        """
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
                self._finals.put(stream.request_id, pubs[-1])
        for pub in pubs:
            self.stats.bytes_out += len(pub.payload)
        with contextlib.suppress(TunnelError):
            await self.publisher.send_all(pubs)

    async def _answer_finished_repeat(self, frame: f.RequestStart) -> None:
        """A start repeated after we answered in full: our answer was lost on the way.

        An extended caller is told so at once (instead of waiting for its first-frame
        timeout); a plain v1 caller gets what the reference server sends, another ack.
        """
        rid = frame.request_id
        if not self.subjects.request_subject_ok(frame.reply_subject, rid):
            return
        if frame.extensions is not None and self.fast_path:
            reply: f.Frame = f.ResponseError(
                rid, ErrorCode.PROTOCOL_ERROR, "the response was already sent and did not arrive; retry"
            )
        else:
            reply = f.ResponseAck(rid)
        await self._send_quietly(Publish(frame.reply_subject, codec.encode_frame(reply)))

    async def _reject_malformed_start(self, msg: Msg, exc: f.FrameError) -> None:
        """Tell a caller its start was unusable, when we can safely tell who it is."""
        rid = exc.request_id
        if rid is None:
            with contextlib.suppress(ValueError, RecursionError, AttributeError, TypeError):
                candidate = json.loads(msg.data).get("requestId")
                rid = candidate if is_valid_request_id(candidate) else None
        if rid is None or not msg.reply or not self.subjects.owns(msg.reply):
            return
        frame = f.ResponseError(rid, ErrorCode.PROTOCOL_ERROR, f"malformed request.start: {exc.message}")
        await self._send_quietly(Publish(msg.reply, codec.encode_frame(frame)))

    async def _on_abort(self, msg: Msg) -> None:
        parsed = parse_request_subject(msg.subject, self.subjects.prefix)
        if parsed is None or not is_valid_request_id(parsed[1]):
            self._malformed(msg.subject, "abort on an unexpected subject")
            return
        rid = parsed[1]
        try:
            frame = codec.decode_frame(msg.data, rid)
        except f.FrameError as exc:
            self._malformed(msg.subject, exc.message)
            frame = f.Abort(rid, "malformed abort")  # an abort is an abort, however badly written
        if not isinstance(frame, f.Abort):
            self._malformed(msg.subject, f"{frame.type} on an abort subject")
            return
        req = self._active.get(rid)
        if req is None:
            if rid not in self._seen:
                self._early_aborts.add(rid, time.monotonic())
            return
        await req.on_frame(frame)

    async def _on_up(self, msg: Msg) -> None:
        await self._on_request_frame(
            msg, allowed=(f.RequestChunk, f.RequestEnd, f.RequestError, f.RequestCredit)
        )

    async def _on_v1_body(self, msg: Msg) -> None:
        await self._on_request_frame(msg, allowed=(f.RequestChunk, f.RequestEnd, f.RequestError))

    async def _on_request_frame(self, msg: Msg, allowed: tuple[type, ...]) -> None:
        parsed = parse_request_subject(msg.subject, self.subjects.prefix)
        if parsed is None:
            self._malformed(msg.subject, "unexpected subject")
            return
        rid = parsed[1]
        req = self._active.get(rid)
        if req is None:
            await self._answer_probe(rid, msg.data)  # else a late frame for a finished request
            return
        try:
            frame = codec.decode_frame(msg.data, rid)
        except f.FrameError as exc:
            self._malformed(msg.subject, exc.message)
            self.stats.protocol_errors += 1
            await req.fail(exc, notify=True)
            return
        if not isinstance(frame, allowed):
            self._malformed(msg.subject, f"{frame.type} on a body subject")
            self.stats.protocol_errors += 1
            await req.fail(f.FrameError(f"{frame.type} not allowed on a body subject", rid), notify=True)
            return
        await req.on_frame(frame)

    async def _answer_probe(self, rid: str, data: bytes) -> None:
        """A caller probing a silence after we finished: our final frame was lost, send it again."""
        final = self._finals.get(rid)
        if final is None:
            return
        try:
            frame = codec.decode_frame(data, rid)
        except f.FrameError:
            return
        if isinstance(frame, f.RequestCredit) and frame.probe:
            self.stats.repeated_finals += 1
            await self._send_quietly(final)

    async def _send_quietly(self, pub: Publish) -> None:
        with contextlib.suppress(TunnelError):
            await self.publisher.send(pub)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a coroutine from synchronous code, keeping a reference until it is done."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


async def serve(
    nc: NATS,
    hostname: str,
    handler: Handler,
    *,
    prefix: str = DEFAULT_PREFIX,
    window: int = DEFAULT_WINDOW,
    max_chunk: int = DEFAULT_MAX_CHUNK,
    stall_timeout: float | None = DEFAULT_STALL_TIMEOUT,
    max_concurrent: int = DEFAULT_MAX_CONCURRENT,
    fast_path: bool = True,
    wire_tap: WireTap | None = None,
    on_event: EventHook | None = None,
    server_class: type[TunnelServer] = TunnelServer,
) -> TunnelServer:
    """Start serving ``hostname``; returns the running server (``await server.close()`` to stop).

    ``server_class``: a ``TunnelServer`` subclass to instantiate (tests, instrumentation).
    """
    server = server_class(
        nc,
        hostname,
        handler,
        prefix=prefix,
        window=window,
        max_chunk=max_chunk,
        stall_timeout=stall_timeout,
        max_concurrent=max_concurrent,
        fast_path=fast_path,
        wire_tap=wire_tap,
        on_event=on_event,
    )
    await server.start()
    return server
