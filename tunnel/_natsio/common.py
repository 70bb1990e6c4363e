"""Publishing, lazy per-stream timers and the one place nats-py errors are mapped."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeVar

from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from nats.errors import FlushTimeoutError

from .._errors import TunnelConnectionError
from .._events import Publish
from .direct import is_direct
from .direct_write import DirectWriter

log = logging.getLogger("tunnel")

#: Test-only fault hook: sees every outgoing frame and returns what to send instead.
WireTap = Callable[[Publish], Iterable[Publish]]
Owner = TypeVar("Owner")


def map_nats_error(exc: BaseException) -> TunnelConnectionError:
    """nats-py failures while publishing or subscribing become one typed error."""
    name = type(exc).__name__
    return TunnelConnectionError(f"NATS connection failed ({name}: {exc})")


async def flush_everything(nc: NATS, timeout: float = 10) -> None:
    """Return once NATS has processed every command ``nc`` sent so far (a SUB, a PUB).

    One ``nc.flush()`` does not promise that: nats-py writes the flush's PING straight to the
    socket, ahead of commands still in its buffer, so the PONG can come back before NATS has
    seen a SUB made just before. The first round trip gets those written (nats-py's flusher
    runs before a PONG can arrive); the second PING follows them.
    """
    await round_trip(nc, timeout)
    await round_trip(nc, timeout)


async def round_trip(nc: NATS, timeout: float = 10) -> None:
    """``nc.flush(timeout)`` (one PING and its PONG), except that giving up leaves nc working.

    nats-py's flush cancels its PONG's future when it times out or is cancelled, but leaves it
    queued: when that PONG comes after all, nats-py's read loop fails setting its result and
    stops, and the connection hears nothing more while it still looks connected. Here the
    future is only waited for, never cancelled, so a late PONG completes it harmlessly.
    Without the nats-py internals used (``_send_ping``, ``_reading_task``), it is ``flush``.
    """
    send_ping = getattr(nc, "_send_ping", None)
    reading = getattr(nc, "_reading_task", None)
    if send_ping is None or reading is None or reading.done() or nc.is_closed:
        await nc.flush(timeout)  # type: ignore[arg-type]  # (its errors, and its fallbacks)
        return
    pong: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    await send_ping(pong)
    done, _ = await asyncio.wait([pong], timeout=timeout)
    if not done:
        raise FlushTimeoutError


async def drain_subscription(nc: NATS, sub: Subscription) -> None:
    """``sub.drain()`` that keeps its promise: when it returns, NATS has processed the UNSUB
    and every message it delivered before was handed to the subscription's callback.

    nats-py's own drain sends the UNSUB and one flush, whose PING goes out ahead of the UNSUB
    (see :func:`flush_everything`). Its PONG can come back while NATS still delivers to the
    subscription: nats-py then drops those messages (it has forgotten the subscription), and
    NATS may route the next one to it after ``drain()`` returned. So the UNSUB goes first here,
    confirmed by :func:`flush_everything` (whatever NATS sent before it has reached nats-py by
    then). A direct subscription (:mod:`.direct`) has handled those already, in the read loop;
    any other has them in its queue, and its callback takes them first. Then the subscription
    is forgotten (NATS ignores a second UNSUB for a subscription it no longer has). No nats-py
    flush is involved: cut short, one would leave the connection deaf (see :func:`round_trip`).
    Without the nats-py internals used (``_send_unsubscribe``, ``_id``, ``_pending_queue``),
    it is nats-py's drain.
    """
    send_unsubscribe = getattr(nc, "_send_unsubscribe", None)
    sid = getattr(sub, "_id", None)
    queue = getattr(sub, "_pending_queue", None)
    if send_unsubscribe is None or not isinstance(sid, int) or queue is None or nc.is_closed:
        await sub.drain()  # type: ignore[no-untyped-call]
        return
    await send_unsubscribe(sid)
    await flush_everything(nc)
    if not is_direct(sub):
        await queue.join()  # every queued message through the subscription's callback
    await sub.unsubscribe()


class Publisher:
    """Sends ``Publish`` values on one connection, through the optional wire tap."""

    def __init__(self, nc: NATS, tap: WireTap | None = None) -> None:
        self.nc = nc
        self.tap = tap
        self._background: set[asyncio.Task[None]] = set()
        self._direct = DirectWriter.for_client(nc)

    async def send(self, pub: Publish) -> None:
        if self.tap is None:
            direct = self._direct
            if direct is not None and direct.try_write(pub.subject, pub.reply, pub.payload):
                return
            await self._publish(pub)
        else:
            for p in self.tap(pub):
                await self._publish(p)

    async def send_batched(
        self, pub: Publish, *, kind: int, key: str, label: str, owner: Owner, size_limit: int | None = None
    ) -> Owner:
        """Send a frame that may share one message with those sent just before it (a start
        batch or a reply batch, see ``direct_write``); returns the ``owner`` given with the
        first frame of that message (``owner`` itself when it went first or alone)."""
        direct = self._direct
        if self.tap is None and direct is not None:
            head = direct.try_write_batched(
                pub.subject,
                pub.reply,
                pub.payload,
                kind=kind,
                key=key,
                label=label,
                owner=owner,
                size_limit=size_limit,
            )
            if head is not None:
                return head
        await self.send(pub)
        return owner

    async def _publish(self, pub: Publish) -> None:
        """nats-py's publish, except that a cancellation is never lost in it.

        When its buffer is full, nats-py's publish waits for its flusher inside
        ``Client._flush_pending``, which swallows ``CancelledError``: the cancelled task would go
        on publishing as if nothing happened (an upload after its response ended, a handler
        after its caller left, an ``asyncio.timeout`` that never fires). A cancel request that
        arrived while publishing (``Task.cancelling()`` grew) is raised here instead.
        """
        task = asyncio.current_task()
        cancels = task.cancelling() if task is not None else 0
        try:
            await self.nc.publish(pub.subject, pub.payload, reply=pub.reply)
        except (NatsError, OSError) as exc:
            raise map_nats_error(exc) from exc
        if task is not None and task.cancelling() > cancels:
            raise asyncio.CancelledError("cancelled while nats-py was publishing")

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


# Granularity of the shared tick that arms per-stream timers: requests that finish
# within one tick (most small requests) never touch the event loop's timer heap.
TIMER_TICK = 0.01


class TimerOwner(Protocol):
    """A request whose timer TimerHub arms: ``timer`` may be created on first access."""

    released: bool

    @property
    def timer(self) -> LazyTimer: ...


class TimedRequest:
    """Base of a client or server request: its LazyTimer is created on first use.

    Subclasses set ``_loop``, ``released`` and ``_timer = None`` and define ``_on_timer``
    (fire: re-check the stream, return its next deadline).
    """

    _loop: asyncio.AbstractEventLoop
    _timer: LazyTimer | None
    released: bool

    def _on_timer(self) -> float | None:
        raise NotImplementedError

    @property
    def timer(self) -> LazyTimer:
        """Created on first use: most requests end before TimerHub's first tick needs it."""
        if self._timer is None:
            # After release, one that never fires (and holds no callback back to us).
            self._timer = LazyTimer(self._loop, _fires_no_more if self.released else self._on_timer)
            self._timer.cancelled = self.released  # as if release() had cancelled it
        return self._timer

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


class TimerHub:
    """Defers arming new streams' timers by up to one tick (costs each request a list append).

    It holds the requests, not their timers: a request that ends within the tick never
    even creates its LazyTimer (one object and one bound method less per request).
    """

    __slots__ = ("_handle", "_loop", "_young")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._young: list[tuple[TimerOwner, float]] = []
        self._handle: asyncio.TimerHandle | None = None

    def add(self, owner: TimerOwner, when: float | None) -> None:
        if when is None:
            return
        self._young.append((owner, when))
        if self._handle is None:
            self._handle = self._loop.call_later(TIMER_TICK, self._tick)

    def _tick(self) -> None:
        self._handle = None
        young, self._young = self._young, []
        for owner, when in young:
            if not owner.released:
                owner.timer.arm(when)


class LazyTimer:
    """One event-loop timer per stream.

    Deadlines move on every frame (idle timeout), so instead of rescheduling each
    time, the timer fires at the old deadline, ``on_fire`` re-checks the data and
    returns the next deadline, and the timer re-arms itself there.
    """

    __slots__ = ("_handle", "_loop", "_on_fire", "cancelled")

    def __init__(self, loop: asyncio.AbstractEventLoop, on_fire: Callable[[], float | None]) -> None:
        self._loop = loop
        self._on_fire = on_fire
        self._handle: asyncio.TimerHandle | None = None
        self.cancelled = False

    def arm(self, when: float | None) -> None:
        """Make sure the timer fires no later than ``when``."""
        if when is None or self.cancelled:
            return
        if self._handle is not None:
            if self._handle.when() <= when:
                return
            self._handle.cancel()
        self._handle = self._loop.call_at(when, self._fire)

    def cancel(self) -> None:
        self.cancelled = True
        self._on_fire = _fires_no_more  # the callback's owner holds this timer: break the cycle
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        self.arm(self._on_fire())


def _fires_no_more() -> None:
    """A cancelled timer's callback."""
    return None


def status_of(msg: Any) -> str | None:
    """The NATS status header of a message (503 = no responders), if any."""
    headers = msg.headers
    if not headers:
        return None
    status = headers.get("Status")
    return status if isinstance(status, str) else None


def permission_refused(error: Exception | None, before: Exception | None, what: str, subject: str) -> bool:
    """Whether ``error`` (the connection's ``last_error``, which was ``before``) is NATS refusing
    ``what`` (``"publish to"``, ``"subscription to"``) a subject that contains ``subject``."""
    if error is None or error is before:
        return False
    text = str(error).lower()
    return "permissions violation" in text and what in text and subject.lower() in text
