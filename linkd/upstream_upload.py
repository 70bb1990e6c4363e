"""The ``--upstream`` proxy for requests with a body: the answer is read while the body goes up.

Why not httpx here: httpcore writes the whole request body before it reads a byte of the
answer. A local service may answer early and close (a 5 MB PUT refused at once with
``501`` or ``413``, before it read the body); with the body's bytes unread in its socket,
its close sends a TCP reset. The next write then fails, asyncio closes the transport
(both ways) on that write error, and anyio had paused reading while httpcore was writing,
so the answer that arrived (it is still readable in the kernel's buffer) is never read:
httpcore's "read after a write error" finds a closed stream and the caller got ``502
upstream_error ... ReadError`` instead of the service's own ``501``. A service that
answers early and keeps the connection open without reading would even hold the request
until the upload's flow control gave up.

So a request with a body gets its own TCP (or TLS) connection, and h11 (client role)
runs both directions at once: one task uploads the body (streamed, each write drained,
the declared ``Content-Length`` kept honest by :func:`~linkd.upstream_body.length_checked`,
else ``Transfer-Encoding: chunked``), while the handler reads the answer. Whichever comes
first decides:

- the answer's head: it is relayed at once, with its body streamed as it arrives, and
  the upload goes on beside it (a service that streams its answer while it reads, say)
  until the answer ends; then the connection is closed and an unfinished upload stops;
- the upload's end: the service then has ``head_timeout`` for its head, as with httpx;
- the upload failing because the service stopped reading (a reset, a closed socket): its
  answer is still awaited (that is the early answer above);
- the body disagreeing with its ``Content-Length``: ``400 content_length_mismatch`` (after
  the head went out: the connection is aborted, so the service never sees a complete
  request, and the caller's response fails).

Connections are kept alive between such requests (:class:`ConnectionPool`): one whose
request and answer both ended cleanly goes back to a small pool, is watched while idle
(any byte or the close the service sends makes it unusable: a late ``408``, a keep-alive
timeout) and is reused only within :data:`MAX_IDLE_SECONDS` (servers such as Node's
close idle connections after 5 s). Without reuse, a busy form-posting app would leave a
socket in TIME_WAIT per request and could run out of local ports.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Final

import h11
import httpx

import tunnel

from .traffic import current_exchange, note_error
from .upstream_body import BodyLengthMismatch, length_checked
from .upstream_response import BadUpstreamResponse, checked_reason, checked_response_headers, checked_status
from .upstream_socket import (
    MAX_HEAD_SIZE,
    READ_SIZE,
    UpstreamConnectFailed,
    describe,
    error_response,
    open_connection,
)
from .upstream_upgrade import answer_headers

__all__ = ["ConnectionPool", "UploadAnswerBody", "send_with_body"]

log = logging.getLogger("linkd.upstream")

_NO_BODY_STATUS: Final = frozenset({204, 304})
MAX_IDLE: Final = 10  # idle connections kept per upstream
MAX_IDLE_SECONDS: Final = 2.0  # reused only this soon: under every common keep-alive timeout
CANCEL_GRACE: Final = 0.1  # for a cancelled upload to end before its socket is reset
DRAIN_GRACE: Final = 1.0  # at the answer's end, for the upload's last drain (else not reused)

# Tasks of uploads whose answer is being relayed (asyncio keeps only weak references).
_TASKS: set[asyncio.Task[None]] = set()


@dataclass(slots=True)
class _Link:
    """One connection to the service and its h11 state."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    conn: h11.Connection
    idle_since: float = 0.0
    watcher: asyncio.Task[bytes] | None = None


class ConnectionPool:
    """Idle keep-alive connections to the service, for requests with a body."""

    def __init__(self, max_idle: int = MAX_IDLE, max_idle_seconds: float = MAX_IDLE_SECONDS) -> None:
        self.max_idle = max_idle
        self.max_idle_seconds = max_idle_seconds
        self.reused = 0  # connections taken again (for tests and curiosity)
        self._idle: deque[_Link] = deque()
        self._closed = False

    def put(self, link: _Link) -> None:
        """Keep ``link`` (its request and answer both ended cleanly) for the next request."""
        if self._closed or len(self._idle) >= self.max_idle:
            link.writer.close()
            return
        link.conn.start_next_cycle()
        link.idle_since = time.monotonic()
        # Anything the service sends while idle (a byte, its close) makes the link unusable.
        link.watcher = asyncio.get_running_loop().create_task(link.reader.read(1), name="linkd-idle-watch")
        self._idle.append(link)

    async def take(self) -> _Link | None:
        """The most recently used idle link still fit for a request, else None."""
        now = time.monotonic()
        while self._idle:
            link = self._idle.pop()
            watcher, link.watcher = link.watcher, None
            quiet = watcher is not None and not watcher.done()
            if watcher is not None:
                watcher.cancel()  # a read cancelled while waiting consumes nothing
                # ...and the reader takes a new read only once that one is over.
                await asyncio.wait([watcher])
                quiet = quiet and watcher.cancelled()
            if quiet and now - link.idle_since <= self.max_idle_seconds and not link.writer.is_closing():
                self.reused += 1
                return link
            link.writer.close()
        return None

    def close(self) -> None:
        self._closed = True
        while self._idle:
            link = self._idle.pop()
            if link.watcher is not None:
                link.watcher.cancel()
            link.writer.close()


async def send_with_body(
    request: tunnel.Request,
    *,
    base: httpx.URL,
    base_url: str,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    length: int | None,
    connect_timeout: float,
    head_timeout: float,
    pool: ConnectionPool | None = None,
) -> tunnel.Response:
    """Send ``request`` and its body to the service at ``base``; its answer as soon as it has one.

    ``target`` is the raw path + query, ``headers`` what the plain proxy sends (hop-by-hop
    ones dropped), ``length`` the declared Content-Length (None: chunked); ``pool`` keeps
    connections alive between requests.
    """
    out = list(headers)
    if length is None:
        out.append((b"Transfer-Encoding", b"chunked"))
    try:
        head = h11.Request(method=request.method, target=target, headers=out)
    except h11.LocalProtocolError as exc:
        return error_response(400, "bad_request_header", str(exc))
    content: AsyncIterator[bytes] = request.stream()
    if length is not None:
        content = length_checked(content, length)
    if length == 0:
        # The head alone is a complete request: it goes out only once the body proved empty.
        try:
            async for _ in content:
                pass
        except BodyLengthMismatch as exc:
            return error_response(400, "content_length_mismatch", str(exc))
    link = await pool.take() if pool is not None else None
    if link is None:
        try:
            reader, writer = await open_connection(base, base_url, connect_timeout)
        except UpstreamConnectFailed as exc:
            return exc.response
        link = _Link(reader, writer, h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_SIZE))
    reader, writer, conn = link.reader, link.writer, link.conn
    writer.write(conn.send(head) or b"")
    upload = asyncio.create_task(_upload(conn, writer, content), name="linkd-upstream-upload")
    _TASKS.add(upload)
    upload.add_done_callback(_upload_done(writer, base_url))
    answer_task = asyncio.create_task(_read_head(conn, reader), name="linkd-upstream-answer")
    try:
        answer = await _await_answer(answer_task, upload, head_timeout)
    except BodyLengthMismatch as exc:
        _abort(writer, upload)
        return error_response(400, "content_length_mismatch", str(exc))
    except TimeoutError:
        _abort(writer, upload)
        log.warning("upstream %s: no response head within %ss of the request's end", base_url, head_timeout)
        return error_response(
            504, "upstream_timeout", f"{base_url} did not answer in time (no response head)"
        )
    except (OSError, h11.ProtocolError, EOFError) as exc:
        _abort(writer, upload)
        log.warning("upstream %s: %s %s failed: %s", base_url, request.method, request.path, describe(exc))
        return error_response(502, "upstream_error", f"request to {base_url} failed: {describe(exc)}")
    except BaseException:  # cancelled (the caller left) or the caller's body failed
        _abort(writer, upload)
        answer_task.cancel()
        raise
    try:
        status = checked_status(answer.status_code)
        reason = checked_reason(answer.reason.decode("latin-1"))
        received = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in answer.headers.raw_items()]
        response_headers = checked_response_headers(answer_headers(received, switching=False))
    except BadUpstreamResponse as exc:
        _abort(writer, upload)
        log.warning("upstream %s sent an unusable response head: %s", base_url, exc)
        return error_response(502, "upstream_error", f"{base_url} sent an unusable response: {exc}")
    if request.method == "HEAD" or status in _NO_BODY_STATUS:
        _abort(writer, upload)
        return tunnel.Response(status, response_headers, None, reason)
    body = UploadAnswerBody(link, upload, base_url, head_timeout, pool)
    body.watch(request)
    return tunnel.Response(status, response_headers, body, reason)


async def _await_answer(
    answer_task: asyncio.Task[h11.Response], upload: asyncio.Task[None], head_timeout: float
) -> h11.Response:
    """The answer's head: whenever it comes while the body goes up, else within ``head_timeout`` after."""
    await asyncio.wait({answer_task, upload}, return_when=asyncio.FIRST_COMPLETED)
    if not answer_task.done():
        error = upload.exception()
        if isinstance(error, BodyLengthMismatch | tunnel.TunnelError):
            answer_task.cancel()
            raise error
        # Uploaded (or the service stopped reading it): its answer, in time.
        async with asyncio.timeout(head_timeout):
            return await answer_task
    return answer_task.result()


async def _upload(conn: h11.Connection, writer: asyncio.StreamWriter, content: AsyncIterator[bytes]) -> None:
    """The request body into the socket, each write drained; then the body's end."""
    async for block in content:
        if writer.is_closing():
            return  # the answer ended or was abandoned (see UploadAnswerBody.aclose)
        if block:
            writer.write(conn.send(h11.Data(data=block)) or b"")
            await writer.drain()
    writer.write(conn.send(h11.EndOfMessage()) or b"")
    await writer.drain()


def _upload_done(writer: asyncio.StreamWriter, base_url: str) -> Callable[[asyncio.Task[None]], None]:
    def done(task: asyncio.Task[None]) -> None:
        _TASKS.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if isinstance(error, BodyLengthMismatch | tunnel.TunnelError):
            # The service must never see a complete request whose body was in fact otherwise.
            writer.transport.abort()
        elif error is not None and not isinstance(error, OSError | h11.ProtocolError | RuntimeError):
            log.warning("uploading a request body to %s failed: %s", base_url, describe(error))
        # OSError: the service stopped reading (it answered early, or will not answer at all).

    return done


def _abort(writer: asyncio.StreamWriter, upload: asyncio.Task[None]) -> None:
    upload.cancel()
    writer.transport.abort()


async def _read_head(conn: h11.Connection, reader: asyncio.StreamReader) -> h11.Response:
    """The service's final answer head (1xx interim answers skipped)."""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(READ_SIZE))
            continue
        if isinstance(event, h11.InformationalResponse):
            if event.status_code == 101:
                raise h11.RemoteProtocolError("101 Switching Protocols to a request that asked for none")
            continue  # 100, 102, 103: a final answer follows
        if isinstance(event, h11.Response):
            return event
        raise EOFError(f"the connection closed before an answer ({type(event).__name__})")


class UploadAnswerBody:
    """The answer's body, read as the tunnel takes it; ending or closing it ends the upload and the socket."""

    def __init__(
        self,
        link: _Link,
        upload: asyncio.Task[None],
        base_url: str,
        read_timeout: float,
        pool: ConnectionPool | None = None,
    ) -> None:
        self._link = link
        self._conn = link.conn
        self._reader = link.reader
        self._writer = link.writer
        self._pool = pool
        self._upload = upload
        self._base_url = base_url
        self._read_timeout = read_timeout
        self._closed = False
        self._watcher: asyncio.Task[None] | None = None
        self._exchange = current_exchange()  # the body is read after the handler returned

    def watch(self, request: tunnel.Request) -> None:
        """Close the socket if ``request`` fails before the tunnel reads (or closes) this body."""

        async def watch() -> None:
            await request.cancelled.wait()
            await self.aclose()

        self._watcher = asyncio.get_running_loop().create_task(watch(), name="linkd-upload-watch")
        _TASKS.add(self._watcher)
        self._watcher.add_done_callback(_TASKS.discard)

    def __aiter__(self) -> UploadAnswerBody:
        return self

    async def __anext__(self) -> bytes:
        while not self._closed:
            try:
                event = self._conn.next_event()
                if event is h11.NEED_DATA:
                    async with asyncio.timeout(self._read_timeout):
                        data = await self._reader.read(READ_SIZE)
                    self._conn.receive_data(data)
                    continue
            except (OSError, h11.ProtocolError, TimeoutError) as exc:
                await self.aclose()
                note_error(
                    "upstream_error",
                    f"the local service broke off the response: {describe(exc)}",
                    exchange=self._exchange,
                )
                log.warning("upstream %s broke off a response body: %s", self._base_url, describe(exc))
                raise tunnel.TunnelError(
                    f"the local service broke off the response ({type(exc).__name__})",
                    code=tunnel.ErrorCode.HANDLER_ERROR,
                ) from None
            if isinstance(event, h11.Data):
                if event.data:
                    return bytes(event.data)
                continue
            await self.aclose(ended=True)  # EndOfMessage (or the end of a close-delimited body)
        raise StopAsyncIteration

    def _reusable(self) -> bool:
        """Both the request and the answer ended cleanly, and neither side asked to close."""
        upload = self._upload
        return (
            self._pool is not None
            and upload.done()
            and not upload.cancelled()
            and upload.exception() is None
            and self._conn.our_state is h11.DONE
            and self._conn.their_state is h11.DONE
            and self._conn.trailing_data == (b"", False)  # nothing came behind the answer
        )

    async def aclose(self, *, ended: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        if ended and not self._upload.done() and self._conn.our_state is h11.DONE:
            # The body's end is written; the upload only waits for its last drain.
            await asyncio.wait([self._upload], timeout=DRAIN_GRACE)
        if ended and self._pool is not None and self._reusable():
            watcher = self._watcher
            if watcher is not None and watcher is not asyncio.current_task():
                watcher.cancel()
            self._pool.put(self._link)
            return
        watcher = self._watcher
        if watcher is not None and watcher is not asyncio.current_task():
            watcher.cancel()
        upload = self._upload
        try:
            if not upload.done():
                upload.cancel()  # the answer is complete (or abandoned): the rest of the body goes nowhere
                # Briefly: a cancel can be lost in nats-py (a credit publish in the request body);
                # the socket's reset then stops the upload (at its next write, or its next block).
                await asyncio.wait([upload], timeout=CANCEL_GRACE)
        finally:  # also when we are cancelled meanwhile: nothing calls aclose() twice
            if not upload.done():
                self._writer.transport.abort()
            self._writer.close()
