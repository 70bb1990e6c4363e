"""Every error the gateway answers is JSON ``{"error": {"code", "message"}}``, never a stack trace.

``code`` is stable (clients match on it); ``message`` is for humans. The
middleware turns aiohttp's own HTTP errors (404, 405, 413...) into the same shape
and any unexpected exception into a logged 500 whose body says nothing internal.

Two things never reach the middleware, and are handled here too:

- a request aiohttp cannot parse (a header over 8 KiB, a bad request line...): aiohttp
  answers it itself with the parser's message as the body, and logs a traceback at error
  level; that message quotes up to 100 bytes of the offending line: part of a header
  value, a token, a cookie. :class:`GatewayRequestHandler` answers ``400 bad_request``
  with a fixed reason instead and logs one info line without any of the request's bytes;
  ``GatewayRunner`` (:mod:`.app`) serves with it, so ``studio-gateway serve`` does;
- a client that leaves while its response streams (Ctrl-C on ``linkctl runs attach``):
  the next write raises ``ConnectionResetError``; that is one info line, not a traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Final

from aiohttp import http_exceptions, web
from aiohttp.typedefs import Handler

__all__ = ["GatewayRequestHandler", "client_left", "error_middleware", "json_error"]

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


def client_left(request: web.Request, exc: BaseException) -> bool:
    """True when ``exc`` is a write failing because the client closed the connection."""
    if not isinstance(exc, ConnectionResetError):
        return False
    transport = request.transport
    return transport is None or transport.is_closing()


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # redirects and the like pass through untouched
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "www-authenticate")}
        return json_error(exc.status, _code_for(exc.status), exc.reason, headers=headers)
    except Exception as exc:
        if client_left(request, exc):
            log.info("%s %s: the client left before the response ended", request.method, request.path)
            # Nothing can be sent any more; aiohttp drops this response quietly.
            return web.Response(status=499)
        log.exception("unhandled error in %s %s", request.method, request.path)
        return json_error(500, "internal_error", "internal server error")
    return response


# What a malformed request was, by aiohttp's exception class (most specific first); never
# the exception's text, which quotes the request.
_PARSE_ERRORS: Final[tuple[tuple[type[Exception], str], ...]] = (
    (http_exceptions.LineTooLong, "request line or header too long"),
    (http_exceptions.InvalidHeader, "invalid request header"),
    (http_exceptions.BadHttpMethod, "invalid request method"),
    (http_exceptions.BadStatusLine, "invalid request line"),
    (http_exceptions.InvalidURLError, "invalid request target"),
    (http_exceptions.ContentEncodingError, "unsupported content encoding"),
    (http_exceptions.PayloadEncodingError, "invalid request body framing"),
)
MALFORMED: Final = "malformed HTTP request"


def parse_error_reason(exc: BaseException) -> str:
    """A fixed description of a parse error, without any of the request's bytes."""
    for kind, reason in _PARSE_ERRORS:
        if isinstance(exc, kind):
            return reason
    return MALFORMED


class GatewayRequestHandler(web.RequestHandler):
    """aiohttp's connection handler, except that a request it cannot parse gets the gateway's
    JSON ``400 bad_request`` with a fixed reason, and one info log line without its bytes."""

    __slots__ = ()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, http_exceptions.HttpProcessingError) or status >= 500:
            return super().handle_error(request, status, exc, message)
        reason = parse_error_reason(exc)
        # A first request in another protocol (TLS on this port, a scanner) is routine: debug.
        level = logging.DEBUG if isinstance(exc, http_exceptions.BadHttpMethod) else logging.INFO
        log.log(level, "refused a malformed request from %s: %s", request.remote, reason)
        if request.writer.output_size > 0:
            raise ConnectionError("the response had started; cannot send the error")
        response = json_error(status, _code_for(status), reason)
        response.force_close()
        return response
