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

Messages to a running run (context, signals: :meth:`RunManager.deliver`) go to its runner
when the runner declares that kind; each message id is delivered once per run (the ids of
the last :data:`MESSAGE_MEMORY` messages of each run are kept, also after it ended), so a
gateway that resends after a crash gets ``duplicate`` instead of a second delivery. The set
lives in memory: a daemon restart forgets it (a resumed run may see a resent message again).

After a crash (docs/runs.md, "Daemon restarts") the daemon hands the runs its journal
found unfinished to :meth:`RunManager.recover`: a run whose runner can resume
(``runner.resumable(item)``) is run again, continuing the same execution (seq and
message ids go on; what it had produced is dropped by :class:`~linkd.resume.ResumeFilter`);
any other is ended at once ``failed`` with ``failureKind: daemon_restarted``.
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

from contract.run_protocol import DAEMON_RESTARTED, FAILURE_KIND_FIELD

from .journal import JournaledRun
from .resume import Progress, ResumeFilter
from .run_events import EventSink, Fence, RunRecorder, TerminalStatus
from .runners.base import (
    MessageRefused,
    Output,
    RunFailed,
    RunMessage,
    Runner,
    RunnerEvent,
    Stage,
    WorkItem,
    message_kinds,
)

__all__ = [
    "DeliverOutcome",
    "DeliverResult",
    "RunInfo",
    "RunManager",
    "SubmitOutcome",
    "SubmitResult",
    "item_from_dict",
    "item_to_dict",
]

log = logging.getLogger("linkd.runs")

# Finished runs remembered for idempotent re-delivery and cancel answers.
FINISHED_MEMORY: Final = 10_000
# Of the shutdown time, this share is for runners to clean up after the first cancel; the rest is
# for the escalated (second) cancel and the final done events.
SHUTDOWN_GRACE_SHARE: Final = 0.75
MIN_ESCALATION: Final = 0.1
# Message ids remembered per run for de-duplication.
MESSAGE_MEMORY: Final = 1024


def item_to_dict(item: WorkItem) -> dict[str, Any]:
    """The work item as the journal keeps it (the ``POST /api/links/work`` body's names)."""
    return {
        "runId": item.run_id,
        "threadId": item.thread_id,
        "userId": item.user_id,
        "fence": item.fence,
        "runner": item.runner,
        "input": item.input,
    }


def item_from_dict(data: Mapping[str, Any]) -> WorkItem:
    """The inverse of :func:`item_to_dict`; ``KeyError`` when a field is missing."""
    return WorkItem(
        str(data["runId"]),
        str(data["threadId"]),
        str(data["userId"]),
        data["fence"],
        str(data["runner"]),
        data.get("input"),
    )


# Called when a run execution starts, before its first event: (item, execution, resumable).
RunStarted = Callable[[WorkItem, str, bool], None]


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


class DeliverOutcome(enum.Enum):
    DELIVERED = "delivered"
    DUPLICATE = "duplicate"
    UNKNOWN = "unknown"
    FINISHED = "finished"
    NOT_ACCEPTED = "not_accepted"


@dataclass(frozen=True)
class DeliverResult:
    outcome: DeliverOutcome
    status: str | None = None  # the run's status (finished runs)
    reason: str = ""  # why a message was not accepted
    accepts: tuple[str, ...] = ()  # the kinds the run's runner takes


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
    # Ids of the messages delivered to this run (bounded, oldest forgotten first).
    messages: OrderedDict[str, None] = field(default_factory=OrderedDict, repr=False)

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
        on_start: RunStarted | None = None,
    ) -> None:
        self.runners = dict(runners)
        self.sink = sink
        self.heartbeat_interval = heartbeat_interval
        self.max_concurrent = max_concurrent
        self.on_change = on_change
        self.on_start = on_start
        self.resumes = 0  # runs continued after a daemon restart
        self.restart_failures = 0  # runs ended daemon_restarted
        self.messages_delivered = 0  # context and signals handed to runners
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
        self._launch(item, self.runners[item.runner], None)
        log.info(
            "run %s started (%s runner)",
            item.run_id,
            item.runner,
            extra={"event": "run_started", "run_id": item.run_id, "runner": item.runner},
        )
        self._changed()
        return SubmitResult(SubmitOutcome.STARTED)

    def _launch(self, item: WorkItem, runner: Runner, resumed: JournaledRun | None) -> RunInfo:
        info = RunInfo(item, time.time())
        self._active[item.run_id] = info
        info.task = asyncio.get_running_loop().create_task(
            self._execute(info, runner, resumed), name=f"run-{item.run_id}"
        )
        self._tasks.add(info.task)
        info.task.add_done_callback(self._tasks.discard)
        return info

    def can_resume(self, run: JournaledRun) -> WorkItem | None:
        """The work item to run again for ``run``, or None when it must end ``daemon_restarted``."""
        if not run.resumable or run.item is None:
            return None
        try:
            item = item_from_dict(run.item)
        except (KeyError, TypeError, ValueError):
            return None
        runner = self.runners.get(item.runner)
        check = getattr(runner, "resumable", None)
        if runner is None or item.run_id != run.run_id or not callable(check):
            return None
        try:
            return item if check(item) else None
        except Exception:
            return None

    async def recover(self, runs: list[JournaledRun]) -> None:
        """The runs a crashed daemon left unfinished: resume each that can, end the others at once."""
        for run in runs:
            item = self.can_resume(run)
            if item is not None and not self._closed:
                self.resumes += 1
                self._launch(item, self.runners[item.runner], run)
                log.info(
                    "run %s resumed after a daemon restart, after seq %d (%s runner)",
                    run.run_id,
                    run.last_seq,
                    item.runner,
                    extra={"event": "run_resumed", "run_id": run.run_id, "seq": run.last_seq},
                )
                continue
            await self._end_restarted(run)
        self._changed()

    async def _end_restarted(self, run: JournaledRun) -> None:
        recorder = RunRecorder(
            self.sink, run.run_id, run.fence, last_seq=run.last_seq, execution=run.execution
        )
        reason = "the desktop daemon was restarted while the run worked, and its runner cannot resume"
        await recorder.done("failed", reason=reason, **{FAILURE_KIND_FIELD: DAEMON_RESTARTED})
        self.restart_failures += 1
        if run.item is not None:
            with contextlib.suppress(KeyError, TypeError, ValueError):
                info = RunInfo(item_from_dict(run.item), time.time(), status="failed", reason=reason)
                info.recorder = recorder
                self._finished[run.run_id] = info
        log.warning(
            "run %s ended failed (%s): the daemon was restarted while it worked, after seq %d",
            run.run_id,
            DAEMON_RESTARTED,
            run.last_seq,
            extra={"event": "run_ended", "run_id": run.run_id, "status": "failed", "seq": recorder.seq},
        )

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

    def deliver(self, run_id: str, message: RunMessage) -> DeliverResult:
        """Hand a context or signal to the run's runner, once per message id."""
        info = self._active.get(run_id)
        if info is None:
            finished = self._finished.get(run_id)
            if finished is None:
                return DeliverResult(DeliverOutcome.UNKNOWN)
            if message.message_id in finished.messages:
                return DeliverResult(DeliverOutcome.DUPLICATE, status=finished.status)
            return DeliverResult(DeliverOutcome.FINISHED, status=finished.status)
        if message.message_id in info.messages:
            return DeliverResult(DeliverOutcome.DUPLICATE, status=info.status)
        runner = self.runners.get(info.item.runner)
        kinds = tuple(sorted(message_kinds(runner)))
        if message.kind not in kinds:
            reason = f"the {info.item.runner} runner takes no {message.kind} messages"
            return DeliverResult(DeliverOutcome.NOT_ACCEPTED, reason=reason, accepts=kinds)
        deliver = getattr(runner, "deliver", None)
        try:
            if not callable(deliver):
                raise MessageRefused(f"the {info.item.runner} runner cannot take messages")
            deliver(info.item, message)
        except MessageRefused as exc:
            return DeliverResult(DeliverOutcome.NOT_ACCEPTED, reason=str(exc), accepts=kinds)
        except Exception:
            log.exception("run %s: the runner failed to take message %s", run_id, message.message_id)
            return DeliverResult(
                DeliverOutcome.NOT_ACCEPTED, reason="the runner failed to take the message", accepts=kinds
            )
        info.messages[message.message_id] = None
        while len(info.messages) > MESSAGE_MEMORY:
            info.messages.popitem(last=False)
        self.messages_delivered += 1
        log.info(
            "run %s: %s %s delivered",
            run_id,
            message.kind,
            message.message_id,
            extra={"event": "run_message", "run_id": run_id, "kind": message.kind},
        )
        return DeliverResult(DeliverOutcome.DELIVERED, status=info.status)

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

    async def _execute(self, info: RunInfo, runner: Runner, resumed: JournaledRun | None = None) -> None:
        item = info.item
        if resumed is None:
            recorder = info.recorder = RunRecorder(self.sink, item.run_id, item.fence)
            if self.on_start is not None:
                check = getattr(runner, "resumable", None)
                try:
                    self.on_start(item, recorder.execution, bool(callable(check) and check(item)))
                except Exception:
                    log.exception("run %s: cannot journal its start", item.run_id)
        else:
            recorder = info.recorder = RunRecorder(
                self.sink, item.run_id, item.fence, last_seq=resumed.last_seq, execution=resumed.execution
            )
        status: TerminalStatus = "completed"
        reason: str | None = None
        details: dict[str, Any] = {}
        heartbeat = asyncio.get_running_loop().create_task(self._heartbeats(recorder))
        try:
            progress = resumed.progress if resumed is not None else None
            info.work = asyncio.get_running_loop().create_task(self._drive(recorder, runner, item, progress))
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

    async def _drive(
        self, recorder: RunRecorder, runner: Runner, item: WorkItem, resumed: Progress | None
    ) -> None:
        skip: ResumeFilter | None = None
        if resumed is None:
            await recorder.stage("starting-run", runner=item.runner)
            source = runner.run(item)
        else:
            skip = ResumeFilter(resumed)
            resume = getattr(runner, "resume", None)
            source = resume(item, resumed) if callable(resume) else runner.run(item)
        async with contextlib.aclosing(source) as events:
            async for produced in events:
                event: RunnerEvent | None = produced if skip is None else skip.take(produced)
                if event is None:
                    continue
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
