"""Request-body framing for the ``--upstream`` proxy: the caller's Content-Length, kept honest.

Why: the proxy forwards a declared ``Content-Length`` (some local services refuse
chunked uploads) next to a body that streams in from the tunnel. If the two disagree,
the local service would read a truncated request, or the excess would be parsed as a
second request (smuggling). So the declared length must be one plain integer, and the
body is passed on only while it agrees: the block that would complete the declared
length is held back until the body's end shows there is nothing more, so the service
never sees a complete request whose body was in fact longer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Final

__all__ = ["BodyLengthMismatch", "declared_length", "length_checked"]

# Longer than any sane size (about 10**18): refuse instead of parsing huge integers.
_MAX_DIGITS: Final = 18


class BodyLengthMismatch(Exception):
    """The request body was longer or shorter than its declared Content-Length."""


def declared_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The single ``Content-Length`` in ``headers`` as an int, None without one; ValueError if invalid."""
    values = [value for name, value in headers if name.lower() == b"content-length"]
    if not values:
        return None
    if len(values) > 1:
        raise ValueError("more than one Content-Length header")
    text = values[0].strip()
    if not text.isdigit() or not text.isascii() or len(text) > _MAX_DIGITS:
        raise ValueError("Content-Length must be a non-negative integer")
    return int(text)


async def length_checked(content: AsyncIterator[bytes] | None, length: int) -> AsyncIterator[bytes]:
    """``content`` (None: no body) passed through while it agrees with ``length``.

    Raises :class:`BodyLengthMismatch` before handing on a byte past ``length``, and
    before the final bytes when the body turns out longer or shorter.
    """
    sent = 0
    held: bytes | None = None
    if content is not None:
        async for block in content:
            if not block:
                continue
            if held is not None or sent + len(block) > length:
                raise BodyLengthMismatch(f"the request body is longer than its Content-Length ({length})")
            sent += len(block)
            if sent == length:
                held = block  # complete only if nothing follows
            else:
                yield block
    if sent != length:
        raise BodyLengthMismatch(
            f"the request body ({sent} bytes) is shorter than its Content-Length ({length})"
        )
    if held is not None:
        yield held
