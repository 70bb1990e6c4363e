"""Structured diagnostics: events for a callback or a logger, counters for metrics.

Both ends of the tunnel report what happened to each request through an
optional ``on_event`` hook, and keep cheap counters a service can expose as
metrics. A hook that raises is logged and otherwise ignored: diagnostics never
break traffic.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

log = logging.getLogger("tunnel.diagnostics")

# Event kinds (stable strings, safe to match on).
REQUEST_STARTED: Final = "request.started"
REQUEST_ENDED: Final = "request.ended"
FRAME_DROPPED: Final = "frame.dropped"  # malformed, misdirected or unattributable frame
OUTCOME_OK: Final = "ok"


@dataclass(frozen=True, slots=True)
class TunnelEvent:
    """One thing that happened. ``outcome`` is ``"ok"`` or a stable error code."""

    kind: str
    side: str  # "client" or "server"
    hostname: str
    request_id: str | None = None
    method: str | None = None
    path: str | None = None
    status: int | None = None
    outcome: str | None = None
    duration: float | None = None  # seconds, for request.ended
    bytes_in: int = 0  # body bytes received
    bytes_out: int = 0  # body bytes sent
    detail: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """For JSON logs: only the fields that are set."""
        return {k: getattr(self, k) for k in self.__slots__ if getattr(self, k) not in (None, 0)}


EventHook = Callable[[TunnelEvent], None]


@dataclass
class TunnelCounters:
    """Counters for one client or server; ``active`` is the number of requests in flight."""

    requests: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    bytes_in: int = 0
    bytes_out: int = 0
    frames_dropped: int = 0
    active: int = 0

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "outcomes": dict(self.outcomes),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "frames_dropped": self.frames_dropped,
            "active": self.active,
        }


def emit(hook: EventHook | None, event: TunnelEvent) -> None:
    """Call the hook, never letting its failure reach the tunnel."""
    if hook is None:
        return
    try:
        hook(event)
    except Exception:
        log.exception("tunnel on_event hook failed for %s", event.kind)


def logging_hook(logger: logging.Logger | None = None, level: int = logging.INFO) -> EventHook:
    """A ready-made hook: one log record per event, fields in ``extra={"tunnel": {...}}``."""
    target = logger or logging.getLogger("tunnel.events")

    def hook(event: TunnelEvent) -> None:
        fields = event.as_dict()
        if not target.isEnabledFor(level):
            return
        summary = " ".join(f"{k}={v}" for k, v in fields.items() if k not in ("kind", "side"))
        target.log(level, "%s %s %s", event.side, event.kind, summary, extra={"tunnel": fields})

    return hook
