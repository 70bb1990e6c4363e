"""Several compact ``request.start`` frames to one host in one NATS message (sans-IO).

A caller that starts many small requests to one host at once (32 callers sharing a client)
would otherwise send one NATS message per start, and each message costs every hop its own
work: the caller's write, NATS's routing, the server's parse and dispatch. A batch carries the
starts the caller has ready together, each with its own reply subject, so every request
still answers, times out and fails on its own. Only compact starts travel in batches, and
only to a host whose server said ``startBatches`` in its ack (docs/protocol.md, section 2).

Layout (:mod:`._batches`): kind ``0x06``; each start is labelled with its reply subject. The
message's NATS reply subject is the first start's, so NATS's no-responders reaches that
request; the caller passes it on to the others (see ``tunnel._natsio.client``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from . import _batches as batches
from ._frames import BINARY_MAGIC, KIND_REQUEST_START, KIND_START_BATCH, FrameError

PREFIX: Final = batches.prefix(KIND_START_BATCH)
ENTRY_OVERHEAD: Final = batches.ENTRY_OVERHEAD
MAX_REPLY_LENGTH: Final = batches.MAX_LABEL_LENGTH


def is_start_batch(payload: bytes) -> bool:
    return batches.is_batch(payload, KIND_START_BATCH)


def entry(reply: str, start: bytes) -> bytes:
    """One start as it goes in a batch (``start`` is a compact ``request.start``)."""
    return batches.entry(reply, start)


def encode(entries: Sequence[bytes]) -> bytes:
    """A batch of entries made by :func:`entry`."""
    return batches.encode(KIND_START_BATCH, entries)


def decode(payload: bytes) -> list[tuple[str, bytes]]:
    """The ``(reply subject, compact start)`` pairs of a batch, all checked before any is used:
    a batch that is cut short, overlong or holds anything but compact starts is refused whole."""
    starts = batches.decode(payload, KIND_START_BATCH, "start batch")
    for reply, start in starts:
        if not reply:
            raise FrameError("a start batch entry without a reply subject")
        if len(start) < 2 or start[0] != BINARY_MAGIC or start[1] != KIND_REQUEST_START:
            raise FrameError("a start batch holds something other than a compact request.start")
    return starts


__all__ = ["ENTRY_OVERHEAD", "PREFIX", "decode", "encode", "entry", "is_start_batch"]
