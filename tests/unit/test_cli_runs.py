"""linkctl runs: input parsing, state rendering, exit statuses, error mapping (no server)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from cli import exitcodes
from cli.common import CliError
from cli.gateway_api import GatewayOptions, check_gateway_url, error_for
from cli.main import app
from cli.runs import exit_status_for, parse_input, render_state
from cli.term import Painter

STATE = {
    "runId": "r1",
    "threadId": "t1",
    "userId": "alice",
    "hostname": "alice-abc",
    "runner": "mock",
    "title": None,
    "status": "failed",
    "stage": "running",
    "fence": 1,
    "seq": 7,
    "finalSeq": 7,
    "outputBytes": 2048,
    "failureKind": "desktop_lost",
    "failureReason": "the desktop went silent",
    "createdAt": 1_700_000_000_000,
    "updatedAt": 1_700_000_002_500,
    "lastEventAt": 1_700_000_002_000,
    "finishedAt": 1_700_000_002_500,
}


def test_input_inline_file_and_stdin(tmp_path: Path) -> None:
    assert parse_input(None) is None
    assert parse_input('{"count": 3}') == {"count": 3}
    assert parse_input('"text"') == "text"
    work = tmp_path / "work.json"
    work.write_text('{"a": [1, 2]}')
    assert parse_input(f"@{work}") == {"a": [1, 2]}
    assert parse_input("@-", stdin=io.StringIO("[1]")) == [1]


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("{count: 3}", "INPUT: not valid JSON"),
        ("hello", "quote it for the shell"),
        ("@/nonexistent/x.json", "INPUT @/nonexistent/x.json: cannot read it"),
    ],
)
def test_bad_input_is_one_clear_usage_error(raw: str, fragment: str) -> None:
    with pytest.raises(CliError) as info:
        parse_input(raw)
    assert fragment in info.value.message and info.value.exit_code == exitcodes.USAGE


def test_render_state_shows_status_failure_and_duration_without_colour() -> None:
    text = render_state(STATE, Painter(False))
    assert text.splitlines()[0] == "run r1  failed"
    assert "desktop_lost: the desktop went silent" in text
    assert "7 of 7" in text and "2.0 KiB" in text and "took 2.50 s" in text
    assert "\033[" not in text
    assert "\033[" in render_state(STATE, Painter(True))


def test_exit_status_follows_the_final_run_status() -> None:
    assert exit_status_for({"status": "completed"}) == exitcodes.OK
    assert exit_status_for({"status": "failed"}) == exitcodes.RUN_FAILED
    assert exit_status_for({"status": "cancelled"}) == exitcodes.RUN_CANCELLED


def _response(status: int, body: object) -> httpx.Response:
    return httpx.Response(
        status, content=json.dumps(body).encode(), request=httpx.Request("GET", "http://x/")
    )


@pytest.mark.parametrize(
    ("status", "exit_code"),
    [
        (401, exitcodes.USAGE),
        (404, exitcodes.NOT_FOUND),
        (409, exitcodes.CONFLICT),
        (422, exitcodes.USAGE),
        (500, exitcodes.GATEWAY_ERROR),
        (503, exitcodes.GATEWAY_ERROR),
    ],
)
def test_gateway_errors_map_to_documented_exit_statuses(status: int, exit_code: int) -> None:
    error = error_for(_response(status, {"error": {"code": "c", "message": "m", "field": "runner"}}), "X")
    assert error.exit_code == exit_code and error.status == status
    assert "c: m" in error.message and "'runner'" in error.message


def test_a_non_json_error_body_still_gives_one_line() -> None:
    resp = httpx.Response(502, content=b"<html>bad gateway</html>", request=httpx.Request("GET", "http://x/"))
    error = error_for(resp, "GET /api/runs/r1")
    assert error.message == "GET /api/runs/r1: the gateway answered HTTP 502: bad gateway"


def test_gateway_options_need_a_token_and_a_sane_url() -> None:
    with pytest.raises(CliError, match="no gateway API token"):
        GatewayOptions.from_flags("http://127.0.0.1:8080", None)
    with pytest.raises(CliError, match="must be an http"):
        check_gateway_url("ftp://x")
    assert check_gateway_url("127.0.0.1:9000/") == "http://127.0.0.1:9000"


runner = CliRunner()


@pytest.mark.parametrize("command", ["send", "show", "attach", "cancel"])
def test_every_runs_command_has_help_with_examples_and_exit_statuses(command: str) -> None:
    result = runner.invoke(app, ["runs", command, "--help"])
    assert result.exit_code == 0
    assert "Examples:" in result.output and "Exit status:" in result.output


def test_runs_without_token_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LINKCTL_TOKEN", raising=False)
    result = runner.invoke(app, ["runs", "show", "r1"], standalone_mode=True)
    assert result.exit_code == exitcodes.USAGE
    assert "no gateway API token" in result.output


def test_render_state_of_finished_runs_has_no_stale_stage_and_a_clean_reason() -> None:
    completed = {**STATE, "status": "completed", "failureKind": None, "failureReason": None}
    text = render_state(completed, Painter(False))
    assert "stage" not in text and "running" not in text and "failure" not in text
    cancelled = {**completed, "status": "cancelled", "failureReason": "cancelled by the user"}
    rows = render_state(cancelled, Painter(False)).splitlines()
    assert "  reason      cancelled by the user" in rows
    assert not any("-:" in row or "failure" in row for row in rows)
    only_kind = {**STATE, "failureReason": None}
    assert "  failure     desktop_lost" in render_state(only_kind, Painter(False)).splitlines()
    running = {**STATE, "status": "in_progress", "failureKind": None, "failureReason": None}
    assert "  stage       running" in render_state(running, Painter(False)).splitlines()
