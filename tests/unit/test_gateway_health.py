"""studio_gateway.runs.health: one answer for /healthz, one log line per change (not per retry)."""

from __future__ import annotations

import logging

import pytest

from studio_gateway.runs.health import Health


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_trouble_and_recovery_log_once_each(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    health = Health(logging.getLogger("test.health"), clock=clock)
    caplog.set_level(logging.INFO, "test.health")
    assert health.ok and health.problem is None
    for _ in range(5):  # a loop failing on every retry
        health.trouble("projector_pull", "503 No Responders")
    clock.now += 7.5
    assert not health.ok
    assert health.problem == "503 No Responders (for 7.5 s)"
    health.fine("projector_pull")
    health.fine("projector_pull")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["runs unavailable: 503 No Responders", "runs available again after 7.5 s"]
    assert health.ok


def test_healthy_only_when_every_condition_is_fine() -> None:
    health = Health(logging.getLogger("test.health"), clock=Clock())
    health.trouble("projector_pull", "a")
    health.trouble("reaper", "b")
    health.fine("projector_pull")
    assert not health.ok and health.problem is not None and health.problem.startswith("b")
    health.fine("reaper")
    assert health.ok
    health.trouble("reaper", "c")
    health.clear()
    assert health.ok and health.problem is None
