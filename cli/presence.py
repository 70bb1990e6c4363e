"""A live presence probe: ``GET tunnel://HOST/api/links/status`` with a short timeout.

The probe and its document are :mod:`contract.presence` (the gateway's ``GET /api/links/me``
answers the same document); linkctl adds ``checkedAt``, so scripts can read either::

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

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import tunnel
from contract import presence

from . import exitcodes

__all__ = ["DEFAULT_PROBE_TIMEOUT", "OFFLINE_REASONS", "Presence", "from_gateway", "probe"]

# The desktop answers from memory: 2 s to first frame is generous on any network.
DEFAULT_PROBE_TIMEOUT: Final = 2.0
OFFLINE_REASONS: Final = frozenset({"not_connected", "timeout"})


@dataclass(frozen=True)
class Presence(presence.Presence):
    """One probe's outcome, when it was taken, and through which gateway if any."""

    # Through the gateway: our HTTP round trip to it (latency_ms is the gateway's own probe).
    round_trip_ms: float | None = None
    via: str | None = None
    checked_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @classmethod
    def of(cls, result: presence.Presence, **extra: Any) -> Presence:
        return cls(**vars(result), **extra)

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
        doc = super().as_json()
        doc["checkedAt"] = self.checked_at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        if self.via is not None:
            doc["via"] = self.via
            doc["roundTripMs"] = self.round_trip_ms
        return doc


async def probe(
    client: tunnel.TunnelClient, hostname: str, timeout: float = DEFAULT_PROBE_TIMEOUT
) -> Presence:
    """Probe ``hostname``; never raises for a tunnel failure (it is an answer)."""
    return Presence.of(await presence.probe(client, hostname, timeout))


def from_gateway(doc: object, via: str, round_trip_ms: float) -> Presence:
    """A :class:`Presence` from the gateway's ``GET /api/links/me`` answer (any JSON value)."""
    result = presence.from_document(doc)
    if result is None:
        return Presence(
            "?",
            online=False,
            reason="bad_response",
            detail="the gateway's answer is not a presence document",
            via=via,
            round_trip_ms=round_trip_ms,
        )
    return Presence.of(result, via=via, round_trip_ms=round_trip_ms)
