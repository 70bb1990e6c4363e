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

A runner may also take messages while a run works (context and signals, see
:mod:`contract.run_messages`): it lists the kinds in ``message_kinds`` and takes each with
``deliver(item, message)``, which must not block (queue it, append it to a file) and raises
:class:`MessageRefused` when it cannot take it now. A runner without ``message_kinds`` takes none.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any, Protocol

from contract.runner_inputs import InvalidRunInput

from ..run_events import Fence

__all__ = [
    "InvalidInput",
    "MessageRefused",
    "Output",
    "RunFailed",
    "RunMessage",
    "Runner",
    "RunnerEvent",
    "Stage",
    "WorkItem",
    "message_kinds",
]


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


@dataclass(frozen=True, slots=True)
class RunMessage:
    """A context or signal for a running run; ``content``: the context, or the signal's JSON."""

    message_id: str
    kind: str
    content: Any

    def as_json(self) -> dict[str, Any]:
        return {"messageId": self.message_id, "kind": self.kind, self.kind: self.content}


class MessageRefused(Exception):
    """The runner cannot take this message now (answered ``409 message_not_accepted``)."""


def message_kinds(runner: object) -> frozenset[str]:
    """The message kinds ``runner`` takes (none unless it declares ``message_kinds``)."""
    kinds = getattr(runner, "message_kinds", None)
    return frozenset(kinds) if isinstance(kinds, frozenset | set | tuple | list) else frozenset()


class Runner(Protocol):
    @property
    def name(self) -> str: ...

    def validate(self, input: Any) -> None: ...

    def run(self, item: WorkItem) -> AsyncGenerator[RunnerEvent, None]: ...
