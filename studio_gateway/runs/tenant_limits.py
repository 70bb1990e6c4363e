"""Per-host bookkeeping that keeps one desktop's traffic from costing the others (pure, no I/O).

- :class:`LookupBudget`: how many state reads the projector may spend on a host's events
  for runs its index does not know (a token bucket per host). An honest desktop needs
  one now and then (an event racing its run's index entry, a late event of an ended run);
  a desktop publishing to made-up run ids exhausts it at once and its events are then
  dropped without any read.
- :class:`StrayCounter`: events a host published for runs it does not have, per window;
  past the limit the host is over its quota (docs/runs.md, "Tenants").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = ["LookupBudget", "StrayCounter"]

# Hosts remembered at most (the oldest are forgotten: a forgotten host starts afresh).
MAX_HOSTS: Final = 65536


@dataclass
class _Bucket:
    tokens: float
    at: float


class LookupBudget:
    """A token bucket per host: ``rate`` reads per second, bursts of ``burst``."""

    def __init__(self, rate: float = 20.0, burst: float = 100.0) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str, _Bucket] = {}

    def allow(self, host: str, now: float) -> bool:
        bucket = self._buckets.get(host)
        if bucket is None:
            if len(self._buckets) >= MAX_HOSTS:
                self._buckets.pop(next(iter(self._buckets)))
            bucket = self._buckets[host] = _Bucket(self.burst, now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) * self.rate)
        bucket.at = now
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True


class StrayCounter:
    """Counts a host's stray events in fixed windows; :meth:`add` says when it went over."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._counts: dict[str, tuple[float, int]] = {}  # host -> (window start, count)

    def add(self, host: str, now: float, count: int = 1) -> bool:
        """Count ``count`` strays; True once per window, when the host first goes over the limit."""
        start, seen = self._counts.get(host, (now, 0))
        if now - start >= self.window:
            start, seen = now, 0
        elif host not in self._counts and len(self._counts) >= MAX_HOSTS:
            self._counts.pop(next(iter(self._counts)))
        self._counts[host] = (start, seen + count)
        return seen <= self.limit < seen + count

    def reset(self, host: str) -> None:
        """Start the host's count afresh (after acting on it: a flood that goes on acts again)."""
        self._counts.pop(host, None)

    def count(self, host: str, now: float) -> int:
        start, seen = self._counts.get(host, (now, 0))
        return 0 if now - start >= self.window else seen
