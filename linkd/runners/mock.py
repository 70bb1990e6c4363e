"""``echo`` and ``mock``: deterministic runners for tests, demos and benchmarks.

``echo`` input: any JSON value. Output: one chunk, the input itself when it is a
string, else its JSON text.

``mock`` input: see :mod:`contract.runner_inputs` (the gateway checks it the same way at
``POST /api/runs``). Output: ``count`` chunks, ``mock_chunk(prefix, i, chunkBytes)``.

Same input, same output, always: both can resume after a daemon restart (the daemon runs
them again and drops what was sent; ``mock`` skips its delays for that part).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any, Final

from contract.runner_inputs import MockInput

from .base import Output, RunFailed, RunnerEvent, Stage, WorkItem

if TYPE_CHECKING:
    from ..resume import Progress

__all__ = ["EchoRunner", "MockRunner", "mock_chunk"]


class EchoRunner:
    name: Final = "echo"

    def validate(self, input: Any) -> None:
        return None

    def resumable(self, item: WorkItem) -> bool:
        return True

    async def run(self, item: WorkItem) -> AsyncGenerator[RunnerEvent, None]:
        yield Stage("running")
        text = item.input if isinstance(item.input, str) else json.dumps(item.input, ensure_ascii=False)
        yield Output(text)


def mock_chunk(prefix: str, index: int, chunk_bytes: int | None) -> str:
    """Chunk ``index`` of a mock run (so tests can predict every byte)."""
    text = f"{prefix} {index}\n"
    if chunk_bytes is not None and len(text) < chunk_bytes:
        text = text[:-1] + "." * (chunk_bytes - len(text)) + "\n"
    return text


class MockRunner:
    name: Final = "mock"

    def validate(self, input: Any) -> None:
        MockInput.parse(input)

    def resumable(self, item: WorkItem) -> bool:
        return True

    def resume(self, item: WorkItem, done: Progress) -> AsyncGenerator[RunnerEvent, None]:
        """The same events as :meth:`run`, without the delays of the chunks sent before a restart."""
        return self.run(item, fast_chars=done.chars.get("stdout", 0))

    async def run(self, item: WorkItem, *, fast_chars: int = 0) -> AsyncGenerator[RunnerEvent, None]:
        spec = MockInput.parse(item.input)
        yield Stage("preparing")
        yield Stage("running")
        produced = 0
        for index in range(spec.count):
            chunk = mock_chunk(spec.prefix, index, spec.chunk_bytes)
            produced += len(chunk)
            if produced <= fast_chars:
                yield Output(chunk)
                continue
            if spec.delay_ms:
                await asyncio.sleep(spec.delay_ms / 1000)
            else:
                await asyncio.sleep(0)  # stay cancellable and fair even with no delay
            yield Output(chunk)
        if spec.fail is not None:
            raise RunFailed(spec.fail)
