"""``GET /api/links/me``: is the caller's desktop online right now? A live probe, no registry.

The gateway fetches ``tunnel://<tunnelHostname>/api/links/status`` and reports::

    {"online": true, "tunnelHostname": "alice-k3v9q2m7x1ab", "hostname": "<what the daemon reports>",
     "capabilities": ["..."], "cliVersion": "1.2.3", "latencyMs": 2.7}

or, always with status 200 (the desktop being away is an answer, not a server error)::

    {"online": false, "tunnelHostname": "alice-k3v9q2m7x1ab", "reason": "not_connected",
     "detail": "<for humans>"}

Stable ``reason`` codes: ``not_connected`` (nobody serves the host: known in
milliseconds, NATS no-responders), ``timeout`` (a daemon took the request but did
not answer in time), ``bad_status`` / ``bad_response`` (it answered, but not a
status document), ``error`` (any other tunnel failure) and ``nats_unavailable``
(the gateway's own NATS connection is down).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import web

import tunnel

from .auth import User, authenticated
from .hostnames import tunnel_hostname
from .natsconn import GATEWAY_NATS

__all__ = ["STATUS_PATH", "PresenceResult", "get_me", "probe_host"]

log = logging.getLogger("studio_gateway.presence")

STATUS_PATH: Final = "/api/links/status"
# A status document is a few hundred bytes; a daemon sending more is misbehaving.
MAX_STATUS_BYTES: Final = 64 * 1024
# Bounds on what we echo from the daemon, so a hostile desktop cannot bloat our answers.
MAX_CAPABILITIES: Final = 64
MAX_FIELD_LENGTH: Final = 256


@dataclass(frozen=True)
class PresenceResult:
    """The outcome of one probe; :meth:`as_json` is the API shape."""

    tunnel_hostname: str
    online: bool
    reason: str | None = None
    detail: str | None = None
    hostname: str | None = None
    capabilities: list[str] = field(default_factory=list)
    cli_version: str | None = None
    latency_ms: float | None = None

    def as_json(self) -> dict[str, Any]:
        if not self.online:
            return {
                "online": False,
                "tunnelHostname": self.tunnel_hostname,
                "reason": self.reason,
                "detail": self.detail,
            }
        return {
            "online": True,
            "tunnelHostname": self.tunnel_hostname,
            "hostname": self.hostname,
            "capabilities": self.capabilities,
            "cliVersion": self.cli_version,
            "latencyMs": self.latency_ms,
        }


def _offline(hostname: str, reason: str, detail: str) -> PresenceResult:
    return PresenceResult(hostname, online=False, reason=reason, detail=detail)


def _short_str(value: object) -> str | None:
    return value[:MAX_FIELD_LENGTH] if isinstance(value, str) else None


async def probe_host(client: tunnel.TunnelClient, hostname: str) -> PresenceResult:
    """Probe one host with ``client``'s timeouts; never raises for a tunnel failure."""
    started = time.perf_counter()
    try:
        async with await client.fetch(
            f"tunnel://{hostname}{STATUS_PATH}", headers=[("accept", "application/json")]
        ) as response:
            if response.status != 200:
                return _offline(hostname, "bad_status", f"the desktop answered HTTP {response.status}")
            raw = bytearray()
            async for chunk in response.aiter_bytes():
                raw += chunk
                if len(raw) > MAX_STATUS_BYTES:
                    return _offline(hostname, "bad_response", "the desktop's status document is too large")
    except tunnel.TunnelUnreachable:
        return _offline(hostname, "not_connected", "no desktop is connected for this account")
    except tunnel.TunnelTimeout as exc:
        return _offline(hostname, "timeout", f"the desktop did not answer in time ({exc.code})")
    except tunnel.TunnelError as exc:
        return _offline(hostname, "error", f"the desktop could not be reached ({exc.code})")
    except Exception:
        # Presence must answer, whatever broke underneath; the log keeps the trace.
        log.exception("presence probe of %s failed unexpectedly", hostname)
        return _offline(hostname, "error", "the probe failed unexpectedly")
    latency_ms = round((time.perf_counter() - started) * 1000, 2)
    try:
        status = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        status = None
    if not isinstance(status, dict):
        return _offline(hostname, "bad_response", "the desktop's status is not a JSON object")
    raw_capabilities = status.get("capabilities")
    capabilities = (
        [c[:MAX_FIELD_LENGTH] for c in raw_capabilities if isinstance(c, str)][:MAX_CAPABILITIES]
        if isinstance(raw_capabilities, list)
        else []
    )
    return PresenceResult(
        hostname,
        online=True,
        hostname=_short_str(status.get("hostname")) or hostname,
        capabilities=capabilities,
        cli_version=_short_str(status.get("cliVersion")),
        latency_ms=latency_ms,
    )


@authenticated
async def get_me(request: web.Request, user: User) -> web.StreamResponse:
    hostname = tunnel_hostname(user.id)
    nats = request.app[GATEWAY_NATS]
    client = nats.client
    if not nats.available or client is None:
        result = _offline(hostname, "nats_unavailable", nats.unavailable_reason())
    else:
        result = await probe_host(client, hostname)
    log.debug("presence probe", extra={"tunnel_hostname": hostname, "online": result.online})
    return web.json_response(result.as_json(), headers={"Cache-Control": "no-store"})
