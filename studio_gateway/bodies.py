"""Request bodies: read within a limit, and JSON objects of a bounded depth.

Every handler that takes a body reads it here, so the rules are the same everywhere:

- a declared ``Content-Length`` over the limit is refused before any of the body is read:
  a client that announces a terabyte and sends a kilobyte gets its ``413`` at once, not
  after a read timeout (:func:`declared_length_limit` does the same for every route, with
  the largest limit any route has, so a route that reads no body is covered too);
- a body without a length (chunked) is read up to the limit, then refused;
- a refused body's answer says ``Connection: close`` (the rest of it is never read);
- JSON must be an object nested at most :data:`MAX_JSON_DEPTH` levels: deeper nesting is a
  ``400``, never a ``RecursionError`` in ``json.loads`` (or later, in whatever walks it);
- a malformed chunked body is a ``400``.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, Final

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from .errors import json_error

__all__ = [
    "MAX_JSON_DEPTH",
    "BodyError",
    "declared_length_limit",
    "expect_within",
    "json_object",
    "read_body",
    "read_json_object",
]

# Objects and arrays inside each other, counting the body's own object as 1. Run inputs and
# session requests are shallow; Python's json gives up near 1000 with a RecursionError.
MAX_JSON_DEPTH: Final = 64
READ_SIZE: Final = 64 * 1024


class BodyError(Exception):
    """A body the gateway refuses; :meth:`response` is the JSON error to answer with."""

    def __init__(self, status: int, code: str, message: str, *, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.close = close

    def response(self) -> web.Response:
        response = json_error(self.status, self.code, self.message)
        if self.close:
            response.force_close()  # "Connection: close": the rest of the body is never read
        return response


def _too_large(limit: int, status: int, code: str) -> BodyError:
    return BodyError(status, code, f"the body must be at most {limit} bytes", close=True)


async def read_body(
    request: web.Request, limit: int, *, too_large: tuple[int, str] = (413, "payload_too_large")
) -> bytes:
    """The whole body, at most ``limit`` bytes; BodyError ``too_large`` (status, code) beyond."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise _too_large(limit, *too_large)
    chunks: list[bytes] = []
    size = 0
    try:
        while chunk := await request.content.read(READ_SIZE):  # what has arrived, up to READ_SIZE
            size += len(chunk)
            if size > limit:
                raise _too_large(limit, *too_large)
            chunks.append(chunk)
    except web.RequestPayloadError:  # e.g. a bad chunk size; its text quotes the client's bytes
        raise BodyError(400, "invalid_body", "the request body is malformed", close=True) from None
    return b"".join(chunks)


def _within_depth(value: object, limit: int) -> bool:
    """True when ``value`` nests objects/arrays at most ``limit`` deep (no recursion)."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        if not children:
            continue
        for child in children:
            if isinstance(child, dict | list):
                if depth + 1 > limit:
                    return False
                stack.append((child, depth + 1))
    return True


def json_object(raw: bytes, *, code: str = "invalid_json", optional: bool = False) -> dict[str, Any]:
    """``raw`` as a JSON object (``{}`` for an empty body when ``optional``); BodyError 400 ``code``."""
    if optional and not raw.strip():
        return {}
    not_object = BodyError(400, code, "the body must be a JSON object")
    try:
        payload = json.loads(raw)
    except RecursionError:
        raise _too_deep(code) from None
    except (ValueError, UnicodeDecodeError):
        raise not_object from None
    if not isinstance(payload, dict):
        raise not_object
    if not _within_depth(payload, MAX_JSON_DEPTH):
        raise _too_deep(code)
    return payload


def _too_deep(code: str) -> BodyError:
    return BodyError(400, code, f"the body's JSON nests deeper than {MAX_JSON_DEPTH} levels")


async def read_json_object(
    request: web.Request,
    limit: int,
    *,
    optional: bool = False,
    code: str = "invalid_json",
    too_large: tuple[int, str] = (413, "payload_too_large"),
) -> dict[str, Any]:
    """:func:`read_body` then :func:`json_object`."""
    return json_object(await read_body(request, limit, too_large=too_large), code=code, optional=optional)


ExpectHandler = Callable[[web.Request], Awaitable[web.StreamResponse | None]]


def expect_within(limit: int) -> ExpectHandler:
    """The ``Expect: 100-continue`` handler of every route that takes a body.

    aiohttp answers ``100 Continue`` before any middleware runs, which would invite a client
    declaring a terabyte to start sending it; this one answers its ``413`` instead, and sends
    ``100 Continue`` only to a body within ``limit`` (the largest any route takes).
    """

    async def expect(request: web.Request) -> web.StreamResponse | None:
        declared = request.content_length
        if declared is not None and declared > limit:
            return _too_large(limit, 413, "payload_too_large").response()
        if request.headers.get("Expect", "").lower() != "100-continue" or request.version < (1, 1):
            return json_error(417, "expectation_failed", "only Expect: 100-continue is understood")
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the interim answer is not the response (as aiohttp does)
        return None

    return expect


def declared_length_limit(limit: int) -> Middleware:
    """Middleware: a declared Content-Length over ``limit`` is ``413`` before routing or auth."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        declared = request.content_length
        if declared is not None and declared > limit:
            return _too_large(limit, 413, "payload_too_large").response()
        return await handler(request)

    return middleware
