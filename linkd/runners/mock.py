"""``echo`` and ``mock``: deterministic runners for tests, demos and benchmarks.

``echo`` input: any JSON value. Output: one chunk, the input itself when it is a
string, else its JSON text.

``mock`` input: see :mod:`contract.runner_inputs` (the gateway checks it the same way at
``POST /api/runs``). Output: ``count`` chunks, ``mock_chunk(prefix, i, chunkBytes)``.

``mock`` takes context and signals while it runs: each becomes one ``output`` event on the
stream ``messages``, its data the message as one JSON line (``{"messageId", "kind", "context"
| "signal"}``), so tests and demos see exactly what reached the runner, and how often.

Same input, same output, always: both can resume after a daemon restart (the daemon runs
them again and drops what was sent; ``mock`` skips its delays for that part).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any, Final

from contract.run_messages import CONTEXT, SIGNAL
from contract.runner_inputs import MockInput

from .base import Output, RunFailed, RunMessage, RunnerEvent, Stage, WorkItem

if TYPE_CHECKING:
    from ..resume import Progress

__all__ = ["MESSAGES_STREAM", "EchoRunner", "MockRunner", "mock_chunk"]

# The output stream mock writes the messages it received to.
MESSAGES_STREAM: Final = "messages"


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


def _message_output(message: RunMessage) -> Output:
    return Output(json.dumps(message.as_json(), separators=(",", ":")) + "\n", MESSAGES_STREAM)


class MockRunner:
    name: Final = "mock"
    message_kinds: Final = frozenset({CONTEXT, SIGNAL})

    def __init__(self) -> None:
        self._inboxes: dict[str, asyncio.Queue[RunMessage]] = {}

    def deliver(self, item: WorkItem, message: RunMessage) -> None:
        """Queue ``message`` for the run; it becomes an output event at its next step."""
        self._inboxes.setdefault(item.run_id, asyncio.Queue()).put_nowait(message)

    def validate(self, input: Any) -> None:
        MockInput.parse(input)

    def resumable(self, item: WorkItem) -> bool:
        return True

    def resume(self, item: WorkItem, done: Progress) -> AsyncGenerator[RunnerEvent, None]:
        """The same events as :meth:`run`, without the delays of the chunks sent before a restart."""
        return self.run(item, fast_chars=done.chars.get("stdout", 0))

    async def run(self, item: WorkItem, *, fast_chars: int = 0) -> AsyncGenerator[RunnerEvent, None]:
        spec = MockInput.parse(item.input)
        inbox = self._inboxes.setdefault(item.run_id, asyncio.Queue())
        try:
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
                    async for message in _pause(inbox, spec.delay_ms / 1000):
                        yield _message_output(message)
                else:
                    await asyncio.sleep(0)  # stay cancellable and fair even with no delay
                while not inbox.empty():
                    yield _message_output(inbox.get_nowait())
                yield Output(chunk)
            while not inbox.empty():
                yield _message_output(inbox.get_nowait())
            if spec.fail is not None:
                raise RunFailed(spec.fail)
        finally:
            self._inboxes.pop(item.run_id, None)


async def _pause(inbox: asyncio.Queue[RunMessage], seconds: float) -> AsyncGenerator[RunMessage, None]:
    """Wait ``seconds``, handing out each message that arrives meanwhile at once."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while (remaining := end - loop.time()) > 0:
        try:
            yield await asyncio.wait_for(inbox.get(), remaining)
        except TimeoutError:
            return
