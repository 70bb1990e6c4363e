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
from .feed import consumer_name, ensure_consumer
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
                    self.subject,
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
