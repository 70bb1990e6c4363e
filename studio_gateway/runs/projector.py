"""The projector: the only writer of run state from uplink events.

Every gateway instance runs one :class:`Projector`. Its input is one durable pull
consumer per host with active runs (:mod:`.host_feeds`), shared by the instances, so
they share the work and a crashed instance's unacknowledged events go to another one
after the ack wait (a few seconds). The projector takes turns between hosts: at most
``TURN_EVENTS`` of one host's events, then the next host's, so a desktop flooding its
own subjects delays nobody else's runs by more than a turn (docs/runs.md, "Tenants").

Each event's run is first looked up in the in-memory index of active runs
(:mod:`.active`): an event for a run its host does not have costs a set lookup,
counted as a stray, with a state read only while the host's :class:`LookupBudget`
allows (an honest race with the index). A host over ``RUNS_HOST_STRAY_EVENTS`` strays
per window is over its quota: its stored events are purged and its active runs fail
as ``quota_exceeded``. A run that reaches ``RUNS_MAX_EVENTS_PER_RUN`` fails as
``event_limit`` (the stream refuses more of its events anyway).

A turn's events are applied run by run, in seq order: the events of one run are
decided one after the other with :func:`.state.apply_event` on the evolving
state, the ones to keep for export are stored (:meth:`.RunStore.keep_events`, one
write per run and turn, idempotent per seq), and the run's new state is written *once*
for the whole group with compare-and-set on the key's revision (on a conflict: read
again, decide again). Only then are the events acknowledged: after a crash they are
delivered again and recognised as duplicates (seq <= applied) or applied now. Each
event is applied once.

An event that arrives before its predecessor (another instance is applying that
one, or it is being redelivered) is held here, unacknowledged (with in-progress
acks), and retried as the run moves on; after ``HOLD_MAX`` it is given back to
JetStream. Events of other fences, of hosts other than the run owner's (taken
from the subject, never the payload), of ended runs, of unknown runs and
malformed ones are acknowledged and counted, never applied.

A *poison* event is one whose apply step raises (a bug, or a payload nothing foresaw): not a
NATS or JetStream failure, which is only retried. It is handed back with a delay; once it was
delivered ``MAX_POISON_DELIVERIES`` times (JetStream's count, the same on every instance) and
still raises, its message is parked in the dead-letter bucket
(:meth:`.RunStore.put_dead_letter`), acknowledged, counted, and its run fails as
``event_rejected``: it would otherwise wait for that event forever.

Applying an event to a ``stalled`` run resumes it (``in_progress``), unless its resume window
is over: then the run fails as ``desktop_lost`` here (the reaper would, a scan later) and the
event is ignored, so late events never revive it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Final

import nats.errors
from nats.aio.msg import Msg

from contract.run_protocol import parse_event, parse_run_subject, split_events

from ..tasks import stop_tasks
from .active import ActiveRuns
from .health import Health
from .host_feeds import HostFeeds
from .metrics import RunMetrics
from .pull_feed import stored_at
from .state import Decision, RunState, apply_event, resume_expired, terminate
from .store import Conflict, RunStore
from .stray_watch import StrayWatch
from .tenant_limits import LookupBudget, StrayCounter

__all__ = ["Projector", "keep_decision"]

log = logging.getLogger("studio_gateway.projector")

# Events of one host applied per turn before the next host's (fairness between tenants).
TURN_EVENTS: Final = 64
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
# How often host feeds are checked (requests renewed, failed feeds re-opened, health).
MAINTAIN_INTERVAL: Final = 0.25
# How often the run streams are asked whether they answer (each check waits up to 1 s).
PROBE_INTERVAL: Final = 0.5
# A host consumer for runs whose creation time this instance does not know starts this far back.
LOOKBACK_UNKNOWN: Final = 30 * 60.0
# While events of runs the index does not know wait, the active runs are listed this often.
REFRESH_INTERVAL: Final = 0.1
# Ended runs remembered (run id -> host), so their late events need no state read.
ENDED_RUNS: Final = 4096
# An event whose apply step raised on this many deliveries is parked as a dead letter.
MAX_POISON_DELIVERIES: Final = 5
# A poison suspect comes back after this long (a bug fixed by a rolling restart may cure it).
POISON_DELAY: Final = 0.2
# The bytes of a dead letter's message kept in its record (a run event is at most 1 MiB).
DEAD_LETTER_DATA_MAX: Final = 64 * 1024
# Failures that say nothing about the event: NATS or JetStream not answering, a lost race.
TRANSIENT_ERRORS: Final = (nats.errors.Error, TimeoutError, OSError, Conflict)


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
class _Delivery:
    """One delivered message and how many of its events are not decided yet.

    A message carries one event or a batch (:func:`contract.run_protocol.split_events`); it is
    acknowledged once all of its events are decided, never while one is held.
    """

    msg: Msg
    left: int
    done: bool = False


@dataclass
class _Item:
    """One delivered event, parsed once."""

    delivery: _Delivery
    run_id: str
    host_token: str
    seq: int
    event: dict[str, Any]
    stream_time: float | None
    size: int = 0  # bytes of its JSON
    since: float | None = None  # when it was first held
    touched: float = 0.0  # last in-progress ack

    @property
    def msg(self) -> Msg:
        return self.delivery.msg


def _parse(msg: Msg, prefix: str) -> tuple[list[_Item], int] | None:
    """The message's events (and how many of its lines were not events); None: not a run subject."""
    subject = parse_run_subject(msg.subject, prefix)
    if subject is None:
        return None
    delivery = _Delivery(msg, 0)
    stamp = stored_at(msg)
    items: list[_Item] = []
    invalid = 0
    for line in split_events(msg.data):
        event = parse_event(line)
        if event is None:
            invalid += 1
            continue
        seq = event.get("seq")
        items.append(
            _Item(
                delivery,
                subject.run_id,
                subject.host_token,
                seq if isinstance(seq, int) and not isinstance(seq, bool) else 0,
                event,
                stamp,
                size=len(line),
            )
        )
    delivery.left = len(items)
    return items, invalid


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
        # Events of runs the index did not know when they came: (arrived, loop time; item).
        self._deferred: list[tuple[float, _Item]] = []
        self._maintain_now = asyncio.Event()
        self.active = ActiveRuns(store, on_change=self._maintain_now.set)
        self.feeds = HostFeeds(
            store,
            on_error=lambda kind: self.metrics.projector_errors.inc(kind=kind),
            on_reopen=self.metrics.projector_restarts.inc,
        )
        self._created: dict[str, int] = {}  # run id -> created_at (ms), for runs this instance created
        self._ended: OrderedDict[str, str] = OrderedDict()  # run id -> host token
        config = store.config
        self.max_events_per_run = config.max_events_per_run
        self._budget = LookupBudget()
        self._strays = StrayCounter(config.host_stray_events, config.host_stray_window)

    async def run(self) -> None:
        """Pull and apply events until cancelled; survives leader changes, node loss and deletion."""
        loop = asyncio.get_running_loop()
        index = loop.create_task(self.active.run(), name="projector-active-runs")
        maintain = loop.create_task(self._maintain(), name="projector-feeds")
        strays = StrayWatch(
            self.store,
            has_active_runs=lambda host: host in self.active.hosts,
            count_strays=self.count_strays,
        )
        watch = loop.create_task(strays.run(), name="projector-stray-watch")
        probe = loop.create_task(self._probe_streams(), name="projector-stream-probe")
        refresh = loop.create_task(self._refresh_index(), name="projector-index-refresh")
        try:
            while True:
                timeout = HELD_POLL if self._held or self._deferred else FETCH_TIMEOUT
                turn = await self.feeds.next_turn(TURN_EVENTS, timeout)
                msgs = turn[1] if turn is not None else []
                if not msgs and not self._held and not self._deferred:
                    self.metrics.projector_pending.set(0)
                await self.handle_batch(msgs)
        finally:
            await stop_tasks([index, maintain, watch, probe, refresh])
            await self._give_back_held()
            await self.feeds.close()

    async def _maintain(self) -> None:
        """Keep a feed open for every host with active runs, and say when one is not served."""
        loop = asyncio.get_running_loop()
        while True:
            self._maintain_now.clear()
            try:
                await self.feeds.maintain(self._wanted_hosts(), loop.time())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug must not stop the projector: report it, go on
                log.exception("projector: keeping host feeds failed")
                self.health.trouble("projector_pull", f"the projector cannot keep its feeds ({exc!r})")
            unserved = self.feeds.unserved()
            if unserved is not None and unserved[1] >= UNHEALTHY_AFTER:
                host, seconds, problem = unserved
                self.health.trouble(
                    "projector_pull",
                    f"the projector's consumer for host {host[:16]}... is not served "
                    f"({problem}, {seconds:.1f} s)",
                )
            elif unserved is None:
                self.health.fine("projector_pull")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._maintain_now.wait(), MAINTAIN_INTERVAL)

    async def _probe_streams(self) -> None:
        """Say when the run stream or the state bucket has no leader: no event can be stored then.

        Nothing else would notice: the daemons' publishes fail (they retry), and the projector
        only sees that no events come.
        """
        while True:
            try:
                await self.store.probe_streams()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.health.trouble("streams", f"the run streams do not answer (no leader?) ({exc!r})")
            else:
                self.health.fine("streams")
            await asyncio.sleep(PROBE_INTERVAL)

    def _wanted_hosts(self) -> dict[str, int]:
        """Hosts with active runs -> when their oldest active run was created (ms; now if unknown)."""
        now = self.now_ms()
        wanted: dict[str, int] = {}
        for host, runs in self.active.hosts.items():
            oldest = now
            for run_id in runs:
                cached = self._cache.get(run_id)
                if cached is not None:
                    oldest = min(oldest, cached[0].created_at)
                else:
                    oldest = min(oldest, self._created.get(run_id, now - int(LOOKBACK_UNKNOWN * 1000)))
            wanted[host] = oldest
        return wanted

    def run_created(self, state: RunState) -> None:
        """This instance just created a run: index it now (its bucket entry follows)."""
        self._created[state.run_id] = state.created_at
        while len(self._created) > CACHE_RUNS:
            self._created.pop(next(iter(self._created)))
        self.active.add(state.run_id, state.host_token)

    async def _give_back_held(self) -> None:
        for items in self._held.values():
            for item in items:
                await self._give_back(item)
        self._held.clear()
        for _, item in self._deferred:
            await self._give_back(item)
        self._deferred.clear()
        self._cache.clear()  # another instance may move runs on while this one restarts

    async def handle_batch(self, msgs: list[Msg]) -> None:
        """Apply a turn run by run in seq order, then whatever held events became applicable."""
        groups: dict[str, list[_Item]] = {}
        strays: dict[str, int] = {}
        now = asyncio.get_running_loop().time()
        for msg in msgs:
            parsed = _parse(msg, self.prefix)
            if parsed is None or not parsed[0]:
                self.metrics.uplink_events.inc(parsed[1] if parsed else 1, result="invalid")
                await self._ack(msg)
                continue
            items, invalid = parsed
            if invalid:
                self.metrics.uplink_events.inc(invalid, result="invalid")
            first = items[0]  # a message holds one run's events: one verdict for all of them
            owner = self.active.host_of(first.run_id)
            if owner != first.host_token:
                ended = self._ended.get(first.run_id)
                if ended == first.host_token:
                    for item in items:
                        await self._settle(item, "terminal")  # late events of an ended run of its own
                    continue
                if owner is not None or ended is not None:  # another host's run: a stray for sure
                    strays[first.host_token] = strays.get(first.host_token, 0) + len(items)
                    for item in items:
                        await self._settle(item, "stray")
                    continue
                # A run the index does not know (yet?): decided once a listing of the active runs
                # asked for after now is in (see _resolve_deferred); never dropped before.
                self._deferred.extend((now, item) for item in items)
                continue
            groups.setdefault(first.run_id, []).extend(items)
        if msgs:
            with contextlib.suppress(Exception):
                self.metrics.projector_pending.set(msgs[-1].metadata.num_pending or 0)
        for run_id, items in groups.items():
            await self._guarded(run_id, items)
        for run_id in list(self._held):
            held = self._held.pop(run_id)
            self._cache.pop(run_id, None)  # another instance may have moved the run on
            await self._guarded(run_id, held)
        for host, count in strays.items():
            await self.count_strays(host, count)
        await self._resolve_deferred()

    async def _resolve_deferred(self) -> None:
        """Decide the deferred events whose arrival a listing of the active runs has caught up with.

        Safe to drop without applying: a run not in a listing asked for after its event arrived
        is not active (its bucket entry is written before it is dispatched). A state read is
        spent on such runs within the host's budget, once per run (it tells an ended run of the
        host from another host's or a made-up one); beyond it they count as strays unread.
        """
        if not self._deferred:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        listed_at = self.active.listed_at
        waiting: list[tuple[float, _Item]] = []
        groups: dict[str, list[_Item]] = {}
        strays: dict[str, int] = {}
        looked_up: set[str] = set()
        for arrived, item in self._deferred:
            if arrived >= listed_at:
                if now - arrived >= self.hold_max:
                    await self._give_back(item, MAX_GAP_DELAY)  # no listing for that long: later
                    continue
                if now - item.touched >= TOUCH_INTERVAL:
                    item.touched = now
                    with contextlib.suppress(Exception):
                        await item.msg.in_progress()
                waiting.append((arrived, item))
                continue
            run_id, host = item.run_id, item.host_token
            owner = self.active.host_of(run_id)
            if owner == host or (
                owner is None
                and self._ended.get(run_id) is None
                and (run_id in looked_up or self._budget.allow(host, now))
            ):
                looked_up.add(run_id)
                groups.setdefault(run_id, []).append(item)  # applied, or judged on its state
            elif owner is None and self._ended.get(run_id) == host:
                await self._settle(item, "terminal")
            else:
                strays[host] = strays.get(host, 0) + 1
                await self._settle(item, "stray")
        self._deferred = waiting
        for run_id, items in groups.items():
            await self._guarded(run_id, items)
        for host, count in strays.items():
            await self.count_strays(host, count)

    async def _refresh_index(self) -> None:
        """While events wait for it, ask for a fresh listing of the active runs now and then."""
        while True:
            if self._deferred:
                try:
                    await self.active.refresh()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.debug("projector: cannot list the active runs (%r); retrying", exc)
                    await asyncio.sleep(ERROR_DELAY)
                    continue
                self.feeds.wake()
            await asyncio.sleep(REFRESH_INTERVAL)

    async def count_strays(self, host: str, count: int) -> None:
        """Count a host's events for runs it does not have; act once it is over its quota."""
        now = asyncio.get_running_loop().time()
        if not self._strays.add(host, now, count):
            return
        self._strays.reset(host)
        await self._over_quota(host)

    async def _over_quota(self, host: str) -> None:
        """The host published too many events for runs it does not have: purge, fail its runs."""
        self.metrics.quota_exceeded.inc()
        limit = self._strays.limit
        window = self._strays.window
        log.warning(
            "host %s... is over its quota: more than %d events for runs it does not have within %g s; "
            "its stored events are purged and its active runs fail as quota_exceeded",
            host[:16],
            limit,
            window,
            extra={"host_token": host},
        )
        reason = (
            f"the desktop published more than {limit} events for runs it does not have within "
            f"{window:g} s (RUNS_HOST_STRAY_EVENTS): its runs were stopped and its stored events purged"
        )
        now_ms = self.now_ms()
        for run_id in list(self.active.hosts.get(host, ())):
            written, _ = await self.store.modify(
                run_id,
                lambda state: terminate(
                    state, "failed", now_ms=now_ms, failure_kind="quota_exceeded", reason=reason
                ),
            )
            if written is not None:
                self.metrics.run_finished(written.status, written.failure_kind)
            self._run_ended(run_id, host)
        try:
            await self.store.purge_host_events(host)
        except Exception as exc:
            log.warning(
                "host %s...: cannot purge its events (%r); trying again on the next excess", host[:16], exc
            )

    def _run_ended(self, run_id: str, host: str) -> None:
        self._cache.pop(run_id, None)
        self.active.forget(run_id)
        self._ended[run_id] = host
        self._ended.move_to_end(run_id)
        while len(self._ended) > ENDED_RUNS:
            self._ended.popitem(last=False)

    async def _guarded(self, run_id: str, items: list[_Item]) -> None:
        try:
            await self._apply_group(run_id, sorted(items, key=lambda i: i.seq))
        except asyncio.CancelledError:
            raise
        except TRANSIENT_ERRORS as exc:
            self.metrics.projector_errors.inc(kind="apply")
            if self.health.ok:
                log.exception("projector: cannot apply events of run %s; they will be redelivered", run_id)
            self.health.trouble("projector_apply", f"the projector cannot write run state ({exc!r})")
            self._cache.pop(run_id, None)
            for item in items:
                await self._give_back(item, ERROR_DELAY)
        except Exception as exc:
            # Not NATS: something about these events. One alone, it is the poison; several, each
            # is tried alone so that only the one(s) raising are suspected.
            self._cache.pop(run_id, None)
            if len(items) == 1:
                await self._poisoned(run_id, items[0], exc)
            else:
                for item in sorted(items, key=lambda i: i.seq):
                    await self._guarded(run_id, [item])

    async def _poisoned(self, run_id: str, item: _Item, exc: BaseException) -> None:
        """``item``'s apply step raised: hand it back, or park it and fail its run."""
        self.metrics.projector_errors.inc(kind="poison")
        try:
            deliveries = int(item.msg.metadata.num_delivered or 1)
        except Exception:
            deliveries = 1
        if deliveries < MAX_POISON_DELIVERIES:
            log.warning(
                "run %s: applying event seq %s raised %r (delivery %d of %d before it is dead-lettered)",
                run_id,
                item.seq,
                exc,
                deliveries,
                MAX_POISON_DELIVERIES,
                extra={"run_id": run_id},
            )
            await self._give_back(item, POISON_DELAY)
            return
        try:
            await self._dead_letter(run_id, item, exc, deliveries)
        except TRANSIENT_ERRORS as error:
            log.warning("run %s: cannot park a dead letter (%r); it comes back", run_id, error)
            await self._give_back(item, ERROR_DELAY)

    async def _dead_letter(self, run_id: str, item: _Item, exc: BaseException, deliveries: int) -> None:
        msg = item.msg
        try:
            stream_seq = int(msg.metadata.sequence.stream)
        except Exception:
            stream_seq = 0
        now = self.now_ms()
        error = f"{type(exc).__name__}: {exc}"[:1000]
        record = {
            "runId": run_id,
            "hostToken": item.host_token,
            "subject": msg.subject,
            "streamSeq": stream_seq,
            "seq": item.seq,
            "deliveries": deliveries,
            "error": error,
            "storedAt": int(item.stream_time * 1000) if item.stream_time is not None else None,
            "deadAt": now,
            "data": msg.data[:DEAD_LETTER_DATA_MAX].decode("utf-8", "replace"),
            "truncated": len(msg.data) > DEAD_LETTER_DATA_MAX,
        }
        await self.store.put_dead_letter(run_id, stream_seq, record)
        log.error(
            "run %s: event seq %s (stream seq %d) raised on %d deliveries (%s); parked in the "
            "dead-letter bucket, the run fails as event_rejected",
            run_id,
            item.seq,
            stream_seq,
            deliveries,
            error,
            extra={"run_id": run_id},
        )
        reason = (
            f"event seq {item.seq} (stream seq {stream_seq}) could not be applied ({error}) after "
            f"{deliveries} deliveries; it is kept as a dead letter"
        )
        try:
            written, _ = await self.store.modify(
                run_id,
                lambda state: terminate(
                    state, "failed", now_ms=now, failure_kind="event_rejected", reason=reason
                ),
            )
        except TRANSIENT_ERRORS:
            raise
        except Exception:  # the run's state itself cannot be read: the letter is parked all the same
            log.exception("run %s: cannot fail the run after parking its dead letter", run_id)
            written = None
        if written is not None:
            self.metrics.run_finished(written.status, written.failure_kind)
        self.metrics.dead_letters.inc()  # counted once it is parked for good (a retry rewrites its key)
        self._run_ended(run_id, item.host_token)
        await self._settle(item, "dead_letter")

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
            if loaded is None and self.active.host_of(run_id) is not None:
                # The index says active, the read says no such run: a replica behind (seen right
                # after a node restart). Never drop on a stale read: hand them back for later.
                self.metrics.uplink_events.inc(len(items), result="stale_read")
                for item in items:
                    await self._give_back(item, MAX_GAP_DELAY)
                return
            if loaded is None:
                for item in items:
                    await self._settle(item, "unknown_run")
                await self.count_strays(items[0].host_token, len(items))
                return
            state, revision = loaded
            if state.terminal:
                self._run_ended(run_id, state.host_token)
            elif self.active.host_of(run_id) is None:
                self.active.add(run_id, state.host_token)  # the index had not seen it yet
            current = state
            applied: list[_Item] = []
            ignored: list[tuple[_Item, str]] = []
            early: list[_Item] = []
            kept: list[_Item] = []
            poison: list[tuple[_Item, Exception]] = []
            now = self.now_ms()
            # Judged by when JetStream stored the events: ones the desktop sent in time resume the
            # run even if this projector comes to them late.
            stored = [int(i.stream_time * 1000) for i in items if i.stream_time is not None]
            expired = resume_expired(current, min(stored, default=now))
            if expired:
                current = self._expire(current, now)
            for item in items:
                try:
                    decision, keep = self._decide(current, item, now)
                except Exception as exc:  # the event's own fault: see _poisoned
                    poison.append((item, exc))
                    continue
                if decision.outcome == "applied" and decision.state is not None:
                    current = decision.state
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
            if applied and not current.terminal and current.seq >= self.max_events_per_run:
                ended = terminate(
                    current,
                    "failed",
                    now_ms=now,
                    failure_kind="event_limit",
                    reason=f"the run published {current.seq} events, the most one run may "
                    f"(RUNS_MAX_EVENTS_PER_RUN); the stream refuses more of them",
                )
                current = ended if ended is not None else current
            if applied or expired:
                # Kept copies first (one idempotent write per run and turn), then the state that counts them.
                if kept:
                    await self.store.keep_events(run_id, [(i.seq, i.event) for i in kept])
                try:
                    new_revision = await self.store.write(current, revision)
                except Conflict:
                    self._cache.pop(run_id, None)
                    continue
                # Counted as soon as the write is in (a reader may see the new state already),
                # before the index's own write.
                if expired:
                    self.metrics.resume_expired.inc()
                    log.warning("run %s: events came after its resume window; failed desktop_lost", run_id)
                elif state.status == "stalled" and applied:
                    self.metrics.resumed.inc()
                    log.info("run %s resumed: its desktop's events flow again", run_id)
                if current.terminal:
                    self._run_ended(run_id, current.host_token)
                    self.metrics.run_finished(current.status, current.failure_kind)
                    await self.store.mark_inactive(run_id)
                else:
                    self._remember(current, new_revision)
                stream_time = applied[-1].stream_time if applied else None
                if stream_time is not None:
                    self.metrics.event_applied_at(stream_time)
                for item in applied:
                    await self._settle(item, "applied")
                self.health.fine("projector_apply")
            for item, outcome in ignored:
                await self._settle(item, outcome)
            wrong_host = sum(1 for _, outcome in ignored if outcome == "wrong_host")
            if wrong_host:
                await self.count_strays(items[0].host_token, wrong_host)
            await self._hold(run_id, early)
            for item, error in poison:
                await self._poisoned(run_id, item, error)
            return
        raise Conflict(f"{run_id}: too many concurrent writers")

    def _decide(self, state: RunState, item: _Item, now: int) -> tuple[Decision, bool]:
        """What ``item`` does to ``state``, and whether to keep it for export (pure; may raise)."""
        decision = apply_event(
            state,
            item.event,
            host_token=item.host_token,
            now_ms=now,
            event_time_ms=int(item.stream_time * 1000) if item.stream_time is not None else None,
        )
        if decision.outcome != "applied" or decision.state is None:
            return decision, False
        keep, after = keep_decision(decision.state, item.event, item.size, self.store.config.output_max_bytes)
        return Decision("applied", after), keep

    def _expire(self, state: RunState, now: int) -> RunState:
        """A stalled run past its resume window: failed desktop_lost, whatever events come now."""
        ended = terminate(
            state,
            "failed",
            now_ms=now,
            failure_kind="desktop_lost",
            reason="the desktop's events came back after the resume window (RUNS_RESUME_WINDOW_SECONDS) "
            "had passed; the run had failed as desktop_lost",
        )
        return ended if ended is not None else state

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
                await self._give_back(item, MAX_GAP_DELAY)
                continue
            if now - item.touched >= TOUCH_INTERVAL:
                item.touched = now
                with contextlib.suppress(Exception):
                    await item.msg.in_progress()
            keep.append(item)
        if keep:
            self._held.setdefault(run_id, []).extend(keep)

    async def _settle(self, item: _Item, outcome: str) -> None:
        """``item`` is decided; its message is acknowledged once all of its events are."""
        self.metrics.uplink_events.inc(result=outcome)
        delivery = item.delivery
        delivery.left -= 1
        if delivery.left <= 0 and not delivery.done:
            delivery.done = True
            await self._ack(delivery.msg)

    async def _give_back(self, item: _Item, delay: float | None = None) -> None:
        """Hand the item's message back to JetStream for redelivery (once per message)."""
        delivery = item.delivery
        if delivery.done:
            return
        delivery.done = True
        with contextlib.suppress(Exception):
            await delivery.msg.nak(delay=delay)

    async def _ack(self, msg: Msg) -> None:
        try:
            await msg.ack()
        except Exception as exc:  # it comes back after the ack wait; handling it again is harmless
            log.warning("projector: cannot ack %s: %s", msg.subject, exc)
