"""The inspector's memory: the most recent exchanges in a bounded ring, and who is watching.

:meth:`Recorder.observe` is a ``linkd.traffic`` observer: called synchronously on the
request path, so it only files a reference and wakes the watchers (no rendering, no I/O).
Memory is bounded by ``size`` x (the traffic record's capture cap x 2): the oldest entry
goes when a new one comes.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from .views import ExchangeLike, Filter

__all__ = ["DEFAULT_SIZE", "Entry", "Recorder", "Watcher"]

DEFAULT_SIZE: Final = 200
# A watcher (the page's stream, `linkctl inspect`) this far behind is dropped, not waited for.
WATCH_BACKLOG: Final = 1000


@dataclass(slots=True)
class Entry:
    exchange: ExchangeLike
    replay_of: str | None = None


class Watcher:
    """Ids of exchanges that started, got their response or finished, in order; ``None``: overrun."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[str | None] = asyncio.Queue(WATCH_BACKLOG)
        self.overrun = False

    def push(self, exchange_id: str) -> None:
        if self.overrun:
            return
        try:
            self.queue.put_nowait(exchange_id)
        except asyncio.QueueFull:
            self.overrun = True
            self.queue.get_nowait()
            self.queue.put_nowait(None)


class Recorder:
    def __init__(self, size: int = DEFAULT_SIZE) -> None:
        if size < 1:
            raise ValueError("the inspector keeps at least one request")
        self.size = size
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._watchers: set[Watcher] = set()
        self._replays = itertools.count(1)

    def __len__(self) -> int:
        return len(self._entries)

    def observe(self, event: str, exchange: ExchangeLike) -> None:
        """The traffic observer: keep (a reference to) the exchange, tell the watchers."""
        entries = self._entries
        if exchange.id not in entries:
            entries[exchange.id] = Entry(exchange)
            if len(entries) > self.size:
                entries.popitem(last=False)
        for watcher in self._watchers:
            watcher.push(exchange.id)

    def add_replay(self, exchange: ExchangeLike, replay_of: str) -> None:
        self._entries[exchange.id] = Entry(exchange, replay_of)
        if len(self._entries) > self.size:
            self._entries.popitem(last=False)
        for watcher in self._watchers:
            watcher.push(exchange.id)

    def next_replay_id(self) -> str:
        return f"replay-{next(self._replays)}"

    def get(self, exchange_id: str) -> Entry | None:
        return self._entries.get(exchange_id)

    def newest(self, where: Filter | None = None, limit: int | None = None) -> Iterator[Entry]:
        """Newest first, those ``where`` matches, at most ``limit``."""
        count = 0
        for entry in reversed(self._entries.values()):
            if limit is not None and count >= limit:
                return
            if where is None or where.matches(entry.exchange):
                count += 1
                yield entry

    def watch(self) -> Watcher:
        watcher = Watcher()
        self._watchers.add(watcher)
        return watcher

    def unwatch(self, watcher: Watcher) -> None:
        self._watchers.discard(watcher)
