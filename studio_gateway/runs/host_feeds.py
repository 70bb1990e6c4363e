"""The projector's inputs: one standing pull per host with active runs, served in turns.

Why per host: a single consumer over every host's events is one queue in arrival
order, so a desktop that publishes 250,000 events puts them all ahead of everybody
else's. Here each host with active runs has its own durable consumer
(:meth:`.store.RunStore.ensure_host_consumer`), each gateway instance keeps a
standing pull on each, and :meth:`HostFeeds.next_turn` hands out at most ``turn``
delivered events of one host at a time, round-robin over the hosts that have some:
another host's event waits for at most one turn per busy host, however deep a
flooding host's backlog is. A host without active runs has no consumer here at all,
so its publishes cost the projector nothing.

Faults: a feed that gives up (consumer deleted, or not served for ``PROJECTOR_GIVE_UP``,
e.g. its R1 node died or a leader election dragged on) is closed and its consumer
checked or re-created with a bounded backoff; :meth:`HostFeeds.unserved` says which
host has been waiting longest (``/healthz``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from nats.aio.msg import Msg

from .pull_feed import ConsumerGone, FeedUnavailable, PullFeed
from .store import RunStore

__all__ = ["HostFeeds"]

log = logging.getLogger("studio_gateway.host_feeds")

# A host's feed is kept this long after its last active run ended (late events, the next run).
IDLE_CLOSE: Final = 10.0
REOPEN_FIRST_DELAY: Final = 0.1
REOPEN_MAX_DELAY: Final = 5.0


@dataclass
class _Feed:
    host: str
    feed: PullFeed | None = None
    opening: asyncio.Task[None] | None = None
    reopen_at: float = 0.0
    delay: float = REOPEN_FIRST_DELAY
    idle_since: float | None = None
    problem: str = ""
    down_since: float | None = None  # no feed since then (failed, or not opened yet)


class HostFeeds:
    """Standing pulls on the consumers of the hosts in ``wanted()``; read with :meth:`next_turn`."""

    def __init__(
        self,
        store: RunStore,
        *,
        on_error: Callable[[str], None] | None = None,
        on_reopen: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self._feeds: dict[str, _Feed] = {}
        self._ready: deque[str] = deque()
        self._queued: set[str] = set()
        self._wake = asyncio.Event()
        self._on_error = on_error or (lambda kind: None)
        self._on_reopen = on_reopen or (lambda: None)

    # ------------------------------------------------------------------ the turns

    def wake(self) -> None:
        """End a :meth:`next_turn` wait now (the projector has deferred work to look at)."""
        self._wake.set()

    def _mark_ready(self, host: str) -> None:
        if host not in self._queued:
            self._queued.add(host)
            self._ready.append(host)
        self._wake.set()

    async def next_turn(self, turn: int, timeout: float) -> tuple[str, list[Msg]] | None:
        """(host, up to ``turn`` of its delivered events), in turns; None after ``timeout`` idle
        or when woken with nothing delivered (:meth:`wake`)."""
        if not self._ready:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            if not self._ready:
                return None
        host = self._ready.popleft()
        self._queued.discard(host)
        entry = self._feeds.get(host)
        if entry is None or entry.feed is None:
            return host, []
        msgs = entry.feed.take(turn)
        if entry.feed.buffered:
            self._mark_ready(host)  # the rest waits for the host's next turn
        else:
            await entry.feed.poke()  # ask for more now that the buffer is empty
        return host, msgs

    # ------------------------------------------------------------------ keeping feeds open

    def unserved(self) -> tuple[str, float, str] | None:
        """(host, seconds, problem) of the feed waiting longest for its consumer, or None."""
        worst: tuple[str, float, str] | None = None
        now = asyncio.get_running_loop().time()
        for entry in self._feeds.values():
            if entry.feed is not None:
                waited, problem = entry.feed.unavailable_for(), entry.feed.last_problem
            elif entry.down_since is not None:
                waited, problem = max(0.001, now - entry.down_since), entry.problem or "opening"
            else:
                continue
            if waited > 0 and (worst is None or waited > worst[1]):
                worst = (entry.host, waited, problem)
        return worst

    async def maintain(self, wanted: dict[str, int], now: float) -> None:
        """Open feeds for ``wanted`` hosts (host -> oldest active run's creation, ms), renew
        requests, re-open failed feeds, close feeds of hosts idle for ``IDLE_CLOSE``."""
        for host, since_ms in wanted.items():
            entry = self._feeds.get(host)
            if entry is None:
                entry = self._feeds[host] = _Feed(host, down_since=now)
            entry.idle_since = None
            if entry.feed is None and entry.opening is None and now >= entry.reopen_at:
                entry.opening = asyncio.get_running_loop().create_task(
                    self._open(entry, since_ms), name=f"host-feed-open-{host[:16]}"
                )
        for entry in list(self._feeds.values()):
            if entry.host not in wanted:
                entry.idle_since = entry.idle_since if entry.idle_since is not None else now
                if now - entry.idle_since >= IDLE_CLOSE and not self._busy(entry):
                    await self._close(entry)
                    continue
            feed = entry.feed
            if feed is None:
                continue
            try:
                feed.check()
            except ConsumerGone as exc:
                self._on_error("unavailable" if isinstance(exc, FeedUnavailable) else "consumer_gone")
                entry.problem = str(exc)
                await self._drop_feed(entry, now)
                continue
            await feed.poke()
            if feed.buffered:
                self._mark_ready(entry.host)

    def _busy(self, entry: _Feed) -> bool:
        return entry.feed is not None and entry.feed.buffered > 0

    async def _open(self, entry: _Feed, since_ms: int) -> None:
        try:
            await self.store.ensure_host_consumer(entry.host, since_ms=since_ms)
            feed = await self.store.host_feed(entry.host, on_ready=lambda: self._mark_ready(entry.host))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._on_error("open")
            entry.problem = f"cannot open the consumer of host {entry.host[:16]}... ({exc!r})"
            loop = asyncio.get_running_loop()
            entry.reopen_at = loop.time() + entry.delay
            entry.delay = min(entry.delay * 2, REOPEN_MAX_DELAY)
            return
        finally:
            entry.opening = None
        if entry.problem:
            self._on_reopen()
        entry.feed = feed
        entry.problem = ""
        entry.down_since = None
        entry.delay = REOPEN_FIRST_DELAY

    async def _drop_feed(self, entry: _Feed, now: float) -> None:
        feed, entry.feed = entry.feed, None
        entry.down_since = now
        entry.reopen_at = now + entry.delay
        entry.delay = min(entry.delay * 2, REOPEN_MAX_DELAY)
        if feed is not None:
            with contextlib.suppress(Exception):
                await feed.unsubscribe()

    async def _close(self, entry: _Feed) -> None:
        self._feeds.pop(entry.host, None)
        if entry.opening is not None:
            entry.opening.cancel()
        if entry.feed is not None:
            with contextlib.suppress(Exception):
                await entry.feed.unsubscribe()

    async def close(self) -> None:
        for entry in list(self._feeds.values()):
            await self._close(entry)
