"""The short text pages a preview answers with itself (never proxied, never HTML).

Plain text, so nothing in them runs on the preview origin; ``no-store``, so a refusal is
not cached in place of the desktop's page once the cause is fixed.
"""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web

__all__ = ["page"]


def page(
    status: int, title: str, detail: str = "", *, headers: Mapping[str, str] | None = None
) -> web.Response:
    """A ``status`` page saying ``title`` (one line) and ``detail`` (what to do about it)."""
    text = title if not detail else f"{title}\n\n{detail}"
    response = web.Response(status=status, text=text + "\n", content_type="text/plain", charset="utf-8")
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Content-Type-Options"] = "nosniff"
    if headers:
        response.headers.update(headers)
    return response
