"""Messages to a running run on the desktop: RunManager.deliver, its de-duplication, and what
the mock and command runners do with them (the command runner with a real child process)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from linkd.config import CommandTemplate
from linkd.run_events import MemoryEventSink
from linkd.runners import CommandRunner, EchoRunner, MockRunner, WorkItem
from linkd.runners.base import RunMessage
from linkd.runners.mock import MESSAGES_STREAM
from linkd.runs import DeliverOutcome, RunManager
from tests.helpers import wait_until

TIMEOUT = 10.0


def item(run_id: str, runner: str, input: Any) -> WorkItem:
    return WorkItem(run_id, "t1", "u1", 1, runner, input)


def context(message_id: str, value: Any = "hi") -> RunMessage:
    return RunMessage(message_id, "context", value)


async def test_mock_gets_each_message_once_and_records_it() -> None:
    sink = MemoryEventSink()
    runs = RunManager({"mock": MockRunner(), "echo": EchoRunner()}, sink)
    runs.submit(item("r1", "mock", {"count": 200, "delayMs": 20}))
    first = "msg_" + "1" * 32
    assert runs.deliver("r1", context(first, {"a": 1})).outcome is DeliverOutcome.DELIVERED
    assert runs.deliver("r1", context(first, {"a": 1})).outcome is DeliverOutcome.DUPLICATE
    signal = {"signalType": "x.y", "severity": "info", "payload": {}}
    second = "msg_" + "2" * 32
    assert runs.deliver("r1", RunMessage(second, "signal", signal)).outcome is DeliverOutcome.DELIVERED
    assert runs.deliver("nope", context(first)).outcome is DeliverOutcome.UNKNOWN

    def received() -> list[dict[str, Any]]:
        return [
            json.loads(e.data["data"])
            for e in sink.events("r1")
            if e.type == "output" and e.data["stream"] == MESSAGES_STREAM
        ]

    await wait_until(lambda: len(received()) == 2, TIMEOUT)
    assert received() == [
        {"messageId": first, "kind": "context", "context": {"a": 1}},
        {"messageId": second, "kind": "signal", "signal": signal},
    ]
    runs.cancel("r1")
    await runs.wait_finished("r1", TIMEOUT)
    # After the end: a message id it had is still a duplicate (a resend after a gateway crash),
    # a new one is refused as finished.
    assert runs.deliver("r1", context(first)).outcome is DeliverOutcome.DUPLICATE
    late = runs.deliver("r1", context("msg_" + "3" * 32))
    assert late.outcome is DeliverOutcome.FINISHED and late.status == "cancelled"
    assert runs.messages_delivered == 2


async def test_a_runner_without_message_kinds_refuses() -> None:
    sink = MemoryEventSink()
    runs = RunManager({"echo": EchoRunner(), "mock": MockRunner()}, sink)

    class Slow(EchoRunner):
        async def run(self, item: WorkItem):  # type: ignore[no-untyped-def, override]
            import asyncio

            await asyncio.Event().wait()
            yield  # pragma: no cover

    runs.runners["slow"] = Slow()
    runs.submit(item("r2", "slow", None))
    result = runs.deliver("r2", context("msg_" + "4" * 32))
    assert result.outcome is DeliverOutcome.NOT_ACCEPTED and result.accepts == ()
    assert "takes no context" in result.reason
    runs.cancel("r2")
    await runs.wait_finished("r2", TIMEOUT)


async def test_command_gets_messages_as_json_lines_in_its_messages_file(tmp_path: Path) -> None:
    script = (
        'test -f "$LINKD_MESSAGES_FILE" || exit 3; '
        'while ! grep -q stop.now "$LINKD_MESSAGES_FILE"; do sleep 0.02; done; '
        'cat "$LINKD_MESSAGES_FILE"'
    )
    runner = CommandRunner({"watch": CommandTemplate("watch", ("sh", "-c", script), cwd=tmp_path)})
    sink = MemoryEventSink()
    runs = RunManager({"command": runner}, sink)
    runs.submit(item("r3", "command", {"template": "watch"}))
    # The messages file exists once the process runs (before, a message is refused: nowhere to write).
    await wait_until(lambda: "r3" in runner._message_files, TIMEOUT)
    path = runner._message_files["r3"]
    one = "msg_" + "5" * 32
    assert runs.deliver("r3", context(one, "use staging")).outcome is DeliverOutcome.DELIVERED
    stop = {"signalType": "stop.now", "severity": "critical", "payload": {"why": "test"}}
    two = "msg_" + "6" * 32
    assert runs.deliver("r3", RunMessage(two, "signal", stop)).outcome is DeliverOutcome.DELIVERED
    events = await sink.wait_done("r3", TIMEOUT)
    assert events[-1].data["status"] == "completed", events[-1].data
    out = "".join(e.data["data"] for e in events if e.type == "output" and e.data["stream"] == "stdout")
    assert [json.loads(line) for line in out.splitlines()] == [
        {"messageId": one, "kind": "context", "context": "use staging"},
        {"messageId": two, "kind": "signal", "signal": stop},
    ]
    assert not path.exists() and not path.parent.exists()  # removed with the run
    assert "r3" not in runner._message_files
