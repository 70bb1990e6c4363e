"""Credit-based flow control and sequence checking for one direction of one stream (sans-IO).

The receiver grants bytes; the sender never sends more than it was granted.
Grants are *cumulative limits* ("you may have sent N body bytes in total"), not
increments: core NATS may drop a credit frame (a reconnect blip), and an
absolute limit is repaired by any later grant, and can be re-sent safely.
The receiver grants more as its application *consumes* data (not as frames
arrive), so bytes buffered on the receiving side never exceed the window, and a
slow reader slows the sender instead of making NATS drop messages.

``None`` as a window means "no flow control" (a plain v1 peer).

The window grows while the reader keeps up (see ``ReceiveWindow.on_consumed``): on a fast
path a fixed window, not the CPU, limited bulk transfers (credit arrives a loop pass or two
after the bytes were read), while a slow reader never earns a larger one.
"""

from __future__ import annotations

from typing import Final

from ._errors import BufferLimitExceeded, LocalProtocolError, RemoteProtocolError

# Grant again once half the window is consumed: few credit frames, no stalls.
GRANT_THRESHOLD_FRACTION: Final = 0.5
# Bounds accumulated credit so a hostile peer cannot overflow our counters.
MAX_CREDIT: Final = 2**53 - 1
# Without flow control (plain v1 peer) we still refuse to hold more unread bytes than this.
UNFLOWED_BUFFER_LIMIT: Final = 64 * 1024 * 1024


class SendCredit:
    """How many more body bytes we may send, and the next sequence number."""

    __slots__ = ("limit", "next_seq", "sent_bytes")

    def __init__(self, initial: int | None) -> None:
        self.limit: int | None = initial  # total body bytes the receiver allows, None: no limit
        self.next_seq = 0
        self.sent_bytes = 0

    @property
    def credit(self) -> int | None:
        """Bytes we may still send (None: no flow control)."""
        return None if self.limit is None else self.limit - self.sent_bytes

    @property
    def unlimited(self) -> bool:
        return self.limit is None

    def available(self) -> int:
        return MAX_CREDIT if self.limit is None else self.limit - self.sent_bytes

    def spend(self, n: int) -> int:
        """Account for one data frame of ``n`` bytes; returns its sequence number."""
        if self.limit is not None and n > self.limit - self.sent_bytes:
            raise LocalProtocolError(
                f"sending {n} bytes with only {self.limit - self.sent_bytes} bytes of credit"
            )
        self.sent_bytes += n
        seq = self.next_seq
        self.next_seq += 1
        return seq

    def grant(self, limit: int) -> None:
        """The receiver now allows ``limit`` bytes in total; stale (smaller) limits change nothing."""
        if self.limit is None:
            return  # credit from a peer we did not negotiate flow control with: harmless
        self.limit = min(max(self.limit, limit), MAX_CREDIT)


class GrowthBudget:
    """How far all windows of one server (or one client) may grow past their initial size.

    Growth costs nothing while readers keep up, but a handler that stalls after its window
    grew holds up to ``max_window`` per request: shared among every request in flight, this
    bounds that at ``limit`` bytes beyond the initial windows. Spent growth comes back when
    a request ends (:meth:`ReceiveWindow.release`).
    """

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> int:
        """Up to ``n`` bytes of growth; what is left of the budget."""
        n = max(0, min(n, self.limit - self.used))
        self.used += n
        return n

    def give_back(self, n: int) -> None:
        self.used = max(0, self.used - n)


class ReceiveWindow:
    """Sequence checks and credit accounting for data we receive."""

    __slots__ = (
        "budget",
        "buffer_limit",
        "buffered",
        "caught_up",
        "consumed_since_grant",
        "expected_seq",
        "granted",
        "grown",
        "max_window",
        "received_bytes",
        "released",
        "window",
    )

    def __init__(
        self,
        window: int | None,
        buffer_limit: int = UNFLOWED_BUFFER_LIMIT,
        max_window: int | None = None,
        budget: GrowthBudget | None = None,
    ) -> None:
        self.window = window  # the credit the peer may be ahead of our reads (grows, see on_consumed)
        self.max_window = window if window is None or max_window is None else max(window, max_window)
        self.budget = budget
        self.grown = 0  # taken from the budget so far
        self.released = False
        self.buffer_limit = buffer_limit
        self.expected_seq = 0
        self.received_bytes = 0
        self.buffered = 0  # received but not yet consumed by the application
        self.granted = window  # total credit given to the peer so far
        self.consumed_since_grant = 0
        self.caught_up = False  # the reader emptied the buffer since the last grant

    def on_chunk(self, seq: int, n: int) -> None:
        """Validate one incoming data frame: contiguous seq, within credit."""
        if seq != self.expected_seq:
            what = "duplicate or reordered" if seq < self.expected_seq else "missing"
            raise RemoteProtocolError(
                f"data frame sequence error ({what} frame): expected seq {self.expected_seq}, got {seq}"
            )
        if self.granted is not None and self.received_bytes + n > self.granted:
            raise RemoteProtocolError(
                f"peer overran its flow-control credit ({self.received_bytes + n} > {self.granted} bytes)"
            )
        if self.granted is None and self.buffered + n > self.buffer_limit:
            raise BufferLimitExceeded(
                f"peer without flow control is {self.buffered + n} bytes ahead of the reader "
                f"(limit {self.buffer_limit})"
            )
        self.expected_seq += 1
        self.received_bytes += n
        self.buffered += n

    def on_end(self, seq: int) -> None:
        """The end frame's seq is the number of chunks sent: anything else is loss."""
        if seq != self.expected_seq:
            raise RemoteProtocolError(
                f"body ended after {seq} frames but {self.expected_seq} arrived (frames lost or duplicated)"
            )

    def on_consumed(self, n: int) -> int | None:
        """The application took ``n`` bytes; returns the new total limit to grant, if one is due.

        If the reader emptied the buffer since the last grant, the grant also doubles the
        window, up to ``max_window``: the reader was waiting for bytes that credit held back,
        so the window, not the reader, limited the transfer (receive-window tuning, as TCP
        does it). A reader slower than the sender never empties its buffer, so its window
        stays; none ever holds more than ``max_window``, and all windows sharing a
        :class:`GrowthBudget` grow no more than it allows in all.
        """
        buffered = self.buffered = self.buffered - n
        window = self.window
        if window is None or self.granted is None:
            return None
        if buffered == 0:
            self.caught_up = True
            if self.released:
                self._give_back()
        self.consumed_since_grant += n
        if self.consumed_since_grant >= window * GRANT_THRESHOLD_FRACTION:
            growth = 0
            if self.caught_up and self.max_window is not None and window < self.max_window:
                growth = min(window, self.max_window - window)
                if self.budget is not None:
                    growth = self.budget.take(growth)
                    self.grown += growth
                self.window = window + growth
            self.caught_up = False
            self.granted = min(self.granted + self.consumed_since_grant + growth, MAX_CREDIT)
            self.consumed_since_grant = 0
            return self.granted
        return None

    def release(self) -> None:
        """The stream is over: grow no more, and return the growth to the budget once the
        application holds nothing unread (the budget bounds what is held, so bytes that
        arrived under a grown window still count until they are read or discarded)."""
        self.max_window = self.window
        self.released = True
        if self.buffered <= 0:
            self._give_back()

    def discard(self) -> None:
        """The application dropped what it had not read (it closed the stream, or took the
        whole buffer at once)."""
        self.buffered = 0
        if self.released:
            self._give_back()

    def _give_back(self) -> None:
        if self.budget is not None:
            self.budget.give_back(self.grown)
            self.grown = 0
            self.budget = None

    def regrant(self) -> int | None:
        """The current limit again, when the sender may be stuck on a lost grant (nothing buffered)."""
        if self.granted is None or self.buffered > 0:
            return None
        return self.granted


class Pacer:
    """A token bucket for a receiver that cannot say how fast it reads (a plain v1 caller).

    Without credit, a server would send as fast as it can, and NATS buffers what the caller
    has not read yet for it, up to its slow-consumer limit (64 MiB by default), then cuts the
    caller's connection, and the request waits forever. So: ``burst`` bytes at full speed,
    then ``rate`` bytes per second. Times are plain numbers (the caller's clock).
    """

    __slots__ = ("_at", "_level", "burst", "rate")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._level = float(burst)  # bytes that may go now
        self._at = now

    def available(self, now: float) -> int:
        self._refill(now)
        return int(self._level)

    def spend(self, n: int, now: float) -> None:
        self._refill(now)
        self._level -= n

    def delay_for(self, n: int, now: float) -> float:
        """Seconds until ``n`` bytes (at most a burst) may go."""
        self._refill(now)
        missing = min(n, self.burst) - self._level
        return max(0.0, missing / self.rate)

    def _refill(self, now: float) -> None:
        if now > self._at:
            self._level = min(float(self.burst), self._level + (now - self._at) * self.rate)
            self._at = now
