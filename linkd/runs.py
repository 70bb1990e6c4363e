"""Runs on this desktop: accept work items, execute them in the background, cancel them.

Each accepted work item becomes one background execution: ``starting-run``, the
runner's stages and output, a heartbeat every ``heartbeat_interval`` while it
works, and always exactly one final ``done`` (``completed``, ``failed`` or
``cancelled``), all through a :class:`~linkd.run_events.RunRecorder`.

Idempotency (the dispatcher may retry a delivery it is unsure about):

- the same ``runId`` and fence again, running or recently finished: accepted again,
  nothing new runs (``duplicate``);
- the same ``runId`` with another fence while it runs: refused (``conflict``);
- the same ``runId`` with another fence after it finished: a new execution (a re-dispatch).

Cancellation cancels the runner's task (a runner cleans up in its ``finally``: a
command's process group is terminated); a second cancel escalates (SIGKILL).
On shutdown every run is cancelled and ends ``cancelled``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from .run_events import EventSink, Fence, RunRecorder, TerminalStatus
from .runners.base import Output, RunFailed, Runner, Stage, WorkItem

__all__ = ["RunInfo", "RunManager", "SubmitOutcome", "SubmitResult"]

log = logging.getLogger("linkd.runs")

# Finished runs remembered for idempotent re-delivery and cancel answers.
FINISHED_MEMORY: Final = 10_000
# Of the shutdown time, this share is for runners to clean up after the first cancel; the rest is
# for the escalated (second) cancel and the final done events.
SHUTDOWN_GRACE_SHARE: Final = 0.75
MIN_ESCALATION: Final = 0.1


class SubmitOutcome(enum.Enum):
    STARTED = "started"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"
    BUSY = "busy"
    CLOSED = "closed"


@dataclass(frozen=True)
class SubmitResult:
    outcome: SubmitOutcome
    status: str | None = None  # for duplicates: "running" or the terminal status
    fence: Fence | None = None  # for conflicts: the fence that is running


@dataclass
class RunInfo:
    item: WorkItem
    started_at: float  # unix time
    status: str = "running"
    reason: str | None = None
    cancel_reason: str | None = None
    cancels: int = 0
    work: asyncio.Task[None] | None = field(default=None, repr=False)
    task: asyncio.Task[None] | None = field(default=None, repr=False)
    recorder: RunRecorder | None = field(default=None, repr=False)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "runId": self.item.run_id,
            "fence": self.item.fence,
            "runner": self.item.runner,
            "status": self.status,
            "startedAt": self.started_at,
        }
        if self.recorder is not None:
            out["events"] = self.recorder.seq
        return out


class RunManager:
    def __init__(
        self,
        runners: Mapping[str, Runner],
        sink: EventSink,
        *,
        heartbeat_interval: float = 10.0,
        max_concurrent: int = 8,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.runners = dict(runners)
        self.sink = sink
        self.heartbeat_interval = heartbeat_interval
        self.max_concurrent = max_concurrent
        self.on_change = on_change
        self._active: dict[str, RunInfo] = {}
        self._finished: OrderedDict[str, RunInfo] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    # ------------------------------------------------------------------ queries

    def active(self) -> list[RunInfo]:
        return list(self._active.values())

    def get(self, run_id: str) -> RunInfo | None:
        return self._active.get(run_id) or self._finished.get(run_id)

    async def wait_finished(self, run_id: str, timeout: float) -> RunInfo:
        """Wait until ``run_id`` has ended and written its done event (for tests and tools)."""
        info = self.get(run_id)
        if info is None or info.task is None:
            raise KeyError(run_id)
        await asyncio.wait_for(asyncio.shield(info.task), timeout)
        return info

    # ------------------------------------------------------------------ commands

    def submit(self, item: WorkItem) -> SubmitResult:
        """Start ``item`` in the background (the runner already validated its input)."""
        running = self._active.get(item.run_id)
        if running is not None:
            if running.item.fence == item.fence:
                return SubmitResult(SubmitOutcome.DUPLICATE, status="running")
            return SubmitResult(SubmitOutcome.CONFLICT, fence=running.item.fence)
        finished = self._finished.get(item.run_id)
        if finished is not None and finished.item.fence == item.fence:
            return SubmitResult(SubmitOutcome.DUPLICATE, status=finished.status)
        if self._closed:
            return SubmitResult(SubmitOutcome.CLOSED)
        if len(self._active) >= self.max_concurrent:
            return SubmitResult(SubmitOutcome.BUSY)
        runner = self.runners[item.runner]
        info = RunInfo(item, time.time())
        self._active[item.run_id] = info
        info.task = asyncio.get_running_loop().create_task(
            self._execute(info, runner), name=f"run-{item.run_id}"
        )
        self._tasks.add(info.task)
        info.task.add_done_callback(self._tasks.discard)
        log.info(
            "run %s started (%s runner)",
            item.run_id,
            item.runner,
            extra={"event": "run_started", "run_id": item.run_id, "runner": item.runner},
        )
        self._changed()
        return SubmitResult(SubmitOutcome.STARTED)

    def cancel(self, run_id: str, reason: str = "cancelled by request") -> RunInfo | None:
        """Cancel a running run (again: escalate); returns it, or None when it is not running."""
        info = self._active.get(run_id)
        if info is None:
            return None
        if info.cancel_reason is None:
            info.cancel_reason = reason
        info.cancels += 1
        if info.work is not None and not info.work.done():
            info.work.cancel()
        return info

    async def shutdown(self, timeout: float, reason: str = "the desktop daemon is shutting down") -> None:
        """Refuse new runs, cancel the running ones and wait (bounded) until each wrote its ``done``."""
        self._closed = True
        for run_id in list(self._active):
            self.cancel(run_id, reason)
        tasks = set(self._tasks)
        if not tasks:
            return
        # Most of the time for the runners' own clean-up (a command's grace period) ...
        _, pending = await asyncio.wait(tasks, timeout=timeout * SHUTDOWN_GRACE_SHARE)
        if pending:
            for run_id in list(self._active):
                self.cancel(run_id, reason)  # ... then a second cancel: kill without grace
            escalation = max(MIN_ESCALATION, timeout * (1 - SHUTDOWN_GRACE_SHARE))
            _, pending = await asyncio.wait(pending, timeout=escalation)
        for task in pending:
            log.warning("run task %s did not finish during shutdown", task.get_name())
            task.cancel()

    # ------------------------------------------------------------------ execution

    async def _execute(self, info: RunInfo, runner: Runner) -> None:
        item = info.item
        recorder = info.recorder = RunRecorder(self.sink, item.run_id, item.fence)
        status: TerminalStatus = "completed"
        reason: str | None = None
        details: dict[str, Any] = {}
        heartbeat = asyncio.get_running_loop().create_task(self._heartbeats(recorder))
        try:
            info.work = asyncio.get_running_loop().create_task(self._drive(recorder, runner, item))
            if info.cancel_reason is not None:
                info.work.cancel()
            await asyncio.wait([info.work])
            if info.work.cancelled():
                status, reason = "cancelled", info.cancel_reason or "cancelled"
            elif (exc := info.work.exception()) is not None:
                status = "failed"
                if isinstance(exc, RunFailed):
                    reason, details = exc.reason, dict(exc.details)
                else:
                    log.error("runner %s failed on run %s", item.runner, item.run_id, exc_info=exc)
                    reason = f"the {item.runner} runner crashed ({type(exc).__name__})"
            elif info.cancel_reason is not None:
                status, reason = "cancelled", info.cancel_reason
        except asyncio.CancelledError:
            # Torn down from outside (event loop closing): the run still ends, as cancelled.
            status, reason = "cancelled", info.cancel_reason or "the desktop daemon stopped"
            if info.work is not None:
                info.work.cancel()
            raise
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            info.status, info.reason = status, reason
            # Finished from here on: a redelivery is a duplicate with this status, a cancel a no-op.
            self._active.pop(item.run_id, None)
            self._finished[item.run_id] = info
            while len(self._finished) > FINISHED_MEMORY:
                self._finished.popitem(last=False)
            try:
                await recorder.done(status, reason=reason, **details)
            finally:
                log.info(
                    "run %s ended: %s%s",
                    item.run_id,
                    status,
                    f" ({reason})" if reason else "",
                    extra={
                        "event": "run_ended",
                        "run_id": item.run_id,
                        "status": status,
                        "seq": recorder.seq,
                    },
                )
                self._changed()

    async def _drive(self, recorder: RunRecorder, runner: Runner, item: WorkItem) -> None:
        await recorder.stage("starting-run", runner=item.runner)
        async with contextlib.aclosing(runner.run(item)) as events:
            async for event in events:
                if isinstance(event, Output):
                    await recorder.output(event.data, event.stream)
                elif isinstance(event, Stage):
                    await recorder.stage(event.name)

    async def _heartbeats(self, recorder: RunRecorder) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            if recorder.finished:
                return
            await recorder.heartbeat()

    def _changed(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change()
            except Exception:
                log.exception("run change callback failed")
