"""How an exchange is shown: JSON for the API and the page, with every secret redacted.

Bodies: text when the bytes are UTF-8 (a character cut by the capture cap at the end is
fine) without control characters and the content type is not a binary one; otherwise a hex
dump of the first :data:`HEX_LIMIT` bytes. Sizes always say how much there was.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from .redact import body_may_hide_secrets, redact_headers, redact_json_body, redact_target

__all__ = [
    "HEX_LIMIT",
    "TEXT_LIMIT",
    "ExchangeLike",
    "Filter",
    "body_view",
    "detail",
    "hex_dump",
    "looks_text",
    "summary",
]

TEXT_LIMIT: Final = 64 * 1024
HEX_LIMIT: Final = 2048
_BINARY_TYPES: Final = ("image/", "audio/", "video/", "font/")
_BINARY_EXACT: Final = frozenset(
    {"application/octet-stream", "application/zip", "application/gzip", "application/pdf", "application/wasm"}
)
_TEXT_CONTROLS: Final = frozenset("\t\n\r\f\x1b")
_PRINTABLE: Final = frozenset(string.printable) - frozenset("\t\n\r\x0b\x0c")


class ExchangeLike(Protocol):
    """What the inspector reads of a recorded exchange (``linkd.traffic.Exchange`` has it all)."""

    id: str
    started_at: float
    method: str
    target: str
    route: str
    request_headers: list[tuple[str, str]]
    request_body: bytes
    request_bytes: int
    status: int | None
    response_headers: list[tuple[str, str]]
    response_body: bytes
    response_bytes: int
    ttfb_ms: float | None
    duration_ms: float | None
    error: str | None
    error_detail: str | None
    upgraded: bool


def _header(headers: Sequence[tuple[str, str]], name: str) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def looks_text(body: bytes, content_type: str | None) -> bool:
    """Show ``body`` as text? Binary content types and non-UTF-8 or control-laden bytes are not."""
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    if kind in _BINARY_EXACT or kind.startswith(_BINARY_TYPES):
        return False
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A multi-byte character cut by the capture cap at the very end still reads as text.
        if exc.start < len(body) - 3 or exc.reason != "unexpected end of data":
            return False
        text = body[: exc.start].decode("utf-8")
    return not any((ch < " " and ch not in _TEXT_CONTROLS) or ch == "\x7f" for ch in text)


def hex_dump(data: bytes, limit: int = HEX_LIMIT) -> str:
    """``xxd``-style lines: offset, 16 bytes in hex, the printable ones as characters."""
    lines: list[str] = []
    for offset in range(0, min(len(data), limit), 16):
        row = data[offset : offset + 16]
        hexes = " ".join(f"{b:02x}" for b in row)
        chars = "".join(chr(b) if chr(b) in _PRINTABLE else "." for b in row)
        lines.append(f"{offset:08x}  {hexes:<47}  {chars}")
    return "\n".join(lines)


def body_view(
    body: bytes, total: int, headers: Sequence[tuple[str, str]], *, upgraded: bool = False
) -> dict[str, Any]:
    """``{kind: empty|text|hex|hidden|upgraded, size, captured, truncated, text?, hex?, note?}``."""
    content_type = _header(headers, "content-type")
    view: dict[str, Any] = {"size": total, "captured": len(body), "truncated": total > len(body)}
    if upgraded:
        return {**view, "kind": "upgraded", "note": "an upgraded (WebSocket) stream: bytes counted, not kept"}
    if not body:
        return {**view, "kind": "empty"}
    redacted = redact_json_body(body, content_type)
    if redacted is not None:
        body = redacted
    elif body_may_hide_secrets(body, content_type):
        return {**view, "kind": "hidden", "note": "a cut-off JSON body naming a secret key: not shown"}
    if looks_text(body, content_type):
        shown = body[:TEXT_LIMIT].decode("utf-8", "replace")
        return {**view, "kind": "text", "text": shown}
    return {**view, "kind": "hex", "hex": hex_dump(body)}


def summary(exchange: ExchangeLike, replay_of: str | None = None) -> dict[str, Any]:
    """One list row: no headers, no bodies."""
    target = redact_target(exchange.target)
    return {
        "id": exchange.id,
        "replayOf": replay_of,
        "startedAt": exchange.started_at,
        "method": exchange.method,
        "target": target,
        "path": target.split("?", 1)[0],
        "route": exchange.route,
        "status": exchange.status,
        "durationMs": _round(exchange.duration_ms),
        "ttfbMs": _round(exchange.ttfb_ms),
        "requestBytes": exchange.request_bytes,
        "responseBytes": exchange.response_bytes,
        "error": exchange.error,
        "inFlight": exchange.duration_ms is None,
        "upgraded": exchange.upgraded,
    }


def detail(exchange: ExchangeLike, replay_of: str | None = None) -> dict[str, Any]:
    """The summary plus headers and bodies, redacted."""
    request_headers = list(exchange.request_headers)
    response_headers = list(exchange.response_headers)
    return {
        **summary(exchange, replay_of),
        "errorDetail": exchange.error_detail,
        "request": {
            "headers": [list(pair) for pair in redact_headers(request_headers)],
            "body": body_view(bytes(exchange.request_body), exchange.request_bytes, request_headers),
        },
        "response": {
            "headers": [list(pair) for pair in redact_headers(response_headers)],
            "body": body_view(
                bytes(exchange.response_body),
                exchange.response_bytes,
                response_headers,
                upgraded=exchange.upgraded,
            ),
        },
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


@dataclass(frozen=True, slots=True)
class Filter:
    """``?status=5xx|404|error&path=SUBSTRING``: status class, exact status, or failed ones."""

    status: str | None = None
    path: str | None = None

    @classmethod
    def parse(cls, status: str | None, path: str | None) -> Filter:
        text = (status or "").strip().lower()
        if text and not (
            text == "error"
            or (len(text) == 3 and text[0] in "12345" and text[1:] == "xx")
            or (text.isdigit() and len(text) == 3)
        ):
            raise ValueError(f"status filter {status!r}: use 2xx, 4xx, 5xx, a status such as 404, or error")
        return cls(text or None, path or None)

    def matches(self, exchange: ExchangeLike) -> bool:
        if self.path is not None and self.path not in redact_target(exchange.target):
            return False
        if self.status is None:
            return True
        code = exchange.status
        if self.status == "error":
            return exchange.error is not None or (code is not None and code >= 500)
        if code is None:
            return False
        if self.status.endswith("xx"):
            return str(code)[0] == self.status[0]
        return str(code) == self.status
