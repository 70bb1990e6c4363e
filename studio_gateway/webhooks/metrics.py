"""``studio_webhook_deliveries_total{result}``: delivery attempts this instance made, by result:
``succeeded`` (a 2xx), ``retry`` (failed, another attempt is scheduled), ``failed`` (failed for good)."""

from __future__ import annotations

from ..metrics import Counter, Registry

__all__ = ["WebhookMetrics"]


class WebhookMetrics:
    def __init__(self, registry: Registry) -> None:
        self.deliveries = registry.register(
            Counter("studio_webhook_deliveries_total", "Webhook delivery attempts, by result.", ("result",))
        )
