"""The gateway's own series and ``GET /metrics`` (with the run series of :mod:`.runs.metrics`).

Series (per gateway instance):

- ``studio_link_sessions_total{outcome}``: ``POST /api/links/session`` answers by outcome
  (``issued``, or the error code: ``tunnel_disabled``, ``no_public_url``,
  ``tunnel_not_configured``, ``nats_unavailable``, ``invalid_body``, ``invalid_public_key``);
- ``studio_presence_probes_total{result}`` and ``studio_presence_probe_seconds{result}``:
  ``GET /api/links/me`` probes by result (``online``, or the offline reason: ``not_connected``,
  ``timeout``, ``nats_unavailable``, ``error``, ...) and how long each took;
- ``studio_tunnel_requests_total{outcome}`` and ``studio_tunnel_request_seconds``: every
  request the gateway made to a desktop over the tunnel (probes, work items, previews), by
  outcome (``ok`` or the tunnel's error code);
- ``studio_nats_disconnects_total``, ``studio_nats_reconnects_total``, ``studio_nats_connected``:
  the gateway's own NATS connection;
- ``process_*`` and ``python_info``: ``prometheus_client``'s process and platform collectors.

``/metrics`` protection: with ``GATEWAY_METRICS_TOKEN`` set, a scrape must send
``Authorization: Bearer <token>`` (401 otherwise), from anywhere. Without it, only a
direct loopback peer (no ``Forwarded``/``X-Forwarded-For``/``X-Real-IP`` header, which a
proxy in front would add) is answered, anyone else gets 403: run counts and host activity
are not for the Internet, and a local scrape or a test needs no setup.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
from collections.abc import Callable
from typing import Final

from aiohttp import web

from tunnel import TunnelEvent

from .errors import json_error
from .metrics import Counter, Gauge, Histogram, Registry

__all__ = ["GATEWAY_METRICS", "GatewayMetrics", "get_metrics", "metrics_allowed"]

# Probes answer in milliseconds or time out at the presence timeout (5 s by default).
PROBE_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_FORWARDING_HEADERS: Final = ("Forwarded", "X-Forwarded-For", "X-Real-IP")
_NO_STORE: Final = {"Cache-Control": "no-store"}
# Label values come from code, never from a desktop (a label per string it sends would grow
# the scrape without bound): presence's stable reasons, anything else is "other".
PRESENCE_RESULTS: Final = frozenset(
    {"online", "not_connected", "timeout", "bad_status", "bad_response", "error", "nats_unavailable"}
)


class GatewayMetrics:
    """The gateway's series, registered on the application's registry (the runs' one)."""

    def __init__(self, registry: Registry, *, nats_connected: Callable[[], bool] | None = None) -> None:
        self.registry = r = registry
        self.sessions = r.register(
            Counter("studio_link_sessions_total", "Link session requests by outcome.", ("outcome",))
        )
        self.presence_probes = r.register(
            Counter("studio_presence_probes_total", "Presence probes of desktops by result.", ("result",))
        )
        self.presence_seconds = r.register(
            Histogram(
                "studio_presence_probe_seconds",
                "How long a presence probe took.",
                ("result",),
                buckets=PROBE_BUCKETS,
            )
        )
        self.tunnel_requests = r.register(
            Counter(
                "studio_tunnel_requests_total",
                "Requests the gateway made to desktops by outcome.",
                ("outcome",),
            )
        )
        self.tunnel_seconds = r.register(
            Histogram("studio_tunnel_request_seconds", "Duration of the gateway's tunnel requests.")
        )
        self.nats_disconnects = r.register(
            Counter("studio_nats_disconnects_total", "Times the gateway's NATS connection dropped.")
        )
        self.nats_reconnects = r.register(
            Counter("studio_nats_reconnects_total", "Times the gateway's NATS connection came back.")
        )
        connected = nats_connected
        self.nats_connected = r.register(
            Gauge(
                "studio_nats_connected",
                "1 while the gateway's NATS connection is up.",
                source=(lambda: 1.0 if connected() else 0.0) if connected is not None else None,
            )
        )
        r.add_process_collectors()

    def presence_probe(self, result: str, seconds: float) -> None:
        result = result if result in PRESENCE_RESULTS else "other"
        self.presence_probes.inc(result=result)
        self.presence_seconds.observe(seconds, result=result)

    def tunnel_event(self, event: TunnelEvent) -> None:
        """The gateway's tunnel client's ``on_event`` hook: one count per finished request."""
        if event.kind != "request.ended" or event.side != "client":
            return
        self.tunnel_requests.inc(outcome=event.outcome or "ok")
        if event.duration is not None:
            self.tunnel_seconds.observe(event.duration)

    def session_answered(self, response: web.Response) -> None:
        """Count one ``POST /api/links/session`` answer: ``issued`` or its error code."""
        outcome = "issued"
        if response.status != 200:
            outcome = f"http_{response.status}"
            body = response.body
            if isinstance(body, bytes):
                with contextlib.suppress(ValueError, TypeError, KeyError):
                    outcome = str(json.loads(body)["error"]["code"])
        self.sessions.inc(outcome=outcome)

    def nats_event(self, event: str) -> None:
        """``disconnected`` or ``reconnected`` (from the connection's callbacks)."""
        if event == "disconnected":
            self.nats_disconnects.inc()
        elif event == "reconnected":
            self.nats_reconnects.inc()


GATEWAY_METRICS: Final = web.AppKey("studio_gateway.metrics", GatewayMetrics)
METRICS_TOKEN: Final = web.AppKey("studio_gateway.metrics_token", str)


def _loopback_direct(request: web.Request) -> bool:
    if any(name in request.headers for name in _FORWARDING_HEADERS):
        return False
    peer = request.remote
    if not peer:
        return False
    try:
        return ipaddress.ip_address(peer.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def metrics_allowed(request: web.Request, token: str | None) -> web.Response | None:
    """None when this scrape may read ``/metrics``, else the 401/403 to answer."""
    if token:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode()):
            return None
        return json_error(401, "unauthorized", "/metrics needs Authorization: Bearer <GATEWAY_METRICS_TOKEN>")
    if _loopback_direct(request):
        return None
    return json_error(
        403,
        "metrics_forbidden",
        "/metrics answers loopback only; set GATEWAY_METRICS_TOKEN to scrape remotely",
    )


async def get_metrics(request: web.Request) -> web.StreamResponse:
    """Text 0.0.4, or OpenMetrics when the scrape's ``Accept`` asks for it."""
    refused = metrics_allowed(request, request.app.get(METRICS_TOKEN))
    if refused is not None:
        return refused
    body, content_type = request.app[GATEWAY_METRICS].registry.exposition(request.headers.get("Accept"))
    return web.Response(body=body, headers={"Content-Type": content_type, **_NO_STORE})
