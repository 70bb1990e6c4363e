"""Checks on a local service's response head before it goes into the tunnel.

Why: the tunnel carries at most 512 headers, names that are HTTP tokens up to 1024
characters and values up to 64 KiB without CR, LF or NUL, and statuses 100-599. A
head outside those bounds used to fail inside the tunnel server (a traceback and a bare
handler error); checked here, it becomes a typed 502 from the proxy instead.
"""

from __future__ import annotations

import re
from typing import Final

import tunnel

__all__ = [
    "BadUpstreamResponse",
    "checked_reason",
    "checked_response_headers",
    "checked_status",
]

# As the tunnel's status_text (docs/protocol.md): a reason that cannot travel is dropped.
MAX_REASON_LENGTH: Final = 1024
_VALUE_FORBIDDEN: Final = re.compile("[\r\n\x00\ud800-\udfff]")


class BadUpstreamResponse(Exception):
    """The local service's response head cannot be relayed through the tunnel."""


def checked_status(status: int) -> int:
    if not 100 <= status <= 599:
        raise BadUpstreamResponse(f"status {status} is outside 100-599")
    return status


def checked_reason(reason: str) -> str | None:
    """The reason phrase when it can travel, else None (it is informational only)."""
    if not reason or len(reason) > MAX_REASON_LENGTH or _VALUE_FORBIDDEN.search(reason):
        return None
    return reason


def checked_response_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``headers`` unchanged if the tunnel can carry them, else :class:`BadUpstreamResponse`."""
    try:
        return tunnel.check_headers(headers)
    except tunnel.LocalProtocolError as exc:
        raise BadUpstreamResponse(str(exc)) from exc
