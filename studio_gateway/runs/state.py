"""The state of one run and every transition it can take: pure functions, no I/O.

Why pure: the projector, the dispatcher, the reaper and gateway-side cancel all
change run state, on several gateway instances at once. Each of them reads the
state, computes the next one here, and writes it with a compare-and-set on the
key-value revision (retrying on conflict), so the rules live in one place and
are unit-tested without a server.

Rules:

- a terminal state (``completed``, ``failed``, ``cancelled``) never changes again;
- run events are applied once each, in ``seq`` order: ``seq <= applied`` is a
  duplicate, ``seq > applied + 1`` a gap (the projector retries it later);
- events of another fence (an older execution, or one the gateway fenced off)
  and events from a subject of another host than the run owner's are ignored;
- only a ``done`` event ends a run from the desktop's side; the gateway ends one
  itself (dispatch failure, reaper, cancel) with :func:`terminate`, which also
  bumps the fence, so late events of the old execution are ignored;
- a run whose desktop went silent is ``stalled`` (:func:`stall`), not ended: the next
  applied event resumes it (``in_progress``), unless its resume deadline passed
  (:func:`resume_expired`): then it fails ``desktop_lost`` and stays failed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Any, Final, Literal

from contract.run_protocol import DAEMON_FAILURE_KINDS, FAILURE_KIND_FIELD

__all__ = [
    "ACTIVE_STATUSES",
    "EVENT_TYPES",
    "FAILURE_KINDS",
    "TERMINAL_STATUSES",
    "Decision",
    "Outcome",
    "RunState",
    "apply_event",
    "mark_dispatched",
    "resume_expired",
    "stall",
    "terminate",
]

Status = Literal["dispatching", "in_progress", "stalled", "completed", "failed", "cancelled"]
ACTIVE_STATUSES: Final = frozenset({"dispatching", "in_progress", "stalled"})
TERMINAL_STATUSES: Final = frozenset({"completed", "failed", "cancelled"})
FAILURE_KINDS: Final = (
    "desktop_unreachable",
    "desktop_rejected",
    "dispatch_timeout",
    "dispatch_error",
    "desktop_lost",
    "events_lost",
    "run_failed",
    "event_limit",
    "quota_exceeded",
    "event_rejected",
    *sorted(DAEMON_FAILURE_KINDS),
)
EVENT_TYPES: Final = frozenset({"stage", "output", "heartbeat", "done"})
# What an event's handling came to; the projector counts each in /metrics.
Outcome = Literal["applied", "duplicate", "gap", "stale_fence", "wrong_host", "terminal", "invalid"]
# Bounds on text echoed from a desktop into the run state.
MAX_STAGE_LENGTH: Final = 200
MAX_REASON_LENGTH: Final = 1000

# Field name in the stored JSON -> attribute; the public API shows the first block only.
_PUBLIC: Final = {
    "runId": "run_id",
    "threadId": "thread_id",
    "userId": "user_id",
    "hostname": "hostname",
    "runner": "runner",
    "title": "title",
    "status": "status",
    "stage": "stage",
    "fence": "fence",
    "seq": "seq",
    "finalSeq": "final_seq",
    "outputBytes": "output_bytes",
    "failureKind": "failure_kind",
    "failureReason": "failure_reason",
    "createdAt": "created_at",
    "updatedAt": "updated_at",
    "lastEventAt": "last_event_at",
    "finishedAt": "finished_at",
    "stalledSince": "stalled_since",
    "resumeDeadline": "resume_deadline",
}
_INTERNAL: Final = {
    "hostToken": "host_token",
    "eventFence": "event_fence",
    "dispatchedAt": "dispatched_at",
    "keptBytes": "kept_bytes",
    "keptTruncated": "kept_truncated",
}


@dataclass(frozen=True, slots=True)
class RunState:
    """One run, as stored in the run-state bucket (timestamps: ms since the epoch)."""

    run_id: str
    thread_id: str
    user_id: str
    hostname: str
    host_token: str
    runner: str
    created_at: int
    updated_at: int
    title: str | None = None
    status: Status = "dispatching"
    stage: str | None = None
    # The run's current fence; events must carry event_fence (the execution's fence).
    fence: int = 1
    event_fence: int = 1
    seq: int = 0
    final_seq: int | None = None
    output_bytes: int = 0
    failure_kind: str | None = None
    failure_reason: str | None = None
    last_event_at: int | None = None
    finished_at: int | None = None
    dispatched_at: int | None = None
    # Events kept in the output bucket (for export after the stream's retention).
    kept_bytes: int = 0
    kept_truncated: bool = False
    # While ``stalled``: since when (ms), and when it fails desktop_lost unless events flow again.
    stalled_since: int | None = None
    resume_deadline: int | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    def public(self) -> dict[str, Any]:
        """The API shape (``GET /api/runs/{id}``)."""
        return {name: getattr(self, attr) for name, attr in _PUBLIC.items()}

    def to_json(self) -> bytes:
        data = {name: getattr(self, attr) for name, attr in {**_PUBLIC, **_INTERNAL}.items()}
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> RunState:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("run state is not a JSON object")
        known = {name: attr for name, attr in {**_PUBLIC, **_INTERNAL}.items() if name in data}
        fields = {attr: data[name] for name, attr in known.items()}
        return cls(**fields)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def liveness_reference(self) -> int:
        """When this run last showed a sign of life (ms): its last event, else dispatch or creation."""
        return self.last_event_at or self.dispatched_at or self.created_at


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: Outcome
    state: RunState | None = None  # the new state, when outcome is "applied"
    detail: str = ""


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _text(value: object, limit: int) -> str | None:
    return value[:limit] if isinstance(value, str) and value else None


def apply_event(
    state: RunState, event: object, *, host_token: str, now_ms: int, event_time_ms: int | None = None
) -> Decision:
    """What one uplink event does to ``state``.

    ``host_token`` is the host token of the subject the event arrived on (never a
    payload field: the daemon's NATS permissions vouch for the subject only).
    ``event_time_ms`` is when JetStream stored it (for liveness), default ``now_ms``.
    """
    if host_token != state.host_token:
        return Decision("wrong_host", detail=f"subject host {host_token} is not the run owner's")
    if not isinstance(event, dict):
        return Decision("invalid", detail="the event is not a JSON object")
    seq = _int(event.get("seq"))
    kind = event.get("type")
    fence = event.get("fence")
    if event.get("runId") != state.run_id or seq is None or seq < 1 or kind not in EVENT_TYPES:
        return Decision("invalid", detail="the event lacks a matching runId, a seq >= 1 or a known type")
    if state.terminal:
        return Decision("terminal", detail=f"the run already ended {state.status}")
    if isinstance(fence, bool) or fence != state.event_fence:
        return Decision("stale_fence", detail=f"fence {fence!r} is not the run's {state.event_fence}")
    if seq <= state.seq:
        return Decision("duplicate", detail=f"seq {seq} was applied already")
    if seq > state.seq + 1:
        return Decision("gap", detail=f"seq {seq} arrived before {state.seq + 1}")
    changes: dict[str, Any] = {
        "seq": seq,
        "updated_at": now_ms,
        "last_event_at": event_time_ms if event_time_ms is not None else now_ms,
    }
    if state.status in ("dispatching", "stalled"):
        changes.update(status="in_progress", stalled_since=None, resume_deadline=None)
    if kind == "stage":
        stage = _text(event.get("stage"), MAX_STAGE_LENGTH)
        if stage is not None:
            changes["stage"] = stage
    elif kind == "output":
        data = event.get("data")
        if isinstance(data, str):
            changes["output_bytes"] = state.output_bytes + len(data.encode("utf-8", "surrogatepass"))
    elif kind == "done":
        status = event.get("status")
        if status not in TERMINAL_STATUSES:
            return Decision("invalid", detail=f"done with status {status!r}")
        reason = _text(event.get("reason"), MAX_REASON_LENGTH)
        changes.update(status=status, final_seq=seq, finished_at=now_ms)
        if status == "failed":
            named = event.get(FAILURE_KIND_FIELD)
            known = isinstance(named, str) and named in DAEMON_FAILURE_KINDS
            changes["failure_kind"] = named if known else "run_failed"
            changes["failure_reason"] = reason or "the run failed on the desktop"
        elif status == "cancelled":
            changes["failure_reason"] = reason
    return Decision("applied", replace(state, **changes))


def mark_dispatched(state: RunState, *, now_ms: int) -> RunState | None:
    """The desktop accepted the work item: ``in_progress`` (None when nothing changes).

    None too when events were applied already: the run is ``in_progress`` and its liveness
    counts from its last event, so the write would say nothing new and only race the
    projector's compare-and-set (a conflict costs it a read and a second write).
    """
    if state.terminal or state.status == "stalled" or (state.status == "in_progress" and state.seq > 0):
        return None
    changes: dict[str, Any] = {"dispatched_at": state.dispatched_at or now_ms, "updated_at": now_ms}
    if state.status == "dispatching":
        changes["status"] = "in_progress"
    return replace(state, **changes)


def terminate(
    state: RunState,
    status: Literal["failed", "cancelled"],
    *,
    now_ms: int,
    failure_kind: str | None = None,
    reason: str | None = None,
    expected_fence: int | None = None,
) -> RunState | None:
    """The gateway ends a run itself; None when it already ended (or its fence moved on).

    The fence is bumped, so events the old execution still sends are ignored.
    """
    if state.terminal:
        return None
    if expected_fence is not None and state.fence != expected_fence:
        return None
    if status == "failed" and failure_kind not in FAILURE_KINDS:
        raise ValueError(f"unknown failure kind {failure_kind!r}")
    return replace(
        state,
        status=status,
        stalled_since=None,
        resume_deadline=None,
        fence=state.fence + 1,
        failure_kind=failure_kind if status == "failed" else None,
        failure_reason=reason[:MAX_REASON_LENGTH] if reason else None,
        finished_at=now_ms,
        updated_at=now_ms,
    )


def stall(state: RunState, *, now_ms: int, since_ms: int, deadline_ms: int) -> RunState | None:
    """The desktop went silent: ``stalled`` until ``deadline_ms`` (None when nothing changes).

    Why not failed at once: a laptop's lid closes, Wi-Fi drops, and the daemon's outbox still
    holds every event; the run goes on when they flow again (see :func:`apply_event`).
    """
    if state.terminal or state.status == "stalled":
        return None
    return replace(
        state, status="stalled", stalled_since=since_ms, resume_deadline=deadline_ms, updated_at=now_ms
    )


def resume_expired(state: RunState, now_ms: int) -> bool:
    """True when a stalled run's resume window is over: it may only fail now, never resume."""
    return state.status == "stalled" and state.resume_deadline is not None and now_ms >= state.resume_deadline
