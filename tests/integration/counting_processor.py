"""A processor for the processor tests: one side effect per event, through an anchor.

The effect appends ``<event key> <pid>`` to a file (``COUNTING_PROCESSOR_FILE`` in a gateway
process's environment), one ``write`` per line on an ``O_APPEND`` descriptor, so two gateway
processes may share the file. Its anchor's ``check`` looks for the key in the file: a claim taken
over from a killed instance does not append a second line when the first one made it.
"""

from __future__ import annotations

import os
from pathlib import Path

from studio_gateway.runs.processors.base import Processor, RunEvent
from studio_gateway.runs.processors.context import ProcessorContext


class CountingProcessor(Processor):
    name = "counting"

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path or os.environ["COUNTING_PROCESSOR_FILE"])
        self.resumed = 0

    def _append(self, key: str) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, f"{key} {os.getpid()}\n".encode())
        finally:
            os.close(fd)

    def _has(self, key: str) -> bool:
        if not self.path.exists():
            return False
        return any(line.split(" ", 1)[0] == key for line in self.path.read_text().splitlines())

    async def handle(self, event: RunEvent, ctx: ProcessorContext) -> None:
        async def effect() -> None:
            self._append(event.key)

        async def happened() -> bool:
            return self._has(event.key)

        outcome = await ctx.once(event.key, effect, check=happened)
        if outcome.resumed:
            self.resumed += 1


def effects(path: Path) -> list[tuple[str, int]]:
    """The file's lines as (event key, pid)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        key, _, pid = line.partition(" ")
        out.append((key, int(pid)))
    return out
