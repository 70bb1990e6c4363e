"""Runs one :class:`~.base.Processor` on this gateway instance: pull, parse, handle, acknowledge.

Every instance runs every processor on the same durable consumer (:mod:`.feed`), so they share
the work. Per message (one or several events of one run): each event of a wanted type is
handled in order; all handled -> acknowledged. A :class:`~.anchors.RetryLater` (e.g.
:class:`~.anchors.AnchorBusy`: another instance is performing that effect) hands the message
back for its ``retry_in``, and so does a NATS or JetStream failure (after 1 s); any other
exception hands it back with a backoff (0.2 s doubling to 10 s) and is counted, and after
``MAX_DELIVERIES`` deliveries the message is terminated (logged, counted as ``poison``): one bad
event must not hold a processor back for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Final

import nats.errors
from nats.aio.msg import Msg

from contract.run_protocol import RUN_STREAM, RunSubject, parse_event, parse_run_subject, split_events

from ..pull_feed import ConsumerGone, PullFeed, stored_at
from .anchors import RetryLater
from .base import Processor, RunEvent
from .context import ProcessorContext
from .feed import (
    consumer_filters,
    consumer_name,
    ensure_consumer,
    no_host_subject,
    set_consumer_filters,
)
from .metrics import ProcessorMetrics

__all__ = ["MAX_DELIVERIES", "ProcessorRunner"]

log = logging.getLogger("studio_gateway.processors")

BATCH: Final = 64
EXPIRES: Final = 2.0
GIVE_UP: Final = 10.0
FETCH_TIMEOUT: Final = 1.0
MAX_DELIVERIES: Final = 20
REOPEN_DELAY: Final = (0.2, 5.0)
NATS_RETRY: Final = 1.0
# Dynamic filters (Processor.subject_filters): the consumer's are compared this often, and a subject
# no longer wanted is removed this long after this instance last wanted it (or first saw it in the
# consumer's filters): an instance whose view lags by milliseconds never removes what another added.
FILTER_CHECK: Final = 5.0
FILTER_GRACE: Final = 30.0


class ProcessorRunner:
    def __init__(
        self,
        processor: Processor,
        ctx: ProcessorContext,
        *,
        prefix: str,
        replicas: int,
        metrics: ProcessorMetrics | None = None,
    ) -> None:
        self.processor = processor
        self.ctx = ctx
        self.prefix = prefix
        self.replicas = replicas
        self.subject = processor.subject_filter or f"{prefix}.host.*.runs.*"
        self.handled = 0  # events handled by this instance
        self.errors: dict[str, int] = {}
        self.last_stored_at: float | None = None
        self.metrics = metrics
        self._wanted_at: dict[str, float] = {}  # dynamic filters: subject -> last time wanted here
        self._applied: list[str] | None = None
        self._next_check = 0.0
        self._filter_lock = asyncio.Lock()

    @property
    def name(self) -> str:
        return self.processor.name

    @property
    def consumer(self) -> str:
        return consumer_name(self.processor.name)

    def _error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        if self.metrics is not None:
            self.metrics.errors.inc(processor=self.name, kind=kind)

    async def lag(self) -> tuple[int, float]:
        """(events not yet acknowledged by any instance, age in s of the last one this one handled)."""
        info = await self.ctx.js.consumer_info(RUN_STREAM, self.consumer)
        pending = int(info.num_pending or 0) + int(info.num_ack_pending or 0)
        age = 0.0
        if pending and self.last_stored_at is not None:
            age = max(0.0, time.time() - self.last_stored_at)
        return pending, age

    async def run(self) -> None:
        delay = REOPEN_DELAY[0]
        await self.processor.start(self.ctx)
        while True:
            feed: PullFeed | None = None
            try:
                await ensure_consumer(
                    self.ctx.js,
                    self.processor.name,
                    self._initial_filters(),
                    replicas=self.replicas,
                    ack_wait=self.ctx.anchors.lease,
                    description=f"run processor {self.processor.name}",
                )
                feed = await PullFeed.open(
                    self.ctx.nc,
                    RUN_STREAM,
                    self.consumer,
                    batch=BATCH,
                    expires=EXPIRES,
                    give_up_after=GIVE_UP,
                )
                while True:
                    try:
                        await self.reconcile_filters()
                    except (nats.errors.Error, TimeoutError) as exc:  # the next round tries again
                        self._error("filters")
                        log.debug("processor %s: filters: %r", self.name, exc)
                    msgs = await feed.fetch(BATCH, FETCH_TIMEOUT)
                    if msgs:
                        await self._batch(msgs)
                        delay = REOPEN_DELAY[0]
            except asyncio.CancelledError:
                raise
            except ConsumerGone as exc:
                self._error("feed")
                log.warning("processor %s: feed lost (%s); reopening", self.name, exc)
            except Exception as exc:
                self._error("feed")
                log.warning("processor %s: %r; reopening in %.1f s", self.name, exc, delay)
            finally:
                if feed is not None:
                    with contextlib.suppress(Exception):
                        await feed.unsubscribe()
            await asyncio.sleep(delay)
            delay = min(delay * 2, REOPEN_DELAY[1])

    def _initial_filters(self) -> list[str]:
        wanted = self.processor.subject_filters(self.prefix)
        if wanted is None:
            return [self.subject]
        return sorted(wanted) or [no_host_subject(self.prefix)]

    async def reconcile_filters(self, *, now: bool = False) -> None:
        """Bring a dynamic consumer's filters in step with what the processor wants (see
        ``FILTER_GRACE``); cheap when nothing changed. ``now``: compare with the consumer at once."""
        wanted = self.processor.subject_filters(self.prefix)
        if wanted is None:
            return
        async with self._filter_lock:
            clock = asyncio.get_running_loop().time()
            for subject in wanted:
                self._wanted_at[subject] = clock
            desired = sorted(wanted)
            if not now and desired == self._applied and clock < self._next_check:
                return
            self._next_check = clock + FILTER_CHECK
            none = no_host_subject(self.prefix)
            current = [s for s in await consumer_filters(self.ctx.js, self.name) if s != none]
            for subject in current:
                self._wanted_at.setdefault(subject, clock)  # first seen: its grace starts now
            keep = {s for s in current if clock - self._wanted_at[s] < FILTER_GRACE}
            target = sorted(set(wanted) | keep) or [none]
            if sorted(current or [none]) != target:
                await set_consumer_filters(self.ctx.js, self.name, target)
                log.info("processor %s: now filtering %d subject(s)", self.name, len(target))
            self._applied = desired

    async def _batch(self, msgs: list[Msg]) -> None:
        """Messages of hosts the processor ignores are acknowledged unread; the rest handled at once."""
        wanted: list[tuple[Msg, RunSubject]] = []
        for msg in msgs:
            subject = parse_run_subject(msg.subject, self.prefix)
            if subject is None or not self.processor.wants_host(subject.host_token):
                await msg.ack()
            else:
                wanted.append((msg, subject))
        if len(wanted) == 1:
            await self._message(*wanted[0])
        elif wanted:
            await asyncio.gather(*(self._message(msg, subject) for msg, subject in wanted))

    async def _message(self, msg: Msg, subject: RunSubject) -> None:
        meta = msg.metadata
        when = stored_at(msg)
        try:
            for line in split_events(msg.data):
                event = _event(line, subject.host_token, subject.run_id, meta.sequence.stream, when)
                if event is None or not self.processor.wants(event.type):
                    continue
                await self.processor.handle(event, self.ctx)
                self.handled += 1
                if self.metrics is not None:
                    self.metrics.events.inc(processor=self.name)
        except RetryLater as later:
            await msg.nak(delay=max(0.1, later.retry_in))
            return
        except asyncio.CancelledError:
            raise
        except (nats.errors.Error, TimeoutError) as exc:
            # JetStream busy or away (a leader election, a lost connection): retried, never dropped.
            self._error("nats")
            log.debug("processor %s: stream seq %d: %r; retried", self.name, meta.sequence.stream, exc)
            with contextlib.suppress(Exception):
                await msg.nak(delay=NATS_RETRY)
            return
        except Exception as exc:
            delivered = int(meta.num_delivered or 1)
            if delivered >= MAX_DELIVERIES:
                self._error("poison")
                log.error(
                    "processor %s: stream seq %d failed %d times, dropped: %r",
                    self.name,
                    meta.sequence.stream,
                    delivered,
                    exc,
                )
                await msg.term()
                return
            self._error("handle")
            log.warning("processor %s: stream seq %d: %r; retried", self.name, meta.sequence.stream, exc)
            await msg.nak(delay=min(0.2 * 2 ** (delivered - 1), 10.0))
            return
        if when is not None:
            self.last_stored_at = when
        await msg.ack()


def _event(line: bytes, host: str, run_id: str, stream_seq: int, when: float | None) -> RunEvent | None:
    data = parse_event(line)
    if data is None or data.get("runId") != run_id:
        return None
    fence, seq, kind = data.get("fence"), data.get("seq"), data.get("type")
    if not isinstance(fence, int) or not isinstance(seq, int) or not isinstance(kind, str):
        return None
    return RunEvent(host, run_id, fence, seq, kind, data, stream_seq, when)
