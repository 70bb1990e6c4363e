"""The caller: ``TunnelClient.fetch`` and the streaming ``FetchResponse``.

One wildcard subscription per client receives the frames of every request it
has in flight (``<prefix>.host.*.req.*.reply.<clientId>``) and hands them to
the request's sans-IO ``CallerStream`` by request id: no per-request SUB/UNSUB.
A second one (``<prefix>.host.*.req.*.reply``) hears servers that may answer only
on the reference reply subject (the reference daemon permissions); frames of
request ids that are not ours are dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import warnings
import weakref
from collections import deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
)
from typing import Any, TypedDict, TypeVar, Unpack
from urllib.parse import urlsplit

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError

from .. import _codec as codec
from .. import _frames as f
from .. import _reply_batch as reply_batch
from .._caller import CallerOptions, CallerPhase, CallerStream, PresenceEvidence
from .._compact_starts import CompactStarts
from .._config import (
    COALESCE_LIMIT,
    RECENTLY_SEEN,
    LegacyClientKwargs,
    Limits,
    Timeouts,
    client_config,
    heartbeat_interval_for,
)
from .._diagnostics import (
    OUTCOME_OK,
    REQUEST_ENDED,
    REQUEST_STARTED,
    EventHook,
    TunnelCounters,
    TunnelEvent,
    emit,
)
from .._errors import ErrorCode, LocalProtocolError, RemoteProtocolError, TunnelAborted, TunnelError
from .._events import (
    BodyEnded,
    CreditGranted,
    DataReceived,
    HeartbeatReceived,
    PeerFailed,
    Publish,
    ResponseHead,
)
from .._flow import GrowthBudget
from .._headers import all_headers, first_header
from .._subjects import (
    DEFAULT_PREFIX,
    HostSubjects,
    client_reply_wildcard,
    new_endpoint_id,
    new_request_id,
    normalize_hostname,
    parse_request_subject,
    reference_reply_wildcard,
    unheld_ready_subject,
    validate_prefix,
)
from .coalesce import coalesced
from .common import (
    LazyTimer,
    Publisher,
    TimedRequest,
    TimerHub,
    WireTap,
    flush_everything,
    log,
    map_nats_error,
    permission_refused,
    status_of,
)
from .direct import subscribe_direct

Body = bytes | bytearray | memoryview | str | AsyncIterable[bytes] | Iterable[bytes] | None
HeadersArg = Iterable[tuple[str, str]] | dict[str, str] | None


class FetchOptions(TypedDict, total=False):
    """:meth:`TunnelClient.fetch`'s keyword arguments, for functions that pass them on
    (module-level :func:`fetch`); mypy checks that both agree."""

    method: str
    headers: HeadersArg
    body: Body
    timeout: float | None
    first_frame_timeout: float | None
    idle_timeout: float | None
    timeouts: Timeouts | None
    upgrade: bool


_UNSET: Any = object()
# Prebuilt: an inline ``A | B`` in isinstance builds the union on every call (hot path).
_TEXT_OR_BYTES = (str, bytes, bytearray, memoryview)
# Per-client caches of host subjects and option objects; cleared when full (cheap, bounded).
HOST_CACHE_SIZE = 4096
# What a presence or liveness question answers (a bool or a PresenceEvidence).
_Answer = TypeVar("_Answer")


_PLAIN_HOST_RE = re.compile(r"[a-z0-9][a-z0-9.-]*", re.ASCII)


def parse_tunnel_url(url: str) -> tuple[str, str]:
    """``tunnel://host/path?query`` -> (hostname, "/path?query")."""
    if url.startswith("tunnel://"):
        # Fast path for the common shape; anything unusual goes through urlsplit below.
        rest = url[9:]
        cut = len(rest)
        for sep in "/?#":
            i = rest.find(sep)
            if i != -1 and i < cut:
                cut = i
        host = rest[:cut].lower()
        if _PLAIN_HOST_RE.fullmatch(host):
            target = rest[cut:].partition("#")[0]
            if not target.startswith("/"):
                target = "/" + target
            if target.endswith("?"):
                target = target[:-1]
            return host, f.validate_url(target)
    parts = urlsplit(url)
    if parts.scheme != "tunnel":
        raise LocalProtocolError(f"not a tunnel:// URL: {url!r}")
    if not parts.hostname:
        raise LocalProtocolError(f"tunnel URL has no host: {url!r}")
    if parts.port is not None or parts.username or parts.password:
        raise LocalProtocolError("tunnel URLs carry no port or credentials")
    # urlsplit lowercases .hostname; keep the netloc spelling out of the subject.
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return normalize_hostname(parts.hostname), f.validate_url(target)


def _normalize_headers(headers: HeadersArg) -> f.Headers:
    if headers is None:
        return []
    items = list(headers.items()) if isinstance(headers, dict) else list(headers)
    return f.validate_headers(items)


class FetchResponse:
    """A streaming response. Read the body once (``aiter_bytes``/``read``), then it closes.

    Leaving early (``aclose`` or the ``async with`` block) aborts the server side.
    """

    def __init__(self, request: _ClientRequest, head: ResponseHead) -> None:
        self._request = request
        self.status = head.status
        self.reason = head.status_text or ""
        self.headers: list[tuple[str, str]] = head.headers
        self.request_id = request.stream.request_id
        self.hostname = request.hostname

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 400

    @property
    def upgraded(self) -> bool:
        """The server accepted an upgrade (101): the body is the stream's server->caller
        direction, and the request body given to ``fetch`` its caller->server direction."""
        return self._request.stream.upgraded

    def header(self, name: str, default: str | None = None) -> str | None:
        return first_header(self.headers, name, default)

    def header_values(self, name: str) -> list[str]:
        return all_headers(self.headers, name)

    def aiter_bytes(self) -> AsyncIterator[bytes]:
        """The body's chunks as they arrive. Cancelling a read aborts the request: a later read
        then raises that error (``tunnel_aborted``), it never looks like the end of the body."""
        return _BodyChunks(self._request)

    async def read(self) -> bytes:
        request = self._request
        if request.ended and not request._iterated and request.error is None:
            # Everything already arrived (e.g. one response.whole): no generator needed.
            request._iterated = True
            chunks = request.chunks
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            chunks.clear()
            request.stream.receive_window.discard()  # read at once: nothing is held any more
            return data
        return b"".join([chunk async for chunk in request.iter_body()])

    async def text(self, encoding: str = "utf-8") -> str:
        return (await self.read()).decode(encoding)

    async def json(self) -> Any:
        return json.loads(await self.read())

    async def aclose(self) -> None:
        await self._request.close()

    @property
    def is_closed(self) -> bool:
        return self._request.released

    async def __aenter__(self) -> FetchResponse:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<FetchResponse {self.status} tunnel://{self.hostname} id={self.request_id}>"


class _BodyChunks:
    """``FetchResponse.aiter_bytes()``: the body generator, minus silent truncation.

    A read cancelled mid-way (``asyncio.wait_for``) closes the generator, and its cleanup
    aborts the request. A closed generator just says "no more items", which would make the
    rest of the body look like its end; here that becomes the request's error instead.
    """

    __slots__ = ("_chunks", "_request")

    def __init__(self, request: _ClientRequest) -> None:
        self._request = request
        self._chunks = request.iter_body()

    def __aiter__(self) -> _BodyChunks:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await anext(self._chunks)
        except StopAsyncIteration:
            request = self._request
            if not request.ended and request.error is not None:
                raise request.error from None
            raise

    async def aclose(self) -> None:
        await self._chunks.aclose()


class _ClientRequest(TimedRequest):
    """The I/O side of one request: buffers, wakeups, the upload task and the timer."""

    def __init__(self, client: TunnelClient, stream: CallerStream, hostname: str, body: Body) -> None:
        self.client = client
        self.stream = stream
        self.hostname = hostname
        self.body = body
        loop = asyncio.get_running_loop()
        self.head: asyncio.Future[ResponseHead] = loop.create_future()
        self.chunks: deque[bytes] = deque()
        self.ended = False
        self.error: TunnelError | None = None
        self.released = False
        self._reader: asyncio.Future[None] | None = None
        self._credit: asyncio.Future[None] | None = None
        self._upload: asyncio.Task[None] | None = None
        self._iterated = False
        self.sub: Subscription | None = None  # only without shared replies
        self.status: int | None = None
        self._loop = loop
        self._timer: LazyTimer | None = None
        #: The request id of the first start of the start batch ours went in (``startBatches``),
        #: until the batch is known to have got through: see ``TunnelClient._start_batches``.
        self.batch_lead: str | None = None

    # -- frames from the demultiplexer ------------------------------------------

    def on_frame(self, frame: f.Frame) -> None:
        """Apply one frame; synchronous (it runs in nats-py's read loop): waits go to tasks."""
        was_starting = self.stream.phase is CallerPhase.STARTING
        try:
            event = self.stream.receive(frame)
        except TunnelError as exc:
            self._fail_and_abort_soon(exc)
            return
        if was_starting and self.stream.phase is not CallerPhase.STARTING:
            self.client._saw_serving(self.hostname, self.stream)
            if self.batch_lead is not None:  # our start got through, so did the rest of its batch
                self.client._start_batches.pop(self.batch_lead, None)
                self.batch_lead = None
        # Any first frame (ack, start, whole) lets the request body flow, as in the reference caller.
        if was_starting and self.stream.phase is not CallerPhase.STARTING and not self.stream.finished:
            if self.body is not None:
                self._upload = asyncio.get_running_loop().create_task(self._send_body())
            self.timer.arm(self.stream.next_deadline())
        if event is None:
            return
        if isinstance(event, DataReceived):
            self.chunks.append(event.data)
            self._wake_reader()
        elif isinstance(event, ResponseHead):
            self.status = event.status
            if event.complete_body and event.has_body:
                self.chunks.append(event.complete_body)
            if not event.has_body or event.complete_body is not None:
                self.ended = True
                self.release()
            elif not self.stream.heartbeats:
                # A plain v1 server: its idle deadline starts only now (nothing was armed while
                # it was busy before the response, since silence then is normal).
                self.timer.arm(self.stream.next_deadline())
            if not self.head.done():
                self.head.set_result(event)
        elif isinstance(event, BodyEnded):
            self.ended = True
            self._wake_reader()
            self.release()
        elif isinstance(event, CreditGranted):
            self._wake_credit()
        elif isinstance(event, HeartbeatReceived):
            refresh = self.stream.refresh_credit()
            if refresh is not None:
                self.client.publisher.send_soon([refresh])
        elif isinstance(event, PeerFailed):
            self._set_error(event.error)
            self.release()

    def on_no_responders(self) -> None:
        try:
            self.stream.no_responders()
        except TunnelError as exc:
            self._set_error(exc)
            self.release()
            return
        self.timer.arm(self.stream.next_deadline())

    def _on_timer(self) -> float | None:
        if self.released:
            return None
        try:
            self.client.publisher.send_soon(self.stream.poll())
        except TunnelError as exc:
            self._fail_and_abort_soon(exc)
            return None
        stream = self.stream
        client = self.client
        if stream.presence_check_pending:
            # First contact and silence: is a non-server subscriber hiding NATS's no-responders,
            # and if so, does a server hold the host's readiness subject?
            stream.presence_check_pending = False
            client._spawn(self._check(client._presence_evidence(stream.subjects), stream.on_presence_check))
        if stream.liveness_check_pending:
            # A plain v1 server was silent for the idle timeout: does its host still have a server?
            stream.liveness_check_pending = False
            client._spawn(self._check(client._host_has_server(stream.subjects), stream.on_liveness_check))
        return stream.next_deadline()

    async def _check(self, question: Awaitable[_Answer], answer: Callable[[_Answer], None]) -> None:
        """Ask NATS ``question`` and hand the answer to the stream (which may fail the request).
        When NATS cannot be asked, nothing changes: the request's own timeouts still end it."""
        try:
            result = await question
        except TunnelError:
            return
        if self.released:
            return
        try:
            answer(result)
        except TunnelError as exc:
            await self._abort_with(exc)

    # -- failure paths ------------------------------------------------------------

    def _set_error(self, exc: TunnelError) -> None:
        if self.error is None:
            self.error = exc
        if not self.head.done():
            self.head.set_exception(exc)
            self.head.exception()  # retrieved: no "never retrieved" warning if nobody awaits
        self._wake_reader()
        self._wake_credit()

    def _fail_and_abort_soon(self, exc: TunnelError) -> None:
        self.stream.fail(exc)
        self._set_error(exc)
        abort = self.stream.abort(exc.code)
        if abort is not None:
            self.client.publisher.send_soon([abort])
        self.release()

    async def _abort_with(self, exc: TunnelError) -> None:
        self.stream.fail(exc)
        self._set_error(exc)
        abort = self.stream.abort(exc.code)
        self.release()
        if abort is not None:
            with contextlib.suppress(TunnelError):
                await self.client.publisher.send(abort)

    # -- request body -----------------------------------------------------------------

    async def _send_body(self) -> None:
        body = self.body
        # Pieces the caller's iterator has ready at once go out together, up to one frame.
        pieces = (
            coalesced(aiter(body), min(self.stream.chunk_limit, COALESCE_LIMIT), _piece_bytes)
            if isinstance(body, AsyncIterable)
            else _iter_body(body)
        )
        try:
            async for piece in pieces:
                view = memoryview(piece)
                while view:
                    if not self._uploading():
                        return
                    frames, taken = self.stream.send_body(view)
                    await self.client.publisher.send_all(frames)
                    self.stream.mark_published()
                    view = view[taken:]
                    if view:
                        await self._wait_credit()
            if self._uploading():
                await self.client.publisher.send(self.stream.end_body())
                self.stream.mark_published()
        except asyncio.CancelledError:
            raise
        except TunnelError as exc:
            if self.error is None:
                await self._abort_with(exc)
        except Exception as exc:  # the caller's body iterator failed
            err = TunnelAborted(
                f"request body failed: {type(exc).__name__}: {exc}", code=ErrorCode.BODY_ERROR
            )
            fail = self.stream.fail_body(
                ErrorCode.BODY_ERROR, f"caller's request body failed: {type(exc).__name__}"
            )
            if fail is not None:
                with contextlib.suppress(TunnelError):
                    await self.client.publisher.send(fail)
            await self._abort_with(err)
        finally:
            await pieces.aclose()  # may hold a started read of the caller's iterator

    def _uploading(self) -> bool:
        """Is the request body still wanted? Not once the response has ended or failed.

        ``release()`` cancels the upload then, but nats-py swallows a cancellation that lands
        while a publish waits for its flusher (``Client._flush_pending``), so the upload
        must also see for itself that it is over.
        """
        return self.error is None and self.stream.can_send_body

    async def _wait_credit(self) -> None:
        if self.stream.send.available() > 0 or not self._uploading():
            return
        self._credit = asyncio.get_running_loop().create_future()
        try:
            await self._credit
        finally:
            self._credit = None

    def _wake_credit(self) -> None:
        if self._credit is not None and not self._credit.done():
            self._credit.set_result(None)

    # -- response body -----------------------------------------------------------------

    async def iter_body(self) -> AsyncGenerator[bytes, None]:
        if self._iterated:
            raise RuntimeError("response body already consumed")
        self._iterated = True
        try:
            while True:
                if self.chunks:
                    chunk = self.chunks.popleft()
                    credit = self.stream.consumed(len(chunk))
                    if credit is not None and not self.released:
                        await self.client.publisher.send(credit)
                    yield chunk
                    continue
                if self.error is not None:
                    raise self.error
                if self.ended:
                    return
                self._reader = asyncio.get_running_loop().create_future()
                try:
                    await self._reader
                finally:
                    self._reader = None
        finally:
            if not self.ended:
                await self.close()

    def _wake_reader(self) -> None:
        if self._reader is not None and not self._reader.done():
            self._reader.set_result(None)

    # -- lifecycle ---------------------------------------------------------------------

    async def close(self) -> None:
        """Leave early: abort the server side (if still running) and release everything."""
        if not self.released:
            abort = self.stream.abort("caller closed the response")
            self._set_error(TunnelAborted("response closed by the caller"))
            self.release()
            self.stream.receive_window.discard()  # what is unread will not be read
            if abort is not None:
                with contextlib.suppress(TunnelError):
                    await self.client.publisher.send(abort)
        elif self.error is None and not self.ended:
            self._set_error(TunnelAborted("response closed by the caller"))

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        if self.batch_lead is not None:
            self.client._leave_start_batch(self)
        self._cancel_timer()
        client = self.client
        client._streams.pop(self.stream.request_id, None)
        stream = self.stream
        # Its window's growth goes back to the client's budget once nothing received is unread.
        stream.receive_window.release()
        stats = client.stats
        stats.active = len(client._streams)
        error = stream.error if stream.phase is CallerPhase.FAILED else None
        outcome = OUTCOME_OK if error is None else error.code
        stats.outcomes[outcome] += 1
        received = stream.receive_window.received_bytes
        stats.bytes_in += received
        stats.bytes_out += stream.send.sent_bytes
        if client.on_event is not None:
            emit(
                client.on_event,
                TunnelEvent(
                    REQUEST_ENDED,
                    "client",
                    self.hostname,
                    stream.request_id,
                    stream.method,
                    None,
                    self.status,
                    outcome,
                    stream.clock() - stream.started_at,
                    received,
                    stream.send.sent_bytes,
                ),
            )
        if self.sub is not None:
            self.client._unsubscribe_soon(self.sub)
            self.sub = None
        # Once the response is over, a still-running upload has nobody to read it.
        self._wake_credit()
        if (
            self._upload is not None
            and not self._upload.done()
            and self._upload is not asyncio.current_task()
        ):
            self._upload.cancel()


def _piece_bytes(piece: Any) -> bytes:
    """One piece of a caller's body as bytes of its own (the caller may reuse its buffer)."""
    return bytes(piece) if piece else b""


async def _iter_body(body: Body) -> AsyncGenerator[bytes, None]:
    if body is None:
        return
    if isinstance(body, str):
        yield body.encode("utf-8")
    elif isinstance(body, bytes | bytearray | memoryview):
        yield bytes(body)
    elif isinstance(body, AsyncIterable):
        async for piece in body:
            if piece:
                yield bytes(piece)
    else:
        for piece in body:
            if piece:
                yield bytes(piece)


class TunnelClient:
    """Calls ``tunnel://`` URLs over one NATS connection; holds defaults for every fetch.

    Cheap to keep for the life of the connection: it owns two wildcard subscriptions.

    - ``prefix``: the subject prefix servers listen under (an address, like the host);
    - ``timeouts``: :class:`Timeouts` for every fetch (each fetch may override them);
    - ``limits``: :class:`Limits`, the buffer and frame sizes of each request;
    - ``fast_path``: offer the protocol extensions (binary frames, credit, heartbeats);
      ``False`` speaks plain reference v1;
    - ``shared_replies``: one wildcard reply subscription for all requests; ``False``
      uses the reference reply subject with a subscription per request (for v1
      daemons whose publish permission allows exactly that subject);
    - ``wire_tap``, ``on_event``: diagnostics hooks.

    The keyword arguments ``timeout``, ``first_frame_timeout``, ``idle_timeout``,
    ``unreachable_grace``, ``republish_interval``, ``window`` and ``max_chunk`` are
    deprecated (a ``DeprecationWarning`` names the replacement): pass ``timeouts=`` and
    ``limits=`` instead. So are the read-only attributes of the same names: read
    ``client.timeouts`` and ``client.limits``.
    """

    def __init__(
        self,
        nc: NATS,
        *,
        prefix: str = DEFAULT_PREFIX,
        timeouts: Timeouts | None = None,
        limits: Limits | None = None,
        fast_path: bool = True,
        shared_replies: bool = True,
        wire_tap: WireTap | None = None,
        on_event: EventHook | None = None,
        **deprecated: Unpack[LegacyClientKwargs],
    ) -> None:
        self.timeouts, self.limits = client_config("TunnelClient", timeouts, limits, deprecated)
        self.nc = nc
        self.prefix = validate_prefix(prefix)
        self.fast_path = fast_path
        # False: the reference reply subject P.req.<id>.reply with a subscription per request,
        # for v1 daemons whose publish permission allows exactly that subject.
        self.shared_replies = shared_replies
        self.client_id = new_endpoint_id()
        self.publisher = Publisher(nc, wire_tap)
        self._streams: dict[str, _ClientRequest] = {}
        #: Start batches not yet known to have got through: the first start's request id -> the
        #: other requests in it. NATS's no-responders for the batch reaches the first start's
        #: reply subject only, even when that request is over; these hear it from there.
        self._start_batches: dict[str, list[_ClientRequest]] = {}
        self._sub: Subscription | None = None
        self._reference_sub: Subscription | None = None
        self._sub_lock = asyncio.Lock()
        self._hosts: dict[str, HostSubjects] = {}
        self._urls: dict[str, tuple[str, str]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._timers: TimerHub | None = None
        self._options: dict[tuple[float | None, ...], CallerOptions] = {}
        # Shared by all this client's requests: see Limits.window_budget.
        self._growth_budget = GrowthBudget(self.limits.window_budget)
        self.on_event = on_event
        self.stats = TunnelCounters()
        # When each host last answered this client (first frames): a host seen lately may be
        # reconnecting when NATS says nobody serves it; any other host within a millisecond or two.
        self._seen: dict[str, float] = {}
        self._compact_starts = CompactStarts(HOST_CACHE_SIZE)
        # Per host token: (checked at, whether a non-server subscriber watches its subjects).
        self._watchers: dict[str, tuple[float, bool]] = {}
        # Per prefix: (checked at, whether something taps readiness subjects no server holds).
        self._ready_tapped: dict[str, tuple[float, bool]] = {}

    # The attributes ``timeouts`` and ``limits`` replace: read-only, deprecated (one release).

    @property
    def timeout(self) -> float | None:
        return _renamed("timeout", "timeouts.total", self.timeouts.total)

    @property
    def first_frame_timeout(self) -> float | None:
        return _renamed("first_frame_timeout", "timeouts.first_frame", self.timeouts.first_frame)

    @property
    def idle_timeout(self) -> float | None:
        return _renamed("idle_timeout", "timeouts.idle", self.timeouts.idle)

    @property
    def unreachable_grace(self) -> float:
        return _renamed("unreachable_grace", "timeouts.unreachable_grace", self.timeouts.unreachable_grace)

    @property
    def republish_interval(self) -> float:
        return _renamed("republish_interval", "timeouts.republish_interval", self.timeouts.republish_interval)

    @property
    def window(self) -> int:
        return _renamed("window", "limits.window", self.limits.window)

    @property
    def max_chunk(self) -> int:
        return _renamed("max_chunk", "limits.max_chunk", self.limits.max_chunk)

    @property
    def in_flight(self) -> int:
        return len(self._streams)

    @property
    def protocol_errors(self) -> int:
        """Frames we could not decode or attribute (dropped)."""
        return self.stats.frames_dropped

    async def _ensure_subscribed(self) -> None:
        if self._sub is not None:
            return
        async with self._sub_lock:
            if self._sub is None:
                try:
                    # A server under the reference daemon permissions may publish only to
                    # P.req.<id>.reply, whatever reply subject we named: hear those too.
                    self._reference_sub = await subscribe_direct(
                        self.nc, reference_reply_wildcard(self.prefix), self._on_message
                    )
                    self._sub = await subscribe_direct(
                        self.nc, client_reply_wildcard(self.prefix, self.client_id), self._on_message
                    )
                except (NatsError, OSError) as exc:
                    raise map_nats_error(exc) from exc

    def _on_message(self, msg: Msg) -> None:
        """A frame for one of our requests, or a batch of them (``replyBatches``), handled
        where nats-py reads it (see ``direct``)."""
        parsed = parse_request_subject(msg.subject, self.prefix)
        if parsed is None:
            return
        token, request_id, _ = parsed
        data = msg.data
        if reply_batch.is_reply_batch(data):
            self._on_reply_batch(token, data)
            return
        if status_of(msg) == "503" and not data:
            self._on_no_responders(token, request_id)
            return
        req = self._request_from(token, request_id)
        if req is not None:
            self._on_frame_bytes(req, request_id, data)

    def _on_no_responders(self, token: str, request_id: str) -> None:
        """NATS said nobody got the start of ``request_id``: nor the others of its start batch,
        if it led one (their reply subjects hear nothing), even when it is over itself."""
        req = self._request_from(token, request_id)
        if req is not None:
            req.on_no_responders()
        others = self._start_batches.get(request_id)
        if not others or others[0].stream.subjects.token != token:
            return  # no batch led by it, or not from its host (a batch goes to one host)
        del self._start_batches[request_id]
        for other in others:
            if not other.released:
                other.batch_lead = None
                other.on_no_responders()

    def _join_start_batch(self, lead: _ClientRequest, req: _ClientRequest) -> None:
        """``req``'s start went in the message of ``lead``'s (a start batch)."""
        lead_id = lead.stream.request_id
        others = self._start_batches.get(lead_id)
        if others is None:  # (each entry lives no longer than a request of its batch)
            others = self._start_batches[lead_id] = []
            if not lead.released:
                lead.batch_lead = lead_id
        others.append(req)
        req.batch_lead = lead_id

    def _leave_start_batch(self, req: _ClientRequest) -> None:
        """``req`` is over: its batch need not be remembered for it (nor at all once empty)."""
        lead_id, req.batch_lead = req.batch_lead, None
        others = self._start_batches.get(lead_id or "")
        if lead_id is None or others is None:
            return
        if req in others:
            others.remove(req)
        if not others:
            del self._start_batches[lead_id]

    def _on_reply_batch(self, token: str, data: bytes) -> None:
        """Complete responses of several of our requests to one host, in one message: each as
        if it had come alone on its own reply subject (under the same host's prefix)."""
        try:
            frames = reply_batch.decode(data)
        except f.FrameError as exc:
            self.stats.frames_dropped += 1
            log.warning("dropped a malformed reply batch from host token %s: %s", token, exc.message)
            return
        for request_id, frame in frames:
            req = self._request_from(token, request_id)
            if req is not None:
                self._on_frame_bytes(req, request_id, frame)

    def _request_from(self, token: str, request_id: str) -> _ClientRequest | None:
        """The request a frame from host ``token`` is for, if it is ours and still going."""
        req = self._streams.get(request_id)
        if req is None:
            return None  # late frame of a finished request
        if token != req.stream.subjects.token:
            # Only host H may publish under H's prefix: a frame from elsewhere is forged.
            self.stats.frames_dropped += 1
            log.warning("dropped a frame for request %s from the wrong host token %s", request_id, token)
            return None
        return req

    def _on_frame_bytes(self, req: _ClientRequest, request_id: str, data: bytes) -> None:
        try:
            frame = codec.decode_frame(data, request_id)
        except f.FrameError as exc:
            self.stats.frames_dropped += 1
            req._fail_and_abort_soon(RemoteProtocolError(f"malformed frame from server: {exc.message}"))
            return
        req.on_frame(frame)

    async def fetch(
        self,
        url: str,
        *,
        method: str = "GET",
        headers: HeadersArg = None,
        body: Body = None,
        timeout: float | None = _UNSET,
        first_frame_timeout: float | None = _UNSET,
        idle_timeout: float | None = _UNSET,
        timeouts: Timeouts | None = None,
        upgrade: bool = False,
    ) -> FetchResponse:
        """Send one request; returns once the response head arrived.

        The body streams from ``FetchResponse.aiter_bytes()``. Raises a ``TunnelError``
        subclass on failure: ``TunnelUnreachable`` within milliseconds when nobody
        serves the host, a ``TunnelTimeout`` per the three timeouts, and so on.

        Timeouts: ``timeouts`` replaces the client's :class:`Timeouts` for this request
        as a whole; ``timeout`` (total), ``first_frame_timeout`` and ``idle_timeout``
        override one of them (of ``timeouts`` when given), handy for one-off changes.

        ``upgrade=True`` asks for an upgraded stream (send the ``Upgrade`` headers yourself,
        or use :func:`tunnel.websocket.websocket_connect`). A 101 answer opens it: the
        response body is the server's direction, ``body`` (an async iterable, pulled as the
        stream goes) ours, and its end our half-close; ``aclose()`` ends both. Any other
        status is an ordinary response. A server that cannot carry upgrades raises
        :class:`tunnel.UpgradeUnsupported`.
        """
        parsed = self._urls.get(url) if isinstance(url, str) else None
        if parsed is None:
            # Callers repeat their URLs: parse (and validate) each one once. Bad URLs raise
            # here and are never cached; the cache is bounded like the others.
            parsed = parse_tunnel_url(url)
            if len(self._urls) >= HOST_CACHE_SIZE:
                self._urls.clear()
            self._urls[url] = parsed
        hostname, target = parsed
        method = f.validate_method(method)
        header_list = _normalize_headers(headers) if headers else []
        base = self.timeouts if timeouts is None else timeouts
        total = base.total if timeout is _UNSET else timeout
        first = base.first_frame if first_frame_timeout is _UNSET else first_frame_timeout
        idle = base.idle if idle_timeout is _UNSET else idle_timeout
        if body is not None and isinstance(body, _TEXT_OR_BYTES) and len(body) == 0:
            body = None
        if self._sub is None and self.shared_replies:
            await self._ensure_subscribed()
        loop = asyncio.get_running_loop()
        if self._timers is None:
            self._timers = TimerHub(loop)
        subjects = self._subjects_for(hostname)
        request_id = new_request_id()
        options = self._options_for(first, idle, total, base)
        first_contact = self._first_contact(hostname, loop.time())
        compact = self._compact_starts.use(hostname)
        deadline_ms = int((time.time() + total) * 1000) if total else None
        stream = CallerStream(
            request_id=request_id,
            subjects=subjects,
            reply_subject=(
                subjects.client_reply(request_id, self.client_id)
                if self.shared_replies
                else subjects.reply(request_id)
            ),
            method=method,
            url=target,
            headers=header_list,
            has_body=body is not None,
            options=options,
            clock=loop.time,
            deadline_unix_ms=deadline_ms,
            upgrade=upgrade,
            first_contact=first_contact,
            compact_start=compact,
        )
        req = _ClientRequest(self, stream, hostname, body)
        self._streams[request_id] = req
        stats = self.stats
        stats.requests += 1
        stats.active = len(self._streams)
        if self.on_event is not None:
            emit(self.on_event, TunnelEvent(REQUEST_STARTED, "client", hostname, request_id, method, target))
        try:
            if not self.shared_replies:
                try:
                    # Same connection: NATS sees this SUB before the start we publish next.
                    req.sub = await subscribe_direct(self.nc, stream.reply_subject, self._on_message)
                except (NatsError, OSError) as exc:
                    raise map_nats_error(exc) from exc
            start = stream.start()
            if stream.compact_start and body is None and not upgrade and self._compact_starts.batch(hostname):
                lead = await self.publisher.send_batched(
                    start, kind=f.KIND_START_BATCH, key=start.subject, label=stream.reply_subject, owner=req
                )
                if lead is not req:
                    self._join_start_batch(lead, req)
            else:
                await self.publisher.send(start)
            self._timers.add(req, stream.next_deadline())
            head = await req.head
        except BaseException as exc:
            if isinstance(exc, TunnelError):
                req.stream.fail(exc)
            await req.close()
            raise
        return FetchResponse(req, head)

    def _saw_serving(self, hostname: str, stream: CallerStream) -> None:
        """``stream`` got its first frame: the host is served, and its server told us whether
        it takes compact starts."""
        now = stream.clock()
        if len(self._seen) >= HOST_CACHE_SIZE:
            self._seen.clear()
        self._seen[hostname] = now
        if stream.compact_start_unanswered:
            self._compact_starts.unanswered(hostname, now)
        elif stream.server_takes_compact_starts is not None:  # an error first frame says nothing
            self._compact_starts.learn(
                hostname, stream.server_takes_compact_starts, now, stream.server_takes_start_batches
            )

    def _first_contact(self, hostname: str, now: float) -> bool:
        seen = self._seen.get(hostname)
        return seen is None or now - seen > RECENTLY_SEEN

    async def _presence_evidence(self, subjects: HostSubjects) -> PresenceEvidence:
        """What NATS can say about a silent host (see ``CallerStream.on_presence_check``).

        Three interest checks at once (each deterministic, see ``_has_interest``): the host's
        subjects watched by a non-server; the readiness namespace tapped (a subject in it that
        no server holds); the host's own readiness subject held.
        """
        before = self.nc.last_error
        watched, ready_tapped, ready = await asyncio.gather(
            self._watched_by_non_server(subjects),
            self._ready_subjects_tapped(subjects.prefix),
            self._has_interest(subjects.ready, b""),
        )
        if not watched:
            return PresenceEvidence.UNWATCHED
        refused = permission_refused(self.nc.last_error, before, "publish to", f"{subjects.prefix}_ready.")
        if ready_tapped or refused:  # interest there proves nothing: NATS cannot tell
            return PresenceEvidence.UNKNOWN
        return PresenceEvidence.SERVER_READY if ready else PresenceEvidence.NO_SERVER

    async def _ready_subjects_tapped(self, prefix: str) -> bool:
        """Does something subscribe readiness subjects no server holds (a tap on ``>``)?"""
        return await self._cached_interest(self._ready_tapped, prefix, unheld_ready_subject(prefix))

    async def _cached_interest(self, cache: dict[str, tuple[float, bool]], key: str, subject: str) -> bool:
        """``_has_interest`` remembered per key for RECENTLY_SEEN: taps are an operator's and come
        and go rarely; the cache is bounded like the others."""
        now = asyncio.get_running_loop().time()
        cached = cache.get(key)
        if cached is not None and now - cached[0] < RECENTLY_SEEN:
            return cached[1]
        interest = await self._has_interest(subject, b"")
        if len(cache) >= HOST_CACHE_SIZE:
            cache.clear()
        cache[key] = (now, interest)
        return interest

    async def _watched_by_non_server(self, subjects: HostSubjects) -> bool:
        """Does something other than a server receive this host's subjects (a monitoring tap)?

        Deterministic, no timing (see ``_has_interest``): the subject is one of the host's that no
        server ever subscribes (the v1 body subject of a request id nobody has).
        """
        return await self._cached_interest(self._watchers, subjects.token, subjects.body(new_request_id()))

    async def _host_has_server(self, subjects: HostSubjects) -> bool:
        """Does any server of this host still listen? Every server subscribes ``P.req.*.abort``,
        so NATS answers no-responders to an abort (of a request id nobody has) only when none
        is left. A harmless frame: servers drop aborts of ids they never saw."""
        probe_id = new_request_id()
        frame = codec.encode_frame(f.Abort(probe_id, "liveness probe"))
        return await self._has_interest(subjects.abort(probe_id), frame)

    async def _has_interest(self, subject: str, payload: bytes) -> bool:
        """Whether NATS has a subscriber for ``subject``, without timing anything.

        Publish with a reply inbox, then flush: NATS answers no-responders before it answers a
        PING that follows the PUB, and nats-py queues that answer before it completes the
        flush, so no answer queued means someone has interest.
        """
        # An inbox of its own: NATS sends no-responders once, to one subscription matching the
        # reply subject, so it must not be one our reply wildcard also matches.
        reply = self.nc.new_inbox()
        try:
            sub = await self.nc.subscribe(reply)  # no callback: its queue counts answers exactly
            try:
                await self.publisher.send(Publish(subject, payload, reply))  # wire taps see it too
                # Its PONG comes after NATS's answer to the PUB.
                await flush_everything(self.nc)
                return sub.pending_msgs == 0
            finally:
                with contextlib.suppress(NatsError, OSError):
                    await sub.unsubscribe()
        except (NatsError, OSError) as exc:
            raise map_nats_error(exc) from exc

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _unsubscribe_soon(self, sub: Subscription) -> None:
        async def unsubscribe() -> None:
            with contextlib.suppress(NatsError, OSError):
                await sub.unsubscribe()

        task = asyncio.get_running_loop().create_task(unsubscribe())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _subjects_for(self, hostname: str) -> HostSubjects:
        subjects = self._hosts.get(hostname)
        if subjects is None:
            if len(self._hosts) >= HOST_CACHE_SIZE:
                self._hosts.clear()
            subjects = self._hosts[hostname] = HostSubjects.for_host(hostname, self.prefix)
        return subjects

    def _options_for(
        self, first: float | None, idle: float | None, total: float | None, timeouts: Timeouts
    ) -> CallerOptions:
        grace, republish = timeouts.unreachable_grace, timeouts.republish_interval
        presence, fallback = timeouts.presence, timeouts.presence_fallback
        key = (first, idle, total, grace, republish, presence, fallback, self.nc.max_payload)
        options = self._options.get(key)
        if options is None:
            if len(self._options) >= HOST_CACHE_SIZE:
                self._options.clear()
            options = self._options[key] = CallerOptions(
                first_frame_timeout=first,
                idle_timeout=idle,
                total_timeout=total,
                republish_interval=republish,
                unreachable_grace=grace,
                window=self.limits.window,
                max_window=self.limits.effective_max_window,
                growth_budget=self._growth_budget,
                max_chunk=self.limits.max_chunk,
                max_payload=self.nc.max_payload,
                heartbeat_interval=heartbeat_interval_for(idle),
                fast_path=self.fast_path,
                presence_timeout=timeouts.presence,
                presence_fallback=timeouts.presence_fallback,
            )
        return options

    async def aclose(self) -> None:
        """Abort everything in flight and drop the subscription."""
        for req in list(self._streams.values()):
            await req.close()
        for sub in (self._sub, self._reference_sub):
            if sub is not None:
                with contextlib.suppress(NatsError, OSError):
                    await sub.unsubscribe()
        self._sub = self._reference_sub = None

    async def __aenter__(self) -> TunnelClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


_V = TypeVar("_V")


def _renamed(old: str, new: str, value: _V) -> _V:
    warnings.warn(
        f"TunnelClient.{old} is deprecated and goes away in the next release; use TunnelClient.{new}",
        DeprecationWarning,
        stacklevel=3,
    )
    return value


_clients: weakref.WeakKeyDictionary[NATS, dict[str, TunnelClient]] = weakref.WeakKeyDictionary()


def client_for(nc: NATS, prefix: str = DEFAULT_PREFIX) -> TunnelClient:
    """The shared default client of a connection (one subscription per connection and prefix)."""
    per_nc = _clients.setdefault(nc, {})
    client = per_nc.get(prefix)
    if client is None:
        client = per_nc[prefix] = TunnelClient(nc, prefix=prefix)
    return client


async def fetch(
    nc: NATS, url: str, *, prefix: str = DEFAULT_PREFIX, **options: Unpack[FetchOptions]
) -> FetchResponse:
    """Fetch ``tunnel://host/path`` over ``nc`` with the connection's shared client
    (:func:`client_for`); ``options`` (``method``, ``headers``, ``body``, the timeouts)
    as for :meth:`TunnelClient.fetch`."""
    return await client_for(nc, prefix).fetch(url, **options)
