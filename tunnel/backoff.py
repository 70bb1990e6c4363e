"""One retry policy: capped exponential backoff with jitter, so a fleet never retries in lockstep.

:class:`Backoff` counts attempts: attempt ``n`` (from 0) waits ``min(cap, initial * factor**n)``,
stretched by up to ``jitter`` of itself and plus up to ``jitter_seconds`` at random.
:class:`ReconnectPolicy` is the same policy as nats-py's ``reconnect_to_server_handler``:
it rotates through the servers, waits only a little jitter for the first attempt on a
server after a drop (the drop may be that server's restart, or a load balancer that
already has another one), then backs off by the server's failed attempts.

Each user configures its own values where it uses the policy (``tunnel.connect``,
``linkd``); this module has no opinion on them. It imports no nats-py at runtime.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nats.aio.client import Server

__all__ = ["Backoff", "ReconnectPolicy"]


class Backoff:
    """``next()``: ``initial * factor**n`` capped at ``cap``, stretched by up to ``jitter`` of itself
    and plus up to ``jitter_seconds``, at random; ``reset()`` starts again from ``initial``."""

    def __init__(
        self,
        initial: float = 1.0,
        cap: float = 60.0,
        factor: float = 2.0,
        jitter: float = 0.25,
        *,
        jitter_seconds: float = 0.0,
    ) -> None:
        self.initial = initial
        self.cap = cap
        self.factor = factor
        self.jitter = jitter
        self.jitter_seconds = jitter_seconds
        self.attempts = 0

    def base(self, attempt: int) -> float:
        """The delay of attempt ``attempt`` (from 0) before jitter."""
        try:
            return min(self.cap, self.initial * float(self.factor) ** attempt)
        except OverflowError:
            # Far past the cap (~1000 doublings: an outage of an hour at a 3 s cap). nats-py
            # would report the error and ask again at once, in a loop: stay at the cap instead.
            return self.cap

    def delay(self, attempt: int) -> float:
        """The delay of attempt ``attempt`` (from 0), jitter included."""
        delay = self.base(attempt)
        if self.jitter:
            delay *= 1.0 + random.uniform(0.0, self.jitter)
        if self.jitter_seconds:
            delay += random.uniform(0.0, self.jitter_seconds)
        return delay

    def next(self) -> float:
        """The delay before the next attempt; counts it."""
        delay = self.delay(self.attempts)
        self.attempts += 1
        return delay

    def reset(self) -> None:
        self.attempts = 0


class ReconnectPolicy:
    """nats-py ``reconnect_to_server_handler``: rotate through the servers; on each, wait up to
    ``first_jitter`` for its first attempt after a drop, then ``initial`` doubling up to ``cap``,
    plus up to ``jitter`` seconds."""

    def __init__(self, *, initial: float, cap: float, jitter: float, first_jitter: float) -> None:
        self.backoff = Backoff(initial, cap, jitter=0.0, jitter_seconds=jitter)
        self.first_jitter = first_jitter
        self._next = 0

    def __call__(self, servers: list[Server], info: dict[str, Any]) -> tuple[Server, float]:
        server = servers[self._next % len(servers)]
        self._next += 1
        # nats-py counts a server's failed attempts since it last connected to it.
        failures = int(getattr(server, "reconnects", 0))
        if failures == 0:
            return server, random.uniform(0.0, self.first_jitter)
        return server, self.backoff.delay(failures - 1)
