"""The layout shared by the two batch frames: several frames in one NATS message (sans-IO).

Magic ``0x00``, the batch's kind, then per frame ``labelLength:u16be``, ``frameLength:u32be``,
the label (UTF-8) and the frame. What a label is depends on the kind: a start batch labels
each start with its reply subject (:mod:`._start_batch`), a reply batch each frame with its
request id (:mod:`._reply_batch`).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Final

from ._frames import BINARY_MAGIC, MAX_BATCHED_FRAMES, FrameError

_ENTRY: Final = struct.Struct(">HI")  # labelLength, frameLength
#: What each frame adds to a batch besides its label and its own bytes.
ENTRY_OVERHEAD: Final = _ENTRY.size
MAX_LABEL_LENGTH: Final = 0xFFFF
PREFIX_LENGTH: Final = 2  # magic, kind


def prefix(kind: int) -> bytes:
    return bytes((BINARY_MAGIC, kind))


def is_batch(payload: bytes, kind: int) -> bool:
    return len(payload) > 1 and payload[0] == BINARY_MAGIC and payload[1] == kind


def entry(label: str, frame: bytes) -> bytes:
    """One frame as it goes in a batch."""
    label_bytes = label.encode()
    if len(label_bytes) > MAX_LABEL_LENGTH:
        raise ValueError("label too long for a batch")
    return b"".join((_ENTRY.pack(len(label_bytes), len(frame)), label_bytes, frame))


def encode(kind: int, entries: Sequence[bytes]) -> bytes:
    """A batch of entries made by :func:`entry`."""
    return prefix(kind) + b"".join(entries)


def decode(payload: bytes, kind: int, what: str) -> list[tuple[str, bytes]]:
    """The ``(label, frame)`` pairs of a batch of ``kind``, all read before any is used: a batch
    cut short or overlong is refused whole. ``what`` names the batch in errors."""
    if not is_batch(payload, kind):
        raise FrameError(f"not a {what}")
    pairs: list[tuple[str, bytes]] = []
    offset = PREFIX_LENGTH
    end = len(payload)
    while offset < end:
        if len(pairs) == MAX_BATCHED_FRAMES:
            raise FrameError(f"a {what} holds more than {MAX_BATCHED_FRAMES} frames")
        if end - offset < _ENTRY.size:
            raise FrameError(f"truncated {what} entry")
        label_length, frame_length = _ENTRY.unpack_from(payload, offset)
        offset += _ENTRY.size
        frame_at = offset + label_length
        next_offset = frame_at + frame_length
        if next_offset > end:
            raise FrameError(f"{what} entry longer than the batch")
        try:
            label = payload[offset:frame_at].decode()
        except UnicodeDecodeError:
            raise FrameError(f"{what} label is not valid UTF-8") from None
        pairs.append((label, payload[frame_at:next_offset]))
        offset = next_offset
    if not pairs:
        raise FrameError(f"empty {what}")
    return pairs


__all__ = [
    "ENTRY_OVERHEAD",
    "MAX_LABEL_LENGTH",
    "PREFIX_LENGTH",
    "decode",
    "encode",
    "entry",
    "is_batch",
    "prefix",
]
