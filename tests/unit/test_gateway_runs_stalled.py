"""Stalled runs, daemon-named failure kinds and the poison-event surface: pure parts, no server."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from cli.dead_letters import render_dead_letter
from cli.runs import render_state
from cli.term import Painter
from contract.run_protocol import DAEMON_FAILURE_KINDS, DAEMON_RESTARTED
from studio_gateway.auth import User
from studio_gateway.runs.admin import OPERATOR_SCOPE, is_operator
from studio_gateway.runs.sse import NDJSON, SSE, EventFormat
from studio_gateway.runs.state import (
    ACTIVE_STATUSES,
    FAILURE_KINDS,
    RunState,
    apply_event,
    mark_dispatched,
    resume_expired,
    stall,
    terminate,
)

NOW = 1_700_000_000_000


def state(**changes: Any) -> RunState:
    base = RunState(
        run_id="run_1",
        thread_id="thr_1",
        user_id="alice",
        hostname="alice-abc",
        host_token="HOST",
        runner="mock",
        created_at=NOW - 10_000,
        updated_at=NOW - 10_000,
        status="in_progress",
        seq=4,
        last_event_at=NOW - 5000,
    )
    return replace(base, **changes)


def stalled(**changes: Any) -> RunState:
    new = stall(state(), now_ms=NOW, since_ms=NOW - 100, deadline_ms=NOW + 60_000)
    assert new is not None
    return replace(new, **changes)


def event(seq: int, kind: str = "heartbeat", **data: Any) -> dict[str, Any]:
    return {"runId": "run_1", "fence": 1, "seq": seq, "ts": 0, "type": kind, **data}


def test_stall_keeps_the_run_active_with_since_and_deadline() -> None:
    s = stalled()
    assert s.status == "stalled" and s.status in ACTIVE_STATUSES and not s.terminal
    assert (s.stalled_since, s.resume_deadline, s.updated_at) == (NOW - 100, NOW + 60_000, NOW)
    assert s.seq == 4 and s.fence == 1  # nothing of the execution changes: its events still count
    assert s.public()["stalledSince"] == NOW - 100 and s.public()["resumeDeadline"] == NOW + 60_000
    assert RunState.from_json(s.to_json()) == s
    # Once: a stalled or ended run is not stalled again (its deadline stays the first one).
    assert stall(s, now_ms=NOW + 1, since_ms=NOW, deadline_ms=NOW + 99_999) is None
    ended = terminate(state(), "cancelled", now_ms=NOW)
    assert ended is not None and stall(ended, now_ms=NOW, since_ms=NOW, deadline_ms=NOW + 1) is None


def test_the_next_event_resumes_a_stalled_run() -> None:
    decision = apply_event(stalled(), event(5, "output", data="x"), host_token="HOST", now_ms=NOW + 10)
    assert decision.outcome == "applied" and decision.state is not None
    resumed = decision.state
    assert resumed.status == "in_progress" and resumed.seq == 5 and resumed.output_bytes == 1
    assert resumed.stalled_since is None and resumed.resume_deadline is None
    # Its done ends it straight from stalled, too.
    done = apply_event(
        stalled(), event(5, "done", finalSeq=5, status="completed"), host_token="HOST", now_ms=NOW
    )
    assert done.state is not None and done.state.status == "completed" and done.state.resume_deadline is None
    # Duplicates, gaps and stale fences do not resume it.
    for outcome, e in (("duplicate", event(4)), ("gap", event(7)), ("stale_fence", {**event(5), "fence": 2})):
        assert apply_event(stalled(), e, host_token="HOST", now_ms=NOW).outcome == outcome


def test_the_resume_window_ends() -> None:
    s = stalled()
    assert not resume_expired(s, NOW + 59_999) and resume_expired(s, NOW + 60_000)
    assert not resume_expired(state(), NOW + 10**9)  # only a stalled run has a window
    lost = terminate(s, "failed", now_ms=NOW + 60_000, failure_kind="desktop_lost", reason="gone")
    assert (
        lost is not None and lost.fence == 2 and lost.stalled_since is None and lost.resume_deadline is None
    )
    # The desktop's dispatch answer arriving late changes nothing of a stalled run.
    assert mark_dispatched(s, now_ms=NOW) is None


def test_a_daemon_names_its_failure_kind_from_the_contract() -> None:
    assert DAEMON_RESTARTED in DAEMON_FAILURE_KINDS and set(DAEMON_FAILURE_KINDS) <= set(FAILURE_KINDS)
    assert "event_rejected" in FAILURE_KINDS

    def failed(**extra: Any) -> RunState:
        e = event(5, "done", finalSeq=5, status="failed", reason="restarted", **extra)
        new = apply_event(state(), e, host_token="HOST", now_ms=NOW).state
        assert new is not None and new.status == "failed"
        return new

    assert failed(failureKind=DAEMON_RESTARTED).failure_kind == DAEMON_RESTARTED
    # Anything else a desktop claims is its run failing, never a gateway verdict.
    for claimed in ("desktop_lost", "made_up", ["daemon_restarted"], None):
        assert failed(failureKind=claimed).failure_kind == "run_failed"
    assert failed().failure_kind == "run_failed"
    # The gateway can record it too (e.g. a reaper): it is a known kind.
    assert terminate(state(), "failed", now_ms=NOW, failure_kind=DAEMON_RESTARTED) is not None


def test_an_event_of_unhashable_type_makes_apply_raise() -> None:
    """What the dead-letter integration test relies on as its poison: the projector's apply
    step raises on it (and only bounded redelivery, then the dead letter, ends it)."""
    with pytest.raises(TypeError):
        apply_event(state(), event(5, ["output"]), host_token="HOST", now_ms=NOW)  # type: ignore[arg-type]


def test_the_state_message_of_live_readers() -> None:
    public = stalled().public()
    sse = EventFormat(SSE).state(public)
    assert sse.startswith(b"event: state\ndata: {") and sse.endswith(b"\n\n") and b"\nid:" not in sse
    assert json.loads(sse.split(b"data: ", 1)[1]) == public
    line = EventFormat(NDJSON).state(public)
    assert json.loads(line) == {"type": "state", "run": public} and line.count(b"\n") == 1


def test_operator_scope() -> None:
    def user(**claims: Any) -> User:
        return User("ops", claims)

    assert is_operator(user(scope=f"runs:read {OPERATOR_SCOPE}"))
    assert is_operator(user(scope=[OPERATOR_SCOPE]))
    for scope in (None, "", "runs:admins", "runs:read", ["runs"], {"runs:admin": True}):
        assert not is_operator(user(scope=scope)), scope


def test_linkctl_shows_since_and_until_of_a_stalled_run_and_a_dead_letter() -> None:
    text = render_state(stalled().public(), Painter(False))
    assert "stalled" in text.splitlines()[0]
    row = next(line for line in text.splitlines() if line.strip().startswith("stalled "))
    assert "since" in row and "by" in row and "desktop_lost" in row
    letter = {
        "runId": "run_1",
        "seq": 3,
        "streamSeq": 77,
        "error": "TypeError: unhashable type: 'list'",
        "deliveries": 5,
        "storedAt": NOW,
        "deadAt": NOW,
        "subject": "_tunnel.v1.host.H.runs.run_1",
        "data": '{"type": ["output"]}\n' + "x" * 500,
    }
    shown = render_dead_letter(letter, Painter(False))
    assert "run run_1" in shown and "stream seq 77" in shown and "TypeError" in shown
    assert "…" in shown and "x" * 201 not in shown
