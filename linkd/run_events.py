"""Run output: the events a run produces and the seam they leave the daemon through.

Every event of one run execution (one ``runId`` + ``runFenceToken``) carries a
``seq`` starting at 1 and contiguous, and the last one is always ``done``::

    {"runId": "r1", "fence": 3, "seq": 1, "ts": 1700000000123, "type": "stage", "stage": "starting-run"}
    {"runId": "r1", "fence": 3, "seq": 2, ..., "type": "output", "stream": "stdout", "data": "hello\\n"}
    {"runId": "r1", "fence": 3, "seq": 3, ..., "type": "heartbeat"}
    {"runId": "r1", "fence": 3, "seq": 4, ..., "type": "done", "finalSeq": 4, "status": "completed"}

``done`` has ``status`` ``completed``, ``failed`` (with ``reason``, and ``exitCode``
for commands) or ``cancelled`` (with ``reason``); ``finalSeq`` is its own ``seq``,
so a reader knows exactly how many events the run has.

:class:`EventSink` is where events go. :class:`linkd.uplink.JetStreamUplink` delivers
them durably to JetStream (what ``linkd up`` uses), with message ids
``<runId>:<fence>:<seq>:<execution>`` (``execution``: random per run execution, so
no other host can guess them); :class:`MemoryEventSink` keeps them in memory (tests, the
demo, ``linkd up --no-uplink``); :class:`JsonlFileSink` appends them to a file
(``--events-file``, for debugging); :class:`TeeSink` fans out.

:class:`RunRecorder` numbers the events of one run and hands them to the sink
from a single writer task, in order: a producer being cancelled (a cancelled
runner, say) never interrupts a sink call half-way or reorders events. Output
bigger than :data:`MAX_OUTPUT_CHARS` is split into several ``output`` events, so
every event fits in one NATS message.

A durable sink (the uplink with a journal) has a synchronous ``persist(event)``: the
recorder calls it as it numbers each event, so the event is on disk before the producer
goes on (``stage``/``output``/``heartbeat`` return), and a crash loses nothing the runner
produced; ``emit`` follows from the writer task as usual. A recorder may also continue an
execution after a restart (``last_seq``, ``execution``): the same ids, seq going on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, Protocol

__all__ = [
    "DONE",
    "HEARTBEAT",
    "MAX_OUTPUT_CHARS",
    "OUTPUT",
    "STAGE",
    "EventSink",
    "Fence",
    "JsonlFileSink",
    "MemoryEventSink",
    "RunEvent",
    "RunRecorder",
    "TeeSink",
    "TerminalStatus",
]

log = logging.getLogger("linkd.run_events")

Fence = int | str
EventType = Literal["stage", "output", "heartbeat", "done"]
TerminalStatus = Literal["completed", "failed", "cancelled"]
STAGE: Final = "stage"
OUTPUT: Final = "output"
HEARTBEAT: Final = "heartbeat"
DONE: Final = "done"

# Events queued between a run and its sink; a producer waits when the sink falls this far behind.
RECORDER_QUEUE_LIMIT: Final = 1024
# Runs whose events a MemoryEventSink keeps (oldest dropped first).
MEMORY_SINK_RUNS: Final = 1000
# Characters of output per event: even fully \u-escaped (12 bytes per character at worst) an event
# stays well under NATS's default 1 MiB max_payload.
MAX_OUTPUT_CHARS: Final = 32 * 1024


@dataclass(frozen=True, slots=True)
class RunEvent:
    run_id: str
    fence: Fence
    seq: int
    type: EventType
    ts_ms: int
    data: Mapping[str, Any] = field(default_factory=dict)
    # Random per run execution (set by RunRecorder), never on the wire in the body: it makes the
    # message id unguessable, so another host cannot take a run's ids first (JetStream de-duplicates
    # per stream, not per subject) and have this daemon's real events dropped as duplicates.
    execution: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "runId": self.run_id,
            "fence": self.fence,
            "seq": self.seq,
            "ts": self.ts_ms,
            "type": self.type,
            **self.data,
        }

    @property
    def message_id(self) -> str:
        """The event's identity, ``<runId>:<fence>:<seq>``."""
        return f"{self.run_id}:{self.fence}:{self.seq}"

    @property
    def uplink_id(self) -> str:
        """The JetStream de-duplication id (``Nats-Msg-Id``): ``<message_id>:<execution>``, kept on retry."""
        return f"{self.message_id}:{self.execution}" if self.execution else self.message_id


class EventSink(Protocol):
    """Where run events go.

    ``emit`` is called once per event, in ``seq`` order per run, never concurrently
    for one run. It returns when the event is accepted (delivered, or queued in an
    outbox that delivers in order). An exception is logged and the event counted
    as lost, so a sink should retry transient failures itself.
    """

    async def emit(self, run_id: str, fence: Fence, event: RunEvent) -> None: ...


class MemoryEventSink:
    """Keeps every event in memory (bounded to the last ``max_runs`` runs); awaitable for tests."""

    def __init__(self, max_runs: int = MEMORY_SINK_RUNS) -> None:
        self.max_runs = max_runs
        self._runs: OrderedDict[tuple[str, Fence], list[RunEvent]] = OrderedDict()
        self._changed = asyncio.Condition()

    async def emit(self, run_id: str, fence: Fence, event: RunEvent) -> None:
        key = (run_id, fence)
        events = self._runs.get(key)
        if events is None:
            events = self._runs[key] = []
            while len(self._runs) > self.max_runs:
                self._runs.popitem(last=False)
        events.append(event)
        async with self._changed:
            self._changed.notify_all()

    def events(self, run_id: str, fence: Fence | None = None) -> list[RunEvent]:
        """The events of ``run_id`` (of its latest execution when ``fence`` is None)."""
        if fence is not None:
            return list(self._runs.get((run_id, fence), []))
        for (rid, _), events in reversed(self._runs.items()):
            if rid == run_id:
                return list(events)
        return []

    async def wait_for(self, run_id: str, predicate: Any, timeout: float) -> list[RunEvent]:
        """Wait until ``predicate(events)`` holds for ``run_id``; TimeoutError otherwise."""
        async with asyncio.timeout(timeout), self._changed:
            while True:
                events = self.events(run_id)
                if predicate(events):
                    return events
                await self._changed.wait()

    async def wait_done(self, run_id: str, timeout: float) -> list[RunEvent]:
        return await self.wait_for(run_id, lambda evs: bool(evs) and evs[-1].type == DONE, timeout)


class JsonlFileSink:
    """Appends each event as one JSON line (flushed per event)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", encoding="utf-8")

    async def emit(self, run_id: str, fence: Fence, event: RunEvent) -> None:
        self._file.write(json.dumps(event.as_dict(), separators=(",", ":")) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TeeSink:
    """Hands each event to every sink in turn."""

    def __init__(self, *sinks: EventSink) -> None:
        self.sinks = sinks

    def persist(self, event: RunEvent) -> None:
        """Hand ``event`` to every sink that keeps events on disk before they are emitted."""
        for sink in self.sinks:
            persist = getattr(sink, "persist", None)
            if callable(persist):
                persist(event)

    async def emit(self, run_id: str, fence: Fence, event: RunEvent) -> None:
        for sink in self.sinks:
            await sink.emit(run_id, fence, event)

    async def aclose(self) -> None:
        """Close every sink that can be closed asynchronously (an uplink flushes)."""
        for sink in self.sinks:
            close = getattr(sink, "aclose", None)
            if callable(close):
                await close()


class RunRecorder:
    """Numbers one run's events and delivers them to the sink in order, from one writer task."""

    def __init__(
        self,
        sink: EventSink,
        run_id: str,
        fence: Fence,
        *,
        queue_limit: int = RECORDER_QUEUE_LIMIT,
        last_seq: int = 0,
        execution: str | None = None,
    ):
        self.sink = sink
        self.run_id = run_id
        self.fence = fence
        self.seq = last_seq
        self.execution = execution or secrets.token_hex(8)
        self.lost = 0
        self.finished = False
        # A durable sink journals each event as it is numbered (see the module doc).
        persist = getattr(sink, "persist", None)
        self._persist: Callable[[RunEvent], None] | None = persist if callable(persist) else None
        self._queue: asyncio.Queue[RunEvent | None] = asyncio.Queue()
        self._limit = queue_limit
        self._space = asyncio.Event()
        self._space.set()
        self._writer = asyncio.get_running_loop().create_task(self._write_all(), name=f"run-events-{run_id}")

    async def stage(self, name: str, **detail: Any) -> None:
        await self._add(STAGE, {"stage": name, **detail})

    async def output(self, data: str, stream: str = "stdout") -> None:
        """One output event (several for more than :data:`MAX_OUTPUT_CHARS` characters)."""
        for start in range(0, max(len(data), 1), MAX_OUTPUT_CHARS):
            await self._add(OUTPUT, {"stream": stream, "data": data[start : start + MAX_OUTPUT_CHARS]})

    async def heartbeat(self) -> None:
        await self._add(HEARTBEAT, {})

    async def done(self, status: TerminalStatus, *, reason: str | None = None, **extra: Any) -> RunEvent:
        """Queue the final event and wait until the sink has everything (the recorder is closed after)."""
        if self.finished:
            raise RuntimeError(f"run {self.run_id} already has its done event")
        data: dict[str, Any] = {"finalSeq": self.seq + 1, "status": status}
        if reason is not None:
            data["reason"] = reason
        data.update(extra)
        event = self._enqueue(DONE, data)  # never waits for space: done always gets through
        self.finished = True
        self._queue.put_nowait(None)
        await asyncio.shield(self._writer)
        return event

    async def _add(self, kind: EventType, data: dict[str, Any]) -> None:
        while not self._space.is_set():
            await self._space.wait()
        if self.finished:
            raise RuntimeError(f"run {self.run_id} is finished; no more events")
        self._enqueue(kind, data)

    def _enqueue(self, kind: EventType, data: dict[str, Any]) -> RunEvent:
        # No await between numbering and queueing: seq order is queue order.
        self.seq += 1
        event = RunEvent(
            self.run_id, self.fence, self.seq, kind, int(time.time() * 1000), data, self.execution
        )
        if self._persist is not None:
            self._persist(event)
        self._queue.put_nowait(event)
        if self._queue.qsize() >= self._limit:
            self._space.clear()
        return event

    async def _write_all(self) -> None:
        while True:
            event = await self._queue.get()
            if self._queue.qsize() < self._limit:
                self._space.set()
            if event is None:
                return
            try:
                await self.sink.emit(self.run_id, self.fence, event)
            except Exception:
                self.lost += 1
                log.exception("run %s: event seq %d was not accepted by the sink", self.run_id, event.seq)

    async def aclose(self) -> None:
        """Stop the writer without a done event (only for teardown after a crash)."""
        if not self._writer.done():
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
