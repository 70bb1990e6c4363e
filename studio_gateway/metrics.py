"""Prometheus metrics on ``prometheus_client``, with a keyword-label call style.

Each metric here wraps a ``prometheus_client`` metric so call sites read
``counter.inc(result="applied")`` rather than ``counter.labels(result="applied").inc()``,
and a :class:`Registry` owns one ``CollectorRegistry`` per application (tests run many
gateways in one process: nothing here touches the library's global default registry).

The library does the exposition: text 0.0.4 by default and OpenMetrics 1.0.0 when the
scrape's ``Accept`` asks for it (:meth:`Registry.exposition`), with its escaping, its
``_created`` series and process metrics (:meth:`Registry.add_process_collectors`).
Counters are declared by their exposed name (``..._total``); the library strips and
re-appends the suffix itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Final, TypeVar

import prometheus_client
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, choose_encoder
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.samples import Sample

__all__ = ["CONTENT_TYPE", "DEFAULT_BUCKETS", "Counter", "Gauge", "Histogram", "Registry"]

CONTENT_TYPE: Final = CONTENT_TYPE_PLAIN_0_0_4
DEFAULT_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _Metric:
    """Name, help and label names; bound to a ``CollectorRegistry`` by :meth:`Registry.register`."""

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help_text
        self.labelnames = tuple(labelnames)
        self._registry: CollectorRegistry | None = None

    def _bind(self, registry: CollectorRegistry) -> None:
        raise NotImplementedError

    def _child(self, metric: MetricWrapperBase, labels: dict[str, str]) -> MetricWrapperBase:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {sorted(labels)}")
        if not self.labelnames:
            return metric
        return metric.labels(**{k: str(v) for k, v in labels.items()})

    def _sample(self, suffix: str, labels: dict[str, str]) -> float | None:
        if self._registry is None:
            return None
        return self._registry.get_sample_value(self._base + suffix, {k: str(v) for k, v in labels.items()})

    @property
    def _base(self) -> str:
        return self.name


class Counter(_Metric):
    """A value that only goes up."""

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labelnames)
        self._metric = prometheus_client.Counter(name, help_text, self.labelnames, registry=None)

    @property
    def _base(self) -> str:
        return self.name.removesuffix("_total")

    def _bind(self, registry: CollectorRegistry) -> None:
        registry.register(self._metric)
        self._registry = registry

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        self._child(self._metric, labels).inc(amount)  # type: ignore[attr-defined]

    def value(self, **labels: str) -> float:
        return self._sample("_total", labels) or 0.0


class Gauge(_Metric, Collector):
    """A value that goes up and down; or read from ``source`` at scrape time (no sample while
    ``source`` returns None: an unknown value is absent, not zero)."""

    def __init__(
        self,
        name: str,
        help_text: str,
        labelnames: Sequence[str] = (),
        *,
        source: Callable[[], float | None] | None = None,
    ) -> None:
        super().__init__(name, help_text, labelnames)
        self._metric = prometheus_client.Gauge(name, help_text, self.labelnames, registry=None)
        self.source = source

    def _bind(self, registry: CollectorRegistry) -> None:
        registry.register(self)
        self._registry = registry

    def describe(self) -> list[Metric]:
        return [GaugeMetricFamily(self.name, self.help, labels=self.labelnames)]

    def collect(self) -> Iterator[Metric]:
        if self.source is None:
            yield from self._metric.collect()
            return
        family = GaugeMetricFamily(self.name, self.help)
        value = self.source()
        if value is not None:
            family.samples.append(Sample(self.name, {}, float(value)))
        yield family

    def set(self, value: float, **labels: str) -> None:
        self._child(self._metric, labels).set(value)  # type: ignore[attr-defined]

    def value(self, **labels: str) -> float | None:
        if self.source is not None:
            return self.source()
        return self._sample("", labels)


class Histogram(_Metric):
    """Observations counted in cumulative buckets, with their sum and count."""

    def __init__(
        self,
        name: str,
        help_text: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> None:
        super().__init__(name, help_text, labelnames)
        self.buckets = tuple(sorted(buckets))
        self._metric = prometheus_client.Histogram(
            name, help_text, self.labelnames, registry=None, buckets=self.buckets
        )

    def _bind(self, registry: CollectorRegistry) -> None:
        registry.register(self._metric)
        self._registry = registry

    def observe(self, value: float, **labels: str) -> None:
        self._child(self._metric, labels).observe(value)  # type: ignore[attr-defined]

    def count(self, **labels: str) -> int:
        return int(self._sample("_count", labels) or 0)


M = TypeVar("M", bound=_Metric)


class Registry:
    """One application's metrics: a ``CollectorRegistry`` of its own."""

    def __init__(self) -> None:
        self.collector_registry = CollectorRegistry(auto_describe=True)

    def register(self, metric: M) -> M:
        """Add ``metric`` (ValueError if its name is taken); returns it for one-line declarations."""
        metric._bind(self.collector_registry)
        return metric

    def add_process_collectors(self) -> None:
        """CPU, memory, file descriptors and start time of this process, and the Python version."""
        prometheus_client.ProcessCollector(registry=self.collector_registry)
        prometheus_client.PlatformCollector(registry=self.collector_registry)

    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """The scrape body and its content type: OpenMetrics if ``accept`` asks for it, else
        text 0.0.4."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.collector_registry), content_type

    def render(self) -> str:
        """Text format 0.0.4."""
        return prometheus_client.generate_latest(self.collector_registry).decode()
