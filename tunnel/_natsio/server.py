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
import logging
import time
from collections.abc import AsyncIterable, Awaitable, Callable, Coroutine, Iterable
from typing import Any, Unpack, cast

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError

from .. import _codec as codec
from .. import _frames as f
from .._config import (
    COALESCE_LIMIT,
    DEFAULT_DRAIN_TIMEOUT,
    REQUEST_DRAIN_LIMIT,
    LegacyServerKwargs,
    ServerConfig,
    server_config,
)
from .._diagnostics import (
    FRAME_DROPPED,
    OUTCOME_OK,
    REQUEST_ENDED,
    REQUEST_STARTED,
    EventHook,
    TunnelEvent,
    emit,
)
from .._dispatch import ServerDispatcher, ServerStats
from .._errors import ErrorCode, LocalProtocolError, PermissionDenied, TunnelAborted, TunnelError
from .._events import BodyEnded, CreditGranted, DataReceived, PeerFailed, Publish
from .._flow import GrowthBudget
from .._handler import Handler, Request, Response
from .._server_stream import ServerOptions, ServerStream
from .._subjects import (
    DEFAULT_PREFIX,
    HostSubjects,
    is_valid_request_id,
    new_endpoint_id,
    parse_request_subject,
)
from .coalesce import coalesced
from .common import (
    LazyTimer,
    Publisher,
    TimedRequest,
    TimerHub,
    WireTap,
    drain_subscription,
    flush_everything,
    map_nats_error,
    permission_refused,
)
from .direct import subscribe_direct

__all__ = ["ServerStats", "TunnelServer", "serve"]

log = logging.getLogger("tunnel.server")

# Prebuilt: an inline ``A | B`` in isinstance builds the union on every call (hot path).
_BYTES_LIKE = (bytes, bytearray, memoryview)
# What a caller may send on a body or up subject (a plain v1 caller: no credit frames).
_BODY_FRAMES: tuple[type[f.Frame], ...] = (f.RequestChunk, f.RequestEnd, f.RequestError, f.RequestCredit)
_V1_BODY_FRAMES: tuple[type[f.Frame], ...] = (f.RequestChunk, f.RequestEnd, f.RequestError)
# Warn about malformed frames at most this often; count all of them.
MALFORMED_LOG_INTERVAL = 1.0


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
            upgrade=stream.upgrade,
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
        self._body_taken = False  # the response body is in _send_body's hands (it closes it)
        self.failing = False  # fail_soon() was called: later frames are dropped

    async def _on_consumed(self, n: int) -> None:
        grant = self.stream.consumed(n)
        if grant is not None:
            await self.server.publisher.send(grant)

    def on_frame(self, frame: f.Frame) -> None:
        """Apply one caller frame where nats-py read it; failing the request (a publish) goes
        to a task (``fail_soon``). Frames for a request already failing are dropped."""
        if self.failing:
            return
        failure = self.apply(frame)
        if failure is not None:
            error, notify = failure
            self.fail_soon(error, notify=notify)

    def apply(self, frame: f.Frame) -> tuple[TunnelError, bool] | None:
        """Apply one caller frame; synchronous, so it can run in nats-py's read loop.

        Returns what the request must then fail with (the error, and whether to tell the
        caller), which needs a publish and so is left to the caller of this method.
        """
        try:
            event = self.stream.receive(frame)
        except TunnelError as exc:
            self.server.stats.protocol_errors += 1
            return exc, True
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
            return event.error, False
        return None

    def fail_soon(self, error: TunnelError, *, notify: bool) -> None:
        """``fail()`` from synchronous code (nats-py's read loop): the stream and the handler's
        request fail now, the rest (telling the caller, releasing) in a task. Once only, so
        a burst of bad frames read together gets one error frame, as it did when each
        frame waited for the last one's handling."""
        if self.failing:
            return
        self.failing = True
        self.stream.fail(error)
        self.request._fail(error)
        self.server._spawn(self.fail(error, notify=notify))

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
                self.server.dispatch.remember_final(self.stream.request_id, pub)
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
                await self._respond(response, body)
            finally:
                if not isinstance(body, _BYTES_LIKE) and body is not None and not self._body_taken:
                    # The head never went out (invalid, refused by NATS, or the request ended
                    # first): the body's own cleanup still runs now (an upstream socket, a file).
                    await _close_body(body)
        except asyncio.CancelledError:
            # Aborted, timed out or server closing: fail() already told whoever needed telling.
            # Cancelled by anything else (the handler's own code, a library it uses), nobody
            # did, and the caller would wait out its timeouts for an answer that never comes.
            if not self.stream.finished:
                stats.handler_errors += 1
                log.warning("handler for %s %s was cancelled", self.request.method, self.request.path)
                error = TunnelError("the handler was cancelled", code=ErrorCode.HANDLER_ERROR)
                await self.fail(error, notify=True)
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

    async def _respond(self, response: Response, body: object) -> None:
        """Send the head (or the whole answer in one message), then the body."""
        stats = self.server.stats
        try:
            whole = None
            if body is None or isinstance(body, _BYTES_LIKE):
                whole = self.stream.whole_response(
                    response.status, response.headers, response.status_text, body or b""
                )
            if whole is not None:
                self.status = response.status
                stats.bytes_out += self.stream.send.sent_bytes  # the body's bytes (not the frame's)
                batch_key = self.stream.reply_batch_key()
                if batch_key is None:
                    await self.server.publisher.send(whole)
                else:
                    await self.server.publisher.send_batched(
                        whole,
                        kind=f.KIND_REPLY_BATCH,
                        key=batch_key,
                        label=self.stream.request_id,
                        owner=self,
                        size_limit=self.stream.frame_limit,  # the caller's maxFrame too
                    )
                stats.completed += 1
                return
            start = self.stream.start_response(response.status, response.headers, response.status_text)
        except LocalProtocolError as exc:
            raise TypeError(f"handler returned an invalid response: {exc.message}") from exc
        self.status = response.status
        await self.server.publisher.send(start)
        self._body_taken = True  # from here _send_body closes it, whatever happens
        await self._send_body(body)
        if not self.stream.finished:
            end = self.stream.end_response()
            self.server.dispatch.remember_final(self.stream.request_id, end)
            await self.server.publisher.send(end)
            stats.completed += 1

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
            # Pieces the handler has ready at once go out together, up to one frame.
            pieces = coalesced(iterator, min(self.stream.chunk_limit, COALESCE_LIMIT), _as_bytes)
            try:
                async for piece in pieces:
                    await self._send_bytes(memoryview(piece))
            finally:
                # Aborted, stalled or failed mid-stream: let the body's own cleanup run now
                # (close a file, an upstream response), not whenever the garbage collector gets to it.
                await pieces.aclose()
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
            sent_before = self.stream.send.sent_bytes
            frames, taken = self.stream.send_body(view)
            self.server.stats.bytes_out += self.stream.send.sent_bytes - sent_before
            await self.server.publisher.send_all(frames)
            self.stream.mark_published()
            view = view[taken:]
            if view:
                pause = self.stream.pace_delay(len(view))
                if pause > 0:
                    await asyncio.sleep(pause)  # a plain v1 caller: the pace NATS can deliver at
                    continue
                self.timer.arm(self.stream.next_deadline())  # credit-stall deadline
                await self._wait_credit()

    async def _wait_credit(self) -> None:
        if self.stream.finished:
            # fail() fails only a wait already begun: one begun after it would never end.
            raise self.stream.error or TunnelAborted("request ended")
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
            self.request._detach()
            # Its window's growth goes back to the budget: the handler is done, so whatever
            # body it left unread will never be read.
            window = self.stream.receive_window
            window.release()
            window.discard()
            server = self.server
            server.dispatch.release(self.stream.request_id)
            stats = server.stats
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


class TunnelServer:
    """Serves one hostname over one NATS connection. Use :func:`serve` to create and start one.

    Arguments as for :func:`serve`.
    """

    def __init__(
        self,
        nc: NATS,
        hostname: str,
        handler: Handler,
        *,
        config: ServerConfig | None = None,
        prefix: str = DEFAULT_PREFIX,
        wire_tap: WireTap | None = None,
        on_event: EventHook | None = None,
        **deprecated: Unpack[LegacyServerKwargs],
    ) -> None:
        self.config = config = server_config("TunnelServer", config, deprecated)
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
        self.server_id = new_endpoint_id()
        self.publisher = Publisher(nc, wire_tap)
        self.dispatch: ServerDispatcher[_ServerRequest] = ServerDispatcher(
            hostname=self.hostname,
            subjects=self.subjects,
            server_id=self.server_id,
            options=ServerOptions(
                window=config.window,
                max_window=config.effective_max_window,
                growth_budget=GrowthBudget(config.window_budget),
                max_chunk=config.max_chunk,
                max_payload=nc.max_payload,
                stall_timeout=config.stall_timeout,
                fast_path=config.fast_path,
                v1_pace=config.v1_pace,
                v1_burst=config.v1_burst,
            ),
            max_concurrent=config.max_concurrent,
            clock=time.monotonic,  # until start() hands over the running loop's clock
            wall_clock=time.time,
        )
        self.stats: ServerStats = self.dispatch.stats
        self._subs: list[Subscription] = []
        self._request_sub: Subscription | None = None
        # The host's readiness subject (outside the prefix: see _subjects), held while we take
        # requests; None where the permissions refuse it.
        self._ready_sub: Subscription | None = None
        # Under the reference daemon permissions: P.req.*.body for every request's body frames.
        self._body_wildcard: Subscription | None = None
        self._closing = False
        self._last_malformed_log = 0.0
        self._background: set[asyncio.Task[None]] = set()
        self._accepting: set[asyncio.Task[None]] = set()
        self._timers: TimerHub | None = None

    # The config's fields, read-only: a server's options are fixed once it is built.
    @property
    def window(self) -> int:
        return self.config.window

    @property
    def max_chunk(self) -> int:
        return self.config.max_chunk

    @property
    def stall_timeout(self) -> float | None:
        return self.config.stall_timeout

    @property
    def max_concurrent(self) -> int:
        return self.config.max_concurrent

    @property
    def fast_path(self) -> bool:
        return self.config.fast_path

    @property
    def in_flight(self) -> int:
        return len(self.dispatch.active)

    async def start(self) -> None:
        """Subscribe; on return the NATS server knows us, so callers never see no-responders.

        The request subscription comes last: once it exists, callers' starts reach us and we
        answer naming our up subject, so that subscription (and what the permissions allow,
        which decides the subjects we name) must be settled before any start can arrive.
        """
        loop = asyncio.get_running_loop()
        self._timers = TimerHub(loop)
        self.dispatch.use_clock(loop.time)  # every deadline in the loop's time, like its timers
        subjects = self.subjects
        others: list[Subscription] = []
        try:
            others.append(await self._subscribe_required(subjects.all_aborts, self._on_abort, direct=True))
            up = await self._subscribe_checked(
                subjects.all_server_up(self.server_id), self._on_body_frame, direct=True
            )
            if up is None:
                # The reference daemon permissions: body subjects only, one wildcard for all.
                self._body_wildcard = await self._subscribe_required(
                    subjects.all_bodies, self._on_body_frame, direct=True
                )
                others.append(self._body_wildcard)
            else:
                others.append(up)
            # Only a restricted permission set (no up subscription) is asked whether it may
            # publish to shared reply subjects: the probe is a message taps would see.
            replies_free = up is not None or await self._may_publish(
                subjects.client_reply(new_endpoint_id(), "permission-check")
            )
            if up is None or not replies_free:
                self.dispatch.use_reference_permissions(replies=not replies_free, up_via_body=up is None)
            self._request_sub = await self._subscribe_required(
                subjects.request, self._on_start, queue=subjects.queue_group, direct=True
            )
        except (NatsError, OSError, PermissionDenied) as exc:
            for sub in others:
                with contextlib.suppress(NatsError, OSError):
                    await sub.unsubscribe()
            if isinstance(exc, PermissionDenied):
                raise
            raise map_nats_error(exc) from exc
        self._subs = [self._request_sub, *others]
        # After the request subscription (and dropped before it): a caller that finds it held
        # under a monitoring tap waits for our answer instead of reporting the host offline.
        with contextlib.suppress(NatsError, OSError):
            self._ready_sub = await self._subscribe_checked(
                subjects.ready, _ignore_readiness_probe, direct=True
            )
        if self._ready_sub is None:
            log.info(
                "serving %s without its readiness subject %s (refused by the NATS permissions): "
                "callers behind a monitoring subscriber on the prefix wait up to "
                "Timeouts.presence_fallback before they report it offline",
                self.hostname,
                subjects.ready,
            )
        if up is None or not replies_free:
            log.info(
                "serving %s under restricted NATS permissions: %s",
                self.hostname,
                "; ".join(
                    part
                    for part in (
                        "body and credit frames on P.req.*.body" if up is None else "",
                        "answers on the reference reply subject P.req.<id>.reply" if not replies_free else "",
                    )
                    if part
                ),
            )

    async def _subscribe_required(
        self,
        subject: str,
        cb: Callable[[Msg], Awaitable[None]] | Callable[[Msg], None],
        *,
        queue: str = "",
        direct: bool = False,
    ) -> Subscription:
        """Subscribe, or raise :class:`PermissionDenied` when NATS refuses.

        ``direct``: ``cb`` is synchronous and runs in nats-py's read loop (see ``direct``).
        """
        sub = await self._subscribe_checked(subject, cb, queue=queue, direct=direct)
        if sub is None:
            raise PermissionDenied(
                f"NATS refused the subscription to {subject}: these credentials may not serve "
                f"{self.hostname!r} (see the NATS server's permissions for this user)"
            )
        return sub

    async def _subscribe_checked(
        self,
        subject: str,
        cb: Callable[[Msg], Awaitable[None]] | Callable[[Msg], None],
        *,
        queue: str = "",
        direct: bool = False,
    ) -> Subscription | None:
        """Subscribe and make sure NATS accepted it (None: refused). A refused subscription is
        only an asynchronous -ERR: a server that ignored it would report success and never answer.
        """
        before = self.nc.last_error
        if direct:
            sub = await subscribe_direct(self.nc, subject, cast(Callable[[Msg], None], cb), queue=queue)
        else:
            sub = await self.nc.subscribe(subject, queue=queue, cb=cast(Callable[[Msg], Awaitable[None]], cb))
        if await self._refused(before, "subscription to", subject) is None:
            return sub
        with contextlib.suppress(NatsError, OSError):
            await sub.unsubscribe()
        return None

    async def _may_publish(self, subject: str) -> bool:
        """Whether NATS lets this connection publish to ``subject`` (an empty message nobody reads)."""
        before = self.nc.last_error
        await self.nc.publish(subject, b"")
        return await self._refused(before, "publish to", subject) is None

    async def _refused(self, before: Exception | None, what: str, subject: str) -> str | None:
        """The permissions violation NATS reported for ``what`` ``subject``, if any.

        NATS sends the -ERR before the PONG that ``flush_everything`` waits for.
        """
        await flush_everything(self.nc)
        error = self.nc.last_error
        return str(error) if permission_refused(error, before, what, subject) else None

    async def close(self, timeout: float = DEFAULT_DRAIN_TIMEOUT) -> None:
        """Stop taking requests, let in-flight ones finish for up to ``timeout`` s, then cancel the rest."""
        if self._closing:
            return
        self._closing = True
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + timeout
        await self._stop_taking_requests(timeout)
        if self._accepting:  # starts that arrived before the UNSUB, still acking: let them run
            await asyncio.wait(list(self._accepting), timeout=max(0.0, give_up_at - loop.time()))
        tasks = [r.task for r in self.dispatch.active.values() if r.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=max(0.0, give_up_at - loop.time()))
        for req in list(self.dispatch.active.values()):
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
        ready, self._ready_sub = self._ready_sub, None
        if ready is not None:
            with contextlib.suppress(NatsError, OSError):
                await ready.unsubscribe()
        sub, self._request_sub = self._request_sub, None
        try:
            if sub is not None and not await self._drain(sub, min(budget, REQUEST_DRAIN_LIMIT)):
                with contextlib.suppress(NatsError, OSError):
                    await sub.unsubscribe()
                _forget(self.nc, sub)
        finally:
            self.dispatch.accepting = False  # also when close() itself is cancelled mid-drain

    async def _drain(self, sub: Subscription, limit: float) -> bool:
        if limit <= 0 or not self.nc.is_connected:
            return False
        try:
            await asyncio.wait_for(drain_subscription(self.nc, sub), limit)
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

    def _on_start(self, msg: Msg) -> None:
        """A message on the request subject, handled where nats-py reads it (see ``direct``):
        one start, or a batch of them (``startBatches``), each then on its own."""
        dispatch = self.dispatch
        if dispatch.options.max_payload != self.nc.max_payload:  # reconnected to a server with other limits
            dispatch.set_max_payload(self.nc.max_payload)
        data = msg.data
        try:
            batch = dispatch.batched_starts(data)
        except f.FrameError as exc:
            self._malformed(msg.subject, exc.message)
            return
        if batch is None:
            self._start(msg.subject, data, msg.reply)
            return
        self.stats.start_batches += 1
        for reply, start in batch:
            self._start(msg.subject, start, reply)

    def _start(self, subject: str, data: bytes, reply: str) -> None:
        """One start. The usual one (an extended caller's, no body, not a first contact) needs
        no publish before its handler runs, so the handler task starts from here. Anything that
        must publish or subscribe first (answers, an immediate ack, a v1 body subscription)
        continues in one task, in the same order as before.
        """
        dispatch = self.dispatch
        answer = dispatch.on_start(data, reply)
        if answer.malformed is not None:
            self._malformed(subject, answer.malformed)
        stream = answer.stream
        if stream is None:
            if answer.publishes:
                self._spawn(self._send_all_quietly(list(answer.publishes)))
            return
        loop = asyncio.get_running_loop()
        req = _ServerRequest(self, stream, loop, stream.created_at)
        dispatch.admit(req)
        frame = stream.start_frame
        if self.on_event is not None:
            emit(
                self.on_event,
                TunnelEvent(
                    REQUEST_STARTED,
                    "server",
                    self.hostname,
                    stream.request_id,
                    frame.method,
                    req.request.path,
                ),
            )
        needs_body_sub = (
            frame.body_subject is not None and stream.up_subject is None and self._body_wildcard is None
        )
        if answer.publishes or needs_body_sub or stream.ack_now:
            task = loop.create_task(self._accept(req, list(answer.publishes), needs_body_sub))
            self._accepting.add(task)  # close() waits for these: their requests are ours
            task.add_done_callback(self._accepting.discard)
            return
        self._run(req, loop)

    async def _accept(self, req: _ServerRequest, publishes: list[Publish], needs_body_sub: bool) -> None:
        """What a start needs on the wire before its handler runs."""
        stream = req.stream
        if publishes:
            await self._send_all_quietly(publishes)
        try:
            if needs_body_sub:
                body_subject = stream.start_frame.body_subject
                assert body_subject is not None
                req.body_sub = await self.nc.subscribe(body_subject, cb=self._on_v1_body)
            if stream.ack_now:
                await self.publisher.send(stream.ack())
        except (NatsError, OSError, TunnelError) as exc:
            log.warning("could not accept request %s: %s", stream.request_id, exc)
            await req.release()
            return
        self._run(req, asyncio.get_running_loop())

    def _run(self, req: _ServerRequest, loop: asyncio.AbstractEventLoop) -> None:
        if self._timers is None:
            self._timers = TimerHub(loop)
        self._timers.add(req, req.stream.next_deadline())
        req.task = loop.create_task(req.run(self.handler))

    async def _send_all_quietly(self, publishes: list[Publish]) -> None:
        with contextlib.suppress(TunnelError):
            await self.publisher.send_all(publishes)

    def _on_abort(self, msg: Msg) -> None:
        """Aborts are handled where nats-py reads them, like starts (see ``direct``): an abort
        NATS delivered before its start is remembered before that start is handled."""
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
        req = self.dispatch.on_abort(rid)
        if req is not None:
            req.on_frame(frame)

    def _on_body_frame(self, msg: Msg) -> None:
        """Frames on our up subjects, or on the body-subject wildcard under the reference
        permissions (v1 bodies and extension frames there), handled where nats-py reads them
        (see ``direct``): a request-body chunk reaches the handler with no queue and no task hop."""
        self._on_request_frame_now(msg, _BODY_FRAMES)

    def _on_request_frame_now(self, msg: Msg, allowed: tuple[type[f.Frame], ...]) -> None:
        """One frame from a caller on a body or up subject; synchronous, so it can run in
        nats-py's read loop. Whatever must publish (an answer to a stray probe, failing the
        request) continues in a task."""
        parsed = parse_request_subject(msg.subject, self.subjects.prefix)
        if parsed is None:
            self._malformed(msg.subject, "unexpected subject")
            return
        rid = parsed[1]
        req = self.dispatch.active.get(rid)
        if req is None:
            final = self.dispatch.on_stray(rid, msg.data)  # a probe after we finished, or a late frame
            if final is not None:
                self._spawn(self._send_quietly(final))
            return
        if req.failing:
            return  # failing already (see fail_soon): what else it sent changes nothing
        try:
            frame = codec.decode_frame(msg.data, rid)
        except f.FrameError as exc:
            self._malformed(msg.subject, exc.message)
            self.stats.protocol_errors += 1
            req.fail_soon(exc, notify=True)
            return
        if not isinstance(frame, allowed):
            self._malformed(msg.subject, f"{frame.type} on a body subject")
            self.stats.protocol_errors += 1
            req.fail_soon(f.FrameError(f"{frame.type} not allowed on a body subject", rid), notify=True)
            return
        req.on_frame(frame)

    async def _on_v1_body(self, msg: Msg) -> None:
        """A plain v1 caller's own body subject (no credit frames there)."""
        self._on_request_frame_now(msg, _V1_BODY_FRAMES)

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
    config: ServerConfig | None = None,
    prefix: str = DEFAULT_PREFIX,
    wire_tap: WireTap | None = None,
    on_event: EventHook | None = None,
    server_class: type[TunnelServer] = TunnelServer,
    **deprecated: Unpack[LegacyServerKwargs],
) -> TunnelServer:
    """Start serving ``hostname``; returns the running server (``await server.close()`` to stop).

    - ``config``: a :class:`ServerConfig` (sizes, stall timeout, concurrency); defaults when omitted;
    - ``prefix``: the subject prefix callers use (an address, like the hostname);
    - ``wire_tap``, ``on_event``: diagnostics hooks;
    - ``server_class``: a ``TunnelServer`` subclass to instantiate (tests, instrumentation).

    The keyword arguments ``window``, ``max_chunk``, ``stall_timeout``, ``max_concurrent``
    and ``fast_path`` are deprecated (a ``DeprecationWarning`` names the replacement):
    pass ``config=ServerConfig(...)`` instead.
    """
    config = server_config("serve", config, deprecated)
    server = server_class(
        nc, hostname, handler, config=config, prefix=prefix, wire_tap=wire_tap, on_event=on_event
    )
    await server.start()
    return server


def _ignore_readiness_probe(msg: Msg) -> None:
    """Callers only ask NATS whether the readiness subject is held; nothing to answer."""
