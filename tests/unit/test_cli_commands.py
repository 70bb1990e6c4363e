"""Every linkctl command documents itself; the demo's event checks catch what they promise to."""

from __future__ import annotations

from typing import Any

import pytest
from typer.testing import CliRunner

from cli import exitcodes
from cli.common import CliError
from cli.demo import check_events
from cli.main import app

runner = CliRunner()

COMMANDS = [
    ["fetch"], ["status"], ["forward"], ["session"], ["dev"], ["demo"],
    ["runs", "send"], ["runs", "show"], ["runs", "attach"], ["runs", "cancel"],
]  # fmt: skip


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help_with_examples(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Examples:" in result.output
    assert "Exit status" in result.output


def test_top_level_help_lists_the_new_commands() -> None:
    result = runner.invoke(app, ["--help"])
    for name in ("session", "runs", "dev", "demo"):
        assert name in result.output


def _events(n: int, **done: Any) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = [{"seq": i, "type": "output"} for i in range(1, n)]
    events.append({"seq": n, "type": "done", "status": "completed", "finalSeq": n, **done})
    return events


def test_check_events_accepts_a_complete_ordered_run() -> None:
    check_events(_events(4), {"status": "completed", "finalSeq": 4})


@pytest.mark.parametrize(
    ("events", "final", "fragment"),
    [
        (_events(4)[1:], {"status": "completed"}, "not 1..3 in order"),
        ([*_events(3)[:1], *_events(3)[:1], *_events(3)[1:]], {"status": "completed"}, "in order"),
        (_events(3, status="failed", reason="boom"), {"status": "failed"}, "ended failed: boom"),
        (_events(3), {"status": "failed", "failureKind": "desktop_lost"}, "desktop_lost"),
        (_events(3, finalSeq=9), {"status": "completed"}, "finalSeq 9"),
        (_events(3), {"status": "completed", "finalSeq": 7}, "finalSeq 7"),
        ([], {"status": "completed"}, "last event is not 'done'"),
    ],
)
def test_check_events_refuses_what_the_demo_must_not_call_a_success(
    events: list[dict[str, Any]], final: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(CliError) as info:
        check_events(events, final)
    assert fragment in info.value.message
    assert info.value.exit_code == exitcodes.DEMO_FAILED
