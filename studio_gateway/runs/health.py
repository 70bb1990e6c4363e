"""Whether the run machinery works right now, for ``/healthz``, ``/metrics`` and the log.

Why a class of its own: several loops (the projector's pulls, its state writes, the
reaper's scans) can each be in trouble, and an operator wants one answer ("runs:
unavailable, because ...") and one log line when that answer changes, not one per retry
of a loop that fails every half second.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["Health"]


class Health:
    """Named conditions, each fine (None) or a problem; unhealthy while any has a problem."""

    def __init__(self, log: logging.Logger, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._log = log
        self._clock = clock
        self._problems: dict[str, str] = {}
        self._since: float | None = None

    @property
    def ok(self) -> bool:
        return not self._problems

    @property
    def problem(self) -> str | None:
        """The first problem and how long runs have been unhealthy, or None."""
        if not self._problems or self._since is None:
            return None
        first = next(iter(self._problems.values()))
        return f"{first} (for {self._clock() - self._since:.1f} s)"

    def trouble(self, condition: str, problem: str) -> None:
        """``condition`` cannot do its job; logs only when runs were healthy until now."""
        if not self._problems:
            self._since = self._clock()
            self._log.warning("runs unavailable: %s", problem)
        self._problems[condition] = problem

    def fine(self, condition: str) -> None:
        """``condition`` works (again); logs when that makes runs healthy again."""
        if self._problems.pop(condition, None) is None or self._problems:
            return
        since, self._since = self._since, None
        took = self._clock() - since if since is not None else 0.0
        self._log.info("runs available again after %.1f s", took)

    def clear(self) -> None:
        """Forget every condition (the loops are restarting on a new connection)."""
        self._problems.clear()
        self._since = None
