"""How run events are written to HTTP readers: Server-Sent Events or NDJSON (pure formatting).

SSE (``text/event-stream``), one message per event, the ``id`` being its ``seq`` so a
browser's ``EventSource`` resumes with ``Last-Event-ID`` by itself::

    id: 3
    event: output
    data: {"runId": "...", "seq": 3, "type": "output", ...}

then exactly one ``event: end`` (no id) whose data is the final run state, and
``: keepalive`` comments while idle. While the run is live, an ``event: state`` (no id) with
the run state says when it became ``stalled`` and when it left that state (no id, so a
reconnecting ``EventSource`` resumes by seq as before). NDJSON (``application/x-ndjson``): one
event per line, ``{"type": "state", "run": {...}}`` for a state change, the last line
``{"type": "end", "run": {...}}``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any, Final

__all__ = [
    "NDJSON",
    "SSE",
    "SSE_KEEPALIVE",
    "EventFormat",
    "choose_format",
    "ordered_events",
    "parse_after",
]

SSE: Final = "text/event-stream"
NDJSON: Final = "application/x-ndjson"
SSE_KEEPALIVE: Final = b": keepalive\n\n"
# A resume point beyond any real run (and beyond what JSON readers handle exactly).
MAX_AFTER: Final = 2**53


def _json(value: Any) -> str:
    # No newlines inside: one SSE data line, one NDJSON line.
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class EventFormat:
    """Formats events for one reader (``SSE`` or ``NDJSON``)."""

    def __init__(self, media_type: str) -> None:
        if media_type not in (SSE, NDJSON):
            raise ValueError(f"unsupported format {media_type!r}")
        self.media_type = media_type

    @property
    def content_type(self) -> str:
        return f"{self.media_type}; charset=utf-8"

    def event(self, event: Mapping[str, Any], raw: bytes | None = None) -> bytes:
        """One event; ``raw``: the JSON it was decoded from, sent as it is when it fits one line.

        Why: the daemon's events are compact JSON already, and encoding each again was a
        share of the gateway's time per event. Anything with a line break is re-encoded.
        """
        if raw is None or b"\n" in raw or b"\r" in raw:
            raw = _json(event).encode()
        if self.media_type == NDJSON:
            return raw + b"\n"
        kind = event.get("type", "message")
        return f"id: {event.get('seq')}\nevent: {kind}\ndata: ".encode() + raw + b"\n\n"

    def state(self, state: Mapping[str, Any]) -> bytes:
        """The run's state changed in a way a reader should see now (stalled, resumed)."""
        if self.media_type == NDJSON:
            return (_json({"type": "state", "run": state}) + "\n").encode()
        return f"event: state\ndata: {_json(state)}\n\n".encode()

    def end(self, state: Mapping[str, Any]) -> bytes:
        if self.media_type == NDJSON:
            return (_json({"type": "end", "run": state}) + "\n").encode()
        return f"event: end\ndata: {_json(state)}\n\n".encode()

    def keepalive(self) -> bytes | None:
        """A no-op line for idle streams (None for NDJSON, whose readers parse every line)."""
        return SSE_KEEPALIVE if self.media_type == SSE else None


def choose_format(accept: str | None) -> EventFormat:
    """NDJSON when the client asks for it explicitly, SSE otherwise."""
    if accept and NDJSON in accept.lower() and SSE not in accept.lower():
        return EventFormat(NDJSON)
    return EventFormat(SSE)


def parse_after(query: str | None, last_event_id: str | None) -> int:
    """The resume point: ``?after=N`` wins over ``Last-Event-ID: N``; 0 when neither is given.

    Raises ValueError (a 400 for the client) when the value is not a whole number >= 0.
    """
    raw = query if query is not None else last_event_id
    if raw is None or not raw.strip():
        return 0
    text = raw.strip()
    if not text.isdigit() or len(text) > 16:
        name = "after" if query is not None else "Last-Event-ID"
        raise ValueError(f"{name} must be a whole number >= 0 (a seq), got {raw[:40]!r}")
    return min(int(text), MAX_AFTER)


def ordered_events(
    events: Iterable[Mapping[str, Any]], fence: object, *, start: int = 1, upto: int | None = None
) -> list[dict[str, Any]]:
    """The events of one execution (``fence``) as a gap-free run of seqs from ``start``.

    Duplicates collapse to one, other fences are dropped, and the result stops before
    the first missing seq (or after ``upto``): readers never see a hole or a repeat.
    """
    by_seq: dict[int, dict[str, Any]] = {}
    for event in events:
        seq = event.get("seq")
        if event.get("fence") != fence or isinstance(fence, bool):
            continue
        if isinstance(seq, int) and not isinstance(seq, bool) and seq >= start:
            by_seq.setdefault(seq, dict(event))
    out: list[dict[str, Any]] = []
    seq = start
    while seq in by_seq and (upto is None or seq <= upto):
        out.append(by_seq[seq])
        seq += 1
    return out
