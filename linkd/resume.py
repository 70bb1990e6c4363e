"""How far a run got, and how a restarted daemon continues it from there (pure, no I/O).

A run's progress is what its *runner* produced and the journal holds: the runner's stage
events (every ``stage`` after seq 1, which is the daemon's own ``starting-run``) and the
characters of output per stream. A runner that can resume (same input, same events: the
``mock`` runner, a command template or http runner configured ``resumable``) is run again
after a restart and :class:`ResumeFilter` drops what it had produced already, cutting an
output chunk that was half sent, so the gateway sees each seq once and the output
byte-exact. Everything else is ended ``daemon_restarted`` (see :mod:`linkd.runs`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .run_events import OUTPUT, STAGE, RunEvent
from .runners.base import Output, RunnerEvent, Stage

__all__ = ["Progress", "ResumeFilter"]


@dataclass
class Progress:
    """Runner events of one run that reached the journal: stages, and output characters per stream."""

    stages: int = 0
    chars: dict[str, int] = field(default_factory=dict)

    def advance(self, event: RunEvent) -> None:
        if event.type == STAGE and event.seq > 1:
            self.stages += 1
        elif event.type == OUTPUT:
            data = event.data.get("data")
            stream = str(event.data.get("stream", "stdout"))
            if isinstance(data, str):
                self.chars[stream] = self.chars.get(stream, 0) + len(data)

    def to_json(self) -> str:
        return json.dumps({"stages": self.stages, "chars": self.chars}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | None) -> Progress:
        """The progress written by :meth:`to_json`; ``ValueError`` for anything else."""
        if not text:
            return cls()
        data: Any = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("progress is not a JSON object")
        stages, chars = data.get("stages", 0), data.get("chars", {})
        if not isinstance(stages, int) or not isinstance(chars, dict):
            raise ValueError("progress has bad fields")
        if not all(isinstance(k, str) and isinstance(v, int) for k, v in chars.items()):
            raise ValueError("progress has bad output counts")
        return cls(stages, dict(chars))


class ResumeFilter:
    """Drops the runner events a run already produced before the restart; passes the rest."""

    def __init__(self, done: Progress) -> None:
        self._stages = done.stages
        self._chars = dict(done.chars)

    def skipped(self, stream: str) -> int:
        """Output characters of ``stream`` still to be dropped."""
        return self._chars.get(stream, 0)

    def take(self, event: RunnerEvent) -> RunnerEvent | None:
        """``event`` as the gateway should see it now: None when it was sent already."""
        if isinstance(event, Stage):
            if self._stages > 0:
                self._stages -= 1
                return None
            return event
        left = self._chars.get(event.stream, 0)
        if left <= 0:
            return event
        if len(event.data) <= left:
            self._chars[event.stream] = left - len(event.data)
            return None
        self._chars[event.stream] = 0
        return Output(event.data[left:], event.stream)
