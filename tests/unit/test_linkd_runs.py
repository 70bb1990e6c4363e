"""Runs: contiguous events ending in exactly one done, heartbeats, cancel, idempotent redelivery, shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import pytest

from linkd.run_events import MemoryEventSink, RunEvent, RunRecorder
from linkd.runners import (
    EchoRunner,
    InvalidInput,
    MockRunner,
    Output,
    RunFailed,
    RunnerEvent,
    Stage,
    WorkItem,
)
from linkd.runners.mock import mock_chunk
from linkd.runs import RunManager, SubmitOutcome

TIMEOUT = 5.0


def item(run_id: str = "r1", runner: str = "mock", input: Any = None, fence: int | str = 1) -> WorkItem:
    return WorkItem(run_id, "t1", "u1", fence, runner, input)


def check_contiguous(events: list[RunEvent]) -> None:
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert [e.type for e in events].count("done") == 1 and events[-1].type == "done"
    assert events[-1].data["finalSeq"] == events[-1].seq


def manager(sink: MemoryEventSink, **kwargs: Any) -> RunManager:
    runners: dict[str, Any] = {"mock": MockRunner(), "echo": EchoRunner(), **kwargs.pop("runners", {})}
    return RunManager(runners, sink, **kwargs)


async def test_mock_run_is_deterministic_and_ends_completed() -> None:
    sink = MemoryEventSink()
    runs = manager(sink)
    assert (
        runs.submit(item(input={"count": 5, "prefix": "c", "chunkBytes": 12})).outcome
        is SubmitOutcome.STARTED
    )
    events = await sink.wait_done("r1", TIMEOUT)
    check_contiguous(events)
    assert [e.data["stage"] for e in events if e.type == "stage"] == ["starting-run", "preparing", "running"]
    assert [e.data["data"] for e in events if e.type == "output"] == [
        mock_chunk("c", i, 12) for i in range(5)
    ]
    assert mock_chunk("c", 3, 12) == "c 3........\n"
    assert events[-1].data["status"] == "completed"
    assert events[0].as_dict()["runId"] == "r1" and events[0].message_id == "r1:1:1"
    assert runs.active() == [] and runs.get("r1") is not None


async def test_echo_and_failures() -> None:
    sink = MemoryEventSink()
    runs = manager(sink)
    runs.submit(item("e1", "echo", {"a": [1, "ü"]}))
    runs.submit(item("f1", "mock", {"count": 1, "fail": "model exploded"}))
    echo = await sink.wait_done("e1", TIMEOUT)
    assert [e.data["data"] for e in echo if e.type == "output"] == ['{"a": [1, "ü"]}']
    failed = await sink.wait_done("f1", TIMEOUT)
    check_contiguous(failed)
    assert failed[-1].data["status"] == "failed" and failed[-1].data["reason"] == "model exploded"


async def test_a_crashing_runner_fails_the_run_with_a_generic_reason() -> None:
    class Crash:
        name = "crash"

        def validate(self, input: Any) -> None:
            pass

        async def run(self, item: WorkItem) -> AsyncGenerator[RunnerEvent, None]:
            yield Output("partial\n")
            raise KeyError("secret detail")

    sink = MemoryEventSink()
    runs = manager(sink, runners={"crash": Crash()})
    runs.submit(item("c1", "crash"))
    events = await sink.wait_done("c1", TIMEOUT)
    check_contiguous(events)
    assert events[-1].data == {
        "finalSeq": 3,
        "status": "failed",
        "reason": "the crash runner crashed (KeyError)",
    }


async def test_heartbeats_during_long_work_and_cancel_ends_cancelled() -> None:
    sink = MemoryEventSink()
    runs = manager(sink, heartbeat_interval=0.05)
    runs.submit(item(input={"count": 1000, "delayMs": 20}))
    await sink.wait_for("r1", lambda evs: sum(e.type == "heartbeat" for e in evs) >= 2, TIMEOUT)
    assert runs.cancel("r1", "user pressed stop") is not None
    events = await sink.wait_done("r1", TIMEOUT)
    check_contiguous(events)
    assert events[-1].data["status"] == "cancelled" and events[-1].data["reason"] == "user pressed stop"
    assert runs.cancel("r1") is None  # not running any more


async def test_redelivery_is_idempotent_and_another_fence_conflicts() -> None:
    sink = MemoryEventSink()
    runs = manager(sink)
    first = item(input={"count": 100, "delayMs": 10}, fence=1)
    assert runs.submit(first).outcome is SubmitOutcome.STARTED
    again = runs.submit(first)
    assert (again.outcome, again.status) == (SubmitOutcome.DUPLICATE, "running")
    conflict = runs.submit(item(input={"count": 1}, fence=2))
    assert (conflict.outcome, conflict.fence) == (SubmitOutcome.CONFLICT, 1)
    runs.cancel("r1")
    await sink.wait_done("r1", TIMEOUT)
    await asyncio.sleep(0)
    finished = runs.submit(first)
    assert (finished.outcome, finished.status) == (SubmitOutcome.DUPLICATE, "cancelled")
    assert len(sink.events("r1", 1)) > 0
    # A new fence after the end is a re-dispatch: a new execution, numbered from 1 again.
    assert runs.submit(item(input={"count": 2}, fence=2)).outcome is SubmitOutcome.STARTED
    await runs.wait_finished("r1", TIMEOUT)
    events = sink.events("r1", 2)
    check_contiguous(events)
    assert events[-1].data["status"] == "completed"


async def test_busy_and_shutdown() -> None:
    sink = MemoryEventSink()
    runs = manager(sink, max_concurrent=2)
    for n in range(2):
        assert (
            runs.submit(item(f"r{n}", input={"count": 1000, "delayMs": 50})).outcome is SubmitOutcome.STARTED
        )
    assert runs.submit(item("r9", input={"count": 1})).outcome is SubmitOutcome.BUSY
    await runs.shutdown(timeout=TIMEOUT)
    for n in range(2):
        events = sink.events(f"r{n}")
        check_contiguous(events)
        assert events[-1].data["status"] == "cancelled"
    assert runs.submit(item("r5", input={"count": 1})).outcome is SubmitOutcome.CLOSED


async def test_a_runner_stuck_in_cleanup_is_escalated_at_the_shutdown_deadline() -> None:
    cleaned = asyncio.Event()

    class Stubborn:
        name = "stubborn"

        def validate(self, input: Any) -> None:
            pass

        async def run(self, item: WorkItem) -> AsyncGenerator[RunnerEvent, None]:
            yield Stage("running")
            try:
                await asyncio.sleep(3600)
            finally:
                try:
                    await asyncio.sleep(3600)  # ignores the first cancel ...
                finally:
                    cleaned.set()  # ... but not the second

    sink = MemoryEventSink()
    runs = manager(sink, runners={"stubborn": Stubborn()})
    runs.submit(item("s1", "stubborn"))
    await sink.wait_for("s1", lambda evs: len(evs) >= 2, TIMEOUT)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await runs.shutdown(timeout=0.3)
    assert loop.time() - started < 1.0
    assert cleaned.is_set()
    assert sink.events("s1")[-1].data["status"] == "cancelled"


async def test_recorder_keeps_order_when_producers_are_cancelled() -> None:
    class SlowSink(MemoryEventSink):
        async def emit(self, run_id: str, fence: Any, event: RunEvent) -> None:
            await asyncio.sleep(0.001)
            await super().emit(run_id, fence, event)

    sink = SlowSink()
    recorder = RunRecorder(sink, "x", 7, queue_limit=4)

    async def produce() -> None:
        for n in range(1000):
            await recorder.output(f"{n}\n")

    task = asyncio.ensure_future(produce())
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    done = await recorder.done("cancelled", reason="stop")
    events = sink.events("x")
    check_contiguous(events)
    assert done.seq == len(events) and done.data["reason"] == "stop"
    with pytest.raises(RuntimeError):
        await recorder.output("late")


def test_mock_input_validation() -> None:
    runner = MockRunner()
    runner.validate(None)
    runner.validate({"count": 0})
    for bad in (
        {"count": -1},
        {"count": "3"},
        {"delayMs": 10**9},
        {"rm": "-rf"},
        [1],
        {"fail": ""},
        {"count": True},
    ):
        with pytest.raises(InvalidInput):
            runner.validate(bad)


async def test_runfailed_details_reach_done() -> None:
    class ExitCode:
        name = "exit"

        def validate(self, input: Any) -> None:
            pass

        async def run(self, item: WorkItem) -> AsyncGenerator[RunnerEvent, None]:
            yield Stage("running")
            raise RunFailed("exited with status 3", exitCode=3)

    sink = MemoryEventSink()
    runs = manager(sink, runners={"exit": ExitCode()})
    runs.submit(item("x1", "exit"))
    events = await sink.wait_done("x1", TIMEOUT)
    assert events[-1].data["exitCode"] == 3 and events[-1].data["status"] == "failed"
