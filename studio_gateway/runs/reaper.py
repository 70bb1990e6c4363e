"""The reaper: fails runs that can no longer finish (``failed`` / ``desktop_lost`` and kin).

Every gateway instance runs it; it is safe concurrently because each verdict is
written with compare-and-set on the state's revision (a lost race just means
another instance, the projector or a cancel got there first). A run is silent when
nothing arrived for ``RUNS_LIVENESS_TIMEOUT_SECONDS`` (linkd sends heartbeats while a
run works) since its last event, or since dispatch when none came yet. A run still
``dispatching`` gets the dispatch timeout on top: its dispatcher decides first, and
when it never did (the gateway instance delivering it died), the run fails as
``dispatch_error``: nothing says the desktop ever got it.

Before failing a run the reaper asks the stream for the run's newest event: when
the desktop did publish recently, or its ``done`` is there, and only the projector
is behind, the run is alive and is left alone, unless the event the projector
waits for is missing from the stream for good (later ones arrived, that one never
did): then the run can never complete, and it fails as ``events_lost``.
Once failed, the run is terminal: late events cannot bring it back (the projector
ignores them).

A run the verdict says is ``desktop_lost`` is not failed at once while
``RUNS_RESUME_WINDOW_SECONDS`` > 0: it is ``stalled`` first (a closed lid, lost Wi-Fi: the
daemon's outbox keeps its events), since the moment it became silent for the liveness
timeout until that moment plus the window (both stored, so every instance agrees). The
projector resumes it when its events flow again; past the deadline the reaper fails it as
``desktop_lost``, and the projector refuses to resume it too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Final

import nats.js.errors

from contract.run_protocol import RUN_STREAM, parse_event, split_events

from ..config import RunsConfig
from .health import Health
from .metrics import RunMetrics
from .state import RunState, resume_expired, stall, terminate
from .store import Conflict, RunStore

__all__ = ["Reaper", "silent_for"]

log = logging.getLogger("studio_gateway.reaper")

ERROR_DELAY: Final = 1.0


def silent_for(state: RunState, now_ms: int) -> float:
    """Seconds since ``state`` last showed a sign of life."""
    return max(0.0, (now_ms - state.liveness_reference()) / 1000)


def deadline_seconds(state: RunState, config: RunsConfig) -> float:
    if state.status == "dispatching":
        return config.dispatch_timeout + config.liveness_timeout
    return config.liveness_timeout


class Reaper:
    def __init__(
        self,
        store: RunStore,
        metrics: RunMetrics,
        config: RunsConfig,
        *,
        now_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        health: Health | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.config = config
        self.health = health if health is not None else Health(log)
        self.now_ms = now_ms
        # Active entries whose run did not exist at the last pass.
        self._missing: set[str] = set()
        # Runs seen stalled in the current pass (the gauge is set at its end).
        self._stalled: set[str] = set()

    async def run(self) -> None:
        while True:
            try:
                await self.scan()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.metrics.reaper_errors.inc()
                if self.health.ok:
                    log.warning("reaper scan failed: %r", exc)
                self.health.trouble("reaper", f"the reaper cannot scan the active runs ({exc!r})")
                await asyncio.sleep(ERROR_DELAY)
            await asyncio.sleep(self.config.reaper_scan_interval)

    async def scan(self) -> list[str]:
        """One pass over the active runs; returns the ids this pass failed.

        A run whose verdict cannot be had (JetStream answers not, a reader is cut short) is
        looked at again next pass; the others are judged all the same.
        """
        reaped: list[str] = []
        missing: set[str] = set()
        failed: list[str] = []
        self._stalled = set()
        for run_id in await self.store.active_ids():
            try:
                verdict = await self._judge(run_id, missing)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.metrics.reaper_errors.inc()
                failed.append(f"{run_id}: {exc!r}")
                continue
            if verdict:
                reaped.append(run_id)
        self._missing = missing
        self.metrics.stalled.set(len(self._stalled))
        if failed:
            self.health.trouble(
                "reaper", f"the reaper cannot judge {len(failed)} active run(s), e.g. {failed[0]}"
            )
        else:
            self.health.fine("reaper")
        return reaped

    async def _judge(self, run_id: str, missing: set[str]) -> bool:
        """Look at one active run; True when this pass failed it."""
        loaded = await self.store.load(run_id)
        if loaded is None and run_id not in self._missing:
            # Listed but not written: a create in flight (both writes go out together), or
            # one that failed. Forgotten only when still missing on the next pass.
            missing.add(run_id)
            return False
        if loaded is None or loaded[0].terminal:
            await self.store.mark_inactive(run_id)  # leftover of an interrupted write
            return False
        state, revision = loaded
        now = self.now_ms()
        if state.status == "stalled":
            self._stalled.add(run_id)
        limit = deadline_seconds(state, self.config)
        silence = silent_for(state, now)
        if resume_expired(state, now):
            verdict: tuple[str, str] | None = await self._expired_verdict(state, silence)
        elif silence < limit:
            return False
        else:
            verdict = await self._verdict(state, now, limit, silence)
        if verdict is None:
            return False
        kind, reason = verdict
        expired = kind == "desktop_lost" and self.config.resume_window > 0
        if expired and not resume_expired(state, now):
            since = state.liveness_reference() + int(limit * 1000)
            deadline = since + int(self.config.resume_window * 1000)
            if now < deadline:
                return await self._stall(state, revision, now, since, deadline)
            reason = self._expired_reason(state, silence)
        new = terminate(
            state,
            "failed",
            now_ms=now,
            failure_kind=kind,
            reason=reason,
            expected_fence=state.fence,
        )
        if new is None:
            return False
        try:
            await self.store.write(new, revision)
        except Conflict:
            return False  # something happened to the run meanwhile; the next pass looks again
        # Counted as soon as the write is in (a reader may see the failed run already), not
        # after the index's own write.
        self._stalled.discard(run_id)
        self.metrics.reaped.inc()
        if expired:
            self.metrics.resume_expired.inc()
        self.metrics.run_finished(new.status, new.failure_kind)
        log.warning("run %s reaped: %s", run_id, reason)
        await self.store.mark_inactive(run_id)
        return True

    async def _stall(self, state: RunState, revision: int, now: int, since: int, deadline: int) -> bool:
        """Mark a silent run ``stalled`` until ``deadline``; False (it is not reaped)."""
        new = stall(state, now_ms=now, since_ms=since, deadline_ms=deadline)
        if new is None:
            return False
        try:
            await self.store.write(new, revision)
        except Conflict:
            return False  # an event or a verdict came first; the next pass looks again
        self._stalled.add(state.run_id)
        self.metrics.stalls.inc()
        log.warning(
            "run %s stalled: the desktop sent nothing for %.1f s; it resumes if its events flow "
            "again within %g s (RUNS_RESUME_WINDOW_SECONDS), else it fails as desktop_lost",
            state.run_id,
            (now - state.liveness_reference()) / 1000,
            self.config.resume_window,
            extra={"run_id": state.run_id},
        )
        return False

    async def _expired_verdict(self, state: RunState, silence: float) -> tuple[str, str] | None:
        """A stalled run past its deadline: desktop_lost, unless the desktop's events were stored
        in time and only the projector is behind (it resumes the run then)."""
        newest = await self._newest_unapplied(state)
        deadline = state.resume_deadline
        in_time = newest is not None and deadline is not None and newest[0] <= deadline
        if in_time and await self._next_event_stored(state):
            return None
        return "desktop_lost", self._expired_reason(state, silence)

    def _expired_reason(self, state: RunState, silence: float) -> str:
        return (
            f"the desktop sent nothing for {silence:.1f} s, past the liveness timeout "
            f"({self.config.liveness_timeout:g} s) and the resume window "
            f"({self.config.resume_window:g} s); it is gone or disconnected"
        )

    async def _next_event_stored(self, state: RunState) -> bool:
        """Whether the stream holds the event the projector needs next (seq = applied + 1)."""
        reader = await self.store.open_events(state)
        try:
            msgs = await reader.snapshot()
        finally:
            await reader.close()
        wanted = state.seq + 1
        for line in (line for msg in msgs for line in split_events(msg.data)):
            event = parse_event(line)
            if event is not None and event.get("seq") == wanted and event.get("fence") == state.event_fence:
                return True
        return False

    async def _verdict(
        self, state: RunState, now: int, limit: float, silence: float
    ) -> tuple[str, str] | None:
        """Why a silent run can no longer finish (failure kind, reason), or None if it still can."""
        newest = await self._newest_unapplied(state)
        if newest is not None:
            stored_ms, newest_type = newest
            if newest_type == "done" or (now - stored_ms) / 1000 < limit:
                # The desktop did send more: the run is alive and only the projector is
                # behind, unless the event it waits for is missing from the stream for good.
                if await self._next_event_stored(state):
                    return None
                return "events_lost", (
                    f"event {state.seq + 1} of the run never arrived although later ones did, "
                    f"for {silence:.1f} s: the desktop's events were lost"
                )
            silence = min(silence, (now - stored_ms) / 1000)
        elif state.status == "dispatching":
            return "dispatch_error", (
                "the delivery to the desktop never finished (the gateway instance sending it "
                f"stopped?) and the desktop sent nothing in {silence:.1f} s"
            )
        return "desktop_lost", (
            f"the desktop sent nothing for {silence:.1f} s "
            f"(liveness timeout {self.config.liveness_timeout:g} s); it is gone or disconnected"
        )

    async def _newest_unapplied(self, state: RunState) -> tuple[float, str] | None:
        """(stored at, ms; type) of the run's newest event in the stream, when not applied yet."""
        try:
            msg = await self.store.js.get_last_msg(RUN_STREAM, self.store.event_subject(state))
        except nats.js.errors.NotFoundError:
            return None
        lines = split_events(msg.data or b"{}")
        event = parse_event(lines[-1]) if lines else None  # a batch's newest is its last
        if event is None or event.get("fence") != state.event_fence:
            return None
        seq = event.get("seq")
        if not isinstance(seq, int) or seq <= state.seq or msg.time is None:
            return None
        return msg.time.timestamp() * 1000, str(event.get("type"))
