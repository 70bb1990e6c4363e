"""Capped exponential backoff with jitter, so a fleet of desktops never retries in lockstep."""

from __future__ import annotations

import random

__all__ = ["Backoff"]


class Backoff:
    """``next()``: ``initial * factor**n`` capped at ``cap``, plus up to ``jitter`` of itself at random."""

    def __init__(self, initial: float = 1.0, cap: float = 60.0, factor: float = 2.0, jitter: float = 0.25):
        self.initial = initial
        self.cap = cap
        self.factor = factor
        self.jitter = jitter
        self.attempts = 0

    def next(self) -> float:
        base = min(self.cap, self.initial * self.factor**self.attempts)
        self.attempts += 1
        return base * (1.0 + random.uniform(0.0, self.jitter))

    def reset(self) -> None:
        self.attempts = 0
