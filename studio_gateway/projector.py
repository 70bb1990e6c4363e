"""The projector: the only writer of run state from uplink events.

Every gateway instance runs one :class:`Projector` loop on the same durable pull
consumer (``LINK_RUNS_PROJECTOR``), so the instances share the work and a crashed
instance's unacknowledged events go to another one after the ack wait (a few seconds).

A pulled batch is applied run by run, in seq order: the events of one run are
decided one after the other with :func:`.run_state.apply_event` on the evolving
state, the ones to keep for export are stored (:meth:`.RunStore.keep_event`,
idempotent per seq), and the run's new state is written *once* for the whole group
with compare-and-set on the key's revision (on a conflict: read again, decide again).
Only then are the events acknowledged: after a crash they are delivered again and
recognised as duplicates (seq <= applied) or applied now. Each event is applied once.

An event that arrives before its predecessor (another instance is applying that
one, or it is being redelivered) is held here, unacknowledged (with in-progress
acks), and retried as the run moves on; after ``HOLD_MAX`` it is given back to
JetStream. Events of other fences, of hosts other than the run owner's (taken
from the subject, never the payload), of ended runs, of unknown runs and
malformed ones are acknowledged and counted, never applied.
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

from nats.aio.msg import Msg

from linkd.run_protocol import parse_run_subject

from .health import Health
from .pull_feed import ConsumerGone, FeedUnavailable, PullFeed
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
# A feed not served this long makes runs "unavailable" (one 503 during a leader change does not).
UNHEALTHY_AFTER: Final = 1.0
# Between re-opening feeds that gave up: a backoff from the first to the max delay.
RESTART_FIRST_DELAY: Final = 0.1
RESTART_MAX_DELAY: Final = 5.0


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
class _Item:
    """One delivered event, parsed once."""

    msg: Msg
    run_id: str
    host_token: str
    seq: int
    event: dict[str, Any]
    stream_time: float | None
    since: float | None = None  # when it was first held
    touched: float = 0.0  # last in-progress ack


def _parse(msg: Msg, prefix: str) -> _Item | None:
    subject = parse_run_subject(msg.subject, prefix)
    if subject is None:
        return None
    try:
        event = json.loads(msg.data)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(event, dict):
        return None
    seq = event.get("seq")
    stamp = msg.metadata.timestamp
    return _Item(
        msg,
        subject.run_id,
        subject.host_token,
        seq if isinstance(seq, int) and not isinstance(seq, bool) else 0,
        event,
        stamp.timestamp() if stamp is not None else None,
    )


class Projector:
    def __init__(
        self,
        store: RunStore,
        metrics: RunMetrics,
        *,
        now_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        hold_max: float = HOLD_MAX,
        health: Health | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.health = health if health is not None else Health(log)
        self.now_ms = now_ms
        self.prefix = store.prefix
        self.hold_max = hold_max
        # Last state written per run (with its revision): the next group usually needs no read.
        self._cache: OrderedDict[str, tuple[RunState, int]] = OrderedDict()
        self._held: dict[str, list[_Item]] = {}

    async def run(self) -> None:
        """Pull and apply events until cancelled; survives leader changes, node loss and deletion.

        A feed that gives up (its consumer deleted, or not served for ``PROJECTOR_GIVE_UP``)
        is closed, the durable consumer checked or re-created (idempotent), and a new feed
        opened, with a bounded backoff between attempts: never a dead feed polled forever.
        """
        delay = RESTART_FIRST_DELAY
        opened_before = False
        while True:
            try:
                if opened_before:
                    await self.store.ensure_projector_consumer()
                feed = await self.store.projector_feed()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.metrics.projector_errors.inc(kind="open")
                self.health.trouble("projector_pull", f"the projector cannot open its consumer ({exc!r})")
                await asyncio.sleep(delay)
                delay = min(delay * 2, RESTART_MAX_DELAY)
                continue
            if opened_before:
                self.metrics.projector_restarts.inc()
                log.info("projector: pulling from a new feed")
            opened_before = True
            try:
                served = await self._pull(feed)
            finally:
                await self._give_back_held()
                with contextlib.suppress(Exception):
                    await feed.unsubscribe()
            delay = RESTART_FIRST_DELAY if served else min(delay * 2, RESTART_MAX_DELAY)
            await asyncio.sleep(delay)

    async def _pull(self, feed: PullFeed) -> bool:
        """Pull and apply until the feed gives up; returns whether it ever served."""
        served = False
        while True:
            try:
                msgs = await feed.fetch(FETCH_BATCH, HELD_POLL if self._held else FETCH_TIMEOUT)
            except asyncio.CancelledError:
                raise
            except ConsumerGone as exc:
                kind = "unavailable" if isinstance(exc, FeedUnavailable) else "consumer_gone"
                self.metrics.projector_errors.inc(kind=kind)
                self.health.trouble("projector_pull", f"the projector's consumer is not served ({exc})")
                return served
            except Exception as exc:
                self.metrics.projector_errors.inc(kind="fetch")
                self.health.trouble("projector_pull", f"the projector cannot pull ({exc!r})")
                await asyncio.sleep(ERROR_DELAY)
                continue
            unserved = feed.unavailable_for()
            if unserved >= UNHEALTHY_AFTER:
                self.health.trouble(
                    "projector_pull",
                    f"the projector's consumer is not served ({feed.last_problem}, {unserved:.1f} s)",
                )
            elif unserved == 0.0:
                served = True
                self.health.fine("projector_pull")
            if not msgs and not self._held:
                self.metrics.projector_pending.set(0)
            await self.handle_batch(msgs)

    async def _give_back_held(self) -> None:
        for items in self._held.values():
            for item in items:
                with contextlib.suppress(Exception):
                    await item.msg.nak()
        self._held.clear()
        self._cache.clear()  # another instance may move runs on while this one restarts

    async def handle_batch(self, msgs: list[Msg]) -> None:
        """Apply a batch run by run in seq order, then whatever held events became applicable."""
        groups: dict[str, list[_Item]] = {}
        for msg in msgs:
            item = _parse(msg, self.prefix)
            if item is None:
                await self._ack(msg, "invalid")
                continue
            groups.setdefault(item.run_id, []).append(item)
        if msgs:
            with contextlib.suppress(Exception):
                self.metrics.projector_pending.set(msgs[-1].metadata.num_pending or 0)
        for run_id, items in groups.items():
            await self._guarded(run_id, items)
        for run_id in list(self._held):
            held = self._held.pop(run_id)
            self._cache.pop(run_id, None)  # another instance may have moved the run on
            await self._guarded(run_id, held)

    async def _guarded(self, run_id: str, items: list[_Item]) -> None:
        try:
            await self._apply_group(run_id, sorted(items, key=lambda i: i.seq))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.metrics.projector_errors.inc(kind="apply")
            if self.health.ok:
                log.exception("projector: cannot apply events of run %s; they will be redelivered", run_id)
            self.health.trouble("projector_apply", f"the projector cannot write run state ({exc!r})")
            self._cache.pop(run_id, None)
            for item in items:
                with contextlib.suppress(Exception):
                    await item.msg.nak(delay=ERROR_DELAY)

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

    async def _apply_group(self, run_id: str, items: list[_Item]) -> None:
        """Decide and write the events of one run (sorted by seq) with one compare-and-set."""
        for _ in range(MAX_CAS_ATTEMPTS):
            cached = run_id in self._cache
            loaded = await self._load(run_id)
            if loaded is None:
                for item in items:
                    await self._ack(item.msg, "unknown_run")
                return
            state, revision = loaded
            current = state
            applied: list[_Item] = []
            ignored: list[tuple[_Item, str]] = []
            early: list[_Item] = []
            kept: list[_Item] = []
            now = self.now_ms()
            for item in items:
                decision = apply_event(
                    current,
                    item.event,
                    host_token=item.host_token,
                    now_ms=now,
                    event_time_ms=int(item.stream_time * 1000) if item.stream_time is not None else None,
                )
                if decision.outcome == "applied" and decision.state is not None:
                    keep, current = keep_decision(
                        decision.state, item.event, len(item.msg.data), self.store.config.output_max_bytes
                    )
                    if keep:
                        kept.append(item)
                    applied.append(item)
                elif decision.outcome == "gap":
                    early.append(item)
                else:
                    if decision.outcome in ("stale_fence", "wrong_host"):
                        log.info("run %s: ignored event (%s)", run_id, decision.detail)
                    ignored.append((item, decision.outcome))
            if early and not applied and cached:
                self._cache.pop(run_id, None)  # the cache may be behind another instance: read again
                continue
            if applied:
                # Kept copies first (idempotent puts, in parallel), then the state that counts them.
                await asyncio.gather(*(self.store.keep_event(run_id, i.seq, i.event) for i in kept))
                try:
                    new_revision = await self.store.write(current, revision)
                except Conflict:
                    self._cache.pop(run_id, None)
                    continue
                if current.terminal:
                    self._cache.pop(run_id, None)
                    self.metrics.run_finished(current.status, current.failure_kind)
                    await self.store.mark_inactive(run_id)
                else:
                    self._remember(current, new_revision)
                stream_time = applied[-1].stream_time
                if stream_time is not None:
                    self.metrics.event_applied_at(stream_time)
                for item in applied:
                    await self._ack(item.msg, "applied")
                self.health.fine("projector_apply")
            for item, outcome in ignored:
                await self._ack(item.msg, outcome)
            await self._hold(run_id, early)
            return
        raise Conflict(f"{run_id}: too many concurrent writers")

    async def _hold(self, run_id: str, items: list[_Item]) -> None:
        """Keep early events (unacknowledged) for a retry; give back the ones held too long."""
        now = asyncio.get_running_loop().time()
        keep: list[_Item] = []
        for item in items:
            if item.since is None:
                item.since = now
                self.metrics.uplink_events.inc(result="gap")
            if now - item.since >= self.hold_max:
                # Its predecessor may be lost for good (the reaper ends such a run); give it back
                # to JetStream so this instance's memory stays bounded.
                with contextlib.suppress(Exception):
                    await item.msg.nak(delay=MAX_GAP_DELAY)
                continue
            if now - item.touched >= TOUCH_INTERVAL:
                item.touched = now
                with contextlib.suppress(Exception):
                    await item.msg.in_progress()
            keep.append(item)
        if keep:
            self._held.setdefault(run_id, []).extend(keep)

    async def _ack(self, msg: Msg, outcome: str) -> None:
        self.metrics.uplink_events.inc(result=outcome)
        try:
            await msg.ack()
        except Exception as exc:  # it comes back after the ack wait; handling it again is harmless
            log.warning("projector: cannot ack %s: %s", msg.subject, exc)
