"""The projector: the only writer of run state from uplink events.

Every gateway instance runs one :class:`Projector` loop on the same durable pull
consumer (``LINK_RUNS_PROJECTOR``), so the instances share the work and a crashed
instance's unacknowledged events go to another one after the ack wait. For each
event it reads the run state, decides with :func:`.run_state.apply_event`, keeps
the event for export (:meth:`.RunStore.keep_event`, idempotent per seq) and
writes the new state with compare-and-set on the key's revision (re-reading on a
conflict). Only then is the event acknowledged: after a crash it is delivered
again and recognised as a duplicate (seq <= applied) or applied now.

An event that arrives before its predecessor (another instance holds it, or it is
being redelivered) is negatively acknowledged with a short delay, so JetStream
hands it back after the missing one. Events of other fences, of hosts other than
the run owner's (taken from the subject, never the payload), of ended runs, of
unknown runs and malformed ones are acknowledged and counted, never applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Final

import nats.errors
from nats.aio.msg import Msg

from linkd.run_protocol import parse_run_subject

from .run_metrics import RunMetrics
from .run_state import RunState, apply_event
from .run_store import Conflict, RunStore

__all__ = ["Projector", "keep_decision"]

log = logging.getLogger("studio_gateway.projector")

FETCH_BATCH: Final = 64
FETCH_TIMEOUT: Final = 1.0
# Redelivery delay for an event whose predecessor is not applied yet: short, then backing off.
GAP_DELAY: Final = 0.05
MAX_GAP_DELAY: Final = 2.0
MAX_CAS_ATTEMPTS: Final = 50
# After an unexpected error (NATS down, say): wait before pulling again.
ERROR_DELAY: Final = 0.5


def keep_decision(state: RunState, event: dict[str, Any], size: int, cap: int) -> tuple[bool, RunState]:
    """Whether to keep this event for export, and the state's kept-bytes accounting after it.

    Heartbeats are not kept; the others are while they fit in ``cap`` bytes per run;
    ``done`` is always kept, so an export after retention still shows how the run ended.
    """
    kind = event.get("type")
    if kind == "heartbeat":
        return False, state
    if kind != "done" and (state.kept_truncated or state.kept_bytes + size > cap):
        return False, state if state.kept_truncated else replace(state, kept_truncated=True)
    return True, replace(state, kept_bytes=state.kept_bytes + size)


class Projector:
    def __init__(
        self,
        store: RunStore,
        metrics: RunMetrics,
        *,
        now_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.now_ms = now_ms
        self.prefix = store.prefix

    async def run(self) -> None:
        """Pull and apply events until cancelled."""
        sub = await self.store.projector_subscription()
        try:
            while True:
                try:
                    msgs = await sub.fetch(FETCH_BATCH, timeout=FETCH_TIMEOUT)
                except (nats.errors.TimeoutError, TimeoutError):
                    self.metrics.projector_pending.set(0)
                    continue
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("projector fetch failed: %s; retrying", exc)
                    await asyncio.sleep(ERROR_DELAY)
                    continue
                for msg in msgs:
                    await self.handle(msg)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def handle(self, msg: Msg) -> str:
        """Apply (or classify) one delivered event; acks or naks it; returns the outcome."""
        try:
            outcome = await self._decide_and_write(msg)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("projector: cannot handle %s; it will be redelivered", msg.subject)
            with contextlib.suppress(Exception):
                await msg.nak(delay=ERROR_DELAY)
            return "error"
        self.metrics.uplink_events.inc(result=outcome)
        with contextlib.suppress(Exception):
            self.metrics.projector_pending.set(msg.metadata.num_pending or 0)
        try:
            if outcome == "gap":
                delivered = msg.metadata.num_delivered or 1
                await msg.nak(delay=min(MAX_GAP_DELAY, GAP_DELAY * delivered))
            else:
                await msg.ack()
        except Exception as exc:  # the event comes back after the ack wait; applying is idempotent
            log.warning("projector: cannot ack %s: %s", msg.subject, exc)
        return outcome

    async def _decide_and_write(self, msg: Msg) -> str:
        subject = parse_run_subject(msg.subject, self.prefix)
        if subject is None:
            return "invalid"
        try:
            event = json.loads(msg.data)
        except (ValueError, UnicodeDecodeError):
            return "invalid"
        stamp = msg.metadata.timestamp
        stream_time = stamp.timestamp() if stamp is not None else None
        event_time_ms = int(stream_time * 1000) if stream_time is not None else None
        for _ in range(MAX_CAS_ATTEMPTS):
            loaded = await self.store.load(subject.run_id)
            if loaded is None:
                return "unknown_run"
            state, revision = loaded
            decision = apply_event(
                state,
                event,
                host_token=subject.host_token,
                now_ms=self.now_ms(),
                event_time_ms=event_time_ms,
            )
            if decision.outcome != "applied" or decision.state is None:
                if decision.outcome in ("stale_fence", "wrong_host"):
                    log.info("run %s: ignored event (%s)", subject.run_id, decision.detail)
                return decision.outcome
            assert isinstance(event, dict)
            size = len(msg.data)
            keep, new = keep_decision(decision.state, event, size, self.store.config.output_max_bytes)
            if keep:
                await self.store.keep_event(state.run_id, int(event["seq"]), event)
            try:
                await self.store.write(new, revision)
            except Conflict:
                continue
            if stream_time is not None:
                self.metrics.event_applied_at(stream_time)
            if new.terminal:
                self.metrics.run_finished(new.status, new.failure_kind)
                await self.store.mark_inactive(new.run_id)
            return "applied"
        raise Conflict(f"{subject.run_id}: too many concurrent writers")
