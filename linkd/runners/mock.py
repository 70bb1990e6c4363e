"""``echo`` and ``mock``: deterministic runners for tests, demos and benchmarks.

``echo`` input: any JSON value. Output: one chunk, the input itself when it is a
string, else its JSON text.

``mock`` input (all optional)::

    {"count": 3,          # chunks to emit, 0..1000000
     "delayMs": 0,        # pause before each chunk, 0..60000
     "chunkBytes": null,  # pad each chunk to this many characters (1..1048576)
     "prefix": "chunk",   # chunk i is "<prefix> <i>\\n" (i from 0)
     "fail": null}        # a string: after the chunks, fail with this reason

Same input, same output, always.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Mapping
from typing import Any, Final

from .base import InvalidInput, Output, RunFailed, RunnerEvent, Stage, WorkItem

__all__ = ["EchoRunner", "MockRunner", "mock_chunk"]

MAX_COUNT: Final = 1_000_000
MAX_DELAY_MS: Final = 60_000
MAX_CHUNK_BYTES: Final = 1024 * 1024
_MOCK_KEYS: Final = frozenset({"count", "delayMs", "chunkBytes", "prefix", "fail"})


class EchoRunner:
    name: Final = "echo"

    def validate(self, input: Any) -> None:
        return None

    async def run(self, item: WorkItem) -> AsyncGenerator[RunnerEvent, None]:
        yield Stage("running")
        text = item.input if isinstance(item.input, str) else json.dumps(item.input, ensure_ascii=False)
        yield Output(text)


def _int_field(data: Mapping[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = data.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidInput(f"mock input {key!r} must be a whole number in [{low}, {high}]")
    return value


def mock_chunk(prefix: str, index: int, chunk_bytes: int | None) -> str:
    """Chunk ``index`` of a mock run (so tests can predict every byte)."""
    text = f"{prefix} {index}\n"
    if chunk_bytes is not None and len(text) < chunk_bytes:
        text = text[:-1] + "." * (chunk_bytes - len(text)) + "\n"
    return text


class MockRunner:
    name: Final = "mock"

    def _parse(self, input: Any) -> tuple[int, float, int | None, str, str | None]:
        data: Mapping[str, Any] = {} if input is None else input
        if not isinstance(data, Mapping):
            raise InvalidInput("mock input must be a JSON object (or null)")
        unknown = sorted(set(data) - _MOCK_KEYS)
        if unknown:
            raise InvalidInput(
                f"mock input has unknown field {unknown[0]!r} (known: {', '.join(sorted(_MOCK_KEYS))})"
            )
        count = _int_field(data, "count", 3, 0, MAX_COUNT)
        delay = _int_field(data, "delayMs", 0, 0, MAX_DELAY_MS) / 1000
        chunk_bytes = data.get("chunkBytes")
        if chunk_bytes is not None:
            chunk_bytes = _int_field(data, "chunkBytes", 1, 1, MAX_CHUNK_BYTES)
        prefix = data.get("prefix", "chunk")
        if not isinstance(prefix, str) or len(prefix) > 256:
            raise InvalidInput("mock input 'prefix' must be a string of at most 256 characters")
        fail = data.get("fail")
        if fail is not None and (not isinstance(fail, str) or not fail):
            raise InvalidInput("mock input 'fail' must be a non-empty string (the failure reason)")
        return count, delay, chunk_bytes, prefix, fail

    def validate(self, input: Any) -> None:
        self._parse(input)

    async def run(self, item: WorkItem) -> AsyncGenerator[RunnerEvent, None]:
        count, delay, chunk_bytes, prefix, fail = self._parse(item.input)
        yield Stage("preparing")
        yield Stage("running")
        for index in range(count):
            if delay:
                await asyncio.sleep(delay)
            else:
                await asyncio.sleep(0)  # stay cancellable and fair even with no delay
            yield Output(mock_chunk(prefix, index, chunk_bytes))
        if fail is not None:
            raise RunFailed(fail)
