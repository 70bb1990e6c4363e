"""``GET /api/links/me``: is the caller's desktop online right now? A live probe, no registry.

The gateway probes ``tunnel://<tunnelHostname>/api/links/status`` with its client's probe
timeouts and answers the presence document of :mod:`contract.presence`, always with
status 200 (the desktop being away is an answer, not a server error)::

    {"online": true, "tunnelHostname": "alice-k3v9q2m7x1ab", "hostname": "<what the daemon reports>",
     "capabilities": ["..."], "cliVersion": "1.2.3", "latencyMs": 2.7}
    {"online": false, "tunnelHostname": "alice-k3v9q2m7x1ab", "reason": "not_connected",
     "detail": "<for humans>"}

``nats_unavailable`` is also the answer, at once, while the gateway's own NATS connection
is down; an unexpected failure of the probe is ``error`` (and a logged traceback).
"""

from __future__ import annotations

import logging
import time

from aiohttp import web

import tunnel
from contract import presence

from .auth import User, authenticated
from .hostnames import tunnel_hostname
from .natsconn import GATEWAY_NATS
from .telemetry import GATEWAY_METRICS

__all__ = ["get_me", "probe_host"]

log = logging.getLogger("studio_gateway.presence")


async def probe_host(client: tunnel.TunnelClient, hostname: str) -> presence.Presence:
    """Probe one host with ``client``'s timeouts; never raises (except on cancellation)."""
    try:
        return await presence.probe(client, hostname)
    except Exception:
        # Presence must answer, whatever broke underneath; the log keeps the trace.
        log.exception("presence probe of %s failed unexpectedly", hostname)
        return presence.offline(hostname, "error", "the probe failed unexpectedly")


@authenticated
async def get_me(request: web.Request, user: User) -> web.StreamResponse:
    hostname = tunnel_hostname(user.id)
    nats = request.app[GATEWAY_NATS]
    client = nats.client
    started = time.monotonic()
    if not nats.available or client is None:
        result = presence.offline(hostname, "nats_unavailable", nats.unavailable_reason())
    else:
        result = await probe_host(client, hostname)
    request.app[GATEWAY_METRICS].presence_probe(
        "online" if result.online else result.reason or "offline", time.monotonic() - started
    )
    log.debug("presence probe", extra={"tunnel_hostname": hostname, "online": result.online})
    return web.json_response(result.as_json(), headers={"Cache-Control": "no-store"})
