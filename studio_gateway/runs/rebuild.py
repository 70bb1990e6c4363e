"""``POST /api/runs/{id}/projection/rebuild``: recompute a run's state from its stored events.

The events of the run's execution (its ``eventFence``) are read from the stream (or, past
the stream's retention, from the kept copy) and applied in ``seq`` order with the
projector's own rule, :func:`.state.apply_event`, to the run's identity (ids, owner, host,
runner, title, creation, fences, dispatch time) with everything events decide reset. What
the gateway itself decided is not in the events and is kept: an end the gateway made
(:func:`.state.terminate` bumped the fence: a dispatch failure, a cancel, desktop_lost, a
limit), a ``stalled`` status while no newer event came, and the export bookkeeping
(``keptBytes``). Timestamps keep their stored value when it is set: the projector's clock,
not the events', wrote them.

Events applied beyond the stored state's ``seq`` (the projector had not got to them, or the
stored ``seq`` was wrong) are also kept for export, as the projector keeps what it applies:
it will see them as duplicates.

Safe while the projector runs: the result is written with compare-and-set on the state's
revision; on a conflict everything is read again and recomputed. Idempotent: a state that
already is what the events say is not written (``changed: {}``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, Final

from contract.run_protocol import parse_event, split_events

from .state import RunState, apply_event
from .store import Conflict, RunStore

__all__ = ["RebuildResult", "field_diff", "rebuild", "rebuild_state"]

# Fields whose stored value wins when set (written from the projector's clock).
_CLOCK_FIELDS: Final = ("updated_at", "last_event_at", "finished_at")
# Fields events decide: reset before the events are applied again.
_RESET: Final[dict[str, Any]] = {
    "stage": None,
    "seq": 0,
    "final_seq": None,
    "output_bytes": 0,
    "failure_kind": None,
    "failure_reason": None,
    "last_event_at": None,
    "finished_at": None,
    "stalled_since": None,
    "resume_deadline": None,
}
ATTEMPTS: Final = 10


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def rebuild_state(current: RunState, events: Iterable[tuple[dict[str, Any], int | None]]) -> RunState:
    """What ``current`` should be, given the run's stored events ``(event, stored at ms)``."""
    base = replace(
        current, **_RESET, status="in_progress" if current.dispatched_at is not None else "dispatching"
    )
    state = base
    for event, stored_ms in sorted(events, key=lambda pair: _seq(pair[0])):
        now = stored_ms if stored_ms is not None else current.updated_at
        decision = apply_event(
            state, event, host_token=current.host_token, now_ms=now, event_time_ms=stored_ms
        )
        if decision.outcome == "applied" and decision.state is not None:
            state = decision.state
    gateway_ended = current.terminal and current.fence > current.event_fence
    if gateway_ended and not state.terminal:
        state = replace(
            state,
            status=current.status,
            fence=current.fence,
            failure_kind=current.failure_kind,
            failure_reason=current.failure_reason,
            finished_at=current.finished_at,
        )
    elif current.status == "stalled" and state.status == "in_progress" and _not_after(state, current):
        state = replace(
            state,
            status="stalled",
            stalled_since=current.stalled_since,
            resume_deadline=current.resume_deadline,
        )
    clocks = {name: getattr(current, name) for name in _CLOCK_FIELDS if getattr(current, name) is not None}
    state = replace(state, **{k: v for k, v in clocks.items() if getattr(state, k) is not None})
    return replace(state, kept_bytes=current.kept_bytes, kept_truncated=current.kept_truncated)


def _not_after(state: RunState, current: RunState) -> bool:
    """No event newer than the stall: the reaper's ``stalled`` still holds."""
    since = current.stalled_since
    return since is None or state.last_event_at is None or state.last_event_at <= since


def _seq(event: dict[str, Any]) -> int:
    seq = event.get("seq")
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else 0


def field_diff(before: RunState, after: RunState) -> dict[str, dict[str, Any]]:
    """``{field: {"from": old, "to": new}}`` for each field that differs (API names)."""
    out: dict[str, dict[str, Any]] = {}
    for f in dataclasses.fields(RunState):
        old, new = getattr(before, f.name), getattr(after, f.name)
        if old != new:
            out[_camel(f.name)] = {"from": old, "to": new}
    return out


def _ahead(
    current: RunState, rebuilt: RunState, events: list[tuple[dict[str, Any], int | None]]
) -> list[tuple[int, dict[str, Any]]]:
    """The events the rebuild applied beyond what the stored state had (heartbeats aside)."""
    if rebuilt.seq <= current.seq:
        return []
    picked: dict[int, dict[str, Any]] = {}
    for event, _ in events:
        seq = _seq(event)
        if current.seq < seq <= rebuilt.seq and event.get("type") != "heartbeat":
            picked.setdefault(seq, event)
    return sorted(picked.items())


@dataclass(frozen=True)
class RebuildResult:
    state: RunState
    changed: dict[str, dict[str, Any]]
    events: int
    attempts: int


async def _stored_events(store: RunStore, state: RunState) -> list[tuple[dict[str, Any], int | None]]:
    reader = await store.open_events(state)
    try:
        msgs = await reader.snapshot()
    finally:
        await reader.close()
    events: list[tuple[dict[str, Any], int | None]] = []
    for msg in msgs:
        stamp = msg.metadata.timestamp
        stored = int(stamp.timestamp() * 1000) if stamp is not None else None
        for line in split_events(msg.data):
            event = parse_event(line)
            if event is not None and event.get("fence") == state.event_fence:
                events.append((event, stored))
    seqs = {_seq(event) for event, _ in events}
    if 1 not in seqs:  # the start is past the stream's retention: take what was kept
        kept = [
            (e, None)
            for e in await store.kept_events(state.run_id)
            if e.get("fence") == state.event_fence and _seq(e) not in seqs
        ]
        events.extend(kept)
    return events


def _consistent_so_far(current: RunState, events: list[tuple[dict[str, Any], int | None]]) -> bool:
    """Whether the stored state is exactly what the events up to its own seq say: then anything
    more is events the projector has not applied yet (it is behind, not wrong)."""
    upto = [(event, at) for event, at in events if _seq(event) <= current.seq]
    diff = field_diff(current, rebuild_state(current, upto))
    diff.pop("updatedAt", None)
    return not diff


async def rebuild(store: RunStore, run_id: str) -> RebuildResult | None:
    """Rebuild one run's state (None: no such run); raises :class:`Conflict` after many losses.

    A state that was right all along for what it had applied, on a run whose projector keeps
    writing (every attempt lost to it), is left to the projector: ``changed`` is ``{}``.
    """
    projector_busy = False
    for attempt in range(1, ATTEMPTS + 1):
        loaded = await store.load(run_id)
        if loaded is None:
            return None
        current, revision = loaded
        events = await _stored_events(store, current)
        rebuilt = rebuild_state(current, events)
        changed = field_diff(current, rebuilt)
        if changed:
            changed.pop("updatedAt", None)
        if not changed:
            return RebuildResult(current, {}, len(events), attempt)
        ahead = _ahead(current, rebuilt, events)
        if ahead:
            # Events the projector had not applied yet: it will see them as duplicates and not
            # keep them for export, so the rebuild keeps them (as the projector would have).
            # (keptBytes is left alone: with a corrupted seq they may be kept already.)
            await store.keep_events(run_id, ahead)
        try:
            await store.write(rebuilt, revision)
        except Conflict:
            projector_busy = _consistent_so_far(current, events)
            continue
        if rebuilt.terminal:
            await store.mark_inactive(run_id)
        elif current.terminal:
            await store.mark_active(run_id, rebuilt.host_token)
        return RebuildResult(rebuilt, changed, len(events), attempt)
    if projector_busy:
        loaded = await store.load(run_id)
        if loaded is not None:
            return RebuildResult(loaded[0], {}, 0, ATTEMPTS)
    raise Conflict(f"{run_id}: the state kept changing during the rebuild")
