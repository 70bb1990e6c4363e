"""tunnel: fetch-style streaming HTTP over core NATS subjects.

Call a desktop::

    async with await tunnel.fetch(nc, "tunnel://desk.example/api/links/status") as resp:
        print(resp.status, await resp.json())

Serve one::

    async def handler(request: tunnel.Request) -> tunnel.Response:
        return tunnel.Response(200, [("content-type", "text/plain")], b"hello")

    server = await tunnel.serve(nc, "desk.example", handler)

Options travel as value objects: ``TunnelClient(nc, timeouts=tunnel.Timeouts(idle=5),
limits=tunnel.Limits(window=1 << 20))``, ``tunnel.serve(nc, host, handler,
config=tunnel.ServerConfig(max_concurrent=64))``.

Add-ons live in public submodules, imported on demand: :mod:`tunnel.asgi`
(serve an ASGI app, HTTP and WebSocket), :mod:`tunnel.httpx_transport` (call tunnel
URLs with httpx), :mod:`tunnel.websocket` (WebSocket client over upgraded streams;
``tunnel.websocket_connect`` loads it on first use) and :mod:`tunnel.connect` (build
a nats-py connection from creds/nkey/token).

Wire protocol: the reference ``tunnel.v1`` JSON frames, plus negotiated
extensions (binary data frames, credit-based flow control, heartbeats).

``tunnel.__version__`` is the installed ``natslink`` distribution's version (one
version for the whole distribution; linkd and linkctl report this one), or
``0.0.0+unknown`` when running from a source tree that is not installed. The
package is typed (``py.typed``).
"""

from importlib import metadata as _metadata
from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

from ._config import (
    DEFAULT_FIRST_FRAME_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CHUNK,
    DEFAULT_MAX_WINDOW,
    DEFAULT_UNREACHABLE_GRACE,
    DEFAULT_WINDOW,
    DEFAULT_WINDOW_BUDGET,
    Limits,
    ServerConfig,
    Timeouts,
)
from ._diagnostics import EventHook, TunnelCounters, TunnelEvent, logging_hook
from ._errors import (
    BufferLimitExceeded,
    DeadlineExceeded,
    ErrorCode,
    IdleTimeout,
    IntegrityError,
    LocalProtocolError,
    NoFirstFrameTimeout,
    PermissionDenied,
    RemoteError,
    RemoteProtocolError,
    StallTimeout,
    TunnelAborted,
    TunnelConnectionError,
    TunnelError,
    TunnelTimeout,
    TunnelUnreachable,
    UpgradeUnsupported,
)
from ._frames import check_headers
from ._handler import Handler, Request, Response
from ._natsio.client import FetchResponse, TunnelClient, client_for, fetch, parse_tunnel_url
from ._natsio.server import ServerStats, TunnelServer, serve
from ._subjects import DEFAULT_PREFIX, LEGACY_PREFIX, HostSubjects, host_token

if _TYPE_CHECKING:
    from .websocket import websocket_connect


def __getattr__(name: str) -> _Any:
    """``websocket_connect`` is imported on first use: wsproto (and h11) cost ~50 ms at import."""
    if name == "websocket_connect":
        from .websocket import websocket_connect

        return websocket_connect
    raise AttributeError(f"module 'tunnel' has no attribute {name!r}")


try:
    __version__: str = _metadata.version("natslink")
except _metadata.PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

__all__ = [
    "DEFAULT_FIRST_FRAME_TIMEOUT",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_MAX_CHUNK",
    "DEFAULT_MAX_WINDOW",
    "DEFAULT_PREFIX",
    "DEFAULT_UNREACHABLE_GRACE",
    "DEFAULT_WINDOW",
    "DEFAULT_WINDOW_BUDGET",
    "LEGACY_PREFIX",
    "BufferLimitExceeded",
    "DeadlineExceeded",
    "ErrorCode",
    "EventHook",
    "FetchResponse",
    "Handler",
    "HostSubjects",
    "IdleTimeout",
    "IntegrityError",
    "Limits",
    "LocalProtocolError",
    "NoFirstFrameTimeout",
    "PermissionDenied",
    "RemoteError",
    "RemoteProtocolError",
    "Request",
    "Response",
    "ServerConfig",
    "ServerStats",
    "StallTimeout",
    "Timeouts",
    "TunnelAborted",
    "TunnelClient",
    "TunnelConnectionError",
    "TunnelCounters",
    "TunnelError",
    "TunnelEvent",
    "TunnelServer",
    "TunnelTimeout",
    "TunnelUnreachable",
    "UpgradeUnsupported",
    "check_headers",
    "client_for",
    "fetch",
    "host_token",
    "logging_hook",
    "parse_tunnel_url",
    "serve",
    "websocket_connect",
]
