"""``echo`` and ``mock``: deterministic runners for tests, demos and benchmarks.

``echo`` input: any JSON value. Output: one chunk, the input itself when it is a
string, else its JSON text.

``mock`` input: see :mod:`contract.runner_inputs` (the gateway checks it the same way at
``POST /api/runs``). Output: ``count`` chunks, ``mock_chunk(prefix, i, chunkBytes)``.

Same input, same output, always.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from typing import Any, Final

from contract.runner_inputs import MockInput

from .base import Output, RunFailed, RunnerEvent, Stage, WorkItem

__all__ = ["EchoRunner", "MockRunner", "mock_chunk"]


class EchoRunner:
    name: Final = "echo"

    def validate(self, input: Any) -> None:
        return None

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

    async def run(self, item: WorkItem) -> AsyncGenerator[RunnerEvent, None]:
        spec = MockInput.parse(item.input)
        yield Stage("preparing")
        yield Stage("running")
        for index in range(spec.count):
            if spec.delay_ms:
                await asyncio.sleep(spec.delay_ms / 1000)
            else:
                await asyncio.sleep(0)  # stay cancellable and fair even with no delay
            yield Output(mock_chunk(spec.prefix, index, spec.chunk_bytes))
        if spec.fail is not None:
            raise RunFailed(spec.fail)
