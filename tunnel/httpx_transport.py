"""An httpx transport that sends ``tunnel://`` URLs through the tunnel.

::

    async with httpx.AsyncClient(transport=TunnelTransport(nc)) as client:
        r = await client.get("tunnel://desk.example/api/status")

Both bodies stream: the request body is read from ``request.stream`` as httpx
produces it, the response body is handed to httpx as it arrives (leaving a
``client.stream(...)`` block early aborts the server's handler).

Timeouts: httpx's per-request timeouts are used when the request carries them
(``AsyncClient`` always does; its default is 5 s): ``connect`` becomes the tunnel's
first-frame timeout and ``read`` its idle timeout (heartbeats keep a slow but live
server from tripping it); ``write`` and ``pool`` have no tunnel meaning. The
``first_frame_timeout``/``idle_timeout`` given to the transport apply to requests
without that extension; ``timeout`` (the overall deadline, which httpx has no
equivalent of) applies to every request.

Redirects (``AsyncClient(follow_redirects=True)``): httpx resolves a ``Location``
against the request URL with :func:`urllib.parse.urljoin`, which only joins onto
schemes it knows, so a relative ``Location: /target`` under ``tunnel://desk.example``
came out as a bare ``/target``; and an application behind the tunnel (see
:mod:`tunnel.asgi`) builds absolute URLs as ``http://desk.example/...``, which is
not a ``tunnel://`` URL. So for a redirect (301, 302, 303, 307, 308) this transport
rewrites the ``Location`` to the ``tunnel://`` URL the tunnel can follow when it
names the same tunnel host:

- a relative reference (``/target``, ``target``, ``../x``, ``?page=2``) is resolved
  against the request URL; a network-path ``//<same host>/x`` too, but ``//other.example/x``
  is left alone (a desktop must not bounce its caller, with the caller's headers, to
  another host its credentials reach);
- ``http://`` or ``https://`` with the request's own host, no port and no
  credentials becomes ``tunnel://<host>/...`` (path, query and fragment kept);
- anything else is left as sent: ``tunnel://other.example/...`` is followed through
  the tunnel as it is; a redirect leaving the tunnel (``https://example.com/``, or
  ``http://desk.example:8080/``) reaches this transport as a non-tunnel URL and fails
  with :class:`NotATunnelURL` (an ``httpx.UnsupportedProtocol``), unless the client
  sends such URLs elsewhere (``AsyncClient(mounts={"tunnel://": TunnelTransport(nc)})``
  leaves the rest to httpx's own transport).

The rewritten redirect keeps httpx's same-origin rules working (``Authorization``
is kept, as the target is the same tunnel host); the ``Location`` as the server sent
it is in ``response.extensions["tunnel_original_location"]``. Links an application
puts in a body (``url_for``) are not touched: fetch one through the tunnel with
``httpx.URL(link).copy_with(scheme="tunnel")``.

Errors: every tunnel error becomes the matching httpx exception (see
:func:`map_tunnel_error`), raised ``from`` the tunnel error. The httpx exception
is also a :class:`TunnelTransportError`, so ``exc.tunnel_code`` (stable, e.g.
``"tunnel_unreachable"``) and ``exc.tunnel_error`` are at hand.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urljoin

import httpx

from ._errors import (
    ErrorCode,
    LocalProtocolError,
    NoFirstFrameTimeout,
    RemoteProtocolError,
    TunnelConnectionError,
    TunnelError,
    TunnelTimeout,
    TunnelUnreachable,
)
from ._natsio.client import FetchResponse, TunnelClient
from ._subjects import DEFAULT_PREFIX

if TYPE_CHECKING:  # nats-py is imported at runtime only under tunnel/_natsio
    from nats.aio.client import Client as NATS

__all__ = [
    "HOP_BY_HOP_HEADERS",
    "NotATunnelURL",
    "TunnelTransport",
    "TunnelTransportError",
    "map_tunnel_error",
    "tunnel_location",
]

# Headers that describe one HTTP connection, not the request: httpx adds them for a
# socket we do not have. ``host`` is dropped too: the tunnel hostname is the host,
# and the server side (e.g. the ASGI adapter) supplies it.
HOP_BY_HOP_HEADERS: Final = frozenset(
    {"host", "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}
)

# The statuses httpx follows a Location of (httpx.Response.has_redirect_location).
_REDIRECT_STATUSES: Final = frozenset({301, 302, 303, 307, 308})

_UNSET: Any = object()


class NotATunnelURL(httpx.UnsupportedProtocol):
    """A request (often a redirect leaving the tunnel) for a URL that is not ``tunnel://host/...``."""


def tunnel_location(request_url: httpx.URL, location: str) -> str | None:
    """The ``tunnel://`` URL a redirect ``location`` from ``request_url`` leads to on the tunnel.

    None when the location is already a ``tunnel://`` URL, leaves the tunnel or is not a
    URL (see the module docstring for the rules).
    """
    try:
        target = httpx.URL(location)
    except httpx.InvalidURL:
        return None
    if not target.scheme:
        # A relative reference: resolve it as if the base were http (which urljoin knows),
        # then put the scheme back.
        base = str(request_url.copy_with(scheme="http"))
        joined = urljoin(base, location)
        if not joined.startswith("http://"):
            return None
        resolved = httpx.URL(joined)
        if resolved.host != request_url.host or resolved.userinfo:
            # A network-path reference (``//other.example/x``) to another host is not turned into
            # a tunnel call: a desktop must not bounce its caller (with the caller's headers and,
            # on 307/308, its body) to another host its credentials reach. An explicit
            # ``tunnel://other`` Location stays the caller's client's decision, as before.
            return None
        return "tunnel://" + joined.removeprefix("http://")
    if (
        target.scheme in ("http", "https")
        and target.host
        and target.host == request_url.host
        and target.port is None
        and not target.userinfo
    ):
        return str(target.copy_with(scheme="tunnel"))
    return None


class TunnelTransportError(Exception):
    """Mixed into every httpx exception this transport raises for a tunnel error."""

    tunnel_error: TunnelError

    @property
    def tunnel_code(self) -> str:
        """The stable tunnel error code, e.g. ``tunnel_idle_timeout``."""
        return self.tunnel_error.code


class _ConnectError(TunnelTransportError, httpx.ConnectError):
    pass


class _ConnectTimeout(TunnelTransportError, httpx.ConnectTimeout):
    pass


class _ReadTimeout(TunnelTransportError, httpx.ReadTimeout):
    pass


class _ReadError(TunnelTransportError, httpx.ReadError):
    pass


class _WriteError(TunnelTransportError, httpx.WriteError):
    pass


class _RemoteProtocolError(TunnelTransportError, httpx.RemoteProtocolError):
    pass


class _LocalProtocolError(TunnelTransportError, httpx.LocalProtocolError):
    pass


def map_tunnel_error(
    exc: TunnelError, request: httpx.Request | None = None, *, response_started: bool = False
) -> httpx.TransportError:
    """The httpx exception for a tunnel error (raise it ``from exc``).

    ========================================  =============================
    tunnel error (code)                        httpx exception
    ========================================  =============================
    TunnelUnreachable (tunnel_unreachable)     ConnectError
    NoFirstFrameTimeout (tunnel_no_first_frame) ConnectTimeout
    IdleTimeout, DeadlineExceeded              ReadTimeout
    RemoteProtocolError                        RemoteProtocolError
    LocalProtocolError (tunnel_bad_request)    LocalProtocolError
    TunnelConnectionError                      ConnectError before the response
                                               head, ReadError after it
    tunnel_body_error (our request body)       WriteError
    anything else (tunnel_handler_error, ...)  ReadError
    ========================================  =============================
    """
    cls: type[httpx.TransportError]
    if isinstance(exc, TunnelUnreachable):
        cls = _ConnectError
    elif isinstance(exc, NoFirstFrameTimeout):
        cls = _ConnectTimeout
    elif isinstance(exc, TunnelTimeout):
        cls = _ReadTimeout
    elif isinstance(exc, RemoteProtocolError):
        cls = _RemoteProtocolError
    elif isinstance(exc, LocalProtocolError):
        cls = _LocalProtocolError
    elif isinstance(exc, TunnelConnectionError):
        cls = _ReadError if response_started else _ConnectError
    elif exc.code == ErrorCode.BODY_ERROR:
        cls = _WriteError
    else:
        cls = _ReadError
    err = cls(str(exc), request=request)
    assert isinstance(err, TunnelTransportError)
    err.tunnel_error = exc
    return err


class _RequestBody:
    """Feeds httpx's request stream to the tunnel and remembers the application's own error."""

    def __init__(self, stream: httpx.AsyncByteStream) -> None:
        self.stream = stream
        self.error: Exception | None = None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.stream:
                yield chunk
        except Exception as exc:
            self.error = exc
            raise


class TunnelResponseStream(httpx.AsyncByteStream):
    """A response body streaming from the tunnel; ``aclose()`` before the end aborts the request."""

    def __init__(self, response: FetchResponse, request: httpx.Request, body: _RequestBody | None) -> None:
        self.response = response
        self._request = request
        self._body = body

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.response.aiter_bytes():
                yield chunk
        except TunnelError as exc:
            if self._body is not None and self._body.error is not None:
                raise self._body.error from exc
            raise map_tunnel_error(exc, self._request, response_started=True) from exc

    async def aclose(self) -> None:
        await self.response.aclose()


class TunnelTransport(httpx.AsyncBaseTransport):
    """``httpx.AsyncClient(transport=TunnelTransport(nc))``: ``tunnel://`` URLs over NATS.

    Pass a NATS connection (the transport then owns a :class:`TunnelClient` and
    closes it with the httpx client) or a ``TunnelClient`` you manage yourself.
    ``timeout``, ``first_frame_timeout`` and ``idle_timeout`` default to the
    client's ``timeouts``; see the module docstring for how httpx timeouts combine with them.
    """

    def __init__(
        self,
        nc: NATS | TunnelClient,
        *,
        prefix: str = DEFAULT_PREFIX,
        timeout: float | None = _UNSET,
        first_frame_timeout: float | None = _UNSET,
        idle_timeout: float | None = _UNSET,
    ) -> None:
        if isinstance(nc, TunnelClient):
            if prefix != DEFAULT_PREFIX and prefix != nc.prefix:
                raise ValueError("prefix given together with a TunnelClient that uses another prefix")
            self.client = nc
            self._owns_client = False
        else:
            self.client = TunnelClient(nc, prefix=prefix)
            self._owns_client = True
        own = self.client.timeouts
        self.timeout = own.total if timeout is _UNSET else timeout
        self.first_frame_timeout = own.first_frame if first_frame_timeout is _UNSET else first_frame_timeout
        self.idle_timeout = own.idle if idle_timeout is _UNSET else idle_timeout

    def _timeouts(self, request: httpx.Request) -> tuple[float | None, float | None, float | None]:
        """(total, first frame, idle) for one request: httpx's connect/read timeouts win when present."""
        first, idle = self.first_frame_timeout, self.idle_timeout
        httpx_timeouts = request.extensions.get("timeout")
        if isinstance(httpx_timeouts, dict):
            first = httpx_timeouts.get("connect", first)
            idle = httpx_timeouts.get("read", idle)
        return self.timeout, first, idle

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme != "tunnel":
            shown = f"{url.scheme}://{url.netloc.decode('ascii', 'replace')}{url.path}"  # no secrets
            raise NotATunnelURL(
                f"TunnelTransport only sends tunnel:// URLs, not {url.scheme}:// ({shown}); a redirect "
                "off the tunnel needs another transport (mount TunnelTransport for 'tunnel://' only)",
                request=request,
            )
        if url.port is not None or url.userinfo:
            raise NotATunnelURL("tunnel:// URLs carry no port or credentials", request=request)
        target = url.raw_path.decode("ascii")
        headers = [
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in request.headers.raw
            if name.lower().decode("latin-1") not in HOP_BY_HOP_HEADERS
        ]
        body: bytes | _RequestBody | None
        try:
            body = request.content or None
        except httpx.RequestNotRead:
            stream = request.stream
            if not isinstance(stream, httpx.AsyncByteStream):
                raise RuntimeError(
                    "TunnelTransport needs an async request body (use httpx.AsyncClient)"
                ) from None
            body = _RequestBody(stream)
        total, first, idle = self._timeouts(request)
        try:
            response = await self.client.fetch(
                f"tunnel://{url.host}{target}",
                method=request.method,
                headers=headers,
                body=body,
                timeout=total,
                first_frame_timeout=first,
                idle_timeout=idle,
            )
        except TunnelError as exc:
            if isinstance(body, _RequestBody) and body.error is not None:
                raise body.error from exc
            raise map_tunnel_error(exc, request) from exc
        extensions: dict[str, Any] = {"tunnel_request_id": response.request_id}
        if response.reason:
            extensions["reason_phrase"] = response.reason.encode("latin-1", errors="replace")
        response_headers = response.headers
        if response.status in _REDIRECT_STATUSES:
            response_headers = self._followable(url, response_headers, extensions)
        return httpx.Response(
            status_code=response.status,
            headers=response_headers,
            stream=TunnelResponseStream(response, request, body if isinstance(body, _RequestBody) else None),
            request=request,
            extensions=extensions,
        )

    @staticmethod
    def _followable(
        url: httpx.URL, headers: list[tuple[str, str]], extensions: dict[str, Any]
    ) -> list[tuple[str, str]]:
        """``headers`` with a same-host redirect ``Location`` as a ``tunnel://`` URL."""
        locations = [i for i, (name, _) in enumerate(headers) if name.lower() == "location"]
        if len(locations) != 1:
            return headers
        index = locations[0]
        name, original = headers[index]
        followable = tunnel_location(url, original)
        if followable is None or followable == original:
            return headers
        extensions["tunnel_original_location"] = original
        return [*headers[:index], (name, followable), *headers[index + 1 :]]

    async def aclose(self) -> None:
        if self._owns_client:
            await self.client.aclose()
