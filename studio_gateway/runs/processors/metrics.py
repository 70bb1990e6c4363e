"""The processors' series of ``GET /metrics`` (per gateway instance, on the application's registry):

- ``studio_processor_events_total{processor}``: events this instance's processor handled;
- ``studio_processor_errors_total{processor,kind}``: ``handle`` (the event is retried),
  ``nats`` (NATS or JetStream failed during ``handle``: retried, never dropped),
  ``poison`` (dropped after ``MAX_DELIVERIES``), ``feed`` (the consumer was lost and reopened);
- ``studio_processor_pending{processor}``: events its checkpoint has not passed yet (JetStream's
  count, the same on every instance: do not sum), the projector's over its host consumers;
- ``studio_processor_lag_seconds{processor}``: how long ago the last event it handled was stored,
  while it has a backlog (0 without one); refreshed every ``LAG_INTERVAL``.
"""

from __future__ import annotations

from typing import Final

from ...metrics import Counter, Gauge, Registry

__all__ = ["LAG_INTERVAL", "ProcessorMetrics"]

LAG_INTERVAL: Final = 2.0


class ProcessorMetrics:
    def __init__(self, registry: Registry) -> None:
        r = registry
        self.events = r.register(
            Counter("studio_processor_events_total", "Run events a processor handled here.", ("processor",))
        )
        self.errors = r.register(
            Counter(
                "studio_processor_errors_total", "Processor failures here, by kind.", ("processor", "kind")
            )
        )
        self.pending = r.register(
            Gauge("studio_processor_pending", "Events past a processor's checkpoint.", ("processor",))
        )
        self.lag_seconds = r.register(
            Gauge(
                "studio_processor_lag_seconds",
                "Age of the last event a processor handled, while it has a backlog.",
                ("processor",),
            )
        )
