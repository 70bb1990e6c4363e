"""The aiohttp application: routes, shared state and the NATS connection's lifetime.

``create_app(config)`` validates everything that can be validated without a
network (keys, credentials, URLs: start-up errors are :class:`ConfigError`), then
returns an application whose ``cleanup_ctx`` opens the gateway's NATS
connection in the background on start-up and closes it on shutdown.

Routes:

- ``GET /healthz``: liveness, no auth; ``{"status": "ok", "nats": "connected"|"disconnected",
  "runs": "ready"|"unavailable"|"disabled"}`` plus ``runsReason`` when runs are unavailable
  (200 even while NATS is down: restarting the gateway would not bring NATS back);
- ``POST /api/links/session``: see :mod:`.sessions`;
- ``GET /api/links/me``: see :mod:`.presence`;
- ``POST /api/links/preview`` and every request for a preview host: see :mod:`.preview`
  (a middleware in front of everything sends ``<label>.<GATEWAY_PREVIEW_DOMAIN>`` to the
  desktop's preview, so no preview host ever reaches the API);
- ``/api/runs...`` and ``/api/threads/{threadId}/messages``: see :mod:`.runs.api` (the run
  machinery, :mod:`.runs.service`, starts after NATS and stops before it);
- ``GET /metrics``: Prometheus/OpenMetrics, see :mod:`.telemetry` (token or loopback only);
- ``GET /api/admin/runs/dead-letters``: see :mod:`.runs.admin` (a token with scope ``runs:admin``);
- ``GET /api/admin/processors``: see :mod:`.runs.processors`; ``/api/webhooks...``: see :mod:`.webhooks`.

Limits on requests: a declared ``Content-Length`` over the largest body any route takes
(``RUNS_MAX_BODY_BYTES``, at least 64 KiB) is ``413`` at once, before auth; each route then
has its own limit (:mod:`.bodies`). aiohttp's parser limits the request line and each header
to 8190 bytes and a request to 128 headers; beyond that, and for anything it cannot parse,
:func:`run_app` answers ``400 bad_request`` without echoing the request (:mod:`.errors`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Final

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

import tunnel
from contract.permissions import GrantProvider
from contract.routes import ME_PATH, SESSION_PATH

from .auth import VERIFIER, TokenVerifier
from .bodies import declared_length_limit, expect_within
from .config import GatewayConfig
from .discovery import GatewayDiscovery
from .errors import GatewayRequestHandler, error_middleware
from .natsconn import GATEWAY_NATS, GatewayNats
from .presence import get_me
from .preview.api import PREVIEW_PATH, create_preview
from .preview.routing import preview_middleware
from .preview.service import PREVIEW, PreviewService
from .runs.admin import add_routes as add_run_admin_routes
from .runs.api import add_routes as add_run_routes
from .runs.processors.service import attach as attach_processors
from .runs.service import RUNS, runs_lifetime
from .runs.service import attach as attach_runs
from .sessions import MINTER, SessionMinter, create_session
from .telemetry import GATEWAY_METRICS, METRICS_TOKEN, GatewayMetrics, get_metrics
from .webhooks.service import attach as attach_webhooks

__all__ = ["CONFIG", "GatewayRunner", "create_app", "run_app"]

log = logging.getLogger("studio_gateway")

CONFIG: Final = web.AppKey("studio_gateway.config", GatewayConfig)
# Session requests carry a public key at most; refuse big bodies before reading them.
CLIENT_MAX_SIZE: Final = 64 * 1024


async def healthz(request: web.Request) -> web.StreamResponse:
    """Liveness, and what works right now: an operator sees why runs answer 503 without a token."""
    return web.json_response(health(request.app))


def health(app: web.Application) -> dict[str, str]:
    """The ``/healthz`` document (also the gateway's discovery ``health`` endpoint)."""
    nats = app[GATEWAY_NATS]
    runs = app[RUNS]
    body = {"status": "ok", "nats": "connected" if nats.available else "disconnected"}
    if not runs.runs.enabled:
        body["runs"] = "disabled"
    elif runs.working:
        body["runs"] = "ready"
    else:
        body["runs"] = "unavailable"
        body["runsReason"] = runs.unavailable_reason()
    return body


async def _nats_lifetime(app: web.Application) -> AsyncIterator[None]:
    nats = app[GATEWAY_NATS]
    await nats.start()
    yield
    await nats.close()


def create_app(config: GatewayConfig, *, extra_grants: tuple[GrantProvider, ...] = ()) -> web.Application:
    """Build the gateway application (raises ConfigError for bad key material or credentials).

    ``extra_grants``: more NATS permissions for every daemon credential, each confined to
    the daemon's own host prefix (e.g. run uplink subjects; see :mod:`contract.permissions`).
    """
    largest_body = max(CLIENT_MAX_SIZE, config.runs.max_body_bytes)
    nats = GatewayNats(config)
    preview = PreviewService(config, nats)
    # The preview first: its hosts stream bodies of any size and never see the API's errors.
    app = web.Application(
        middlewares=[preview_middleware(preview), error_middleware, declared_length_limit(largest_body)],
        client_max_size=CLIENT_MAX_SIZE,
    )
    app[CONFIG] = config
    app[VERIFIER] = TokenVerifier(config.auth)
    app[MINTER] = minter = SessionMinter(config, extra_grants=extra_grants)
    problem = minter.unavailable()
    if problem is not None:
        log.warning("link sessions will answer 503 %s: %s", *problem)
    app[GATEWAY_NATS] = nats
    app[PREVIEW] = preview
    app.cleanup_ctx.append(_nats_lifetime)
    runs = attach_runs(app, config)
    # One registry per application: the run series and the gateway's own.
    app[GATEWAY_METRICS] = metrics = GatewayMetrics(
        runs.metrics.registry, nats_connected=lambda: nats.available
    )
    nats.on_tunnel_event = metrics.tunnel_event
    nats.on_connection_event = metrics.nats_event
    nats.on_connected = GatewayDiscovery(lambda: health(app), tunnel.__version__).attach
    if config.metrics_token:
        app[METRICS_TOKEN] = config.metrics_token
    else:
        log.info("/metrics answers loopback peers only (GATEWAY_METRICS_TOKEN is not set)")
    # After NATS: cleanup runs in reverse, so deliveries drain before the connection closes.
    app.cleanup_ctx.append(runs_lifetime)
    app.router.add_get("/healthz", healthz)
    expect = expect_within(largest_body)
    app.router.add_post(SESSION_PATH, create_session, expect_handler=expect)
    app.router.add_get(ME_PATH, get_me)
    app.router.add_post(PREVIEW_PATH, create_preview, expect_handler=expect)
    add_run_routes(app, expect_handler=expect)
    add_run_admin_routes(app)
    # Processors over the run stream, and the webhooks (one of them): after runs, stopped before.
    attach_processors(app, config)
    attach_webhooks(app, config)
    app.router.add_get("/metrics", get_metrics)
    return app


class _GatewayServer(web.Server):
    """aiohttp's low-level server, but its connections are :class:`GatewayRequestHandler`.

    aiohttp has no setting for the connection class: this is ``web.Server.__call__`` with
    the class swapped (the integration tests catch a change in aiohttp that breaks it).
    """

    def __call__(self) -> web.RequestHandler:
        return GatewayRequestHandler(self, loop=self._loop, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """``web.AppRunner`` serving with :class:`GatewayRequestHandler` connections."""

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()
        # Two private attributes of aiohttp's Server (what it was built with): if an aiohttp
        # upgrade drops them, serve with aiohttp's own handler rather than not at all.
        loop, kwargs = getattr(plain, "_loop", None), getattr(plain, "_kwargs", None)
        if loop is None or not isinstance(kwargs, dict):
            log.warning("this aiohttp's Server has no _loop/_kwargs: malformed requests get aiohttp's 400")
            return plain
        return _GatewayServer(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=loop,
            **kwargs,
        )


def run_app(
    app: web.Application,
    *,
    host: str,
    port: int,
    access_log_class: type[AbstractAccessLogger],
    shutdown_timeout: float,
) -> None:
    """``web.run_app(app, ...)`` with :class:`GatewayRunner`: until SIGINT/SIGTERM, then a
    graceful stop (requests in flight get ``shutdown_timeout``). OSError if the port is taken."""

    async def main() -> None:
        runner = GatewayRunner(
            app, handle_signals=True, access_log_class=access_log_class, shutdown_timeout=shutdown_timeout
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
            await asyncio.Event().wait()  # SIGINT/SIGTERM raise GracefulExit out of the loop
        finally:
            await runner.cleanup()

    # asyncio.run then cancels main(), whose cleanup stops the site and the application.
    with contextlib.suppress(web.GracefulExit, KeyboardInterrupt):
        asyncio.run(main())
