"""A one-line download progress bar on stderr (only drawn on a terminal).

Nothing is drawn for the first :data:`DELAY` seconds, so a quick, small download
leaves no trace; after that the line is redrawn at most every :data:`INTERVAL`.
With a known total (``content-length``) it shows a bar, percentage, rate and ETA;
without one, the bytes so far and the rate.

Hand-written on purpose, not ``rich.progress``: it is one ``\r`` line redrawn from the
download loop itself, nothing for the first :data:`DELAY` seconds, no refresh thread and no
capture of stdout (which carries the body); ``rich``'s Live display would need all three
switched off, and ``rich`` (only there through typer) declared as a dependency of ours.
"""

from __future__ import annotations

import shutil
import time
from typing import Final, TextIO

from .term import human_bytes

__all__ = ["Progress"]

DELAY: Final = 0.3
INTERVAL: Final = 0.1


class Progress:
    def __init__(self, stream: TextIO, total: int | None, *, enabled: bool) -> None:
        self.stream = stream
        self.total = total if total is not None and total > 0 else None
        self.enabled = enabled
        self.done = 0
        self._started = time.monotonic()
        self._last_draw = 0.0
        self._drawn = False

    def update(self, count: int) -> None:
        self.done += count
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._started < DELAY or now - self._last_draw < INTERVAL:
            return
        self._last_draw = now
        self._draw(now)

    def finish(self) -> None:
        """Draw the final state and end the line, if anything was drawn."""
        if self.enabled and self._drawn:
            self._draw(time.monotonic(), final=True)
            self.stream.write("\n")
            self.stream.flush()

    def abandon(self) -> None:
        """End the line without a final redraw (an error message follows)."""
        if self.enabled and self._drawn:
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self, now: float, final: bool = False) -> None:
        elapsed = max(now - self._started, 1e-6)
        rate = self.done / elapsed
        width = shutil.get_terminal_size((80, 24)).columns
        if self.total is not None:
            fraction = min(self.done / self.total, 1.0)
            tail = f" {fraction * 100:5.1f}%  {human_bytes(self.done)} / {human_bytes(self.total)}"
            if final:
                tail += f"  {human_bytes(rate)}/s in {elapsed:.1f} s"
            else:
                remaining = (self.total - self.done) / rate if rate > 0 else 0.0
                tail += f"  {human_bytes(rate)}/s  ETA {remaining:.0f} s"
            bar_width = max(width - len(tail) - 3, 10)
            filled = int(bar_width * fraction)
            line = f"[{'#' * filled}{'.' * (bar_width - filled)}]{tail}"
        else:
            line = f"{human_bytes(self.done)}  {human_bytes(rate)}/s"
            if final:
                line += f" in {elapsed:.1f} s"
        self.stream.write("\r" + line[: width - 1] + "\033[K")
        self.stream.flush()
        self._drawn = True
