"""The API: :class:`AsgiHandler` (a tunnel handler running an ASGI application, one cycle
per request), :func:`asgi_handler`, and :func:`serve_asgi` with its :class:`AsgiTunnelServer`."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any, Unpack
from urllib.parse import quote

from .. import asgi
from .._config import DEFAULT_DRAIN_TIMEOUT, LegacyServerKwargs, ServerConfig, server_config
from .._diagnostics import EventHook
from .._handler import Request, Response
from .._natsio.common import WireTap
from .._natsio.server import TunnelServer
from .._subjects import DEFAULT_PREFIX
from .._ws_protocol import GOING_AWAY
from ..websocket import CLOSE_TIMEOUT
from ._http import _Cycle
from ._lifespan import _Lifespan
from ._scope import http_scope, websocket_scope
from ._types import ASGIApp, LifespanMode, Scope
from ._websocket import _WebSocketCycle, is_websocket_upgrade

if TYPE_CHECKING:  # nats-py is imported at runtime only under tunnel/_natsio
    from nats.aio.client import Client as NATS


class AsgiHandler:
    """A :data:`tunnel.Handler` that runs an ASGI application; see the package docstring."""

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
            await asyncio.wait(pending, timeout=asgi.LIFESPAN_EXIT_GRACE)

    def scope_for(self, request: Request) -> Scope:
        """The ASGI http scope for one tunnel request (see the package docstring)."""
        return http_scope(request, self.root_path, self._raw_root, self.proxy_headers, self.state)

    def websocket_scope_for(self, request: Request) -> Scope:
        """The ASGI websocket scope (spec 2.4) for a WebSocket upgrade request."""
        return websocket_scope(self.scope_for(request), request)

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
    ``root_path`` and ``proxy_headers`` shape the scope (see the package docstring).
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
        await self.asgi.aclose(max(deadline - loop.time(), asgi.LIFESPAN_EXIT_GRACE))
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
    ``root_path`` and ``proxy_headers`` as described in the package docstring).

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
