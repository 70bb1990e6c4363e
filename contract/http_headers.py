"""HTTP headers that belong to one connection, not to the message (RFC 9110 7.6.1).

Every proxy in this project (linkd's ``--upstream`` proxy and its upgrade path, the gateway's
preview relay, ``linkctl forward``) drops these on both sides, plus whatever a
``Connection`` header names; one list, so the hops agree on what a hop is.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

__all__ = ["HOP_BY_HOP", "connection_named"]

HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)


def connection_named(headers: Iterable[tuple[str, str]]) -> frozenset[str]:
    """The header names (lower case) that ``Connection`` headers list: hop-by-hop too."""
    named: set[str] = set()
    for name, value in headers:
        if name.lower() == "connection":
            named.update(token.strip().lower() for token in value.split(",") if token.strip())
    return frozenset(named)
