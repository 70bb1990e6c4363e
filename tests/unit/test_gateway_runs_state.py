"""Run state transitions (studio_gateway.runs.state) and the projector's keep rule: pure, no server."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from studio_gateway.runs.projector import keep_decision
from studio_gateway.runs.state import RunState, apply_event, mark_dispatched, terminate

NOW = 1_700_000_000_000


def state(**changes: Any) -> RunState:
    base = RunState(
        run_id="run_1",
        thread_id="thr_1",
        user_id="alice",
        hostname="alice-abc",
        host_token="HOST",
        runner="mock",
        created_at=NOW - 1000,
        updated_at=NOW - 1000,
    )
    return replace(base, **changes)


def event(seq: int, kind: str = "heartbeat", fence: object = 1, **data: Any) -> dict[str, Any]:
    return {"runId": "run_1", "fence": fence, "seq": seq, "ts": 0, "type": kind, **data}


def apply(s: RunState, e: object, host: str = "HOST") -> tuple[str, RunState | None]:
    decision = apply_event(s, e, host_token=host, now_ms=NOW, event_time_ms=NOW - 5)
    return decision.outcome, decision.state


def test_first_event_moves_dispatching_to_in_progress_and_records_liveness() -> None:
    outcome, new = apply(state(), event(1, "stage", stage="starting-run"))
    assert outcome == "applied" and new is not None
    assert new.status == "in_progress" and new.stage == "starting-run" and new.seq == 1
    assert new.last_event_at == NOW - 5 and new.updated_at == NOW


def test_output_counts_utf8_bytes() -> None:
    _, new = apply(state(seq=1, status="in_progress"), event(2, "output", data="héllo\n"))
    assert new is not None and new.output_bytes == 7


@pytest.mark.parametrize(
    ("status", "reason", "kind", "expected_reason"),
    [
        ("completed", None, None, None),
        ("failed", "exit 3", "run_failed", "exit 3"),
        ("failed", None, "run_failed", "the run failed on the desktop"),
        ("cancelled", "user", None, "user"),
    ],
)
def test_done_ends_the_run(
    status: str, reason: str | None, kind: str | None, expected_reason: str | None
) -> None:
    data = {"finalSeq": 3, "status": status}
    if reason:
        data["reason"] = reason
    outcome, new = apply(state(seq=2, status="in_progress"), event(3, "done", **data))
    assert outcome == "applied" and new is not None
    assert new.status == status and new.final_seq == 3 and new.finished_at == NOW
    assert new.failure_kind == kind and new.failure_reason == expected_reason


def test_duplicates_gaps_fences_hosts_and_terminal_runs() -> None:
    running = state(seq=2, status="in_progress")
    assert apply(running, event(2))[0] == "duplicate"
    assert apply(running, event(1))[0] == "duplicate"
    assert apply(running, event(4))[0] == "gap"
    assert apply(running, event(3, fence=2))[0] == "stale_fence"
    assert apply(running, event(3, fence="1"))[0] == "stale_fence"
    assert apply(running, event(3, fence=True))[0] == "stale_fence"
    assert apply(running, event(3), host="OTHER")[0] == "wrong_host"
    for status in ("completed", "failed", "cancelled"):
        assert apply(replace(running, status=status), event(3))[0] == "terminal"


@pytest.mark.parametrize(
    "bad",
    [
        "not a dict",
        [1, 2],
        {"runId": "run_2", "fence": 1, "seq": 3, "type": "heartbeat"},
        {"runId": "run_1", "fence": 1, "seq": 0, "type": "heartbeat"},
        {"runId": "run_1", "fence": 1, "seq": True, "type": "heartbeat"},
        {"runId": "run_1", "fence": 1, "seq": "3", "type": "heartbeat"},
        {"runId": "run_1", "fence": 1, "seq": 3, "type": "party"},
        {"runId": "run_1", "fence": 1, "seq": 3, "type": "done", "status": "exploded"},
    ],
)
def test_malformed_events_are_invalid(bad: object) -> None:
    assert apply(state(seq=2, status="in_progress"), bad)[0] == "invalid"


def test_stage_text_is_bounded_and_non_strings_ignored() -> None:
    _, new = apply(state(), event(1, "stage", stage="x" * 1000))
    assert new is not None and new.stage == "x" * 200
    _, new = apply(state(stage="kept"), event(1, "stage", stage=42))
    assert new is not None and new.stage == "kept"


def test_terminate_bumps_the_fence_once_and_never_changes_a_terminal_run() -> None:
    running = state(seq=4, status="in_progress")
    failed = terminate(running, "failed", now_ms=NOW, failure_kind="desktop_lost", reason="silent")
    assert failed is not None
    assert (failed.status, failed.fence, failed.event_fence) == ("failed", 2, 1)
    assert failed.failure_kind == "desktop_lost" and failed.finished_at == NOW and failed.seq == 4
    assert terminate(failed, "cancelled", now_ms=NOW) is None
    assert terminate(running, "cancelled", now_ms=NOW, expected_fence=5) is None
    cancelled = terminate(running, "cancelled", now_ms=NOW, reason="by user")
    assert cancelled is not None and cancelled.failure_kind is None and cancelled.failure_reason == "by user"
    with pytest.raises(ValueError, match="failure kind"):
        terminate(running, "failed", now_ms=NOW, failure_kind="bogus")


def test_mark_dispatched() -> None:
    new = mark_dispatched(state(), now_ms=NOW)
    assert new is not None and new.status == "in_progress" and new.dispatched_at == NOW
    already = mark_dispatched(state(status="in_progress", dispatched_at=5), now_ms=NOW)
    assert already is not None and already.dispatched_at == 5
    assert mark_dispatched(state(status="cancelled"), now_ms=NOW) is None
    # The first events were applied before the daemon's answer came back: nothing to write.
    assert mark_dispatched(state(status="in_progress", seq=2, last_event_at=NOW - 1), now_ms=NOW) is None


def test_state_json_round_trip_and_public_shape() -> None:
    s = state(
        status="failed", failure_kind="run_failed", failure_reason="boom", seq=3, final_seq=3, title="t"
    )
    assert RunState.from_json(s.to_json()) == s
    public = s.public()
    assert set(public) == {
        "runId", "threadId", "userId", "hostname", "runner", "title", "status", "stage", "fence", "seq",
        "finalSeq", "outputBytes", "failureKind", "failureReason", "createdAt", "updatedAt", "lastEventAt",
        "finishedAt", "stalledSince", "resumeDeadline",
    }  # fmt: skip
    assert "hostToken" not in public and public["failureKind"] == "run_failed"
    with pytest.raises(ValueError):
        RunState.from_json(b"[]")


def test_liveness_reference_prefers_the_last_event() -> None:
    assert state().liveness_reference() == NOW - 1000
    assert state(dispatched_at=NOW - 10).liveness_reference() == NOW - 10
    assert state(dispatched_at=NOW - 10, last_event_at=NOW - 2).liveness_reference() == NOW - 2


def test_keep_decision_caps_bytes_skips_heartbeats_and_always_keeps_done() -> None:
    s = state()
    assert keep_decision(s, event(1), 50, 100) == (False, s)
    keep, s = keep_decision(s, event(1, "output"), 60, 100)
    assert keep and s.kept_bytes == 60
    keep, s = keep_decision(s, event(2, "output"), 60, 100)
    assert not keep and s.kept_truncated and s.kept_bytes == 60
    keep, s2 = keep_decision(s, event(3, "output"), 1, 100)
    assert not keep and s2 == s  # once truncated, nothing more (no holes in the middle)
    keep, s = keep_decision(s, event(4, "done"), 60, 100)
    assert keep and s.kept_bytes == 120
