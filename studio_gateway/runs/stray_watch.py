"""Counts the run events of hosts without active runs, so a flood there is purged too.

Why: a host's events reach a projector only while the host has active runs (its
consumer exists only then, see :mod:`.host_feeds`). A desktop with no run that
publishes to made-up run ids costs the projector nothing, but its events would sit
in the shared stream until ``RUNS_STREAM_MAX_AGE_SECONDS``. This watch reads every
run event's *headers only* (no body, no acks) from one shared consumer that starts at
new events, at a bounded rate so a flood cannot take the gateway's time from other
work, and hands the events of hosts without active runs to the projector's stray
count (:meth:`.projector.Projector.count_strays`): over the quota, the host's stored
events are purged. Losing this consumer (its node died) loses only counts; it is
re-created starting at new events.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Final

import nats.js.errors
from nats.js import api

from contract.run_protocol import RUN_STREAM, parse_run_subject

from .pull_feed import PullFeed
from .store import RunStore

__all__ = ["ACCOUNTING_CONSUMER", "StrayWatch"]

log = logging.getLogger("studio_gateway.stray_watch")

ACCOUNTING_CONSUMER: Final = "LINK_RUNS_ACCOUNTING"
# At most this many headers per pass, and passes at most this often: <= 50,000 events/s.
PASS_EVENTS: Final = 1000
PASS_INTERVAL: Final = 0.02
EXPIRES: Final = 5.0
GIVE_UP: Final = 3.0
REOPEN_DELAY: Final = 1.0
INACTIVE: Final = 120.0


class StrayWatch:
    def __init__(
        self,
        store: RunStore,
        *,
        has_active_runs: Callable[[str], bool],
        count_strays: Callable[[str, int], Awaitable[None]],
    ) -> None:
        self.store = store
        self._has_active_runs = has_active_runs
        self._count_strays = count_strays

    async def _ensure_consumer(self) -> None:
        config = api.ConsumerConfig(
            name=ACCOUNTING_CONSUMER,
            durable_name=ACCOUNTING_CONSUMER,
            description="headers of every run event, for per-host quotas "
            "(studio_gateway/runs/stray_watch.py)",
            ack_policy=api.AckPolicy.NONE,
            deliver_policy=api.DeliverPolicy.NEW,
            headers_only=True,
            filter_subject=f"{self.store.prefix}.host.*.runs.*",
            max_waiting=512,
            mem_storage=True,
            num_replicas=1,
            inactive_threshold=INACTIVE,
        )
        try:
            await self.store.js.add_consumer(RUN_STREAM, config)
        except nats.js.errors.BadRequestError:
            await self.store.js.consumer_info(RUN_STREAM, ACCOUNTING_CONSUMER)  # exists as it is: fine

    async def run(self) -> None:
        """Count until cancelled; re-open the consumer after any failure."""
        while True:
            feed: PullFeed | None = None
            try:
                await self._ensure_consumer()
                feed = await PullFeed.open(
                    self.store.nc,
                    RUN_STREAM,
                    ACCOUNTING_CONSUMER,
                    batch=PASS_EVENTS,
                    expires=EXPIRES,
                    give_up_after=GIVE_UP,
                )
                while True:
                    msgs = await feed.fetch(PASS_EVENTS, EXPIRES)
                    counts: dict[str, int] = {}
                    for msg in msgs:
                        subject = parse_run_subject(msg.subject, self.store.prefix)
                        if subject is not None and not self._has_active_runs(subject.host_token):
                            counts[subject.host_token] = counts.get(subject.host_token, 0) + 1
                    for host, count in counts.items():
                        await self._count_strays(host, count)
                    await asyncio.sleep(PASS_INTERVAL)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("stray watch: %r; re-opening", exc)
            finally:
                if feed is not None:
                    await feed.unsubscribe()
            await asyncio.sleep(REOPEN_DELAY)
