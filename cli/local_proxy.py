"""A local HTTP/1.1 listener that forwards each request over the tunnel to one host.

The engine of ``linkctl forward`` (the command is :mod:`cli.forward`); usable on its own:
``Forwarder(client, hostname).start(host, port)``.

Written with ``h11`` (sans-IO) over asyncio streams: h11 parses and frames, this module
moves bytes. Per connection:

- requests are read one at a time (keep-alive; no pipelining in parallel);
- a request head must be complete within ``header_timeout`` (10 s; counted from the
  connection's start, or from the first byte of a later request on a kept-alive
  connection): a slow head gets ``408`` and the connection is closed (slowloris), an idle
  kept-alive connection is closed after ``keepalive_timeout`` (75 s);
- a request whose framing is ambiguous (both ``Content-Length`` and ``Transfer-Encoding``,
  or ``Transfer-Encoding`` from an HTTP/1.0 client: RFC 9112 6.1 and 6.3) gets ``400`` and
  the connection is closed, so nothing behind it can be read as a second request (request
  smuggling); nothing of it reaches the desktop. A malformed request body (a bad chunk
  size) is ``400`` as well, and also closes the connection;
- the request body (Content-Length or chunked) streams into the tunnel as it arrives,
  and ``Expect: 100-continue`` is answered once the desktop is ready for the body;
- the response streams back as it arrives, with the desktop's Content-Length when it
  sent one, else chunked (HTTP/1.1) or close-delimited (HTTP/1.0);
- hop-by-hop headers are dropped both ways, and so is ``Host`` on the way in (the
  tunnel hostname is the host; the desktop side supplies it, as with the httpx transport);
  what the browser used is passed on as ``X-Forwarded-Host`` / ``-Proto`` / ``-For``, so an
  app behind the tunnel (``tunnel.asgi``) builds redirects and links to this listener, not
  to the tunnel host; this listener is the edge, so a client's own ``X-Forwarded-*`` and
  ``Forwarded`` headers are dropped, never passed on;
- an upgrade request (``Connection: Upgrade`` + ``Upgrade: websocket``, no body) is sent
  as an upgraded tunnel stream; after the desktop's ``101`` the connection is a raw byte
  pipe both ways (:mod:`cli.forward_upgrade`); any other answer is an ordinary response;
- a tunnel error before the response head becomes ``502`` (``504`` for the timeouts,
  ``400`` for a request the tunnel cannot express) with a one-line text body and the
  stable code in ``X-Tunnel-Error``; after the head, the connection is cut, so a client
  never mistakes a truncated body for a complete one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Callable
from http import HTTPStatus
from typing import Final, cast
from urllib.parse import urlsplit

import h11

import tunnel
from contract.http_headers import HOP_BY_HOP as CONNECTION_HEADERS

from .forward_upgrade import UpgradedPipe, is_upgrade, switching_headers, upgrade_headers
from .term import human_bytes

__all__ = ["ERROR_HEADER", "HEADER_TIMEOUT", "HOP_BY_HOP", "KEEPALIVE_TIMEOUT", "Forwarder"]

ERROR_HEADER: Final = "x-tunnel-error"
# Connection-level headers (RFC 9110 7.6.1 and friends) are never forwarded; "expect" is
# answered here; "host" names this listener, not the desktop.
HOP_BY_HOP: Final = CONNECTION_HEADERS
REQUEST_ONLY_DROPPED: Final = frozenset(
    # x-forwarded-*: set by this listener alone (the edge), never taken from a client.
    {"host", "expect", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "forwarded"}
)
READ_SIZE: Final = 64 * 1024
# Largest request head we accept (h11's default is 16 KiB; browsers send big cookies).
MAX_HEAD_SIZE: Final = 64 * 1024
# An idle keep-alive connection is closed after this long (browsers reconnect freely).
KEEPALIVE_TIMEOUT: Final = 75.0
# A request head (request line and headers) must be complete within this long: from the
# connection's start, or from the first byte of a later request. Slower: 408, closed.
HEADER_TIMEOUT: Final = 10.0
# After an error answer that closes the connection, what the client still sends is read and
# dropped for up to this long (and this much) before closing: closing with unread input
# would reset the connection (RST), and the client could lose the answer.
LINGER_TIME: Final = 2.0
LINGER_BYTES: Final = 1024 * 1024

Log = Callable[[str], None]
log = logging.getLogger("cli.forward")  # named after the command, as its log lines always were


class _CloseConnection(Exception):
    """This connection cannot go on (the client left, or a response had to be cut): close it."""


def _forwarded_headers(request: h11.Request, peer_ip: str | None) -> list[tuple[str, str]]:
    """``X-Forwarded-*`` for what the browser used: its Host, plain http, its address.

    This listener is the edge, so these are ours alone: whatever a client sent under these
    names was dropped (see :data:`REQUEST_ONLY_DROPPED`), or any LAN client could choose the
    address and scheme an application logs, rate-limits or allow-lists by.
    """
    added = [("x-forwarded-proto", "http")]
    host = next((value for name, value in request.headers if name == b"host"), None)
    if host:
        added.append(("x-forwarded-host", host.decode("latin-1")))
    if peer_ip is not None:
        added.append(("x-forwarded-for", peer_ip))
    return added


def _dropped_names(headers: list[tuple[bytes, bytes]]) -> set[str]:
    """Hop-by-hop names, including those listed in the Connection header."""
    names = set(HOP_BY_HOP)
    for name, value in headers:
        if name.lower() == b"connection":
            names.update(token.strip().lower() for token in value.decode("latin-1").split(",") if token)
    return names


def _origin_form(target: str) -> str:
    """``http://host:port/p?q`` (absolute form, as a proxy sees it) -> ``/p?q``."""
    if target.startswith(("http://", "https://")):
        parts = urlsplit(target)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return target


def _unexpected_host(request: h11.Request, allowed: frozenset[str]) -> str | None:
    """The request's Host name when it is not one this listener answers to, else None.

    Loopback names (``localhost``, ``*.localhost``) and IP literals always pass: a browser
    pointed at this port uses one of them, and a page on another name that reaches it did so
    by DNS rebinding. ``allowed`` adds names (``--allow-host``), ``*`` allows any.
    """
    if "*" in allowed:
        return None
    raw = next((value for name, value in request.headers if name == b"host"), b"")
    host = raw.decode("latin-1").strip().lower()
    if host.startswith("["):  # [v6]:port
        name = host[1 : host.find("]")] if "]" in host else host
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if not name or name == "localhost" or name.endswith(".localhost") or name in allowed:
        return None
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return name
    return None


class Forwarder:
    """Serves HTTP/1.1 connections by forwarding every request to ``tunnel://hostname``."""

    def __init__(
        self,
        client: tunnel.TunnelClient,
        hostname: str,
        *,
        timeout: float | None = None,
        first_frame_timeout: float | None = tunnel.DEFAULT_FIRST_FRAME_TIMEOUT,
        idle_timeout: float | None = tunnel.DEFAULT_IDLE_TIMEOUT,
        keepalive_timeout: float = KEEPALIVE_TIMEOUT,
        header_timeout: float = HEADER_TIMEOUT,
        log: Log | None = None,
        allowed_hosts: frozenset[str] = frozenset(),
    ) -> None:
        self.client = client
        # Host names (lower case) a request may name besides loopback ones; "*": any.
        self.allowed_hosts = frozenset(name.lower() for name in allowed_hosts)
        self.hostname = hostname
        self.timeout = timeout
        self.first_frame_timeout = first_frame_timeout
        self.idle_timeout = idle_timeout
        self.keepalive_timeout = keepalive_timeout
        self.header_timeout = header_timeout
        self.log = log
        self._connections: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> asyncio.Server:
        """Listen on ``host:port`` (port 0: any free port; see ``server.sockets``)."""
        self._server = await asyncio.start_server(self._accept, host, port)
        return self._server

    async def close(self) -> None:
        """Stop listening and end every connection (aborting requests in flight)."""
        if self._server is not None:
            self._server.close()
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await _Connection(self, reader, writer).serve()
        except asyncio.CancelledError:
            pass
        except Exception:  # a bug here must cost one connection, not the listener
            log.exception("forwarding a connection failed")
        finally:
            self._connections.discard(task)


class _Connection:
    def __init__(
        self, forwarder: Forwarder, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.fw = forwarder
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_SIZE)
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "?"
        self.peer_ip = str(peer[0]) if isinstance(peer, tuple) and peer else None
        # Set when the client's request body was malformed (h11 refused it mid-body).
        self.body_error: h11.RemoteProtocolError | None = None
        # Set when an answer said "connection: close" with client input left unread.
        self.linger = False

    # -- h11 plumbing ----------------------------------------------------------------

    async def _read(self) -> bytes:
        try:
            return await self.reader.read(READ_SIZE)
        except ConnectionError:
            return b""

    async def _next_event(self) -> h11.Event | None:
        """The next event from the client, reading as needed; None when h11 is PAUSED."""
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                self.h11.receive_data(await self._read())
                continue
            if event is h11.PAUSED:
                return None
            return cast(h11.Event, event)

    async def _next_head(self, fresh: bool) -> h11.Event | None:
        """The next request head (or ConnectionClosed); None: close the connection quietly.

        A fresh connection has ``header_timeout`` from its start to send a whole head; a
        kept-alive one may idle up to ``keepalive_timeout`` first, then has ``header_timeout``
        from the first byte. A head still incomplete then is answered 408.
        """
        if not fresh and not self.h11.trailing_data[0]:
            try:
                data = await asyncio.wait_for(self._read(), self.fw.keepalive_timeout)
            except TimeoutError:
                return None
            self.h11.receive_data(data)
        try:
            async with asyncio.timeout(self.fw.header_timeout):
                return await self._next_event()
        except TimeoutError:
            pass
        if self.h11.trailing_data[0]:  # part of a head arrived, too slowly: say why, then close
            timeout = f"{self.fw.header_timeout:g}"
            self._log_line(f"{self.peer} 408 request head incomplete after {timeout} s: connection closed")
            with contextlib.suppress(h11.LocalProtocolError, _CloseConnection):
                await self._simple(
                    408, f"request timeout: the request head took more than {timeout} s\n", close=True
                )
        return None

    async def _send(self, event: h11.Event) -> None:
        data = self.h11.send(event)
        if data:
            self.writer.write(data)
            try:
                await self.writer.drain()
            except ConnectionError as exc:
                raise _CloseConnection(f"client closed the connection ({type(exc).__name__})") from exc

    # -- the connection loop ---------------------------------------------------------------

    async def serve(self) -> None:
        try:
            fresh = True
            while True:
                try:
                    event = await self._next_head(fresh)
                except h11.RemoteProtocolError as exc:
                    await self._reject(exc)
                    return
                if not isinstance(event, h11.Request):
                    return  # ConnectionClosed, a timeout (or garbage after close)
                fresh = False
                await self._handle(event)
                if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
                    self.h11.start_next_cycle()
                else:
                    return
        except _CloseConnection:
            return
        finally:
            if self.linger:
                await self._linger()
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()

    async def _linger(self) -> None:
        """Half-close, then drop what the client still sends (up to LINGER_TIME/LINGER_BYTES)."""
        if self.writer.is_closing() or not self.writer.can_write_eof():
            return
        with contextlib.suppress(OSError, RuntimeError):
            self.writer.write_eof()
        dropped = 0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LINGER_TIME):
                while dropped < LINGER_BYTES and (data := await self._read()):
                    dropped += len(data)

    async def _reject(self, exc: h11.RemoteProtocolError) -> None:
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        status = exc.error_status_hint or 400
        # A fixed text: h11's message can quote the client's bytes (never echoed, as the gateway).
        with contextlib.suppress(h11.LocalProtocolError, _CloseConnection):
            await self._simple(status, f"bad request ({status} {_phrase(status)})\n", close=True)

    async def _simple(
        self, status: int, text: str, *, close: bool = False, extra: list[tuple[str, str]] | None = None
    ) -> None:
        body = text.encode("utf-8")
        headers = [
            ("content-type", "text/plain; charset=utf-8"),
            ("content-length", str(len(body))),
            *(extra or []),
        ]
        if close or self.h11.their_state not in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED):
            # The request body was not read to its end: this connection cannot be reused.
            headers.append(("connection", "close"))
            self.linger = True
        await self._send(h11.Response(status_code=status, headers=headers, reason=_phrase(status)))
        await self._send(h11.Data(data=body))
        await self._send(h11.EndOfMessage())

    # -- one request -------------------------------------------------------------------------

    async def _handle(self, request: h11.Request) -> None:
        started = time.perf_counter()
        method = request.method.decode("ascii", "replace")
        target = _origin_form(request.target.decode("latin-1"))
        if method == "CONNECT":
            await self._simple(405, "CONNECT is not supported: this forwards plain HTTP\n", close=True)
            self._log(method, target, 405, started, note="CONNECT refused")
            return
        refused_host = _unexpected_host(request, self.fw.allowed_hosts)
        if refused_host is not None:
            # DNS rebinding: a web page whose name now resolves to 127.0.0.1 reaches this port,
            # and the desktop's dev server (which sees its own Host, not this one) cannot refuse it.
            await self._simple(
                403,
                f"forward: Host {refused_host!r} is not allowed here (DNS rebinding protection): "
                "use localhost or an IP address, or start linkctl forward with "
                f"--allow-host {refused_host}\n",
                close=True,
            )
            self._log(method, target, 403, started, note=f"refused Host {refused_host!r}")
            return
        problem = _framing_problem(request)
        if problem is not None:
            # Read nothing more from this connection: what follows could be a smuggled request.
            await self._simple(400, f"bad request: {problem}\n", close=True)
            self._log(method, target, 400, started, note=f"refused: {problem}")
            return
        dropped = _dropped_names(list(request.headers)) | REQUEST_ONLY_DROPPED
        headers = [
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in request.headers.raw_items()  # the client's spelling of names
            if name.decode("latin-1").lower() not in dropped
        ]
        headers += _forwarded_headers(request, self.peer_ip)
        pipe: UpgradedPipe | None = None
        if is_upgrade(request):
            headers += upgrade_headers(request)
            pipe = UpgradedPipe(self.reader, self.writer)
        # h11 validated the framing headers: a body follows iff chunked or a length above 0.
        has_body = any(
            (name == b"content-length" and int(value) > 0) or name == b"transfer-encoding"
            for name, value in request.headers
        )
        if not has_body:
            # h11 reports a body-less request's end as its own event: take it now, so the
            # connection is ready for the next request (keep-alive) once we answered.
            end = await self._next_event()
            if not isinstance(end, h11.EndOfMessage):
                raise _CloseConnection("unexpected event after a body-less request")
        body: AsyncIterator[bytes] | None = None
        if pipe is not None:
            body = pipe.browser_bytes()  # read only once the 101 is written
        elif has_body:
            body = self._request_body()
        try:
            response = await self.fw.client.fetch(
                f"tunnel://{self.fw.hostname}{target}",
                method=method,
                headers=headers,
                body=body,
                timeout=self.fw.timeout if pipe is None else None,  # a WebSocket lives on
                first_frame_timeout=self.fw.first_frame_timeout,
                idle_timeout=self.fw.idle_timeout,
                upgrade=pipe is not None,
            )
        except tunnel.TunnelError as exc:
            if pipe is not None:
                pipe.refused()
            if self.body_error is not None:
                # The client's body was malformed (tunnel_body_error): the client's fault, a 400.
                self._log(method, target, 400, started, note=f"bad request body: {self.body_error}")
                with contextlib.suppress(h11.LocalProtocolError):
                    await self._simple(400, f"bad request body: {self.body_error}\n", close=True)
                return
            status = _error_status(exc)
            self._log(method, target, status, started, note=exc.code)
            with contextlib.suppress(h11.LocalProtocolError):
                await self._simple(status, f"{exc.code}: {exc.message}\n", extra=[(ERROR_HEADER, exc.code)])
            return
        if pipe is not None:
            if response.status == 101:
                await self._switch(response, pipe, method, target, started)
                return
            pipe.refused()
        progress = [0]
        try:
            await self._relay(response, progress)
        except _CloseConnection as exc:
            self._log(
                method, target, response.status, started, note=f"cut after {human_bytes(progress[0])}: {exc}"
            )
            raise
        finally:
            await response.aclose()  # aborts the desktop's handler if the body did not end
        self._log(method, target, response.status, started, size=progress[0])

    async def _switch(
        self, response: tunnel.FetchResponse, pipe: UpgradedPipe, method: str, target: str, started: float
    ) -> None:
        """Write the desktop's 101, then pipe bytes both ways until the stream ends."""
        try:
            await self._send(
                h11.InformationalResponse(
                    status_code=101, headers=switching_headers(response.headers), reason="Switching Protocols"
                )
            )
        except (h11.LocalProtocolError, _CloseConnection) as exc:
            pipe.refused()
            await response.aclose()
            self._log(method, target, 101, started, note=f"not switched: {exc}")
            raise _CloseConnection("invalid 101 head from the desktop, or the client left") from None
        pipe.switched(bytes(self.h11.trailing_data[0]))
        problem = await pipe.relay(response)
        note = f"upgraded: {human_bytes(pipe.up)} up, {human_bytes(pipe.down)} down"
        self._log(method, target, 101, started, note=note + (f", cut: {problem}" if problem else ""))

    async def _request_body(self) -> AsyncIterator[bytes]:
        """The client's request body, read as the tunnel asks for it."""
        if self.h11.client_is_waiting_for_100_continue and self.h11.our_state is h11.SEND_RESPONSE:
            await self._send(h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue"))
        while True:
            try:
                event = await self._next_event()
            except h11.RemoteProtocolError as exc:  # e.g. a bad chunk size
                self.body_error = exc
                raise
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return
            else:
                raise _CloseConnection("the client closed the connection before the request body ended")

    async def _relay(self, response: tunnel.FetchResponse, progress: list[int]) -> None:
        """Send the response head and stream its body, counting body bytes in ``progress[0]``."""
        if response.status < 200:
            # A final status must be 200..599; the tunnel only checks 100..599.
            await self._simple(
                502,
                f"tunnel_protocol_error: the desktop answered with status {response.status}\n",
                extra=[(ERROR_HEADER, tunnel.ErrorCode.PROTOCOL_ERROR)],
            )
            return
        dropped = _dropped_names([(n.encode("latin-1"), v.encode("latin-1")) for n, v in response.headers])
        headers = [(name, value) for name, value in response.headers if name.lower() not in dropped]
        reason = response.reason or _phrase(response.status)
        try:
            await self._send(h11.Response(status_code=response.status, headers=headers, reason=reason))
        except h11.LocalProtocolError:
            # The desktop's head is not valid HTTP/1.1 (e.g. a control character in a value).
            # h11 refuses to send anything more on this connection, so cut it.
            raise _CloseConnection("invalid response head from the desktop") from None
        try:
            async for chunk in response.aiter_bytes():
                await self._send(h11.Data(data=chunk))
                progress[0] += len(chunk)
            await self._send(h11.EndOfMessage())
        except tunnel.TunnelError as exc:
            # Too late for an error status: cut the connection so the body is visibly incomplete.
            raise _CloseConnection(f"{exc.code}: {exc.message}") from None
        except h11.LocalProtocolError as exc:
            # The desktop's body disagreed with its own Content-Length.
            raise _CloseConnection(f"invalid body from the desktop: {exc}") from None

    # -- logging ----------------------------------------------------------------------------

    def _log(
        self, method: str, target: str, status: int, started: float, *, size: int = 0, note: str = ""
    ) -> None:
        elapsed = (time.perf_counter() - started) * 1000
        detail = note or human_bytes(size)
        self._log_line(f'{self.peer} "{method} {target}" {status} {detail} {elapsed:.1f} ms')

    def _log_line(self, line: str) -> None:
        if self.fw.log is not None:
            self.fw.log(line)


def _framing_problem(request: h11.Request) -> str | None:
    """Why the request's body framing cannot be trusted (RFC 9112 6.1, 6.3), or None.

    h11 accepts both Content-Length and Transfer-Encoding and lets chunked win; a server
    or proxy in front or behind that lets Content-Length win would see different requests
    in the same bytes. RFC 9112 6.1 allows treating it as an error: we do, and close.
    """
    names = {name for name, _ in request.headers}
    if b"transfer-encoding" in names:
        if b"content-length" in names:
            return "both Content-Length and Transfer-Encoding (RFC 9112 6.1)"
        if request.http_version == b"1.0":
            return "Transfer-Encoding in an HTTP/1.0 request (RFC 9112 6.1)"
    return None


def _error_status(exc: tunnel.TunnelError) -> int:
    if isinstance(exc, tunnel.LocalProtocolError):
        return 400
    if isinstance(exc, tunnel.TunnelTimeout):
        return 504
    return 502


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""
