"""Terminal output: colour only on a tty, never when ``NO_COLOR`` is set (https://no-color.org).

Hand-written on purpose, not ``rich`` (which typer installs): six styles on one line of
text, the no-color.org and ``TERM=dumb`` rules, a ``Painter(False)`` for every non-terminal
stream, and plain ANSI output the tests can compare. ``rich`` only arrives through typer;
importing it here would make it a declared dependency of ours for no visible difference.
"""

from __future__ import annotations

import os
import sys
from typing import Final, TextIO

__all__ = ["Painter", "color_enabled", "human_bytes"]

_CODES: Final = {
    "bold": "1",
    "dim": "2",
    "red": "31",
    "green": "32",
    "yellow": "33",
    "cyan": "36",
}


def color_enabled(stream: TextIO) -> bool:
    """Colour on ``stream``: a terminal, ``NO_COLOR`` unset or empty, ``TERM`` not ``dumb``."""
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


class Painter:
    """Wraps text in ANSI styles when colour is enabled for the stream it writes to."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    @classmethod
    def for_stream(cls, stream: TextIO | None = None) -> Painter:
        return cls(color_enabled(stream if stream is not None else sys.stdout))

    def __call__(self, text: str, *styles: str) -> str:
        if not self.enabled or not styles:
            return text
        codes = ";".join(_CODES[style] for style in styles)
        return f"\033[{codes}m{text}\033[0m"


def human_bytes(count: float) -> str:
    """``1536`` -> ``1.5 KiB``; whole bytes below 1 KiB."""
    if count < 1024:
        return f"{int(count)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        count /= 1024
        if count < 1024 or unit == "TiB":
            return f"{count:.1f} {unit}"
    raise AssertionError("unreachable")
