"""The ``--upstream`` proxy for upgrade requests (WebSocket: a dev server's HMR socket).

Why not httpx: it cannot hand over the socket after a ``101 Switching Protocols``. So an
upgrade request (the caller asked the tunnel for an upgraded stream *and* sent an
``Upgrade`` header) gets its own TCP (or TLS, for an https upstream) connection to the
local service, and h11 (client role) writes the request head and reads the answer:

- the head carries what the plain proxy sends (end-to-end headers, ``Host`` = the
  upstream's, ``X-Forwarded-Host``, ``Via``; same path rule: only the path and query,
  unchanged, appended to the base path) plus ``Upgrade`` and ``Connection: Upgrade``;
  ``Sec-WebSocket-*``, ``Origin`` and cookies are end-to-end headers and pass as sent.
  An upgrade request has no body: a ``Content-Length`` above 0 or ``Transfer-Encoding``
  is refused (400) rather than guessing where the body ends and the stream begins;
- ``101``: the answer is ``101`` with the service's headers (``Upgrade``,
  ``Connection: Upgrade``, ``Sec-WebSocket-Accept/-Protocol/-Extensions``, ...), and
  after it the proxy is a raw byte pipe both ways: it never parses WebSocket frames, so
  text, binary, compressed frames, pings and close codes pass unchanged. Bytes the
  service wrote right behind its 101 go first. Back-pressure holds both ways (the
  socket is read only as the tunnel takes bytes; each write to it is drained);
- pre-handshake data: nothing is read from the caller's stream before the service
  answered 101, so what the caller sent early waits in the tunnel's flow-control window
  (bounded) and is written to the service first, in order, after the 101;
- the service closing its socket ends the stream; the caller's half-close
  (``request.stream()`` ends) half-closes the socket (``write_eof``; over TLS the socket
  stays open until the service closes it); the caller vanishing or the request failing
  (``request.cancelled``) closes the socket, even before the tunnel started reading the
  stream (a 101 that could not be delivered);
- any other answer (404, 403, 426, 500, ...) is relayed as that HTTP response, its body
  streamed like the plain proxy's; unreachable: ``502 upstream_unreachable``; no head in
  time: ``504 upstream_timeout``; an unusable head: ``502 upstream_error``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Final

import h11
import httpx

import tunnel
from contract.http_headers import HOP_BY_HOP, connection_named

from .upstream_response import BadUpstreamResponse, checked_reason, checked_response_headers, checked_status
from .upstream_socket import MAX_HEAD_SIZE, READ_SIZE, UpstreamConnectFailed, error_response, open_connection

__all__ = ["RefusalBody", "UpgradedStream", "answer_headers", "open_upgraded"]

log = logging.getLogger("linkd.upstream")

_NO_BODY_STATUS: Final = frozenset({204, 304})


def answer_headers(headers: list[tuple[str, str]], *, switching: bool) -> list[tuple[str, str]]:
    """The service's answer headers for the caller, hop-by-hop ones (and those named in
    ``Connection``) dropped, order kept.

    ``switching`` (a 101): ``Upgrade`` stays as the service sent it, ``Connection`` becomes
    exactly ``Upgrade`` and a ``Content-Length`` is dropped (nothing is framed after a 101);
    ``Sec-WebSocket-*`` are end-to-end headers and stay either way.
    """
    drop = HOP_BY_HOP | connection_named(headers)
    if switching:
        drop = (drop - {"upgrade"}) | {"content-length"}
    out = [
        (name, value)
        for name, value in headers
        if name.lower() not in drop and not name.lower().startswith("proxy-")
    ]
    if switching:
        out.append(("Connection", "Upgrade"))
    return out


def _upgrade_head(request: tunnel.Request, target: bytes, headers: list[tuple[bytes, bytes]]) -> h11.Request:
    """The request head for the service; ValueError for an upgrade request with a body."""
    out: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        lower = name.lower()
        if lower == b"content-length":
            if value.strip() != b"0":
                raise ValueError("an upgrade request cannot carry a body (Content-Length above 0)")
            continue
        if lower == b"transfer-encoding":
            raise ValueError("an upgrade request cannot carry a body (Transfer-Encoding)")
        out.append((name, value))
    upgrade = ", ".join(request.header_values("upgrade"))
    out.append((b"Upgrade", upgrade.encode("latin-1", "replace")))
    out.append((b"Connection", b"Upgrade"))
    return h11.Request(method=request.method, target=target, headers=out)


async def open_upgraded(
    request: tunnel.Request,
    *,
    base: httpx.URL,
    base_url: str,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    connect_timeout: float,
    head_timeout: float,
) -> tunnel.Response:
    """Send ``request`` (an upgrade) to the service at ``base``; the 101 with its stream, or its refusal.

    ``target`` is the raw path + query for the request line, ``headers`` the ones the plain
    proxy would send (hop-by-hop ones already dropped).
    """
    try:
        head = _upgrade_head(request, target, headers)
    except (ValueError, h11.LocalProtocolError) as exc:
        return error_response(400, "bad_request_header", str(exc))
    try:
        reader, writer = await open_connection(base, base_url, connect_timeout, purpose=" for an upgrade")
    except UpstreamConnectFailed as exc:
        return exc.response
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_SIZE)
    try:
        writer.write(conn.send(head) or b"")
        writer.write(conn.send(h11.EndOfMessage()) or b"")
        async with asyncio.timeout(head_timeout):
            await writer.drain()
            answer = await _read_answer(conn, reader)
    except TimeoutError:
        writer.close()
        log.warning("upstream %s did not answer an upgrade within %ss", base_url, head_timeout)
        return error_response(504, "upstream_timeout", f"{base_url} did not answer the upgrade in time")
    except (OSError, h11.ProtocolError) as exc:
        writer.close()
        log.warning("upstream %s failed an upgrade request: %s", base_url, exc)
        return error_response(502, "upstream_error", f"upgrade request to {base_url} failed: {exc}")
    except BaseException:  # cancelled: the caller is gone
        writer.close()
        raise
    try:
        status = checked_status(answer.status_code)
        reason = checked_reason(answer.reason.decode("latin-1"))
        received = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in answer.headers.raw_items()]
        response_headers = checked_response_headers(answer_headers(received, switching=status == 101))
    except BadUpstreamResponse as exc:
        writer.close()
        log.warning("upstream %s sent an unusable upgrade answer: %s", base_url, exc)
        return error_response(502, "upstream_error", f"{base_url} sent an unusable response: {exc}")
    if status == 101:
        first, _ = conn.trailing_data
        body: UpgradedStream | RefusalBody = UpgradedStream(
            reader, writer, bytes(first), request.stream(), base_url
        )
        _close_when_cancelled(request, body)
        return tunnel.Response(101, response_headers, body, reason)
    if request.method == "HEAD" or status in _NO_BODY_STATUS:
        writer.close()
        return tunnel.Response(status, response_headers, None, reason)
    body = RefusalBody(conn, reader, writer, base_url)
    _close_when_cancelled(request, body)
    return tunnel.Response(status, response_headers, body, reason)


# Watchers of requests whose body holds a socket (strong references: asyncio keeps weak ones).
_WATCHERS: set[asyncio.Task[None]] = set()


def _close_when_cancelled(request: tunnel.Request, body: UpgradedStream | RefusalBody) -> None:
    """Close ``body`` (its socket) if the request fails or is aborted, even if the tunnel never
    started reading it: a failure between the handler's return and the head going out (the
    101 too large for the NATS server, the caller gone) closes no body, and the service would
    keep a socket nobody reads open for as long as it likes."""

    async def watch() -> None:
        await request.cancelled.wait()
        await body.aclose()

    task = asyncio.get_running_loop().create_task(watch(), name="linkd-upgrade-watch")
    _WATCHERS.add(task)
    task.add_done_callback(_WATCHERS.discard)
    body.watcher = task


async def _read_answer(
    conn: h11.Connection, reader: asyncio.StreamReader
) -> h11.Response | h11.InformationalResponse:
    """The service's final answer to the head, or its 101 (an ``InformationalResponse``)."""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(READ_SIZE))
            continue
        if isinstance(event, h11.InformationalResponse):
            if event.status_code == 101:
                return event
            continue  # 100, 102, 103: a final answer follows
        if isinstance(event, h11.Response):
            return event
        raise h11.RemoteProtocolError(f"the connection closed before an answer ({type(event).__name__})")


class UpgradedStream:
    """The service's bytes after its 101, while the caller's bytes are pumped into the socket.

    An async iterator the tunnel reads and closes (``aclose``) when the stream ends or
    the caller is gone; closing it closes the socket, whether or not it was ever read.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        first: bytes,
        inbound: AsyncIterator[bytes],
        base_url: str,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._first = first
        self._inbound = inbound
        self._base_url = base_url
        self._pump: asyncio.Task[None] | None = None
        self._closed = False
        self.watcher: asyncio.Task[None] | None = None  # closes us if the request fails first

    def __aiter__(self) -> UpgradedStream:
        return self

    async def __anext__(self) -> bytes:
        if self._closed:
            raise StopAsyncIteration
        if self._pump is None:
            # The tunnel is sending the 101 now: only from here on is the caller's stream read.
            self._pump = asyncio.create_task(self._pump_in(), name="linkd-upgrade-pump")
        if self._first:
            first, self._first = self._first, b""
            return first
        try:
            data = await self._reader.read(READ_SIZE)
        except OSError as exc:  # reset: the service died
            await self.aclose()
            log.info("upstream %s broke off an upgraded stream: %s", self._base_url, exc)
            raise tunnel.TunnelError(
                f"the local service broke off the upgraded stream ({type(exc).__name__})",
                code=tunnel.ErrorCode.HANDLER_ERROR,
            ) from None
        if not data:
            await self.aclose()
            raise StopAsyncIteration
        return data

    async def _pump_in(self) -> None:
        """Caller -> service: each piece written and drained; the caller's end half-closes."""
        writer = self._writer
        try:
            async for piece in self._inbound:
                if piece:
                    writer.write(piece)
                    await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except OSError:
            pass  # the service is gone: its side of the socket ends the stream
        except tunnel.TunnelError as exc:
            log.info("the caller of an upgraded stream to %s failed: %s", self._base_url, exc)
            writer.transport.abort()  # nobody to talk to: end the service's side too
        except RuntimeError:
            pass  # the socket was closed under us (aclose), nothing more to write

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        _stop_watcher(self.watcher)
        pump, self._pump = self._pump, None
        if pump is not None and pump is not asyncio.current_task():
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump
        self._writer.close()


class RefusalBody:
    """The body of a non-101 answer, read with h11 as the tunnel takes it; closes the socket."""

    def __init__(
        self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, base_url: str
    ) -> None:
        self._conn = conn
        self._reader = reader
        self._writer = writer
        self._base_url = base_url
        self._closed = False
        self.watcher: asyncio.Task[None] | None = None  # closes us if the request fails first

    def __aiter__(self) -> RefusalBody:
        return self

    async def __anext__(self) -> bytes:
        while not self._closed:
            try:
                event = self._conn.next_event()
                if event is h11.NEED_DATA:
                    self._conn.receive_data(await self._reader.read(READ_SIZE))
                    continue
            except (OSError, h11.ProtocolError) as exc:
                await self.aclose()
                log.warning("upstream %s broke off a response body: %s", self._base_url, exc)
                raise tunnel.TunnelError(
                    f"the local service broke off the response ({type(exc).__name__})",
                    code=tunnel.ErrorCode.HANDLER_ERROR,
                ) from None
            if isinstance(event, h11.Data):
                if event.data:
                    return bytes(event.data)
                continue
            await self.aclose()  # EndOfMessage (or the end of a close-delimited body)
        raise StopAsyncIteration

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            _stop_watcher(self.watcher)
            self._writer.close()


def _stop_watcher(watcher: asyncio.Task[None] | None) -> None:
    if watcher is not None and watcher is not asyncio.current_task():
        watcher.cancel()
