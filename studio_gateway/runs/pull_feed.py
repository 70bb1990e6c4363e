"""A JetStream pull consumer with a standing pull request: each message arrives when it is stored.

Why not nats-py's ``PullSubscription.fetch``: every call is a new pull request (a round
trip), and once it had to wait it lingers until the batch is full or the timeout passed,
so a caller either polls with short timeouts (a delay per event) or waits for nothing.
Here one request for ``batch`` messages (expiring after ``expires``) stays open on the
server; the server pushes each message into it as soon as it is stored, and a new request
goes out when the old one is used up, expired (JetStream answers 408) or lost (a local
deadline, e.g. after a reconnect). At most ``batch`` delivered messages wait here unread,
so a slow reader stays bounded; the consumer's own semantics (acks, ordering, redelivery)
are unchanged: this only decides when to ask.

Faults, as a NATS cluster shows them (see docs/runs.md, "On a NATS cluster"):

- ``503`` (no responders): nobody serves the consumer right now. After its leader's node
  died a replicated consumer answers 503 for ~5-8 s until a new leader is elected, then
  serves again; an R1 consumer whose node died never comes back. So a 503 is *not* taken
  as "gone": the feed asks again with a bounded backoff and counts how long it has been
  unavailable (:meth:`PullFeed.unavailable_for`). Only when that exceeds the owner's
  ``give_up_after`` does :meth:`PullFeed.fetch` raise :class:`FeedUnavailable`, and the
  owner decides (re-create the consumer, open another feed). A request that gets no answer
  at all (the connection is away) counts the same way.
- ``409 Consumer Deleted``: gone for good; :class:`ConsumerGone` at once.
- ``409`` for anything else (too many waiting requests, leadership change): asked again soon.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from collections.abc import Callable
from typing import Final

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

__all__ = ["ConsumerGone", "FeedUnavailable", "PullFeed", "stored_at"]

# A request JetStream did not answer this long after its expiry is taken as lost.
LOST_MARGIN: Final = 0.5
# After a refused request (e.g. too many waiting requests): ask again after this.
RETRY_DELAY: Final = 0.1
# While nobody serves the consumer (503): ask again after this, doubling up to the max.
UNAVAILABLE_FIRST_DELAY: Final = 0.05
UNAVAILABLE_MAX_DELAY: Final = 1.0


def stored_at(msg: Msg) -> float | None:
    """When JetStream stored a delivered message (Unix seconds), read straight off its ack subject.

    Why not ``msg.metadata.timestamp``: that builds several objects and a datetime per
    message, a measurable share of the projector's time. The ack subject is
    ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ns>.<pending>`` (9 tokens), or
    with a domain and an account hash in front (12 tokens, 2.9+ servers may send it).
    """
    reply = msg.reply
    if not reply:
        return None
    tokens = reply.split(".")
    index = 7 if len(tokens) == 9 else 9 if len(tokens) >= 11 else -1
    if index < 0 or not tokens[index].isdigit():
        return None
    return int(tokens[index]) / 1e9


class ConsumerGone(Exception):
    """The consumer no longer exists (deleted, or its stream is gone): open a new one."""


class FeedUnavailable(ConsumerGone):
    """Nobody served the consumer for longer than the feed's ``give_up_after``.

    It may still come back (a leader election that takes long) or never (an R1 consumer
    on a dead node); either way its owner should check or re-create it and open a new feed.
    """


class PullFeed:
    """Messages of one pull consumer, pushed into a standing request; read with :meth:`fetch`."""

    def __init__(
        self,
        nc: NATS,
        stream: str,
        consumer: str,
        *,
        batch: int,
        expires: float,
        give_up_after: float | None = None,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self._nc = nc
        # Called when a message is queued (a scheduler waiting on many feeds at once).
        self._on_ready = on_ready
        self._subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._batch = batch
        self._expires = expires
        self._give_up_after = give_up_after
        self._inbox = nc.new_inbox()
        self._sub: Subscription | None = None
        self._queue: deque[Msg] = deque()
        self._ready = asyncio.Event()
        self._left = 0  # messages the standing request may still bring
        self._check_at = 0.0  # when the standing request counts as lost
        self._retry_at = 0.0  # no new request before this (after a refusal or a 503)
        self._unavailable_since: float | None = None
        self._unavailable_delay = UNAVAILABLE_FIRST_DELAY
        self.last_problem = ""  # what the server said last time it did not serve (for logs)
        self._error: Exception | None = None
        self._closed = False

    @classmethod
    async def open(
        cls,
        nc: NATS,
        stream: str,
        consumer: str,
        *,
        batch: int,
        expires: float,
        give_up_after: float | None = None,
        on_ready: Callable[[], None] | None = None,
    ) -> PullFeed:
        feed = cls(
            nc, stream, consumer, batch=batch, expires=expires, give_up_after=give_up_after, on_ready=on_ready
        )
        feed._sub = await nc.subscribe(feed._inbox, cb=feed._on_message)
        await feed._request_if_due()
        return feed

    # ------------------------------------------------------------------ health

    def unavailable_for(self) -> float:
        """Seconds since the consumer last served this feed without a break; 0 while it does."""
        if self._unavailable_since is None:
            return 0.0
        return asyncio.get_running_loop().time() - self._unavailable_since

    def _served(self) -> None:
        self._unavailable_since = None
        self._unavailable_delay = UNAVAILABLE_FIRST_DELAY

    def _not_served(self, problem: str) -> None:
        now = asyncio.get_running_loop().time()
        if self._unavailable_since is None:
            self._unavailable_since = now
        self.last_problem = problem
        self._left = 0
        self._retry_at = now + self._unavailable_delay
        self._unavailable_delay = min(self._unavailable_delay * 2, UNAVAILABLE_MAX_DELAY)

    # ------------------------------------------------------------------ messages in

    async def _on_message(self, msg: Msg) -> None:
        status = msg.headers.get("Status") if msg.headers else None
        if not status:
            self._served()
            self._queue.append(msg)
            self._left -= 1
            self._ready.set()
            if self._on_ready is not None:
                self._on_ready()
            if self._left <= 0:
                await self._request_if_due()
            return
        if status == "100":  # heartbeat or flow control: nothing to do
            return
        description = (msg.headers or {}).get("Description", "")
        if status in ("404", "408"):  # no messages / the request expired: ask again
            self._served()
            self._left = 0
            await self._request_if_due()
            return
        if status == "409" and "deleted" not in description.lower():
            # Refused or cut short (too many waiting requests, leadership change): retry soon.
            self._left = 0
            self._retry_at = asyncio.get_running_loop().time() + RETRY_DELAY
        elif status == "503":
            self._not_served(f"503 {description}".strip())
        else:  # 409 Consumer Deleted, anything unexpected
            self._error = ConsumerGone(f"{self._subject}: {status} {description}".strip())
        self._ready.set()

    async def _request_if_due(self) -> None:
        """Open a new pull request unless one is standing or enough is buffered already."""
        if self._closed or self._error is not None:
            return
        now = asyncio.get_running_loop().time()
        if self._left > 0:
            if now < self._check_at:
                return  # a request is standing
            # Nothing answered it (the connection was away, the server lost it): a request
            # unanswered that long counts as not served, like a 503.
            self._not_served("a pull request went unanswered")
            self._retry_at = now  # but ask again right away
        if now < self._retry_at or len(self._queue) >= self._batch:
            return  # backing off after a refusal, or enough is waiting to be read
        request = {"batch": self._batch, "expires": int(self._expires * 1_000_000_000)}
        self._left = self._batch
        self._check_at = now + self._expires + LOST_MARGIN
        await self._nc.publish(self._subject, json.dumps(request).encode(), reply=self._inbox)

    # ------------------------------------------------------------------ reading

    @property
    def buffered(self) -> int:
        """Messages delivered and not read yet."""
        return len(self._queue)

    async def poke(self) -> None:
        """Renew a lost or refused request of a feed nobody is reading right now."""
        await self._request_if_due()

    def take(self, batch: int) -> list[Msg]:
        """Up to ``batch`` of the messages delivered already, without waiting (see :meth:`poke`)."""
        out = [self._queue.popleft() for _ in range(min(batch, len(self._queue)))]
        if not self._queue:
            self._ready.clear()
        return out

    def check(self) -> None:
        """Raise what :meth:`fetch` would: :class:`ConsumerGone` / :class:`FeedUnavailable`."""
        if self._error is not None:
            raise self._error
        if self._give_up_after is not None and self.unavailable_for() > self._give_up_after:
            raise FeedUnavailable(
                f"{self._subject}: not served for {self.unavailable_for():.1f} s ({self.last_problem})"
            )

    async def fetch(self, batch: int, timeout: float) -> list[Msg]:
        """Up to ``batch`` messages as soon as there is one; [] when none came within ``timeout``.

        Raises :class:`ConsumerGone` when the consumer was deleted and :class:`FeedUnavailable`
        when it was not served for longer than ``give_up_after``.
        """
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            if self._queue:
                out = self.take(batch)
                await self._request_if_due()
                return out
            self.check()
            now = loop.time()
            if now >= end:
                return []
            await self._request_if_due()
            if self._queue or self._error is not None:
                continue  # arrived while the request went out
            self._ready.clear()
            wake = self._check_at if self._left > 0 else max(self._retry_at, now + UNAVAILABLE_FIRST_DELAY)
            if self._give_up_after is not None and self._unavailable_since is not None:
                wake = min(wake, self._unavailable_since + self._give_up_after + 0.001)
            wait = max(0.001, min(end, wake) - now)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), wait)

    async def unsubscribe(self) -> None:
        self._closed = True
        sub, self._sub = self._sub, None
        if sub is not None:
            await sub.unsubscribe()
