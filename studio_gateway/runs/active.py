"""Which runs are active, and on which host, in every gateway instance's memory.

Why: the projector must tell in microseconds whether an event belongs to a run its
host really has, so that a desktop publishing to made-up run ids costs a set lookup,
not a key-value read (see docs/runs.md, "Tenants"); and it pulls events host by host,
so it must know which hosts have runs at all.

The source of truth is the ``LINK_RUN_ACTIVE`` bucket (one key per active run, the
value its host token; only gateways write it). This index reads the bucket's stream
with an :class:`~.store.EventReader` (replay, then live) and re-opens it after
its checkpoint when the reader fails (a node died). Removals are purges, which a
reader does not see, so they come from this instance's own writes (:meth:`forget`)
and from a periodic comparison with the bucket's key listing (:meth:`refresh`).
A stale entry only costs the slow path (a state read) for an ended run's events.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Final

from nats.aio.msg import Msg

from .store import ACTIVE_BUCKET, EventReader, RunStore

__all__ = ["ActiveRuns"]

log = logging.getLogger("studio_gateway.active_runs")

RECONCILE_INTERVAL: Final = 5.0
REOPEN_DELAY: Final = 0.5
READ_BATCH: Final = 256
READ_POLL: Final = 1.0
# Values written before the host token was stored there (older gateways).
_LEGACY_VALUE: Final = b"1"


class ActiveRuns:
    """run id -> host token for every active run; ``hosts`` groups them by host."""

    def __init__(self, store: RunStore, *, on_change: Callable[[], None] | None = None) -> None:
        self.store = store
        self.runs: dict[str, str] = {}
        self.hosts: dict[str, set[str]] = {}
        self._on_change = on_change or (lambda: None)
        self._checkpoint = 0  # stream sequence after the last entry read
        self._added_at: dict[str, float] = {}  # when each run entered the index (loop time)
        # When the listing last applied by refresh() was asked for (loop time): every run that was
        # active then is in the index (or ended since).
        self.listed_at = -1.0

    # ------------------------------------------------------------------ lookups and local writes

    def host_of(self, run_id: str) -> str | None:
        return self.runs.get(run_id)

    def add(self, run_id: str, host_token: str) -> None:
        if self.runs.get(run_id) == host_token:
            return
        self.forget(run_id)
        self.runs[run_id] = host_token
        self.hosts.setdefault(host_token, set()).add(run_id)
        self._added_at[run_id] = asyncio.get_running_loop().time()
        self._on_change()

    def forget(self, run_id: str) -> None:
        host = self.runs.pop(run_id, None)
        self._added_at.pop(run_id, None)
        if host is None:
            return
        runs = self.hosts.get(host)
        if runs is not None:
            runs.discard(run_id)
            if not runs:
                del self.hosts[host]
        self._on_change()

    # ------------------------------------------------------------------ keeping up with the bucket

    async def run(self) -> None:
        """Follow the bucket until cancelled; reconcile with its key listing now and then."""
        reconcile = asyncio.get_running_loop().create_task(
            self._reconcile_loop(), name="active-runs-reconcile"
        )
        try:
            while True:
                try:
                    reader = await EventReader.open(
                        self.store.nc,
                        self.store.js,
                        f"KV_{ACTIVE_BUCKET}",
                        f"$KV.{ACTIVE_BUCKET}.>",
                        start_seq=self._checkpoint,
                    )
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.debug("active runs: cannot open the bucket's reader (%r); retrying", exc)
                    await asyncio.sleep(REOPEN_DELAY)
                    continue
                try:
                    await self._follow(reader)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.debug("active runs: reading the bucket failed (%r); re-opening", exc)
                finally:
                    await reader.close()
                await asyncio.sleep(REOPEN_DELAY)
        finally:
            reconcile.cancel()

    async def _follow(self, reader: EventReader) -> None:
        while True:
            for msg in await reader.fetch(READ_BATCH, READ_POLL):
                await self._apply(msg)
                self._checkpoint = msg.metadata.sequence.stream + 1

    async def _apply(self, msg: Msg) -> None:
        run_id = msg.subject[len(f"$KV.{ACTIVE_BUCKET}.") :]
        operation = (msg.headers or {}).get("KV-Operation")
        if operation in ("DEL", "PURGE"):
            self.forget(run_id)
            return
        host = msg.data.decode(errors="replace") if msg.data and msg.data != _LEGACY_VALUE else None
        if host is None:
            loaded = await self.store.load(run_id)
            if loaded is None or loaded[0].terminal:
                return
            host = loaded[0].host_token
        self.add(run_id, host)

    async def _reconcile_loop(self) -> None:
        while True:
            await asyncio.sleep(RECONCILE_INTERVAL)
            try:
                await self.refresh()  # forgets runs the bucket no longer lists (ended: purged)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("active runs: cannot list the bucket (%r)", exc)

    async def refresh(self) -> None:
        """Bring the index to the bucket's listing, asked for now: afterwards every run active
        at the time of the call is in the index (``listed_at`` says since when that holds).

        The projector relies on it before it drops an event of a run the index does not know:
        the run's bucket entry is written before the run is dispatched, so a listing asked for
        after the event arrived shows the run if it is active.
        """
        loop = asyncio.get_running_loop()
        asked_at = loop.time()
        listed = set(await self.store.active_ids())
        for run_id in [r for r in self.runs if r not in listed and self._added_at.get(r, 0.0) < asked_at]:
            self.forget(run_id)
        for run_id in listed - self.runs.keys():
            loaded = await self.store.load(run_id)
            if loaded is not None and not loaded[0].terminal:
                self.add(run_id, loaded[0].host_token)
        self.listed_at = max(self.listed_at, asked_at)
