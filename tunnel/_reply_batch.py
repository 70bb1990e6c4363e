"""Several complete responses to one caller in one NATS message (sans-IO).

The other direction of :mod:`._start_batch`: a server that answers many small requests of
one caller at once sends the ``response.whole`` frames it has ready together, each labelled
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
from ._frames import KIND_REPLY_BATCH, FrameError
from ._subjects import is_valid_request_id

PREFIX: Final = batches.prefix(KIND_REPLY_BATCH)


def is_reply_batch(payload: bytes) -> bool:
    return batches.is_batch(payload, KIND_REPLY_BATCH)


def entry(request_id: str, frame: bytes) -> bytes:
    return batches.entry(request_id, frame)


def encode(entries: Sequence[bytes]) -> bytes:
    return batches.encode(KIND_REPLY_BATCH, entries)


def decode(payload: bytes) -> list[tuple[str, bytes]]:
    """The ``(request id, frame)`` pairs of a reply batch, refused whole when any is unreadable."""
    frames = batches.decode(payload, KIND_REPLY_BATCH, "reply batch")
    for request_id, frame in frames:
        if not is_valid_request_id(request_id) or not frame:
            raise FrameError("a reply batch holds an invalid request id or an empty frame")
    return frames


__all__ = ["PREFIX", "decode", "encode", "entry", "is_reply_batch"]
