"""A live presence probe: ``GET tunnel://HOST/api/links/status`` with a short timeout.

The result has the same JSON shape as the gateway's ``GET /api/links/me`` (see
``studio_gateway/presence.py``), plus ``checkedAt``, so scripts can read either::

    {"online": true, "tunnelHostname": "desk", "hostname": "alice-laptop",
     "capabilities": ["runs"], "cliVersion": "0.1.0", "latencyMs": 2.7, "checkedAt": "..."}
    {"online": false, "tunnelHostname": "desk", "reason": "not_connected", "detail": "...", ...}

Reasons: ``not_connected`` and ``timeout`` mean offline (exit status 1); ``bad_status``,
``bad_response``, ``error`` and ``nats_unavailable`` mean the probe could not tell
(exit status 2). A probe through the gateway (:func:`from_gateway`, ``/api/links/me``)
produces the same :class:`Presence`, plus ``via`` (the gateway URL) and ``roundTripMs``
(our HTTP round trip; ``latencyMs`` is then the gateway's own probe of the desktop).
``gateway_unavailable`` (the gateway cannot be reached or answers an error) is exit status 2.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import tunnel

from . import exitcodes

__all__ = ["DEFAULT_PROBE_TIMEOUT", "OFFLINE_REASONS", "STATUS_PATH", "Presence", "from_gateway", "probe"]

STATUS_PATH: Final = "/api/links/status"
# The desktop answers from memory: 2 s to first frame is generous on any network.
DEFAULT_PROBE_TIMEOUT: Final = 2.0
# A status document is a few hundred bytes; more means a misbehaving desktop.
MAX_STATUS_BYTES: Final = 64 * 1024
MAX_CAPABILITIES: Final = 64
MAX_FIELD_LENGTH: Final = 256
OFFLINE_REASONS: Final = frozenset({"not_connected", "timeout"})


@dataclass(frozen=True)
class Presence:
    """One probe's outcome."""

    tunnel_hostname: str
    online: bool
    reason: str | None = None
    detail: str | None = None
    hostname: str | None = None
    capabilities: tuple[str, ...] = ()
    cli_version: str | None = None
    latency_ms: float | None = None
    # Through the gateway: our HTTP round trip to it (latency_ms is the gateway's own probe).
    round_trip_ms: float | None = None
    via: str | None = None
    checked_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def exit_code(self) -> int:
        if self.online:
            return exitcodes.OK
        return exitcodes.OFFLINE if self.reason in OFFLINE_REASONS else exitcodes.USAGE

    @property
    def state(self) -> str:
        """``online``, ``offline`` or ``error`` (the probe could not tell)."""
        if self.online:
            return "online"
        return "offline" if self.reason in OFFLINE_REASONS else "error"

    def as_json(self) -> dict[str, Any]:
        checked = self.checked_at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        if not self.online:
            doc: dict[str, Any] = {
                "online": False,
                "tunnelHostname": self.tunnel_hostname,
                "reason": self.reason,
                "detail": self.detail,
                "checkedAt": checked,
            }
        else:
            doc = {
                "online": True,
                "tunnelHostname": self.tunnel_hostname,
                "hostname": self.hostname,
                "capabilities": list(self.capabilities),
                "cliVersion": self.cli_version,
                "latencyMs": self.latency_ms,
                "checkedAt": checked,
            }
        if self.via is not None:
            doc["via"] = self.via
            doc["roundTripMs"] = self.round_trip_ms
        return doc


def _offline(hostname: str, reason: str, detail: str) -> Presence:
    return Presence(hostname, online=False, reason=reason, detail=detail)


def _short_str(value: object) -> str | None:
    return value[:MAX_FIELD_LENGTH] if isinstance(value, str) else None


async def probe(
    client: tunnel.TunnelClient, hostname: str, timeout: float = DEFAULT_PROBE_TIMEOUT
) -> Presence:
    """Probe ``hostname``; never raises for a tunnel failure (it is an answer)."""
    started = time.perf_counter()
    try:
        async with await client.fetch(
            f"tunnel://{hostname}{STATUS_PATH}",
            headers=[("accept", "application/json")],
            first_frame_timeout=timeout,
            idle_timeout=timeout,
            timeout=timeout * 2,
        ) as response:
            if response.status != 200:
                return _offline(hostname, "bad_status", f"the desktop answered HTTP {response.status}")
            raw = bytearray()
            async for chunk in response.aiter_bytes():
                raw += chunk
                if len(raw) > MAX_STATUS_BYTES:
                    return _offline(hostname, "bad_response", "the desktop's status document is too large")
    except tunnel.TunnelUnreachable:
        return _offline(hostname, "not_connected", "no desktop is connected for this host")
    except tunnel.TunnelTimeout as exc:
        return _offline(hostname, "timeout", f"the desktop did not answer in time ({exc.code})")
    except tunnel.TunnelConnectionError as exc:
        return _offline(hostname, "nats_unavailable", f"the NATS connection is down ({exc.code})")
    except tunnel.TunnelError as exc:
        return _offline(hostname, "error", f"{exc.code}: {exc.message}")
    latency_ms = round((time.perf_counter() - started) * 1000, 2)
    try:
        status = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        status = None
    if not isinstance(status, dict):
        return _offline(hostname, "bad_response", "the desktop's status is not a JSON object")
    raw_capabilities = status.get("capabilities")
    capabilities = (
        tuple(c[:MAX_FIELD_LENGTH] for c in raw_capabilities if isinstance(c, str))[:MAX_CAPABILITIES]
        if isinstance(raw_capabilities, list)
        else ()
    )
    return Presence(
        hostname,
        online=True,
        hostname=_short_str(status.get("hostname")) or hostname,
        capabilities=capabilities,
        cli_version=_short_str(status.get("cliVersion")),
        latency_ms=latency_ms,
    )


def from_gateway(doc: object, via: str, round_trip_ms: float) -> Presence:
    """A :class:`Presence` from the gateway's ``GET /api/links/me`` answer (any JSON value)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("online"), bool):
        return Presence(
            "?",
            online=False,
            reason="bad_response",
            detail="the gateway's answer is not a presence document",
            via=via,
            round_trip_ms=round_trip_ms,
        )
    hostname = _short_str(doc.get("tunnelHostname")) or ""
    if not doc["online"]:
        return Presence(
            hostname,
            online=False,
            reason=_short_str(doc.get("reason")) or "error",
            detail=_short_str(doc.get("detail")) or "-",
            via=via,
            round_trip_ms=round_trip_ms,
        )
    raw_capabilities = doc.get("capabilities")
    capabilities = (
        tuple(c[:MAX_FIELD_LENGTH] for c in raw_capabilities if isinstance(c, str))[:MAX_CAPABILITIES]
        if isinstance(raw_capabilities, list)
        else ()
    )
    latency = doc.get("latencyMs")
    return Presence(
        hostname,
        online=True,
        hostname=_short_str(doc.get("hostname")) or hostname,
        capabilities=capabilities,
        cli_version=_short_str(doc.get("cliVersion")),
        latency_ms=float(latency)
        if isinstance(latency, int | float) and not isinstance(latency, bool)
        else None,
        via=via,
        round_trip_ms=round_trip_ms,
    )
