"""linkd's Prometheus metrics (served at ``/metrics`` on the inspector's loopback listener).

Two sources, nothing counted twice:

- the daemon's traffic record (:class:`linkd.traffic.Traffic`): one observation per
  finished exchange: ``linkd_requests_total{route,code}`` (``code``: the status class,
  ``2xx`` .. ``5xx``, or ``none`` when no response head was sent),
  ``linkd_request_bytes_total{route}`` / ``linkd_response_bytes_total{route}`` (body bytes),
  ``linkd_request_duration_seconds{route}`` and ``linkd_upstream_errors_total{code}`` (an
  exchange that ended with an error: ``upstream_unreachable``, ``upstream_error``,
  ``cancelled``, a tunnel error code, ...);
- the daemon's own state, read at scrape time: ``linkd_nats_reconnects_total`` (NATS
  reconnects and new connections after the first, as ``linkd status`` shows them),
  ``linkd_credential_refreshes_total``, ``linkd_connected``, ``linkd_requests_in_flight``,
  ``linkd_outbox_depth`` (run events in the uplink's outbox, journal-backed when journaled,
  not yet acknowledged by JetStream), ``linkd_outbox_delivered_total``,
  ``linkd_outbox_dropped_total``, ``linkd_runs_active``, ``linkd_runs_resumed_total``;
- ``process_*`` and ``python_info`` from ``prometheus_client``.

:class:`RequestStats` is the same traffic reduced to three numbers (requests, errors,
processing time) for the NATS micro ``$SRV.STATS`` answer (:mod:`linkd.discovery`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import prometheus_client
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from .traffic import Exchange, ExchangeEvent, Traffic

if TYPE_CHECKING:
    from .daemon import LinkDaemon

__all__ = ["LinkdMetrics", "RequestStats"]

DURATION_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _code_class(status: int | None) -> str:
    return f"{status // 100}xx" if status is not None and 100 <= status < 600 else "none"


@dataclass
class RequestStats:
    """Every finished tunnelled request: how many, how many failed, how long they took."""

    requests: int = 0
    errors: int = 0
    processing_ns: int = 0
    last_error: str = ""

    def observe(self, exchange: Exchange) -> None:
        self.requests += 1
        self.processing_ns += int((exchange.duration_ms or 0.0) * 1_000_000)
        if exchange.error is not None or exchange.status is None:  # an upstream's 5xx is its answer
            self.errors += 1
            self.last_error = exchange.error or f"status {exchange.status}"


class _DaemonCollector(Collector):
    """The daemon's counters and gauges, read when scraped."""

    def __init__(self, daemon: LinkDaemon) -> None:
        self.daemon = daemon

    def describe(self) -> list[Metric]:
        return []  # registered before the daemon has set its state up: never collect early

    def collect(self) -> Iterator[Metric]:
        d = self.daemon
        yield CounterMetricFamily(
            "linkd_nats_reconnects", "NATS reconnects and new connections after the first.", d.reconnects
        )
        yield CounterMetricFamily(
            "linkd_credential_refreshes", "NATS credentials refreshed from the gateway.", d.refreshes
        )
        nc = d.nc
        yield GaugeMetricFamily(
            "linkd_connected",
            "1 while serving on a NATS connection.",
            1 if nc is not None and nc.is_connected else 0,
        )
        yield GaugeMetricFamily(
            "linkd_requests_in_flight", "Tunnelled requests being served.", d._in_flight()
        )
        uplink = d.uplink
        if uplink is not None:
            yield GaugeMetricFamily(
                "linkd_outbox_depth", "Run events not yet acknowledged by JetStream.", len(uplink.outbox)
            )
            yield CounterMetricFamily(
                "linkd_outbox_delivered", "Run events JetStream acknowledged.", uplink.outbox.acked_total
            )
            yield CounterMetricFamily(
                "linkd_outbox_dropped", "Run events that could never be published.", uplink.dropped
            )
        yield GaugeMetricFamily("linkd_runs_active", "Runs this daemon is running.", len(d.runs.active()))
        yield CounterMetricFamily(
            "linkd_runs_resumed", "Runs continued after a daemon restart.", d.runs.resumes
        )


class LinkdMetrics:
    """One daemon's registry: fed by its traffic, reading its state when scraped."""

    def __init__(self, traffic: Traffic, daemon: LinkDaemon | None = None) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.stats = RequestStats()
        self.requests = prometheus_client.Counter(
            "linkd_requests",
            "Tunnelled requests served, by route and status class.",
            ("route", "code"),
            registry=r,
        )
        self.request_bytes = prometheus_client.Counter(
            "linkd_request_bytes", "Request body bytes received through the tunnel.", ("route",), registry=r
        )
        self.response_bytes = prometheus_client.Counter(
            "linkd_response_bytes", "Response body bytes sent through the tunnel.", ("route",), registry=r
        )
        self.duration = prometheus_client.Histogram(
            "linkd_request_duration_seconds",
            "Time from a request's arrival to the end of its response.",
            ("route",),
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.errors = prometheus_client.Counter(
            "linkd_upstream_errors",
            "Tunnelled requests that ended with an error, by its code.",
            ("code",),
            registry=r,
        )
        if daemon is not None:
            r.register(_DaemonCollector(daemon))
        prometheus_client.ProcessCollector(registry=r)
        prometheus_client.PlatformCollector(registry=r)
        self._children: dict[tuple[str, str], tuple[Any, Any, Any, Any]] = {}
        self.unsubscribe: Callable[[], None] = traffic.subscribe(self.observe)

    def observe(self, event: ExchangeEvent, exchange: Exchange) -> None:
        """The traffic observer: counts each exchange once, when it finished."""
        if event != "finished":
            return
        self.stats.observe(exchange)
        # Label lookups cost more than the counting: the children are cached (bounded: five
        # routes, six status classes).
        key = (exchange.route, _code_class(exchange.status))
        children = self._children.get(key)
        if children is None:
            route = exchange.route
            children = self._children[key] = (
                self.requests.labels(route, key[1]),
                self.request_bytes.labels(route),
                self.response_bytes.labels(route),
                self.duration.labels(route),
            )
        requests, request_bytes, response_bytes, duration = children
        requests.inc()
        if exchange.request_bytes:
            request_bytes.inc(exchange.request_bytes)
        if exchange.response_bytes:
            response_bytes.inc(exchange.response_bytes)
        if exchange.duration_ms is not None:
            duration.observe(exchange.duration_ms / 1000.0)
        if exchange.error is not None:
            self.errors.labels(exchange.error).inc()

    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """The scrape body and its content type: OpenMetrics if ``accept`` asks for it, else text 0.0.4."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
