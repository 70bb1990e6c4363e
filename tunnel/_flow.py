"""Credit-based flow control and sequence checking for one direction of one stream (sans-IO).

The receiver grants bytes; the sender never sends more than it was granted.
The receiver grants more as its application *consumes* data (not as frames
arrive), so bytes buffered on the receiving side never exceed the window, and a
slow reader slows the sender instead of making NATS drop messages.

``None`` as a window means "no flow control" (a plain v1 peer).
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

    __slots__ = ("credit", "next_seq", "sent_bytes")

    def __init__(self, initial: int | None) -> None:
        self.credit: int | None = initial
        self.next_seq = 0
        self.sent_bytes = 0

    @property
    def unlimited(self) -> bool:
        return self.credit is None

    def available(self) -> int:
        return MAX_CREDIT if self.credit is None else self.credit

    def spend(self, n: int) -> int:
        """Account for one data frame of ``n`` bytes; returns its sequence number."""
        if self.credit is not None:
            if n > self.credit:
                raise LocalProtocolError(f"sending {n} bytes with only {self.credit} bytes of credit")
            self.credit -= n
        self.sent_bytes += n
        seq = self.next_seq
        self.next_seq += 1
        return seq

    def grant(self, n: int) -> None:
        if self.credit is None:
            return  # credit from a peer we did not negotiate flow control with: harmless
        self.credit = min(self.credit + n, MAX_CREDIT)


class ReceiveWindow:
    """Sequence checks and credit accounting for data we receive."""

    __slots__ = (
        "buffer_limit",
        "buffered",
        "consumed_since_grant",
        "expected_seq",
        "granted",
        "received_bytes",
        "window",
    )

    def __init__(self, window: int | None, buffer_limit: int = UNFLOWED_BUFFER_LIMIT) -> None:
        self.window = window
        self.buffer_limit = buffer_limit
        self.expected_seq = 0
        self.received_bytes = 0
        self.buffered = 0  # received but not yet consumed by the application
        self.granted = window  # total credit given to the peer so far
        self.consumed_since_grant = 0

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
        """The application took ``n`` bytes; returns bytes to grant now, if a grant is due."""
        self.buffered -= n
        if self.window is None or self.granted is None:
            return None
        self.consumed_since_grant += n
        if self.consumed_since_grant >= self.window * GRANT_THRESHOLD_FRACTION:
            grant = self.consumed_since_grant
            self.consumed_since_grant = 0
            self.granted = min(self.granted + grant, MAX_CREDIT)
            return grant
        return None
