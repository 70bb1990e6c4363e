"""Which hosts take compact ``request.start`` frames, as one client has seen (sans-IO).

A server says so in its ack (``binaryStart``) and in each compact ``response.whole`` head;
a first contact always sends JSON, so its ack teaches the client before any compact start
goes out. Two daemons of different versions may share a host's queue group for a while (an
upgrade), and an older one drops a compact start without a word: the caller then republishes
it as JSON after the usual second, and this host gets JSON starts for a cooldown.

Batches of compact starts (``startBatches``) are learnt from acks alone (a ``response.whole``
does not say) and kept while the host takes compact starts: what ends those ends them too.
"""

from __future__ import annotations

from ._config import COMPACT_START_COOLDOWN


class CompactStarts:
    """Per host: may this client send compact starts? Bounded (cleared when full), like the
    client's other host caches."""

    def __init__(self, limit: int, cooldown: float = COMPACT_START_COOLDOWN) -> None:
        self.limit = limit
        self.cooldown = cooldown
        self._takes: set[str] = set()
        self._batches: set[str] = set()
        self._refused_until: dict[str, float] = {}

    def use(self, host: str) -> bool:
        return host in self._takes

    def batch(self, host: str) -> bool:
        """May starts to ``host`` go several to a message?"""
        return host in self._batches

    def learn(self, host: str, takes: bool, now: float, batches: bool | None = None) -> None:
        """A server of ``host`` answered: ``takes`` is what its first frame said about compact
        starts, ``batches`` what an ack said about batches of them (None: nothing)."""
        if not takes:
            self._takes.discard(host)
            self._batches.discard(host)
            return
        until = self._refused_until.get(host)
        if until is not None:
            if now < until:
                return
            del self._refused_until[host]
        if host not in self._takes:
            if len(self._takes) >= self.limit:
                self._takes.clear()
                self._batches.clear()
            self._takes.add(host)
        if batches is True:
            self._batches.add(host)
        elif batches is False:
            self._batches.discard(host)

    def unanswered(self, host: str, now: float) -> None:
        """A compact start to ``host`` got no frame within the republish interval."""
        self._takes.discard(host)
        self._batches.discard(host)
        if len(self._refused_until) >= self.limit:
            self._refused_until.clear()
        self._refused_until[host] = now + self.cooldown


__all__ = ["CompactStarts"]
