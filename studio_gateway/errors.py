"""Every error the gateway answers is JSON ``{"error": {"code", "message"}}``, never a stack trace.

``code`` is stable (clients match on it); ``message`` is for humans. The
middleware turns aiohttp's own HTTP errors (404, 405, 413...) into the same shape
and any unexpected exception into a logged 500 whose body says nothing internal.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from aiohttp import web

__all__ = ["error_middleware", "json_error"]

log = logging.getLogger("studio_gateway.errors")


def json_error(
    status: int,
    code: str,
    message: str,
    *,
    headers: Mapping[str, str] | None = None,
    **details: Any,
) -> web.Response:
    body: dict[str, Any] = {"code": code, "message": message, **details}
    return web.json_response({"error": body}, status=status, headers=headers)


def _code_for(status: int) -> str:
    return {
        400: "bad_request",
        401: "unauthorized",
        403: "forbidden",
        404: "not_found",
        405: "method_not_allowed",
        413: "payload_too_large",
        415: "unsupported_media_type",
    }.get(status, "http_error" if status < 500 else "server_error")


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # redirects and the like pass through untouched
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "www-authenticate")}
        return json_error(exc.status, _code_for(exc.status), exc.reason, headers=headers)
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return json_error(500, "internal_error", "internal server error")
    return response
