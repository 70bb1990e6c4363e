"""Subscriptions whose messages are handled in nats-py's read loop, with no queue and no task hop.

A nats-py subscription with a callback puts each message on an ``asyncio.Queue`` that a
task of its own drains: one queue round trip and one event-loop pass per message before
our code sees it. nats-py's own ``request()`` avoids that by resolving a future in its read
loop. The tunnel's reply frames need no more than that: decoding a frame and updating a
stream is synchronous work of a few microseconds, and what must wait (a publish) is handed
to a task. So the caller's reply subscriptions and the server's start and up (request-body)
subscriptions deliver each message to a plain function, called where nats-py would have queued it.

nats-py has no public call for this. The one private detail used is the subscription's
``_pending_queue``: a subscription made without a callback starts no task and only ever
``put_nowait``\\s into that queue (its iterator reads it, and we never iterate), so putting
an object with the queue's methods in its place is all it takes. If a nats-py release
changes this, :func:`subscribe_direct` notices and falls back to an ordinary callback.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription

__all__ = ["subscribe_direct"]

log = logging.getLogger("tunnel")

Deliver = Callable[["Msg"], None]


class _DirectDelivery:
    """Stands where the subscription's pending queue was: hands each message on at once."""

    __slots__ = ("_deliver", "_sub")

    def __init__(self, sub: Subscription, deliver: Deliver) -> None:
        self._sub = sub
        self._deliver = deliver

    def put_nowait(self, msg: Msg) -> None:
        # nats-py counted the payload as pending before handing it over; it is handled now.
        self._sub._pending_size -= len(msg.data)
        try:
            self._deliver(msg)
        except Exception:  # never let a bug of ours stop nats-py's read loop
            log.exception("handling a message on %s failed", msg.subject)

    # What nats-py asks of a pending queue elsewhere (drain, unsubscribe, pending counts).
    def qsize(self) -> int:
        return 0

    def empty(self) -> bool:
        return True

    def full(self) -> bool:
        return False

    def task_done(self) -> None:
        return None

    async def join(self) -> None:
        return None


async def subscribe_direct(nc: NATS, subject: str, deliver: Deliver, *, queue: str = "") -> Subscription:
    """Subscribe ``subject`` (in queue group ``queue``) with ``deliver`` called for each message
    in nats-py's read loop.

    ``deliver`` must not block; it may schedule tasks.
    """
    sub = await nc.subscribe(subject, queue=queue)  # no callback: nats-py starts no task for it
    pending: Any = getattr(sub, "_pending_queue", None)
    if not isinstance(pending, asyncio.Queue) or not hasattr(sub, "_pending_size"):
        await sub.unsubscribe()
        return await nc.subscribe(subject, queue=queue, cb=_as_callback(deliver))
    sub._pending_queue = _DirectDelivery(sub, deliver)  # type: ignore[assignment]
    while not pending.empty():  # anything that arrived before the swap, in order
        msg = pending.get_nowait()
        sub._pending_size -= len(msg.data)
        deliver(msg)
    return sub


def _as_callback(deliver: Deliver) -> Callable[[Msg], Any]:
    async def callback(msg: Msg) -> None:
        deliver(msg)

    return callback


def is_direct(sub: Subscription) -> bool:
    """Whether ``sub`` hands its messages on in nats-py's read loop (none waits in a queue)."""
    return isinstance(getattr(sub, "_pending_queue", None), _DirectDelivery)
