"""Runners: what executes a work item (see :mod:`.base` for the interface)."""

from __future__ import annotations

from ..config import RunnerSettings
from .base import InvalidInput, Output, RunFailed, Runner, RunnerEvent, Stage, WorkItem
from .command import CommandRunner
from .http import HttpRunner
from .mock import EchoRunner, MockRunner

__all__ = [
    "CommandRunner",
    "EchoRunner",
    "HttpRunner",
    "InvalidInput",
    "MockRunner",
    "Output",
    "RunFailed",
    "Runner",
    "RunnerEvent",
    "Stage",
    "WorkItem",
    "build_runners",
]


def build_runners(settings: RunnerSettings) -> dict[str, Runner]:
    """The runners this desktop offers, by name: only what the settings enable."""
    runners: dict[str, Runner] = {}
    if settings.mock:
        runners["echo"] = EchoRunner()
        runners["mock"] = MockRunner()
    if settings.commands:
        runners["command"] = CommandRunner(settings.commands, kill_grace=settings.kill_grace)
    if settings.http is not None:
        runners["http"] = HttpRunner(settings.http)
    return runners
