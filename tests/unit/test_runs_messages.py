"""The pure parts of messages to a running run: the contract's checks, the record lifecycle, the
API answers, how a desktop's answer is classified, and the rebuild of a run state from events."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from contract.run_messages import (
    InvalidMessage,
    check_context,
    control_body,
    is_message_id,
    new_message_id,
    parse_signal,
)
from studio_gateway.dispatch import ControlResult, DeliveryFailure
from studio_gateway.runs.messages import content_digest, new_record, summarize, transition
from studio_gateway.runs.outbound import answer, classify
from studio_gateway.runs.rebuild import field_diff, rebuild_state
from studio_gateway.runs.state import RunState, stall, terminate


def test_signal_and_context_checks() -> None:
    signal = parse_signal({"signalType": "build.progress", "payload": {"pct": 1}})
    assert signal.as_json() == {"signalType": "build.progress", "severity": "info", "payload": {"pct": 1}}
    for bad, field in (
        ({}, "signalType"),
        ({"signalType": "1x"}, "signalType"),
        ({"signalType": "a" * 65}, "signalType"),
        ({"signalType": "ok", "severity": "fatal"}, "severity"),
        ({"signalType": "ok", "payload": "text"}, "payload"),
        ({"signalType": "ok", "payload": {"x": "y" * 17000}}, "payload"),
    ):
        with pytest.raises(InvalidMessage) as info:
            parse_signal(bad)
        assert info.value.field == field
    assert check_context("text") == "text"
    assert check_context("\ud800") == "\ud800"  # a lone surrogate (valid JSON text) is no crash
    assert content_digest("context", "\ud800") != content_digest("context", "x")
    with pytest.raises(InvalidMessage):
        check_context(None)
    with pytest.raises(InvalidMessage):
        check_context("x" * 70000)
    message_id = new_message_id()
    assert is_message_id(message_id) and not is_message_id("msg_x") and not is_message_id(None)
    assert control_body("r", "context", message_id, 5) == {
        "runId": "r",
        "action": "context",
        "messageId": message_id,
        "context": 5,
    }
    with pytest.raises(ValueError):
        control_body("r", "cancel", message_id, None)


def test_lifecycle_moves_forward_only_and_final_states_stay() -> None:
    record = new_record("r1", "m1", "context", "hi", now_ms=1)
    assert record["status"] == "queued" and record["attempts"] == 0
    sent = transition(record, "sent", now_ms=2)
    assert sent is not None and sent["attempts"] == 1 and sent["updatedAt"] == 2
    resent = transition(sent, "sent", now_ms=3)
    assert resent is not None and resent["attempts"] == 2
    acked = transition(resent, "acknowledged", now_ms=4, duplicate=True)
    assert acked is not None and acked["ack"] == {"at": 4, "duplicate": True}
    assert transition(acked, "failed", now_ms=5) is None  # a late answer of an earlier send
    assert transition(acked, "sent", now_ms=5) is None
    assert transition(sent, "queued", now_ms=5) is None
    failed = transition(sent, "failed", now_ms=6, error={"code": "x", "message": "y"}, http_status=409)
    assert failed is not None and failed["httpStatus"] == 409
    big = new_record("r1", "m2", "kickoff", "x" * 300_000, now_ms=1)
    assert big["content"] is None and big["contentDropped"] is True
    assert content_digest("context", {"a": 1, "b": 2}) == content_digest("context", {"b": 2, "a": 1})
    assert content_digest("context", "a") != content_digest("signal", "a")


def test_summary_counts_by_status_and_names_the_last() -> None:
    records = [
        {**new_record("r", "m1", "kickoff", None, now_ms=1), "status": "acknowledged"},
        {**new_record("r", "m2", "context", "x", now_ms=3), "status": "failed"},
        new_record("r", "m3", "signal", {}, now_ms=2),
    ]
    summary = summarize(records)
    assert summary["total"] == 3
    assert summary["byStatus"] == {"queued": 1, "sent": 0, "acknowledged": 1, "failed": 1}
    assert summary["last"]["messageId"] == "m2"
    assert summarize([])["last"] is None


def result(status: int | None, code: str | None = None, **answer_: Any) -> ControlResult:
    failure = DeliveryFailure(code or "x", "why") if status is None else None
    return ControlResult(status, code if status is not None else None, failure=failure, answer=answer_)


def test_classify_the_desktops_answer() -> None:
    assert classify(result(202, duplicate=True)) == ("acknowledged", None, None, True)
    status, error, http, _ = classify(result(None, "desktop_unreachable"))
    assert (status, error and error["code"], http) == ("failed", "desktop_unreachable", 503)
    assert classify(result(None, "dispatch_timeout"))[0] == "sent"  # unknown: resent
    status, error, http, _ = classify(
        result(409, "message_not_accepted", error={"code": "message_not_accepted", "accepts": ["context"]})
    )
    assert (status, http) == ("failed", 409) and error is not None and error["accepts"] == ["context"]
    assert classify(result(404, "unknown_run"))[1] == {
        "code": "run_finished",
        "message": "the run is not running on the desktop (unknown_run)",
    }
    assert classify(result(503, "shutting_down"))[0] == "sent"
    assert classify(result(400, "invalid_json"))[2] == 502


def test_answers_from_records() -> None:
    record = new_record("r", "m", "signal", {}, now_ms=1)
    assert answer(record).http_status == 202 and answer(record).body["status"] == "queued"
    acked = transition(record, "acknowledged", now_ms=2)
    assert acked is not None
    replay = answer(acked, replay=True)
    assert replay.http_status == 202 and replay.body["idempotentReplay"] and replay.body["duplicate"] is False
    failed = transition(
        record, "failed", now_ms=2, error={"code": "run_finished", "message": "m"}, http_status=409
    )
    assert failed is not None
    out = answer(failed)
    assert out.http_status == 409 and out.body["error"]["code"] == "run_finished"
    assert out.body["error"]["messageId"] == "m"


def state(**changes: Any) -> RunState:
    base = RunState(
        run_id="r1",
        thread_id="t",
        user_id="u",
        hostname="h",
        host_token="tok",
        runner="mock",
        created_at=1000,
        updated_at=1000,
        dispatched_at=1001,
        status="in_progress",
    )
    return replace(base, **changes)


def events(*kinds: str, fence: int = 1) -> list[tuple[dict[str, Any], int | None]]:
    out: list[tuple[dict[str, Any], int | None]] = []
    for seq, kind in enumerate(kinds, start=1):
        event: dict[str, Any] = {"runId": "r1", "fence": fence, "seq": seq, "type": kind}
        if kind == "stage":
            event["stage"] = f"s{seq}"
        if kind == "output":
            event["data"] = "abc"
        if kind == "done":
            event["status"] = "completed"
        out.append((event, 2000 + seq))
    return out


def test_rebuild_restores_what_the_events_say() -> None:
    stored = events("stage", "output", "output", "done")
    good = rebuild_state(state(), stored)
    assert (good.status, good.seq, good.final_seq, good.output_bytes, good.stage) == (
        "completed",
        4,
        4,
        6,
        "s1",
    )
    corrupt = replace(good, status="in_progress", seq=1, final_seq=None, output_bytes=999, stage="bogus")
    again = rebuild_state(corrupt, reversed(stored))  # order of reading does not matter
    assert field_diff(corrupt, again) == {
        "status": {"from": "in_progress", "to": "completed"},
        "seq": {"from": 1, "to": 4},
        "finalSeq": {"from": None, "to": 4},
        "outputBytes": {"from": 999, "to": 6},
        "stage": {"from": "bogus", "to": "s1"},
    }
    assert field_diff(good, rebuild_state(good, stored)) == {}  # idempotent
    # Events of another fence, or repeated, change nothing.
    assert rebuild_state(state(), stored + events("output", fence=2) + stored[:2]).seq == 4


def test_rebuild_keeps_what_the_gateway_decided() -> None:
    stored = events("stage", "output")
    running = rebuild_state(state(), stored)
    cancelled = terminate(running, "cancelled", now_ms=5000, reason="by the user")
    assert cancelled is not None
    kept = rebuild_state(cancelled, stored)
    assert (kept.status, kept.fence, kept.failure_reason) == ("cancelled", 2, "by the user")
    stalled = stall(running, now_ms=9000, since_ms=8000, deadline_ms=99000)
    assert stalled is not None
    assert rebuild_state(stalled, stored).status == "stalled"
    # A newer event than the stall resumes it, as the projector would have.
    assert (
        rebuild_state(
            stalled, [*stored, ({"runId": "r1", "fence": 1, "seq": 3, "type": "heartbeat"}, 8500)]
        ).status
        == "in_progress"
    )
    assert (
        rebuild_state(replace(state(), dispatched_at=None, status="dispatching"), []).status == "dispatching"
    )


def test_a_state_behind_but_right_is_consistent_so_far() -> None:
    from studio_gateway.runs.rebuild import _consistent_so_far

    stored = events("stage", "output", "output", "done")
    behind = rebuild_state(state(), stored[:2])  # the projector applied two of four
    assert behind.seq == 2 and _consistent_so_far(behind, stored)
    assert not _consistent_so_far(replace(behind, output_bytes=99), stored)  # wrong: rebuild writes
