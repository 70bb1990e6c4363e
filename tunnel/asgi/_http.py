"""Serve an ASGI 3 application (Starlette, FastAPI, ...) behind a tunnel hostname.

::

    server = await serve_asgi(nc, "desk.example", app)   # lifespan startup ran
    ...
    await server.close()                                 # drain, then lifespan shutdown

Or, to combine with :func:`tunnel.serve` yourself::

    handler = asgi_handler(app)
    await handler.startup()
    server = await tunnel.serve(nc, "desk.example", handler)
    ...
    await server.close(); await handler.aclose(); await handler.shutdown()

Each request runs the application in its own task (one ``_Cycle`` per request,
like a uvicorn request-response cycle). What the application sees:

- ``scope``: ``type "http"``, ``asgi {"version": "3.0", "spec_version": "2.3"}``,
  ``http_version "1.1"``, the method, ``path`` (percent-decoded UTF-8) and
  ``raw_path`` (the bytes as sent), ``query_string`` (bytes, still encoded),
  ``headers`` (lowercase names, latin-1 bytes, order and repeats kept),
  ``server = (hostname, None)`` (the tunnel hostname is what the server listens on;
  there is no port), ``state`` (a copy of the lifespan state) and
  ``extensions["tunnel"] = {"request_id": ...}``.

The URL the application builds (``request.url``, ``url_for``, Starlette's
trailing-slash redirect) is ``{scheme}://{host header}{root_path}{path}``, so the
adapter sets those to what the *caller* used:

- ``scheme`` is ``"http"`` (the ASGI default, and what frameworks expect: the tunnel
  carries plain HTTP semantics; whether the NATS link is TLS is not the app's
  business). A caller that is itself a proxy for other clients (a gateway or a
  local forwarder in front of browsers) says what its clients used with
  ``X-Forwarded-Proto: https``.
- the ``host`` header: a ``X-Forwarded-Host`` (a proxy's public host, e.g.
  ``127.0.0.1:8080`` for a browser on a local forwarder) replaces it; else the
  caller's own ``Host`` stays; else (a direct tunnel caller: the httpx transport and
  ``tunnel.fetch`` send none, the tunnel hostname *is* the host) the adapter adds
  ``host: <tunnel hostname>``. So a direct caller of ``tunnel://desk.example/items``
  gets redirected to ``http://desk.example/items/``, which :mod:`tunnel.httpx_transport`
  follows as ``tunnel://desk.example/items/`` (it maps same-host ``http(s)://``
  redirects back onto the tunnel).
- ``root_path`` is only what you pass (like uvicorn's ``--root-path``; no
  ``X-Forwarded-Prefix``): set it when something in front serves the app under a
  prefix and strips it. The tunnel path is the path *below* the mount point, and
  ``path``/``raw_path`` get ``root_path`` prepended, so frameworks route on the rest
  and build public URLs with the prefix (URLs for that front's callers, not for a
  direct tunnel caller, whose URLs have no prefix).
- ``client``: NATS does not tell a server who published a message, so there is no
  peer address. With ``X-Forwarded-For`` (leftmost address, when it is an IP
  address) it is ``(address, 0)``, as uvicorn's proxy headers give; otherwise the
  placeholder :data:`UNKNOWN_CLIENT` ``= ("tunnel", 0)``, so ``request.client.host``
  works. It is deliberately not an IP address (like Starlette's TestClient's
  ``"testclient"``): a made-up address such as ``127.0.0.1`` could pass an
  allow-list. Never use ``client`` for access control behind the tunnel: who may
  call is decided by NATS permissions on the hostname's subjects.
- ``X-Forwarded-Proto``/``-Host``/``-For`` are trusted from every caller
  (``proxy_headers=True``, the default) because every caller is someone NATS lets
  publish to this hostname, as trusted as the reverse proxy in front of a uvicorn
  that honours them; pass ``proxy_headers=False`` when callers should not choose the
  public URL or client address. Only ``http``/``https``, a plain ``host[:port]`` and
  an IP address are taken; anything else is ignored. The headers themselves stay in
  ``scope["headers"]``. (RFC 7239 ``Forwarded`` is not read.)

What happens during a request:

- ``receive()`` yields the request body as it streams in (``http.request`` with
  ``more_body``), then blocks until the caller leaves or the response is
  complete, and returns ``http.disconnect``.
- ``send()`` checks message order like uvicorn. Body bytes go through a small
  buffer (``RESPONSE_HIGH_WATER``): when the caller reads slowly, tunnel flow
  control stops draining it and ``send()`` waits, so a body is never held whole.
  After the caller left, ``send()`` drops messages silently (ASGI 2.3); an
  application that still has not returned ``DISCONNECT_GRACE`` seconds later is
  cancelled.
- An exception (or returning) before ``http.response.start`` answers 500; an
  exception after it fails the stream, so the caller gets a tunnel error
  (``tunnel_handler_error``) instead of a silently truncated body.
- HEAD and 1xx/204/205/304 responses carry no body: once the head is sent the
  caller has all it gets, so the application hears ``http.disconnect`` and its
  body messages are dropped (an endless stream answering a HEAD stops).

WebSockets: an upgraded tunnel request with ``Upgrade: websocket``, a valid
``Sec-WebSocket-Key`` and version 13 gets a ``websocket`` scope (ASGI spec 2.4: the
http scope without ``method``, ``scheme`` ``ws``/``wss``, ``subprotocols``), run by
``_WebSocketCycle`` on a :class:`tunnel.websocket.WebSocketChannel`. ``websocket.accept``
answers 101, ``websocket.close`` before it 403 (``websocket.http.response`` is offered:
the app's own refusal), a failure before it 500 (after: close 1011); the client
leaving is ``websocket.disconnect`` 1006, and ``send()`` after that raises
:class:`ClientDisconnected`. Closing the server closes open sockets with 1001.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any, Final, Literal, Unpack
from urllib.parse import quote, unquote

from .._config import (
    DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_MAX_CHUNK,
    LegacyServerKwargs,
    ServerConfig,
    server_config,
)
from .._diagnostics import EventHook
from .._errors import TunnelError
from .._frames import validate_headers
from .._handler import Headers, Request, Response
from .._natsio.common import WireTap
from .._natsio.server import TunnelServer
from .._subjects import DEFAULT_PREFIX
from .._ws_protocol import (
    ABNORMAL_CLOSURE,
    GOING_AWAY,
    INTERNAL_ERROR,
    NORMAL_CLOSURE,
    accept_token,
    split_tokens,
    valid_key,
)
from ..websocket import CLOSE_TIMEOUT, WebSocketChannel, WebSocketClosed

if TYPE_CHECKING:  # nats-py is imported at runtime only under tunnel/_natsio
    from nats.aio.client import Client as NATS

__all__ = [
    "UNKNOWN_CLIENT",
    "ASGIApp",
    "AsgiHandler",
    "AsgiTunnelServer",
    "ClientDisconnected",
    "LifespanError",
    "LifespanMode",
    "asgi_handler",
    "serve_asgi",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
LifespanMode = Literal["auto", "on", "off"]

log = logging.getLogger("tunnel.asgi")

# Response bytes buffered between the application's send() and the tunnel before
# send() waits: one full data frame, so small sends coalesce into big frames while
# a slow caller still stops the application (the tunnel's window does the rest).
RESPONSE_HIGH_WATER: Final = DEFAULT_MAX_CHUNK
# After the caller left, the application gets this long to notice http.disconnect
# and return before its task is cancelled (sends are dropped meanwhile).
DISCONNECT_GRACE: Final = 5.0
# Once lifespan shutdown completed, the lifespan task should return at once.
LIFESPAN_EXIT_GRACE: Final = 1.0
# Statuses that carry no body on the wire (the tunnel, like HTTP, sends none).
_NO_BODY_STATUSES: Final = frozenset({204, 205, 304})
_INTERNAL_ERROR_BODY: Final = b"Internal Server Error"
#: ``scope["client"]`` when no ``X-Forwarded-For`` names the caller (see the module docstring).
UNKNOWN_CLIENT: Final[tuple[str, int]] = ("tunnel", 0)
# What X-Forwarded-Host may be: a DNS name or IPv4 address, or a bracketed IPv6 literal, and a port.
_FORWARDED_HOST: Final = re.compile(
    r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9._-]{0,251}[A-Za-z0-9])?)(?::[0-9]{1,5})?"
)


class LifespanError(RuntimeError):
    """The application's lifespan startup (or shutdown) failed."""


def _header_bytes(value: str) -> bytes:
    """Header text back to the bytes an HTTP server would have read (latin-1, else UTF-8)."""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8")


def _host_bytes(hostname: str) -> bytes:
    try:
        return hostname.encode("ascii")
    except UnicodeEncodeError:
        try:
            return hostname.encode("idna")
        except UnicodeError:
            return hostname.encode("utf-8")


def _first_value(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    """The first (leftmost, i.e. the original client's) value of a comma-separated header."""
    for key, value in headers:
        if key == name:
            first = value.decode("latin-1").split(",", 1)[0].strip()
            return first or None
    return None


def _ip_address(text: str) -> str | None:
    """``text`` as an IP address (``1.2.3.4``, ``::1``, ``[::1]``, ``1.2.3.4:80``, ``[::1]:80``) or None."""
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


class _Cycle:
    """One request-response cycle: the application's ``receive``/``send`` and the tunnel side."""

    def __init__(self, request: Request, scope: Scope) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self.request = request
        self.scope = scope
        self.app_task: asyncio.Task[None] | None = None
        # request side
        self._body_iter: AsyncIterator[bytes] | None = None
        self._pending_read: asyncio.Task[tuple[bytes, bool] | None] | None = None
        self._request_complete = False
        # response side
        self.started = False
        self.complete = False
        self.status = 500
        self.headers: Headers = []
        self.discard_body = False
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self.disconnected = False
        self.app_done = False
        self.app_error: BaseException | None = None
        # Resolved once the head is known (start sent) or the application ended without one.
        self.head: asyncio.Future[None] = loop.create_future()
        # Resolved when the caller left or the response is complete: receive() then says disconnect.
        self._ended: asyncio.Future[None] = loop.create_future()
        self._data_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._grace: asyncio.TimerHandle | None = None

    # -- the application's side ------------------------------------------------------

    async def run(self, app: ASGIApp) -> None:
        try:
            await app(self.scope, self.receive, self.send)
        except asyncio.CancelledError:
            self.app_error = RuntimeError("ASGI application was cancelled")
            raise
        except Exception as exc:
            self.app_error = exc
            if self.disconnected:
                log.debug("ASGI application failed after the caller left", exc_info=True)
            else:
                log.error("Exception in ASGI application", exc_info=True)
        else:
            if not self.started:
                self.app_error = RuntimeError("ASGI application returned without starting a response")
                log.error("%s (%s %s)", self.app_error, self.request.method, self.request.path)
            elif not self.complete and not self.disconnected:
                self.app_error = RuntimeError("ASGI application returned without completing the response")
                log.error("%s (%s %s)", self.app_error, self.request.method, self.request.path)
        finally:
            self.app_done = True
            self._finish()

    async def receive(self) -> Message:
        while not (self.disconnected or self.complete):
            if self._request_complete:
                await self._block(self._ended)
                break
            if not self.request.has_body:
                self._request_complete = True
                return {"type": "http.request", "body": b"", "more_body": False}
            # The read runs in its own task so a cancelled receive() (Starlette cancels its
            # disconnect listener) never cancels the body stream halfway through a chunk.
            read = self._pending_read
            if read is None:
                read = self._pending_read = self._loop.create_task(self._read_chunk())
            await asyncio.wait((read, self._ended), return_when=asyncio.FIRST_COMPLETED)
            if not read.done():
                continue
            self._pending_read = None
            result = read.result()
            if result is None:
                continue  # the caller failed or left: disconnected
            chunk, more_body = result
            if not more_body:
                self._request_complete = True
            return {"type": "http.request", "body": chunk, "more_body": more_body}
        return {"type": "http.disconnect"}

    async def _read_chunk(self) -> tuple[bytes, bool] | None:
        """(chunk, more_body), or None when the caller failed or left (then we are disconnected)."""
        if self._body_iter is None:
            self._body_iter = self.request.stream().__aiter__()
        try:
            return await anext(self._body_iter), True
        except StopAsyncIteration:
            return b"", False
        except TunnelError:
            self.disconnect()
            return None

    async def send(self, message: Message) -> None:
        mtype = message["type"]
        if self.disconnected:
            return  # ASGI 2.3: messages to a gone caller are dropped
        if not self.started:
            if mtype != "http.response.start":
                raise RuntimeError(f"Expected ASGI message 'http.response.start', but got '{mtype}'.")
            self._start(message)
            return
        if self.complete:
            raise RuntimeError(f"Unexpected ASGI message '{mtype}' sent, after response already completed.")
        if mtype != "http.response.body":
            raise RuntimeError(f"Expected ASGI message 'http.response.body', but got '{mtype}'.")
        body = message.get("body", b"")
        if not isinstance(body, bytes | bytearray | memoryview):
            raise TypeError(f"http.response.body 'body' must be bytes, not {type(body).__name__}")
        more_body = bool(message.get("more_body", False))
        if body and not self.discard_body:
            self._chunks.append(bytes(body))
            self._buffered += len(body)
            self._wake_reader()
        if not more_body:
            self.complete = True
            _resolve(self._ended)
            self._wake_reader()
        elif self._buffered > RESPONSE_HIGH_WATER:
            self._drain_waiter = self._loop.create_future()
            try:
                await self._block(self._drain_waiter)
            finally:
                self._drain_waiter = None

    def _start(self, message: Message) -> None:
        status = message["status"]
        if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
            raise ValueError(f"invalid HTTP status {status!r} in http.response.start")
        raw_headers = message.get("headers", [])
        try:
            headers = [
                (bytes(name).decode("latin-1"), bytes(value).decode("latin-1")) for name, value in raw_headers
            ]
        except (TypeError, ValueError) as exc:
            raise TypeError("http.response.start 'headers' must be [bytes, bytes] pairs") from exc
        self.headers = validate_headers(headers, error=ValueError)
        self.status = status
        self.started = True
        self.discard_body = self.request.method == "HEAD" or status in _NO_BODY_STATUSES or status < 200
        _resolve(self.head)

    async def _block(self, waiter: asyncio.Future[None]) -> None:
        """Wait for ``waiter``; also wakes (as a disconnect) if the request is failed meanwhile."""
        if self._watcher is None and not self.request.is_cancelled:
            self._watcher = self._loop.create_task(self._watch_cancelled())
        elif self.request.is_cancelled:
            self.disconnect()
        if not waiter.done():
            # asyncio.wait, not ``await waiter``: cancelling the application's await must
            # not cancel a future the cycle shares (``_ended``).
            await asyncio.wait((waiter,))

    async def _watch_cancelled(self) -> None:
        await self.request.cancelled.wait()
        self.disconnect()

    # -- the tunnel's side -----------------------------------------------------------

    def response(self) -> Response:
        """The tunnel response once ``head`` resolved."""
        if not self.started:
            body = None if self.request.method == "HEAD" else _INTERNAL_ERROR_BODY
            headers = [
                ("content-type", "text/plain; charset=utf-8"),
                ("content-length", str(len(_INTERNAL_ERROR_BODY))),
            ]
            return Response(500, headers, body)
        if self.discard_body:
            # The caller gets the head and nothing else: from here on it has left, so a
            # streaming app (SSE answering a HEAD) hears http.disconnect instead of running on.
            self.disconnect()
            return Response(self.status, self.headers, None)
        if self.complete:
            # The whole body is already here (the usual case for small answers): one message.
            data = b"".join(self._chunks)
            self._chunks.clear()
            self._buffered = 0
            return Response(self.status, self.headers, data)
        return Response(self.status, self.headers, self._body())

    async def _body(self) -> AsyncIterator[bytes]:
        delivered = False
        try:
            while True:
                if self._chunks:
                    chunks = self._chunks
                    data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
                    chunks.clear()
                    self._buffered = 0
                    if self._drain_waiter is not None:
                        _resolve(self._drain_waiter)
                    yield data
                    continue
                if self.complete:
                    delivered = True
                    return
                if self.app_error is not None:
                    raise RuntimeError("ASGI application failed after starting the response") from (
                        self.app_error
                    )
                if self.app_done or self.disconnected:
                    raise RuntimeError("ASGI application returned without completing the response")
                self._data_waiter = self._loop.create_future()
                try:
                    await self._data_waiter
                finally:
                    self._data_waiter = None
        finally:
            if not delivered:
                self.disconnect()

    def _wake_reader(self) -> None:
        if self._data_waiter is not None:
            _resolve(self._data_waiter)

    def disconnect(self) -> None:
        """The caller left (abort, deadline, server closing): tell the application."""
        if self.disconnected:
            return
        self.disconnected = True
        _resolve(self._ended)
        _resolve(self.head)
        if self._drain_waiter is not None:
            _resolve(self._drain_waiter)
        self._wake_reader()
        task = self.app_task
        if task is not None and not task.done() and self._grace is None:
            self._grace = self._loop.call_later(DISCONNECT_GRACE, self._cancel_app)

    def _cancel_app(self) -> None:
        task = self.app_task
        if task is not None and not task.done():
            log.warning(
                "ASGI application for %s %s still running %.0fs after the caller left: cancelling it",
                self.request.method,
                self.request.path,
                DISCONNECT_GRACE,
            )
            task.cancel()

    def _finish(self) -> None:
        _resolve(self.head)
        self._wake_reader()
        if self._watcher is not None:
            self._watcher.cancel()
        if self._grace is not None:
            self._grace.cancel()
        if self._pending_read is not None:
            self._pending_read.cancel()


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class ClientDisconnected(OSError):
    """``send()`` on a WebSocket whose client is gone (ASGI 2.4: an ``OSError`` subclass)."""


def is_websocket_upgrade(request: Request) -> bool:
    """An upgraded tunnel request asking for a WebSocket (RFC 6455 4.2.1: key and version 13)."""
    if not request.upgrade:
        return False
    upgrade = [token.lower() for token in split_tokens(request.header_values("upgrade"))]
    version = (request.header("sec-websocket-version") or "").strip()
    return "websocket" in upgrade and version == "13" and valid_key(request.header("sec-websocket-key"))


def _header_pairs(raw: Any, where: str) -> Headers:
    """ASGI ``[bytes, bytes]`` header pairs as checked tunnel headers."""
    try:
        headers = [(bytes(name).decode("latin-1"), bytes(value).decode("latin-1")) for name, value in raw]
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{where} 'headers' must be [bytes, bytes] pairs") from exc
    return validate_headers(headers, error=ValueError)


class _WebSocketCycle:
    """One WebSocket connection: the ASGI ``websocket`` messages and the upgraded stream.

    Before ``websocket.accept`` the tunnel request waits for an answer (101, 403 after a
    ``websocket.close``, 500 if the application fails); after it, a
    :class:`~tunnel.websocket.WebSocketChannel` carries the frames both ways.
    """

    def __init__(self, request: Request, scope: Scope) -> None:
        self._loop = asyncio.get_running_loop()
        self.request = request
        self.scope = scope
        self.channel = WebSocketChannel(client=False)
        self.app_task: asyncio.Task[None] | None = None
        self.connect_sent = False
        self.accepted = False
        self.closed = False  # websocket.close sent, refused, or the client is gone
        self.disconnected = False
        self.answer: Response | None = None
        self.head: asyncio.Future[None] = self._loop.create_future()
        self._grace: asyncio.TimerHandle | None = None
        self._watcher: asyncio.Task[None] | None = None
        # websocket.http.response.start seen: (status, headers, body parts so far)
        self._denial: tuple[int, Headers, list[bytes]] | None = None

    async def run(self, app: ASGIApp) -> None:
        try:
            await app(self.scope, self.receive, self.send)
        except asyncio.CancelledError:
            await self.channel.abort()
            raise
        except Exception:
            if self.disconnected:
                log.debug("ASGI WebSocket application failed after the client left", exc_info=True)
            else:
                log.error("Exception in ASGI application", exc_info=True)
            if self.accepted:
                await self._close(INTERNAL_ERROR, "")
        else:
            if not self.accepted and self.answer is None:
                log.error(
                    "ASGI WebSocket application returned without accepting or closing (%s)", self.request.path
                )
            elif self.accepted and not self.closed:
                await self._close(NORMAL_CLOSURE, "")
        finally:
            self._finish()

    async def receive(self) -> Message:
        if not self.connect_sent:
            self.connect_sent = True
            return {"type": "websocket.connect"}
        if not self.accepted:
            if self.answer is None:
                raise RuntimeError("ASGI WebSocket application called receive() before websocket.accept")
            return {"type": "websocket.disconnect", "code": ABNORMAL_CLOSURE, "reason": ""}
        try:
            message = await self.channel.receive()
        except WebSocketClosed as exc:
            self.disconnected = True
            self._start_grace()
            return {"type": "websocket.disconnect", "code": exc.code, "reason": exc.reason}
        if message.kind == "text":
            return {"type": "websocket.receive", "text": message.data, "bytes": None}
        return {"type": "websocket.receive", "bytes": message.data, "text": None}

    async def send(self, message: Message) -> None:
        mtype = message["type"]
        if self._denial is not None:
            self._deny(mtype, message)
            return
        if not self.accepted and self.answer is None:
            if mtype == "websocket.accept":
                self._accept(message)
            elif mtype == "websocket.close":
                self.closed = True
                self._answer(Response(403, [("content-type", "text/plain"), ("content-length", "0")], b""))
            elif mtype == "websocket.http.response.start":
                self._start_denial(message)
            else:
                expected = "'websocket.accept', 'websocket.close' or 'websocket.http.response.start'"
                raise RuntimeError(f"Expected ASGI message {expected}, but got '{mtype}'.")
            return
        if self.closed or not self.accepted:
            raise ClientDisconnected(f"cannot send '{mtype}': the WebSocket is closed")
        if mtype == "websocket.send":
            text, data = message.get("text"), message.get("bytes")
            try:
                if text is not None:
                    await self.channel.send_text(str(text))
                elif data is not None:
                    await self.channel.send_bytes(data)
                else:
                    raise ValueError("websocket.send needs 'text' or 'bytes'")
            except WebSocketClosed as exc:
                self.closed = True
                raise ClientDisconnected(f"the WebSocket is closed ({exc.code})") from exc
        elif mtype == "websocket.close":
            code = message.get("code") or NORMAL_CLOSURE
            await self._close(int(code), str(message.get("reason") or ""))
        else:
            raise RuntimeError(
                f"Expected ASGI message 'websocket.send' or 'websocket.close', but got '{mtype}'."
            )

    def _start_denial(self, message: Message) -> None:
        """The ``websocket.http.response`` extension: refuse with an HTTP response of the app's."""
        status = message["status"]
        if (
            not isinstance(status, int)
            or isinstance(status, bool)
            or not 200 <= status <= 599
            or status == 101
        ):
            raise ValueError(f"invalid HTTP status {status!r} in websocket.http.response.start")
        self._denial = (
            status,
            _header_pairs(message.get("headers") or [], "websocket.http.response.start"),
            [],
        )

    def _deny(self, mtype: str, message: Message) -> None:
        if self.answer is not None:
            raise ClientDisconnected(f"cannot send '{mtype}': the denial response is complete")
        if mtype != "websocket.http.response.body":
            raise RuntimeError(f"Expected ASGI message 'websocket.http.response.body', but got '{mtype}'.")
        assert self._denial is not None
        status, headers, parts = self._denial
        body = message.get("body", b"")
        if not isinstance(body, bytes | bytearray | memoryview):
            raise TypeError(f"websocket.http.response.body 'body' must be bytes, not {type(body).__name__}")
        parts.append(bytes(body))
        if not message.get("more_body", False):
            self.closed = True
            self._answer(Response(status, headers, b"".join(parts)))

    def _accept(self, message: Message) -> None:
        subprotocol = message.get("subprotocol")
        extra = _header_pairs(message.get("headers") or [], "websocket.accept")
        key = self.request.header("sec-websocket-key") or ""
        headers: Headers = [
            ("upgrade", "websocket"),
            ("connection", "Upgrade"),
            ("sec-websocket-accept", accept_token(key.strip())),
        ]
        if subprotocol is not None:
            headers.append(("sec-websocket-protocol", str(subprotocol)))
        headers.extend(extra)
        self.accepted = True
        self.channel.start(self.request.stream().__aiter__())
        self._answer(Response(101, headers, self._frames()))
        if self._watcher is None:
            self._watcher = self._loop.create_task(self._watch_cancelled())

    async def _frames(self) -> AsyncIterator[bytes]:
        """The 101's body: the frames going to the client; its end ends the stream."""
        try:
            async for data in self.channel.outbound.chunks():
                yield data
        finally:
            if not self.channel.proto.finished:
                self.disconnect()  # the tunnel stopped pulling: the client is gone
            elif not self.channel.reader_done.is_set():
                # The body's end ends the stream both ways: the request side may never
                # see its end, so its reader stops here.
                self.channel.stop()

    async def _close(self, code: int, reason: str) -> None:
        await self.close(code, reason, CLOSE_TIMEOUT)

    async def close(self, code: int, reason: str, timeout: float) -> None:
        """The close handshake from the server's side (once)."""
        if self.closed:
            return
        self.closed = True
        await self.channel.close(code, reason, timeout)

    def _answer(self, response: Response) -> None:
        self.answer = response
        if not self.head.done():
            self.head.set_result(None)

    def response(self) -> Response:
        if self.answer is not None:
            return self.answer
        headers = [
            ("content-type", "text/plain; charset=utf-8"),
            ("content-length", str(len(_INTERNAL_ERROR_BODY))),
        ]
        return Response(500, headers, _INTERNAL_ERROR_BODY)

    async def _watch_cancelled(self) -> None:
        await self.request.cancelled.wait()
        self.disconnect()

    def disconnect(self) -> None:
        """The client is gone (abort, tunnel failure): the application hears websocket.disconnect."""
        if self.disconnected and self._grace is not None:
            return
        self.disconnected = True
        self.channel.stop()
        self._start_grace()

    def _start_grace(self) -> None:
        task = self.app_task
        if task is not None and not task.done() and self._grace is None:
            self._grace = self._loop.call_later(DISCONNECT_GRACE, self._cancel_app)

    def _cancel_app(self) -> None:
        task = self.app_task
        if task is not None and not task.done():
            log.warning(
                "ASGI WebSocket application for %s still running %.0fs after the client left: cancelling it",
                self.request.path,
                DISCONNECT_GRACE,
            )
            task.cancel()

    def _finish(self) -> None:
        if not self.head.done():
            self.head.set_result(None)
        self.channel.outbound.end()
        if self._watcher is not None:
            self._watcher.cancel()
        if self._grace is not None:
            self._grace.cancel()


class _Lifespan:
    """The ASGI lifespan protocol, as uvicorn runs it ("auto": an app without it is fine)."""

    def __init__(self, app: ASGIApp, mode: LifespanMode, state: dict[str, Any]) -> None:
        self.app = app
        self.mode = mode
        self.state = state
        self._queue: asyncio.Queue[Message] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._started = asyncio.Event()
        self._shut_down = asyncio.Event()
        self._startup_failed: str | None = None
        self._shutdown_failed: str | None = None
        self._error: BaseException | None = None
        self._returned = False  # the app returned without answering lifespan.startup
        self._running = False

    async def startup(self) -> None:
        if self.mode == "off" or self._task is not None:
            return
        scope: Scope = {
            "type": "lifespan",
            "asgi": {"version": "3.0", "spec_version": "2.0"},
            "state": self.state,
        }
        self._task = asyncio.get_running_loop().create_task(self._main(scope))
        await self._queue.put({"type": "lifespan.startup"})
        await self._started.wait()
        if self._startup_failed is not None:
            raise LifespanError(f"ASGI lifespan startup failed: {self._startup_failed}")
        if self._returned and self.mode == "on":
            raise LifespanError("the application returned from lifespan without completing startup")
        if self._error is not None:
            if self.mode == "on":
                raise LifespanError(
                    f"ASGI lifespan startup raised {type(self._error).__name__}: {self._error}"
                ) from self._error
            log.info("ASGI 'lifespan' protocol appears unsupported by the application")
            return
        self._running = not self._returned

    async def shutdown(self) -> None:
        if not self._running:
            return
        self._running = False
        await self._queue.put({"type": "lifespan.shutdown"})
        await self._shut_down.wait()
        task = self._task
        if task is not None and not task.done():
            await asyncio.wait({task}, timeout=LIFESPAN_EXIT_GRACE)
            task.cancel()
        if self._shutdown_failed is not None:
            raise LifespanError(f"ASGI lifespan shutdown failed: {self._shutdown_failed}")
        if self._error is not None:
            raise LifespanError(
                f"ASGI lifespan shutdown raised {type(self._error).__name__}: {self._error}"
            ) from self._error

    async def _main(self, scope: Scope) -> None:
        try:
            await self.app(scope, self._receive, self._send)
            if not self._started.is_set():
                self._returned = True
                log.debug("the application returned from lifespan without starting up")
        except BaseException as exc:
            self._error = exc
            if self._startup_failed is None and self._shutdown_failed is None:
                if self.mode == "auto" and not self._started.is_set():
                    log.debug("lifespan not supported by the application", exc_info=True)
                else:
                    log.error("Exception in ASGI lifespan", exc_info=True)
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            self._started.set()
            self._shut_down.set()

    async def _receive(self) -> Message:
        return await self._queue.get()

    async def _send(self, message: Message) -> None:
        mtype = message["type"]
        if mtype == "lifespan.startup.complete":
            self._check(not self._started.is_set(), mtype)
            self._started.set()
        elif mtype == "lifespan.startup.failed":
            self._check(not self._started.is_set(), mtype)
            self._startup_failed = str(message.get("message", "")) or "no message"
            self._started.set()
        elif mtype == "lifespan.shutdown.complete":
            self._check(self._started.is_set() and not self._shut_down.is_set(), mtype)
            self._shut_down.set()
        elif mtype == "lifespan.shutdown.failed":
            self._check(self._started.is_set() and not self._shut_down.is_set(), mtype)
            self._shutdown_failed = str(message.get("message", "")) or "no message"
            self._shut_down.set()
        else:
            raise RuntimeError(f"Unexpected ASGI lifespan message type '{mtype}'.")

    @staticmethod
    def _check(ok: bool, mtype: str) -> None:
        if not ok:
            raise RuntimeError(f"Unexpected ASGI lifespan message '{mtype}' at this point.")


class AsgiHandler:
    """A :data:`tunnel.Handler` that runs an ASGI application; see the module docstring."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        root_path: str = "",
        lifespan: LifespanMode = "auto",
        proxy_headers: bool = True,
    ) -> None:
        if lifespan not in ("auto", "on", "off"):
            raise ValueError(f"lifespan must be 'auto', 'on' or 'off', not {lifespan!r}")
        if root_path and (not root_path.startswith("/") or root_path.endswith("/")):
            raise ValueError(f"root_path must start with '/' and not end with one: {root_path!r}")
        self.app = app
        self.root_path = root_path
        self.proxy_headers = proxy_headers
        self._raw_root = quote(root_path).encode("ascii")
        #: Lifespan state; each request's ``scope["state"]`` is a shallow copy.
        self.state: dict[str, Any] = {}
        self._lifespan = _Lifespan(app, lifespan, self.state)
        self._tasks: set[asyncio.Task[None]] = set()
        self._sockets: set[_WebSocketCycle] = set()

    @property
    def active(self) -> int:
        """Application tasks still running (requests, or work after the response, e.g. background tasks)."""
        return len(self._tasks)

    @property
    def websockets(self) -> int:
        """WebSocket connections whose application is still running."""
        return len(self._sockets)

    async def close_websockets(
        self, code: int = GOING_AWAY, reason: str = "server shutting down", timeout: float = CLOSE_TIMEOUT
    ) -> None:
        """Close every accepted WebSocket (close frame, then up to ``timeout`` s for the
        client's); their applications hear ``websocket.disconnect``. For a server going away."""
        cycles = [cycle for cycle in self._sockets if cycle.accepted and not cycle.closed]
        if cycles:
            await asyncio.gather(
                *(cycle.close(code, reason, timeout) for cycle in cycles), return_exceptions=True
            )

    async def startup(self) -> None:
        """Run lifespan startup; raises :class:`LifespanError` if the application reports failure."""
        await self._lifespan.startup()

    async def shutdown(self) -> None:
        """Run lifespan shutdown (no-op if startup did not run or the app has no lifespan)."""
        await self._lifespan.shutdown()

    async def aclose(self, timeout: float = DEFAULT_DRAIN_TIMEOUT) -> None:
        """Wait up to ``timeout`` s for running application tasks, then cancel the rest."""
        tasks = set(self._tasks)
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=LIFESPAN_EXIT_GRACE)

    def scope_for(self, request: Request) -> Scope:
        """The ASGI http scope for one tunnel request (see the module docstring)."""
        raw_path = request.path
        headers = [(name.lower().encode("latin-1"), _header_bytes(value)) for name, value in request.headers]
        scheme = "http"
        client = UNKNOWN_CLIENT
        public_host: bytes | None = None
        if self.proxy_headers:
            proto = _first_value(headers, b"x-forwarded-proto")
            if proto is not None and proto.lower() in ("http", "https"):
                scheme = proto.lower()
            host = _first_value(headers, b"x-forwarded-host")
            if host is not None and _FORWARDED_HOST.fullmatch(host):
                public_host = host.encode("ascii")
            forwarded_for = _first_value(headers, b"x-forwarded-for")
            address = None if forwarded_for is None else _ip_address(forwarded_for)
            if address is not None:
                client = (address, 0)
        if public_host is not None:
            headers = [(b"host", public_host), *((n, v) for n, v in headers if n != b"host")]
        elif not any(name == b"host" for name, _ in headers):
            headers.insert(0, (b"host", _host_bytes(request.hostname)))
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": request.method,
            "scheme": scheme,
            "path": self.root_path + unquote(raw_path, encoding="utf-8", errors="replace"),
            "raw_path": self._raw_root + raw_path.encode("utf-8"),
            "query_string": request.query_string.encode("utf-8"),
            "root_path": self.root_path,
            "headers": headers,
            "client": client,
            "server": (request.hostname, None),
            "state": self.state.copy(),
            "extensions": {"tunnel": {"request_id": request.request_id}},
        }

    def websocket_scope_for(self, request: Request) -> Scope:
        """The ASGI websocket scope (spec 2.4) for a WebSocket upgrade request."""
        scope = self.scope_for(request)
        del scope["method"]
        scope["type"] = "websocket"
        scope["asgi"] = {"version": "3.0", "spec_version": "2.4"}
        scope["scheme"] = "wss" if scope["scheme"] == "https" else "ws"
        scope["subprotocols"] = split_tokens(request.header_values("sec-websocket-protocol"))
        scope["extensions"]["websocket.http.response"] = {}
        return scope

    async def __call__(self, request: Request) -> Response:
        if is_websocket_upgrade(request):
            return await self._websocket(request)
        cycle = _Cycle(request, self.scope_for(request))
        task = asyncio.get_running_loop().create_task(cycle.run(self.app))
        cycle.app_task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        try:
            await cycle.head
        except asyncio.CancelledError:
            cycle.disconnect()
            raise
        return cycle.response()

    async def _websocket(self, request: Request) -> Response:
        cycle = _WebSocketCycle(request, self.websocket_scope_for(request))
        task = asyncio.get_running_loop().create_task(cycle.run(self.app))
        cycle.app_task = task
        self._tasks.add(task)
        self._sockets.add(cycle)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda _: self._sockets.discard(cycle))
        try:
            await asyncio.wait((cycle.head,))
        except asyncio.CancelledError:
            cycle.disconnect()
            raise
        return cycle.response()


def asgi_handler(
    app: ASGIApp, *, root_path: str = "", lifespan: LifespanMode = "auto", proxy_headers: bool = True
) -> AsgiHandler:
    """Wrap an ASGI 3 application as a tunnel handler.

    ``lifespan`` ("auto", "on", "off") is used by :meth:`AsgiHandler.startup`, which
    :func:`serve_asgi` calls for you; with :func:`tunnel.serve` call it yourself.
    ``root_path`` and ``proxy_headers`` shape the scope (see the module docstring).
    """
    return AsgiHandler(app, root_path=root_path, lifespan=lifespan, proxy_headers=proxy_headers)


class AsgiTunnelServer(TunnelServer):
    """A :class:`TunnelServer` whose ``close()`` also finishes the ASGI application."""

    def __init__(self, nc: NATS, hostname: str, handler: AsgiHandler, **serve_kwargs: Any) -> None:
        super().__init__(nc, hostname, handler, **serve_kwargs)
        self.asgi = handler
        self._asgi_closed = False

    async def close(self, timeout: float = DEFAULT_DRAIN_TIMEOUT) -> None:
        """Stop taking requests and drain (as ``TunnelServer.close``), end leftover
        application tasks, then run lifespan shutdown (raises ``LifespanError`` if it fails)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # Open WebSockets never end by themselves: say goodbye (1001) while the drain waits.
        goodbye = loop.create_task(self.asgi.close_websockets(timeout=min(timeout, CLOSE_TIMEOUT)))
        try:
            await super().close(timeout)
        finally:
            await goodbye
        if self._asgi_closed:
            return
        self._asgi_closed = True
        # Requests the drain cut off just heard http.disconnect: give their apps what is left.
        await self.asgi.aclose(max(deadline - loop.time(), LIFESPAN_EXIT_GRACE))
        await self.asgi.shutdown()


async def serve_asgi(
    nc: NATS,
    hostname: str,
    app: ASGIApp,
    *,
    root_path: str = "",
    lifespan: LifespanMode = "auto",
    proxy_headers: bool = True,
    config: ServerConfig | None = None,
    prefix: str = DEFAULT_PREFIX,
    wire_tap: WireTap | None = None,
    on_event: EventHook | None = None,
    **deprecated: Unpack[LegacyServerKwargs],
) -> AsgiTunnelServer:
    """Run lifespan startup, then serve ``app`` for ``hostname`` (``config``, ``prefix``,
    ``wire_tap`` and ``on_event`` as for ``tunnel.serve``, and the same deprecated keywords;
    ``root_path`` and ``proxy_headers`` as described in the module docstring).

    Raises :class:`LifespanError` (without subscribing anything) if startup fails.
    ``await server.close()`` drains requests, then runs lifespan shutdown.
    """
    config = server_config("serve_asgi", config, deprecated)
    handler = asgi_handler(app, root_path=root_path, lifespan=lifespan, proxy_headers=proxy_headers)
    server = AsgiTunnelServer(
        nc, hostname, handler, config=config, prefix=prefix, wire_tap=wire_tap, on_event=on_event
    )
    await handler.startup()
    try:
        await server.start()
    except BaseException:
        with contextlib.suppress(Exception):
            await handler.shutdown()
        raise
    return server
