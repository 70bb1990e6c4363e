"""A minimal v1-only tunnel peer, written from shared/PROTOCOL-v1-reference.md alone.

It stands in for the existing TypeScript transport in the interop tests, so it
deliberately imports nothing from ``tunnel``: only nats-py, ``json`` and
``base64``. It speaks plain ``tunnel.v1`` JSON frames and nothing else.

- ``V1Caller``: subscribes ``P.req.<id>.reply``, publishes ``request.start`` to
  ``P.request`` and republishes it every second until the first response frame,
  streams the request body (``request.chunk``/``request.end`` on the body
  subject, at most 64 KiB per chunk) only after that first frame, ignores
  ``response.ack``, reads ``response.start``/chunks/``response.end``, turns
  ``response.error`` into ``V1Error(code)``, expects no body for HEAD and
  204/205/304, and has abort, overall and idle timeouts.
- ``V1Server``: queue-subscribes ``P.request`` (group ``tunnel_v1_host_<token>``)
  and ``P.req.*.abort``, re-acks repeated ids, subscribes the body subject,
  sends ``response.ack``, runs a handler, sends ``response.start``, base64url
  ``response.chunk`` frames (seq from 0) and ``response.end``; a failing handler
  gives ``response.error`` ``tunnel_handler_error``; an abort cancels the handler.

Being a test peer, both are stricter observers than the reference: every frame
type a v1 peer does not know, every binary payload, every missing or mistyped
field, every sequence gap and every field a v1 frame does not have is recorded
(``unknown_frames``, ``violations``, ``extra_fields``) so the tests can assert
that our side never sent a v1 peer anything but plain v1.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

DEFAULT_PREFIX = "tunnel.v1"  # the current reference's; older ones used "_tunnel.v1"
PROTOCOL = "tunnel.v1"
# The reference caller sends at most this much body per request.chunk.
MAX_REQUEST_CHUNK = 64 * 1024
# Our V1Server slices response bodies the same way.
DEFAULT_RESPONSE_CHUNK = 64 * 1024
REPUBLISH_INTERVAL = 1.0
FIRST_FRAME_TIMEOUT = 30.0
# The reference server remembers request ids this long, bounded in number.
SEEN_TTL = 60.0
SEEN_LIMIT = 10_000
# "An abort for an unknown id is remembered briefly."
EARLY_ABORT_TTL = 10.0
NO_BODY_STATUSES = frozenset({204, 205, 304})

# Every v1 frame type with (required fields, optional fields), as the reference table lists them.
V1_FIELDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "request.start": (
        frozenset(
            {"type", "protocol", "requestId", "method", "url", "headers", "replySubject", "abortSubject"}
        ),
        frozenset({"bodySubject", "deadlineUnixMs"}),
    ),
    "request.chunk": (frozenset({"type", "requestId", "seq", "data"}), frozenset()),
    "request.end": (frozenset({"type", "requestId", "seq"}), frozenset()),
    "request.error": (frozenset({"type", "requestId", "code", "message"}), frozenset()),
    "response.ack": (frozenset({"type", "requestId"}), frozenset()),
    "response.start": (frozenset({"type", "requestId", "status", "headers"}), frozenset({"statusText"})),
    "response.chunk": (frozenset({"type", "requestId", "seq", "data"}), frozenset()),
    "response.end": (frozenset({"type", "requestId", "seq"}), frozenset()),
    "response.error": (frozenset({"type", "requestId", "code", "message"}), frozenset()),
    "abort": (frozenset({"type", "requestId"}), frozenset({"reason"})),
}
RESPONSE_TYPES = frozenset(
    {"response.ack", "response.start", "response.chunk", "response.end", "response.error"}
)
REQUEST_BODY_TYPES = frozenset({"request.chunk", "request.end", "request.error"})

_ID_RE = re.compile(r"[A-Za-z0-9_-]+")
_B64URL_RE = re.compile(r"[A-Za-z0-9_-]*")

Headers = list[tuple[str, str]]


class V1Error(Exception):
    """A failed v1 call, with the stable code the reference peer would report."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def host_token(hostname: str) -> str:
    """``b64url_nopad(utf8(hostname))``; an empty or blank hostname is an error."""
    if not hostname.strip():
        raise ValueError("empty hostname")
    return b64url(hostname.encode("utf-8"))


def host_base(hostname: str, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}.host.{host_token(hostname)}"


def dumps(frame: dict[str, Any]) -> bytes:
    return json.dumps(frame, separators=(",", ":")).encode("utf-8")


def split_tunnel_url(url: str) -> tuple[str, str]:
    """``tunnel://<hostname>/<path>?<query>`` -> (hostname, path+query); only path+query travel."""
    if not url.startswith("tunnel://"):
        raise ValueError(f"not a tunnel URL: {url!r}")
    rest = url[len("tunnel://") :].split("#", 1)[0]
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i != -1), default=len(rest))
    hostname, target = rest[:cut], rest[cut:]
    if not target.startswith("/"):
        target = "/" + target
    return hostname, target


class FrameLog:
    """What a v1 peer saw that it should not have: unknown frames, malformed fields, extras."""

    def __init__(self) -> None:
        self.unknown_frames: list[tuple[str, bytes]] = []  # (subject, payload) a v1 peer cannot read
        self.violations: list[str] = []  # known frame type, but wrong fields, seq or data
        self.extra_fields: list[tuple[str, tuple[str, ...]]] = []  # (type, fields v1 does not define)

    def check(self, subject: str, payload: bytes, allowed: Iterable[str], request_id: str | None) -> Any:
        """Return the frame as a dict if it is a well-formed v1 frame of an allowed type, else None."""
        if not payload or payload[:1] != b"{":
            self.unknown_frames.append((subject, payload))  # binary (or empty): not a v1 frame
            return None
        try:
            obj = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            self.unknown_frames.append((subject, payload))
            return None
        kind = obj.get("type") if isinstance(obj, dict) else None
        if kind not in V1_FIELDS or kind not in allowed:
            self.unknown_frames.append((subject, payload))
            return None
        required, optional = V1_FIELDS[kind]
        missing = required - obj.keys()
        if missing:
            self.violations.append(f"{kind} on {subject} lacks {sorted(missing)}")
            return None
        extra = obj.keys() - required - optional
        if extra:
            self.extra_fields.append((kind, tuple(sorted(extra))))
        rid = obj["requestId"]
        if not isinstance(rid, str) or not _ID_RE.fullmatch(rid):
            self.violations.append(f"{kind} on {subject} has an invalid requestId {rid!r}")
            return None
        if request_id is not None and rid != request_id:
            self.violations.append(f"{kind} on {subject} names request {rid}, expected {request_id}")
            return None
        problem = _field_problem(obj)
        if problem:
            self.violations.append(f"{kind} on {subject}: {problem}")
            return None
        return obj


def _field_problem(obj: dict[str, Any]) -> str | None:
    kind = obj["type"]
    if "seq" in obj and (type(obj["seq"]) is not int or obj["seq"] < 0):
        return f"bad seq {obj['seq']!r}"
    if "data" in obj:
        data = obj["data"]
        if not isinstance(data, str) or not _B64URL_RE.fullmatch(data) or len(data) % 4 == 1:
            return "data is not unpadded base64url"
        try:
            unb64url(data)
        except (binascii.Error, ValueError):
            return "data does not decode"
    if "headers" in obj and not _headers_ok(obj["headers"]):
        return "headers are not a list of [name, value] string pairs"
    if kind == "response.start":
        if type(obj["status"]) is not int or not 100 <= obj["status"] <= 599:
            return f"status {obj['status']!r} out of range"
        if "statusText" in obj and not isinstance(obj["statusText"], str):
            return "statusText is not a string"
    if kind == "request.start":
        if obj["protocol"] != PROTOCOL:
            return f"protocol {obj['protocol']!r}"
        for key in ("method", "url", "replySubject", "abortSubject"):
            if not isinstance(obj[key], str):
                return f"{key} is not a string"
        if "bodySubject" in obj and not isinstance(obj["bodySubject"], str):
            return "bodySubject is not a string"
        if "deadlineUnixMs" in obj and type(obj["deadlineUnixMs"]) is not int:
            return "deadlineUnixMs is not an integer"
    if kind in ("request.error", "response.error") and not (
        isinstance(obj["code"], str) and isinstance(obj["message"], str)
    ):
        return "code and message must be strings"
    if kind == "abort" and "reason" in obj and not isinstance(obj["reason"], str):
        return "reason is not a string"
    return None


def _headers_ok(headers: Any) -> bool:
    return isinstance(headers, list) and all(
        isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)
        for pair in headers
    )


async def _pieces(body: bytes | AsyncIterable[bytes] | Iterable[bytes]) -> AsyncIterator[bytes]:
    if isinstance(body, bytes | bytearray | memoryview):
        yield bytes(body)
    elif isinstance(body, AsyncIterable):
        async for piece in body:
            yield bytes(piece)
    else:
        for piece in body:
            yield bytes(piece)


# ============================================================================ caller


@dataclass
class V1Head:
    status: int
    status_text: str | None
    headers: Headers
    has_body: bool


@dataclass
class V1Result:
    status: int
    status_text: str | None
    headers: Headers
    body: bytes


class V1Call:
    """One request of a ``V1Caller``: ``response()`` for the head, then ``iter_body()``/``read()``."""

    def __init__(
        self,
        caller: V1Caller,
        *,
        base: str,
        method: str,
        target: str,
        headers: Headers,
        body: bytes | AsyncIterable[bytes] | Iterable[bytes] | None,
        timeout: float | None,
        idle_timeout: float | None,
        first_frame_timeout: float,
        deadline_unix_ms: int | None,
        request_id: str | None = None,
    ) -> None:
        self.caller = caller
        self.nc = caller.nc
        self.request_id = request_id or secrets.token_hex(16)
        self.method = method
        self.reply_subject = f"{base}.req.{self.request_id}.reply"
        self.abort_subject = f"{base}.req.{self.request_id}.abort"
        self.body_subject = f"{base}.req.{self.request_id}.body" if body is not None else None
        self.request_subject = f"{base}.request"
        start: dict[str, Any] = {
            "type": "request.start",
            "protocol": PROTOCOL,
            "requestId": self.request_id,
            "method": method,
            "url": target,
            "headers": [[n, v] for n, v in headers],
            "replySubject": self.reply_subject,
            "abortSubject": self.abort_subject,
        }
        if self.body_subject is not None:
            start["bodySubject"] = self.body_subject
        if deadline_unix_ms is not None:
            start["deadlineUnixMs"] = deadline_unix_ms
        self.start_frame = start
        self._start_payload = dumps(start)
        self._body = body
        self._idle_timeout = idle_timeout
        self._first_frame_timeout = first_frame_timeout
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._opened_at = loop.time()
        self._deadline = self._opened_at + timeout if timeout is not None else None
        #: Every v1 frame received on the reply subject, in order (acks included).
        self.received: list[dict[str, Any]] = []
        #: How often the start frame was published (1 + republishes).
        self.starts_published = 0
        self.first_frame_at: float | None = None
        self.body_sent_chunks: list[int] = []  # size of each request.chunk sent
        self.head: V1Head | None = None
        self.finished = False  # the response ended (end, error, no-body head)
        self.aborted_with: str | None = None
        self._queue: asyncio.Queue[dict[str, Any] | V1Error] = asyncio.Queue()
        self._first = asyncio.Event()
        self._sub: Subscription | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._body_seq = 0
        self._body_bytes = 0

    # -- lifecycle -------------------------------------------------------------------

    async def _open(self) -> None:
        self._sub = await self.nc.subscribe(self.reply_subject, cb=self._on_msg)
        await self._publish_start()
        self._tasks.append(self._loop.create_task(self._republish_until_first_frame()))

    async def _publish_start(self) -> None:
        self.starts_published += 1
        await self.nc.publish(self.request_subject, self._start_payload)

    async def republish(self) -> None:
        """Publish the identical start frame once more (what a lost-frame retry looks like)."""
        await self._publish_start()

    async def _republish_until_first_frame(self) -> None:
        give_up = self._opened_at + self._first_frame_timeout
        interval = self.caller.republish_interval
        while not self._first.is_set():
            wait = min(interval, give_up - self._loop.time())
            if wait <= 0:
                self._queue.put_nowait(V1Error("tunnel_no_first_frame", "no frame from a server"))
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._first.wait(), wait)
            if not self._first.is_set() and self._loop.time() < give_up:
                await self._publish_start()

    async def _on_msg(self, msg: Msg) -> None:
        frame = self.caller.log.check(msg.subject, msg.data, RESPONSE_TYPES, self.request_id)
        if frame is None:
            # A v1 peer cannot read it: the call fails loudly (and the log keeps the evidence).
            self._queue.put_nowait(V1Error("v1_unreadable_frame", repr(msg.data[:80])))
            return
        self.received.append(frame)
        if not self._first.is_set():
            self._first.set()
            self.first_frame_at = self._loop.time()
            if self._body is not None and not self.finished:
                self._tasks.append(self._loop.create_task(self._send_body()))
        if frame["type"] != "response.ack":  # acks only mean "a server took it"
            self._queue.put_nowait(frame)

    async def _send_body(self) -> None:
        assert self._body is not None and self.body_subject is not None
        try:
            async for piece in _pieces(self._body):
                for offset in range(0, len(piece), MAX_REQUEST_CHUNK):
                    data = piece[offset : offset + MAX_REQUEST_CHUNK]
                    frame = {
                        "type": "request.chunk",
                        "requestId": self.request_id,
                        "seq": self._body_seq,
                        "data": b64url(data),
                    }
                    await self.nc.publish(self.body_subject, dumps(frame))
                    self._body_seq += 1
                    self._body_bytes += len(data)
                    self.body_sent_chunks.append(len(data))
        except Exception as exc:
            error = {
                "type": "request.error",
                "requestId": self.request_id,
                "code": "tunnel_body_error",
                "message": f"request body failed: {type(exc).__name__}",
            }
            await self.nc.publish(self.body_subject, dumps(error))
            return
        end = {"type": "request.end", "requestId": self.request_id, "seq": self._body_seq}
        await self.nc.publish(self.body_subject, dumps(end))

    async def abort(self, reason: str = "tunnel_aborted") -> None:
        """Publish ``abort`` (unless the response already ended) and stop the call (idempotent)."""
        if self.aborted_with is None and not self.finished:
            self.aborted_with = reason
            frame = {"type": "abort", "requestId": self.request_id, "reason": reason}
            await self.nc.publish(self.abort_subject, dumps(frame))
            await self.nc.flush()
        self._finish()

    async def close(self) -> None:
        """Leave: abort if the response is not complete, then unsubscribe.

        The subscription lives until here (not just until the response ended) so a test
        can see what a server sends after the end, e.g. the re-ack of a repeated start.
        """
        if not self.finished:
            await self.abort("caller closed the response")
        if self._sub is not None:
            sub, self._sub = self._sub, None
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def _finish(self) -> None:
        self.finished = True
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        self._tasks = []

    # -- reading ---------------------------------------------------------------------

    async def _next(self, *, idle: bool) -> dict[str, Any]:
        """The next non-ack frame, honouring the overall timeout (and the idle one while reading)."""
        waits: list[tuple[float, str]] = []
        now = self._loop.time()
        if self._deadline is not None:
            waits.append((self._deadline - now, "tunnel_timeout"))
        if idle and self._idle_timeout is not None:
            waits.append((self._idle_timeout, "tunnel_idle_timeout"))
        if waits:
            wait, code = min(waits)
            try:
                item = await asyncio.wait_for(self._queue.get(), max(0.0, wait))
            except TimeoutError:
                await self.abort(code)
                raise V1Error(code, "timed out") from None
        else:
            item = await self._queue.get()
        if isinstance(item, V1Error):
            self._finish()
            raise item
        if item["type"] == "response.error":
            self._finish()
            raise V1Error(item["code"], item["message"])
        return item

    async def response(self) -> V1Head:
        """Wait for ``response.start`` (acks are ignored)."""
        if self.head is not None:
            return self.head
        frame = await self._next(idle=False)
        if frame["type"] != "response.start":
            self.caller.log.violations.append(f"{frame['type']} before response.start")
            await self.abort("tunnel_protocol_error")
            raise V1Error("tunnel_protocol_error", f"{frame['type']} before response.start")
        has_body = not (self.method == "HEAD" or frame["status"] in NO_BODY_STATUSES)
        self.head = V1Head(
            frame["status"], frame.get("statusText"), [(n, v) for n, v in frame["headers"]], has_body
        )
        if not has_body:
            self._finish()
        return self.head

    async def iter_body(self) -> AsyncIterator[bytes]:
        head = await self.response()
        if not head.has_body:
            return
        expected = 0
        while True:
            frame = await self._next(idle=True)
            kind = frame["type"]
            if kind == "response.chunk":
                if frame["seq"] != expected:
                    self.caller.log.violations.append(
                        f"response.chunk seq {frame['seq']}, expected {expected}"
                    )
                expected += 1
                yield unb64url(frame["data"])
            elif kind == "response.end":
                if frame["seq"] != expected:
                    self.caller.log.violations.append(
                        f"response.end seq {frame['seq']} after {expected} chunks"
                    )
                self._finish()
                return
            else:
                self.caller.log.violations.append(f"{kind} inside the response body")
                await self.abort("tunnel_protocol_error")
                raise V1Error("tunnel_protocol_error", f"{kind} inside the response body")

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.iter_body()])


class V1Caller:
    """Calls ``tunnel://`` URLs the way the reference v1 caller does."""

    def __init__(
        self,
        nc: Client,
        *,
        prefix: str = DEFAULT_PREFIX,
        republish_interval: float = REPUBLISH_INTERVAL,
        first_frame_timeout: float = FIRST_FRAME_TIMEOUT,
    ) -> None:
        self.nc = nc
        self.prefix = prefix
        self.republish_interval = republish_interval
        self.first_frame_timeout = first_frame_timeout
        self.log = FrameLog()
        self.calls: list[V1Call] = []

    @property
    def unknown_frames(self) -> list[tuple[str, bytes]]:
        return self.log.unknown_frames

    async def open(
        self,
        url: str,
        *,
        method: str = "GET",
        headers: Iterable[tuple[str, str]] = (),
        body: bytes | AsyncIterable[bytes] | Iterable[bytes] | None = None,
        timeout: float | None = None,
        idle_timeout: float | None = None,
        deadline_unix_ms: int | None = None,
        request_id: str | None = None,
    ) -> V1Call:
        """Publish the start; returns at once (use ``response()`` and ``read()`` on the call)."""
        hostname, target = split_tunnel_url(url)
        call = V1Call(
            self,
            base=host_base(hostname, self.prefix),
            method=method,
            target=target,
            headers=list(headers),
            body=body,
            timeout=timeout,
            idle_timeout=idle_timeout,
            first_frame_timeout=self.first_frame_timeout,
            deadline_unix_ms=deadline_unix_ms,
            request_id=request_id,
        )
        self.calls.append(call)
        await call._open()
        return call

    async def request(
        self,
        url: str,
        *,
        method: str = "GET",
        headers: Iterable[tuple[str, str]] = (),
        body: bytes | AsyncIterable[bytes] | Iterable[bytes] | None = None,
        timeout: float | None = None,
        idle_timeout: float | None = None,
        deadline_unix_ms: int | None = None,
    ) -> V1Result:
        """One whole request: head and body, or ``V1Error``."""
        call = await self.open(
            url,
            method=method,
            headers=headers,
            body=body,
            timeout=timeout,
            idle_timeout=idle_timeout,
            deadline_unix_ms=deadline_unix_ms,
        )
        try:
            head = await call.response()
            data = await call.read()
        finally:
            await call.close()
        return V1Result(head.status, head.status_text, head.headers, data)


# ============================================================================ server


@dataclass
class V1Reply:
    status: int = 200
    headers: Headers = field(default_factory=list)
    body: bytes | AsyncIterable[bytes] | Iterable[bytes] | None = None
    status_text: str | None = None


class V1ServerRequest:
    """What a ``V1Server`` handler sees."""

    def __init__(self, start: dict[str, Any]) -> None:
        self.start = start
        self.request_id: str = start["requestId"]
        self.method: str = start["method"]
        self.url: str = start["url"]
        self.headers: Headers = [(n, v) for n, v in start["headers"]]
        self.deadline_unix_ms: int | None = start.get("deadlineUnixMs")
        self.has_body = "bodySubject" in start
        self._chunks: asyncio.Queue[bytes | V1Error | None] = asyncio.Queue()
        self.next_seq = 0
        self.body_ended = not self.has_body

    def header_values(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]

    async def stream(self) -> AsyncIterator[bytes]:
        if not self.has_body:
            return
        while True:
            item = await self._chunks.get()
            if item is None:
                return
            if isinstance(item, V1Error):
                raise item
            yield item

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.stream()])


V1Handler = Callable[[V1ServerRequest], Awaitable[V1Reply]]


@dataclass
class _Active:
    request: V1ServerRequest
    reply_subject: str
    task: asyncio.Task[None] | None = None
    body_sub: Subscription | None = None


class V1Server:
    """Serves one hostname the way the reference v1 server does."""

    def __init__(
        self,
        nc: Client,
        hostname: str,
        handler: V1Handler,
        *,
        prefix: str = DEFAULT_PREFIX,
        chunk_size: int = DEFAULT_RESPONSE_CHUNK,
    ) -> None:
        self.nc = nc
        self.hostname = hostname
        self.handler = handler
        self.prefix = prefix
        self.token = host_token(hostname)
        self.base = host_base(hostname, prefix)
        self.chunk_size = chunk_size
        self.log = FrameLog()
        #: Every request.start received (repeats included), as decoded JSON.
        self.starts: list[dict[str, Any]] = []
        #: Request ids whose handler ran (each at most once).
        self.handled: list[str] = []
        self.repeated: list[str] = []  # ids of starts answered with only another ack
        self.aborts: list[tuple[str, str | None]] = []  # (request id, reason) of every abort received
        self.cancelled: list[str] = []  # ids whose handler/stream was cancelled by an abort
        self.completed: list[str] = []  # ids answered with response.end
        self.body_frames: list[dict[str, Any]] = []  # every request.chunk/end/error received
        #: Messages under P.> on subjects no v1 peer uses (e.g. an extension's up subject).
        self.stray: list[tuple[str, bytes]] = []
        self._active: dict[str, _Active] = {}
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._early_aborts: dict[str, float] = {}
        self._subs: list[Subscription] = []

    @property
    def unknown_frames(self) -> list[tuple[str, bytes]]:
        return self.log.unknown_frames

    @property
    def in_flight(self) -> int:
        return len(self._active)

    async def start(self) -> V1Server:
        self._subs = [
            await self.nc.subscribe(
                f"{self.base}.request", queue=f"tunnel_v1_host_{self.token}", cb=self._on_start
            ),
            await self.nc.subscribe(f"{self.base}.req.*.abort", cb=self._on_abort),
            await self.nc.subscribe(f"{self.base}.>", cb=self._spy),
        ]
        # Twice: nats-py writes a flush's PING ahead of SUBs still in its buffer.
        await self.nc.flush()
        await self.nc.flush()
        return self

    async def close(self) -> None:
        for active in list(self._active.values()):
            if active.task is not None:
                active.task.cancel()
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs = []

    async def __aenter__(self) -> V1Server:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _send(self, subject: str, frame: dict[str, Any]) -> None:
        await self.nc.publish(subject, dumps(frame))

    def _seen_recently(self, rid: str) -> bool:
        expiry = self._seen.get(rid)
        return expiry is not None and expiry > time.monotonic()

    def _remember(self, rid: str) -> None:
        self._seen[rid] = time.monotonic() + SEEN_TTL
        while len(self._seen) > SEEN_LIMIT:
            self._seen.popitem(last=False)

    async def _spy(self, msg: Msg) -> None:
        rest = msg.subject[len(self.base) + 1 :].split(".")
        v1_subject = rest == ["request"] or (
            len(rest) >= 3
            and rest[0] == "req"
            # body and abort are exactly P.req.<id>.<kind>; replies go where the caller said
            and ((len(rest) == 3 and rest[2] in ("body", "abort")) or rest[2] == "reply")
        )
        if not v1_subject:
            self.stray.append((msg.subject, msg.data))

    async def _on_start(self, msg: Msg) -> None:
        frame = self.log.check(msg.subject, msg.data, {"request.start"}, None)
        if frame is None:
            return
        self.starts.append(frame)
        rid: str = frame["requestId"]
        reply: str = frame["replySubject"]
        ack = {"type": "response.ack", "requestId": rid}
        if rid in self._active or self._seen_recently(rid):
            self.repeated.append(rid)
            await self._send(reply, ack)
            return
        self._remember(rid)
        expiry = self._early_aborts.pop(rid, None)
        if expiry is not None and expiry > time.monotonic():
            self.cancelled.append(rid)  # aborted before it started: never run it
            return
        active = _Active(V1ServerRequest(frame), reply)
        self._active[rid] = active
        body_subject = frame.get("bodySubject")
        if body_subject is not None:

            async def on_body(m: Msg) -> None:
                await self._on_body(active, m)

            active.body_sub = await self.nc.subscribe(body_subject, cb=on_body)
        await self._send(reply, ack)
        active.task = asyncio.get_running_loop().create_task(self._run(active))

    async def _on_body(self, active: _Active, msg: Msg) -> None:
        req = active.request
        frame = self.log.check(msg.subject, msg.data, REQUEST_BODY_TYPES, req.request_id)
        if frame is None:
            return
        self.body_frames.append(frame)
        if req.body_ended:
            self.log.violations.append(f"{frame['type']} after the request body ended")
            return
        kind = frame["type"]
        if kind == "request.chunk":
            if frame["seq"] != req.next_seq:
                self.log.violations.append(f"request.chunk seq {frame['seq']}, expected {req.next_seq}")
            req.next_seq += 1
            req._chunks.put_nowait(unb64url(frame["data"]))
        elif kind == "request.end":
            if frame["seq"] != req.next_seq:
                self.log.violations.append(f"request.end seq {frame['seq']} after {req.next_seq} chunks")
            req.body_ended = True
            req._chunks.put_nowait(None)
        else:
            req.body_ended = True
            req._chunks.put_nowait(V1Error(frame["code"], frame["message"]))

    async def _on_abort(self, msg: Msg) -> None:
        parts = msg.subject.split(".")
        rid = parts[-2]
        frame = self.log.check(msg.subject, msg.data, {"abort"}, rid)
        if frame is None:
            return
        self.aborts.append((rid, frame.get("reason")))
        active = self._active.get(rid)
        if active is None:
            if not self._seen_recently(rid):
                self._early_aborts[rid] = time.monotonic() + EARLY_ABORT_TTL
            return
        if active.task is not None and not active.task.done():
            active.task.cancel()

    async def _run(self, active: _Active) -> None:
        req = active.request
        rid = req.request_id
        reply_subject = active.reply_subject
        self.handled.append(rid)
        try:
            try:
                reply = await self.handler(req)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await self._send(
                    reply_subject,
                    {
                        "type": "response.error",
                        "requestId": rid,
                        "code": "tunnel_handler_error",
                        "message": f"handler failed: {type(exc).__name__}",
                    },
                )
                return
            start: dict[str, Any] = {
                "type": "response.start",
                "requestId": rid,
                "status": reply.status,
                "headers": [[n, v] for n, v in reply.headers],
            }
            if reply.status_text is not None:
                start["statusText"] = reply.status_text
            await self._send(reply_subject, start)
            seq = 0
            body_allowed = not (req.method == "HEAD" or reply.status in NO_BODY_STATUSES)
            if reply.body is not None and body_allowed:
                async for piece in _pieces(reply.body):
                    for offset in range(0, len(piece), self.chunk_size):
                        data = piece[offset : offset + self.chunk_size]
                        chunk = {"type": "response.chunk", "requestId": rid, "seq": seq, "data": b64url(data)}
                        await self._send(reply_subject, chunk)
                        seq += 1
            await self._send(reply_subject, {"type": "response.end", "requestId": rid, "seq": seq})
            self.completed.append(rid)
        except asyncio.CancelledError:
            self.cancelled.append(rid)
        finally:
            self._active.pop(rid, None)
            if active.body_sub is not None:
                with contextlib.suppress(Exception):
                    await active.body_sub.unsubscribe()
