"""Publishing, lazy per-stream timers and the one place nats-py errors are mapped."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any

from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError

from .._errors import TunnelConnectionError
from .._stream import Publish

log = logging.getLogger("tunnel")

#: Test-only fault hook: sees every outgoing frame and returns what to send instead.
WireTap = Callable[[Publish], Iterable[Publish]]


def map_nats_error(exc: BaseException) -> TunnelConnectionError:
    """nats-py failures while publishing or subscribing become one typed error."""
    name = type(exc).__name__
    return TunnelConnectionError(f"NATS connection failed ({name}: {exc})")


class Publisher:
    """Sends ``Publish`` values on one connection, through the optional wire tap."""

    def __init__(self, nc: NATS, tap: WireTap | None = None) -> None:
        self.nc = nc
        self.tap = tap
        self._background: set[asyncio.Task[None]] = set()

    async def send(self, pub: Publish) -> None:
        pubs: Iterable[Publish] = (pub,) if self.tap is None else self.tap(pub)
        try:
            for p in pubs:
                await self.nc.publish(p.subject, p.payload, reply=p.reply)
        except (NatsError, OSError) as exc:
            raise map_nats_error(exc) from exc

    async def send_all(self, pubs: Iterable[Publish]) -> None:
        for pub in pubs:
            await self.send(pub)

    def send_soon(self, pubs: Iterable[Publish]) -> None:
        """From synchronous code (timer callbacks): send in a task, log failures."""
        batch = list(pubs)
        if not batch:
            return
        task = asyncio.get_running_loop().create_task(self._send_logged(batch))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _send_logged(self, batch: list[Publish]) -> None:
        try:
            await self.send_all(batch)
        except TunnelConnectionError as exc:
            log.debug("background publish failed: %s", exc)


class LazyTimer:
    """One event-loop timer per stream.

    Deadlines move on every frame (idle timeout), so instead of rescheduling each
    time, the timer fires at the old deadline, ``on_fire`` re-checks the data and
    returns the next deadline, and the timer re-arms itself there.
    """

    __slots__ = ("_handle", "_loop", "_on_fire")

    def __init__(self, loop: asyncio.AbstractEventLoop, on_fire: Callable[[], float | None]) -> None:
        self._loop = loop
        self._on_fire = on_fire
        self._handle: asyncio.TimerHandle | None = None

    def arm(self, when: float | None) -> None:
        """Make sure the timer fires no later than ``when``."""
        if when is None:
            return
        if self._handle is not None:
            if self._handle.when() <= when:
                return
            self._handle.cancel()
        self._handle = self._loop.call_at(when, self._fire)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        self.arm(self._on_fire())


def status_of(msg: Any) -> str | None:
    """The NATS status header of a message (503 = no responders), if any."""
    headers = msg.headers
    if not headers:
        return None
    status = headers.get("Status")
    return status if isinstance(status, str) else None
