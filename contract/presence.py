"""The presence probe and its document: is a desktop serving its host right now?

The probe is ``GET tunnel://<host>/api/links/status`` (:data:`contract.routes.STATUS_PATH`)
with a short timeout; no registry is asked. Its outcome, the presence document, is what
the gateway answers on ``GET /api/links/me`` and what ``linkctl status --json`` prints
(linkctl adds ``checkedAt``, and ``via``/``roundTripMs`` through a gateway)::

    {"online": true, "tunnelHostname": "alice-k3v9q2m7x1ab", "hostname": "<what the daemon reports>",
     "capabilities": ["..."], "cliVersion": "1.2.3", "latencyMs": 2.7}
    {"online": false, "tunnelHostname": "alice-k3v9q2m7x1ab", "reason": "not_connected",
     "detail": "<for humans>"}

Stable ``reason`` codes: ``not_connected`` (nobody serves the host: known in
milliseconds, NATS no-responders) and ``timeout`` (a daemon took the request but did
not answer in time) mean offline; ``bad_status`` / ``bad_response`` (it answered, but
not a status document), ``error`` (any other tunnel failure) and ``nats_unavailable``
(the prober's own NATS connection is down) mean the probe could not tell.

What is echoed from the daemon is bounded (:data:`MAX_STATUS_BYTES`,
:data:`MAX_CAPABILITIES`, :data:`MAX_FIELD_LENGTH`), so a misbehaving desktop cannot
bloat the answers.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Final

import tunnel

from .routes import STATUS_PATH

__all__ = [
    "MAX_CAPABILITIES",
    "MAX_FIELD_LENGTH",
    "MAX_STATUS_BYTES",
    "Presence",
    "from_document",
    "offline",
    "probe",
]

# A status document is a few hundred bytes; a daemon sending more is misbehaving.
MAX_STATUS_BYTES: Final = 64 * 1024
MAX_CAPABILITIES: Final = 64
MAX_FIELD_LENGTH: Final = 256


@dataclass(frozen=True)
class Presence:
    """One probe's outcome; :meth:`as_json` is the presence document."""

    tunnel_hostname: str
    online: bool
    reason: str | None = None
    detail: str | None = None
    hostname: str | None = None
    capabilities: tuple[str, ...] = ()
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
            "capabilities": list(self.capabilities),
            "cliVersion": self.cli_version,
            "latencyMs": self.latency_ms,
        }


def offline(hostname: str, reason: str, detail: str) -> Presence:
    return Presence(hostname, online=False, reason=reason, detail=detail)


def _short_str(value: object) -> str | None:
    return value[:MAX_FIELD_LENGTH] if isinstance(value, str) else None


def _capabilities(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        return ()
    return tuple(c[:MAX_FIELD_LENGTH] for c in value if isinstance(c, str))[:MAX_CAPABILITIES]


async def probe(client: tunnel.TunnelClient, hostname: str, timeout: float | None = None) -> Presence:
    """Probe ``hostname``; never raises for a tunnel failure (it is an answer).

    ``timeout`` bounds the first frame and each idle gap (twice it the whole request);
    ``None`` uses ``client``'s own timeouts.
    """
    url = f"tunnel://{hostname}{STATUS_PATH}"
    accept = [("accept", "application/json")]
    started = time.perf_counter()
    try:
        async with await (
            client.fetch(url, headers=accept)
            if timeout is None
            else client.fetch(
                url, headers=accept, first_frame_timeout=timeout, idle_timeout=timeout, timeout=timeout * 2
            )
        ) as response:
            if response.status != 200:
                return offline(hostname, "bad_status", f"the desktop answered HTTP {response.status}")
            raw = bytearray()
            async for chunk in response.aiter_bytes():
                raw += chunk
                if len(raw) > MAX_STATUS_BYTES:
                    return offline(hostname, "bad_response", "the desktop's status document is too large")
    except tunnel.TunnelUnreachable:
        return offline(hostname, "not_connected", "no desktop is connected for this host")
    except tunnel.TunnelTimeout as exc:
        return offline(hostname, "timeout", f"the desktop did not answer in time ({exc.code})")
    except tunnel.TunnelConnectionError as exc:
        return offline(hostname, "nats_unavailable", f"the NATS connection is down ({exc.code})")
    except tunnel.TunnelError as exc:
        detail = f"the desktop could not be reached ({exc.code}: {exc.message})"
        return offline(hostname, "error", detail[:MAX_FIELD_LENGTH])
    latency_ms = round((time.perf_counter() - started) * 1000, 2)
    try:
        status = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        status = None
    if not isinstance(status, dict):
        return offline(hostname, "bad_response", "the desktop's status is not a JSON object")
    return Presence(
        hostname,
        online=True,
        hostname=_short_str(status.get("hostname")) or hostname,
        capabilities=_capabilities(status.get("capabilities")),
        cli_version=_short_str(status.get("cliVersion")),
        latency_ms=latency_ms,
    )


def from_document(doc: object) -> Presence | None:
    """A :class:`Presence` read back from a presence document (any JSON value); None if it is not one."""
    if not isinstance(doc, dict) or not isinstance(doc.get("online"), bool):
        return None
    hostname = _short_str(doc.get("tunnelHostname")) or ""
    if not doc["online"]:
        return offline(
            hostname, _short_str(doc.get("reason")) or "error", _short_str(doc.get("detail")) or "-"
        )
    latency = doc.get("latencyMs")
    return Presence(
        hostname,
        online=True,
        hostname=_short_str(doc.get("hostname")) or hostname,
        capabilities=_capabilities(doc.get("capabilities")),
        cli_version=_short_str(doc.get("cliVersion")),
        latency_ms=float(latency)
        if isinstance(latency, int | float) and not isinstance(latency, bool)
        else None,
    )
