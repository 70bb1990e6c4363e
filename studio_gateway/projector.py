"""The projector: the only writer of run state from uplink events.

Every gateway instance runs one :class:`Projector` loop on the same durable pull
consumer (``LINK_RUNS_PROJECTOR``), so the instances share the work and a crashed
instance's unacknowledged events go to another one after the ack wait. For each
event it reads the run state, decides with :func:`.run_state.apply_event`, keeps
the event for export (:meth:`.RunStore.keep_event`, idempotent per seq) and
writes the new state with compare-and-set on the key's revision (re-reading on a
conflict). Only then is the event acknowledged: after a crash it is delivered
again and recognised as a duplicate (seq <= applied) or applied now.

A batch is applied run by run in seq order. An event that arrives before its
predecessor (another instance is applying that one, or it is being redelivered)
is held here, unacknowledged, and retried as the run moves on; after
``HOLD_MAX`` it is given back to JetStream (nak with a delay). Events of other fences, of hosts other than
the run owner's (taken from the subject, never the payload), of ended runs, of
unknown runs and malformed ones are acknowledged and counted, never applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Final

import nats.errors
from nats.aio.msg import Msg

from linkd.run_protocol import parse_run_subject

from .run_metrics import RunMetrics
from .run_state import RunState, apply_event
from .run_store import Conflict, RunStore

__all__ = ["Projector", "keep_decision"]

log = logging.getLogger("studio_gateway.projector")

FETCH_BATCH: Final = 32
FETCH_TIMEOUT: Final = 1.0
# While holding early events, pull with this short timeout so they are retried promptly.
HELD_POLL: Final = 0.02
# An early event is held at most this long, then given back (nak) so this instance's memory stays bounded.
HOLD_MAX: Final = 5.0
# Redelivery delay for an event given back after holding it.
MAX_GAP_DELAY: Final = 1.0
# Held events get an in-progress ack this often (the consumer's ack wait is a few seconds).
TOUCH_INTERVAL: Final = 1.0
# Runs whose last written state this instance remembers.
CACHE_RUNS: Final = 1024
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


@dataclass
class _Held:
    """An event whose predecessor is not applied yet, held (unacknowledged) until it is."""

    msg: Msg
    run_id: str
    seq: int
    since: float
    touched: float


def _sort_key(msg: Msg, prefix: str) -> tuple[str, int]:
    """(run id, seq) for applying a batch run by run in seq order; unparsable ones first."""
    subject = parse_run_subject(msg.subject, prefix)
    try:
        seq = json.loads(msg.data).get("seq")
    except (ValueError, UnicodeDecodeError, AttributeError):
        seq = None
    run_id = subject.run_id if subject is not None else ""
    return run_id, seq if isinstance(seq, int) else 0


class Projector:
    def __init__(
        self,
        store: RunStore,
        metrics: RunMetrics,
        *,
        now_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        hold_max: float = HOLD_MAX,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.now_ms = now_ms
        self.prefix = store.prefix
        self.hold_max = hold_max
        # Last state written per run (with its revision): the next event usually needs no read.
        self._cache: OrderedDict[str, tuple[RunState, int]] = OrderedDict()
        self._held: dict[tuple[str, int], _Held] = {}

    async def run(self) -> None:
        """Pull and apply events until cancelled."""
        sub = await self.store.projector_subscription()
        try:
            while True:
                try:
                    msgs = await sub.fetch(FETCH_BATCH, timeout=HELD_POLL if self._held else FETCH_TIMEOUT)
                except (nats.errors.TimeoutError, TimeoutError):
                    msgs = []
                    if not self._held:
                        self.metrics.projector_pending.set(0)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("projector fetch failed: %s; retrying", exc)
                    await asyncio.sleep(ERROR_DELAY)
                    continue
                await self.handle_batch(msgs)
        finally:
            for held in self._held.values():
                with contextlib.suppress(Exception):
                    await held.msg.nak()
            self._held.clear()
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def handle_batch(self, msgs: list[Msg]) -> None:
        """Apply a batch run by run in seq order, then whatever held events became applicable."""
        for msg in sorted(msgs, key=lambda m: _sort_key(m, self.prefix)):
            await self.handle(msg)
        await self._retry_held()

    async def _retry_held(self) -> None:
        """Per run, apply held events from the lowest seq on, while they fit."""
        for run_id in sorted({run for run, _ in self._held}):
            self._cache.pop(run_id, None)  # another instance may have moved the run on
            keys = sorted(k for k in self._held if k[0] == run_id)
            for i, key in enumerate(keys):
                held = self._held.pop(key)
                if await self.handle(held.msg, held_since=held.since) == "gap":
                    await self._keep_alive(keys[i + 1 :])  # still early: so are the later ones
                    break

    async def _keep_alive(self, keys: list[tuple[str, int]]) -> None:
        """Tell JetStream we still work on held events, so their ack wait does not run out."""
        now = asyncio.get_running_loop().time()
        for key in keys:
            held = self._held.get(key)
            if held is not None and now - held.touched > TOUCH_INTERVAL:
                held.touched = now
                with contextlib.suppress(Exception):
                    await held.msg.in_progress()

    async def handle(self, msg: Msg, *, held_since: float | None = None) -> str:
        """Apply (or classify) one delivered event; acks it, or holds it when it came too early."""
        try:
            outcome, key = await self._decide_and_write(msg)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("projector: cannot handle %s; it will be redelivered", msg.subject)
            with contextlib.suppress(Exception):
                await msg.nak(delay=ERROR_DELAY)
            return "error"
        with contextlib.suppress(Exception):
            self.metrics.projector_pending.set(msg.metadata.num_pending or 0)
        if outcome == "gap" and key is not None:
            loop = asyncio.get_running_loop()
            since = held_since if held_since is not None else loop.time()
            if held_since is None:
                self.metrics.uplink_events.inc(result="gap")
            if loop.time() - since < self.hold_max:
                # Its predecessor is on its way (another instance, or a redelivery): keep it here,
                # unacknowledged, and try again as the run moves on.
                self._held[key] = _Held(msg, key[0], key[1], since, loop.time())
                with contextlib.suppress(Exception):
                    await msg.in_progress()
                return outcome
            # Held long enough: give it back to JetStream (the predecessor may be lost for good,
            # and the reaper ends such a run), so this instance's memory stays bounded.
            with contextlib.suppress(Exception):
                await msg.nak(delay=MAX_GAP_DELAY)
            return outcome
        self.metrics.uplink_events.inc(result=outcome)
        try:
            await msg.ack()
        except Exception as exc:  # the event comes back after the ack wait; applying is idempotent
            log.warning("projector: cannot ack %s: %s", msg.subject, exc)
        return outcome

    async def _load(self, run_id: str) -> tuple[RunState, int] | None:
        cached = self._cache.get(run_id)
        if cached is not None:
            return cached
        return await self.store.load(run_id)

    def _remember(self, state: RunState, revision: int) -> None:
        self._cache[state.run_id] = (state, revision)
        self._cache.move_to_end(state.run_id)
        while len(self._cache) > CACHE_RUNS:
            self._cache.popitem(last=False)

    async def _decide_and_write(self, msg: Msg) -> tuple[str, tuple[str, int] | None]:
        subject = parse_run_subject(msg.subject, self.prefix)
        if subject is None:
            return "invalid", None
        try:
            event = json.loads(msg.data)
        except (ValueError, UnicodeDecodeError):
            return "invalid", None
        stamp = msg.metadata.timestamp
        stream_time = stamp.timestamp() if stamp is not None else None
        event_time_ms = int(stream_time * 1000) if stream_time is not None else None
        for _ in range(MAX_CAS_ATTEMPTS):
            loaded = await self._load(subject.run_id)
            if loaded is None:
                return "unknown_run", None
            state, revision = loaded
            decision = apply_event(
                state,
                event,
                host_token=subject.host_token,
                now_ms=self.now_ms(),
                event_time_ms=event_time_ms,
            )
            if decision.outcome == "gap" and subject.run_id in self._cache:
                self._cache.pop(subject.run_id)  # the cache may be behind: read the real state
                continue
            if decision.outcome != "applied" or decision.state is None:
                if decision.outcome in ("stale_fence", "wrong_host"):
                    log.info("run %s: ignored event (%s)", subject.run_id, decision.detail)
                key = (subject.run_id, int(event["seq"])) if decision.outcome == "gap" else None
                return decision.outcome, key
            assert isinstance(event, dict)
            keep, new = keep_decision(
                decision.state, event, len(msg.data), self.store.config.output_max_bytes
            )
            if keep:
                await self.store.keep_event(state.run_id, int(event["seq"]), event)
            try:
                new_revision = await self.store.write(new, revision)
            except Conflict:
                self._cache.pop(subject.run_id, None)
                continue
            if new.terminal:
                self._cache.pop(subject.run_id, None)
                self.metrics.run_finished(new.status, new.failure_kind)
                await self.store.mark_inactive(new.run_id)
            else:
                self._remember(new, new_revision)
            if stream_time is not None:
                self.metrics.event_applied_at(stream_time)
            return "applied", None
        raise Conflict(f"{subject.run_id}: too many concurrent writers")
