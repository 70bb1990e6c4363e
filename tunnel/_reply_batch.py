"""Several complete responses to one caller in one NATS message (sans-IO).

The other direction of :mod:`._start_batch`: a server that answers many small requests of
one caller at once sends the ``response.whole`` frames it has ready together (nothing else
travels in them), each labelled
with its request id. The message goes to the first response's reply subject, under the
host's own prefix like any frame of it, so the caller's reply subscription hears it and the
host token in its subject still says which host sent every frame in it. Only to a caller
that offered ``replyBatches`` (docs/protocol.md, section 2).

Layout (:mod:`._batches`): kind ``0x07``; each frame is labelled with its request id.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from . import _batches as batches
from ._frames import (
    BINARY_MAGIC,
    KIND_REPLY_BATCH,
    KIND_RESPONSE_WHOLE,
    KIND_RESPONSE_WHOLE_COMPACT,
    FrameError,
)
from ._subjects import is_valid_request_id

PREFIX: Final = batches.prefix(KIND_REPLY_BATCH)
_WHOLE_KINDS: Final = (KIND_RESPONSE_WHOLE, KIND_RESPONSE_WHOLE_COMPACT)


def is_reply_batch(payload: bytes) -> bool:
    return batches.is_batch(payload, KIND_REPLY_BATCH)


def entry(request_id: str, frame: bytes) -> bytes:
    return batches.entry(request_id, frame)


def encode(entries: Sequence[bytes]) -> bytes:
    return batches.encode(KIND_REPLY_BATCH, entries)


def decode(payload: bytes) -> list[tuple[str, bytes]]:
    """The ``(request id, response.whole)`` pairs of a reply batch, refused whole when any is
    unreadable or anything but a complete response (each is then decoded like a frame of its own)."""
    frames = batches.decode(payload, KIND_REPLY_BATCH, "reply batch")
    for request_id, frame in frames:
        if not is_valid_request_id(request_id):
            raise FrameError("a reply batch entry with an invalid request id")
        if len(frame) < 2 or frame[0] != BINARY_MAGIC or frame[1] not in _WHOLE_KINDS:
            raise FrameError("a reply batch holds something other than a response.whole")
    return frames


__all__ = ["PREFIX", "decode", "encode", "entry", "is_reply_batch"]
