"""Noticing that the machine slept: the wall clock jumped ahead of the monotonic clock (pure).

While a laptop is suspended, ``time.monotonic()`` (CLOCK_MONOTONIC on Linux, the uptime
clock elsewhere) stands still and the wall clock does not. Everything the daemon schedules
on the monotonic clock (the credential's refresh and expiry, backoffs) is then late by the
length of the sleep: a credential that expired during the sleep still looks valid. The daemon
checks every few seconds (:data:`CHECK_INTERVAL`) and, after a jump, refreshes what expired,
reconnects and flushes its outbox (:mod:`linkd.daemon`).
"""

from __future__ import annotations

from typing import Final

__all__ = ["CHECK_INTERVAL", "SLEEP_THRESHOLD", "SleepDetector"]

CHECK_INTERVAL: Final = 2.0
# A jump smaller than this is clock adjustment (NTP), not sleep.
SLEEP_THRESHOLD: Final = 5.0


class SleepDetector:
    """Feed it both clocks now and then; it says how long the machine slept in between."""

    def __init__(self, monotonic: float, wall: float, *, threshold: float = SLEEP_THRESHOLD) -> None:
        self.threshold = threshold
        self._monotonic = monotonic
        self._wall = wall

    def check(self, monotonic: float, wall: float) -> float | None:
        """Seconds of sleep since the last check (wall time that passed beyond monotonic time), or None."""
        gap = (wall - self._wall) - (monotonic - self._monotonic)
        self._monotonic, self._wall = monotonic, wall
        return gap if gap >= self.threshold else None
