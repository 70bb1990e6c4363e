"""The runner interface: a work item in, an async stream of events out, cancellable.

A runner is an object with a ``name`` and two methods:

- ``validate(input)``: called before the work is accepted, so a bad input is a 422
  answer to the dispatcher rather than a failed run; raises :class:`InvalidInput`.
- ``run(item)``: an async generator of :class:`Stage` and :class:`Output` events.
  Returning ends the run ``completed``; raising :class:`RunFailed` ends it
  ``failed`` with that reason (any other exception too, with a generic reason).
  Cancellation is ``asyncio`` cancellation of the task iterating it, or
  ``aclose()`` of the generator: either way its ``finally`` blocks must release
  what it holds (processes, connections) before returning.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any, Protocol

from contract.runner_inputs import InvalidRunInput

from ..run_events import Fence

__all__ = ["InvalidInput", "Output", "RunFailed", "Runner", "RunnerEvent", "Stage", "WorkItem"]


@dataclass(frozen=True, slots=True)
class WorkItem:
    """A validated ``POST /api/links/work`` body."""

    run_id: str
    thread_id: str
    user_id: str
    fence: Fence
    runner: str
    input: Any


@dataclass(frozen=True, slots=True)
class Stage:
    """The run entered a named stage (``preparing``, ``running``, ...)."""

    name: str


@dataclass(frozen=True, slots=True)
class Output:
    """A chunk of output text; ``stream`` is ``stdout``, ``stderr`` or ``body``."""

    data: str
    stream: str = "stdout"


RunnerEvent = Stage | Output


# The work item's input does not suit this runner (answered 422 before anything runs); the
# contract's error, so the checks the gateway shares with the daemon raise the same thing.
InvalidInput = InvalidRunInput


class RunFailed(Exception):
    """The work ran and failed; ``reason`` is for humans, ``details`` go into the done event."""

    def __init__(self, reason: str, **details: Any) -> None:
        super().__init__(reason)
        self.reason = reason
        self.details = details


class Runner(Protocol):
    @property
    def name(self) -> str: ...

    def validate(self, input: Any) -> None: ...

    def run(self, item: WorkItem) -> AsyncGenerator[RunnerEvent, None]: ...
