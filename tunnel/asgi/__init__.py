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

import logging
from typing import Final

from .._config import DEFAULT_MAX_CHUNK
from ._lifespan import LifespanError
from ._scope import UNKNOWN_CLIENT
from ._server import AsgiHandler, AsgiTunnelServer, asgi_handler, serve_asgi
from ._types import ASGIApp, LifespanMode
from ._types import Message as Message
from ._types import Receive as Receive
from ._types import Scope as Scope
from ._types import Send as Send
from ._websocket import ClientDisconnected
from ._websocket import is_websocket_upgrade as is_websocket_upgrade

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

log = logging.getLogger("tunnel.asgi")

# Tunables. The modules of this package read them here at use time (``asgi.DISCONNECT_GRACE``),
# so setting ``tunnel.asgi.DISCONNECT_GRACE`` (as a test does) still takes effect.

# Response bytes buffered between the application's send() and the tunnel before
# send() waits: one full data frame, so small sends coalesce into big frames while
# a slow caller still stops the application (the tunnel's window does the rest).
RESPONSE_HIGH_WATER: Final = DEFAULT_MAX_CHUNK
# After the caller left, the application gets this long to notice http.disconnect
# and return before its task is cancelled (sends are dropped meanwhile).
DISCONNECT_GRACE: Final = 5.0
# Once lifespan shutdown completed, the lifespan task should return at once.
LIFESPAN_EXIT_GRACE: Final = 1.0
