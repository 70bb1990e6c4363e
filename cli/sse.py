"""A sans-IO parser for ``text/event-stream`` (the WHATWG server-sent events format).

Bytes in, messages out, no I/O: :meth:`SseParser.feed` takes any slice of the stream (a
line may be split anywhere, even inside a UTF-8 character or a CRLF) and returns the
messages completed by it. Comment lines (``: keepalive``) are reported as keep-alives so a
caller can tell a live idle stream from a dead one.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import Final

__all__ = ["KEEPALIVE", "MAX_LINE", "SseError", "SseMessage", "SseParser"]

# One event's data line: a run's output chunk can be large, but not unbounded.
MAX_LINE: Final = 16 * 1024 * 1024
KEEPALIVE: Final = "keepalive"


class SseError(ValueError):
    """The stream is not server-sent events we can read (e.g. a line beyond MAX_LINE)."""


@dataclass(frozen=True, slots=True)
class SseMessage:
    """One dispatched message. ``event`` is ``message`` when the server named none;
    ``id`` is None when the message carried no ``id:`` field."""

    event: str
    data: str
    id: str | None = None


class SseParser:
    def __init__(self, max_line: int = MAX_LINE) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""
        self._skip_lf = False  # the previous chunk ended with CR: a leading LF belongs to it
        self._max_line = max_line
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None
        self._has_fields = False
        self._first = True
        self.keepalives = 0
        self.last_event_id: str | None = None
        self.retry_ms: int | None = None

    def feed(self, chunk: bytes) -> list[SseMessage]:
        text = self._decoder.decode(chunk)
        if self._first and text:
            text = text.removeprefix("\ufeff")
            self._first = False
        if self._skip_lf and text.startswith("\n"):
            text = text[1:]
        self._skip_lf = False
        self._buffer += text
        out: list[SseMessage] = []
        while True:
            cut = _line_end(self._buffer)
            if cut is None:
                break
            end, after = cut
            if end == len(self._buffer) - 1 and self._buffer[end] == "\r":
                # A CR at the very end: the LF of a CRLF may come in the next chunk.
                self._skip_lf = True
            line = self._buffer[:end]
            self._buffer = self._buffer[after:]
            message = self._line(line)
            if message is not None:
                out.append(message)
        if len(self._buffer) > self._max_line:
            raise SseError(f"an event-stream line is longer than {self._max_line} bytes")
        return out

    def _line(self, line: str) -> SseMessage | None:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            self.keepalives += 1
            return None
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._id = value
        elif name == "retry":
            if value.isdigit():
                self.retry_ms = int(value)
            return None
        else:
            return None  # unknown fields are ignored
        self._has_fields = True
        return None

    def _dispatch(self) -> SseMessage | None:
        message = None
        if self._has_fields and (self._data or self._event or self._id is not None):
            message = SseMessage(self._event or "message", "\n".join(self._data), self._id)
            if self._id is not None:
                self.last_event_id = self._id
        self._event, self._data, self._id, self._has_fields = "", [], None, False
        return message


def _line_end(buffer: str) -> tuple[int, int] | None:
    """(index of the line terminator, index after it) for the first CR, LF or CRLF."""
    cr = buffer.find("\r")
    lf = buffer.find("\n")
    if cr == -1 and lf == -1:
        return None
    if cr == -1 or (lf != -1 and lf < cr):
        return lf, lf + 1
    if cr + 1 < len(buffer) and buffer[cr + 1] == "\n":
        return cr, cr + 2
    return cr, cr + 1
