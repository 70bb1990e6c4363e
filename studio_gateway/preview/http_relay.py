"""Relay one HTTP request from a browser to its desktop through the tunnel, streaming both ways.

The request body is pulled from aiohttp as the tunnel's flow control asks for it, and the
response body written to the browser as it arrives (each write awaited: a slow browser slows
the desktop), so no body is held whole. Failures before the response head are text pages:
the desktop not connected is ``502`` naming ``tunnel_unreachable``, a desktop that stopped
answering ``504``, any other tunnel failure ``502`` with its code. A failure after the head
closes the browser's connection, so a short body never looks complete; so does a body that
disagrees with the desktop's own ``Content-Length`` (aiohttp frames the response by it).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web
from nats.aio.client import Client as NATS

import tunnel

from .headers import Headers, response_headers
from .pages import page

__all__ = ["BodyLengthMismatch", "declared_length", "relay_http", "tunnel_failure_page"]

log = logging.getLogger("studio_gateway.preview")

READ_SIZE = 64 * 1024


def tunnel_failure_page(exc: tunnel.TunnelError, host: str) -> web.Response:
    """The page for a tunnel failure before the desktop answered (also the WebSocket relay's)."""
    if isinstance(exc, tunnel.TunnelUnreachable):
        return page(
            502,
            f"Your desktop is not connected ({exc.code}).",
            "Start it with 'linkd up --upstream http://127.0.0.1:<port>' and reload this page.",
        )
    if isinstance(exc, tunnel.TunnelTimeout):
        return page(504, f"Your desktop did not answer in time ({exc.code}).", "Reload to try again.")
    if isinstance(exc, tunnel.LocalProtocolError):
        return page(400, f"This request cannot be sent to your desktop ({exc.code}).")
    log.info("preview request to %s failed: %s", host, exc)
    return page(502, f"Your desktop could not be reached ({exc.code}).", "Reload to try again.")


async def _request_body(request: web.Request) -> AsyncIterator[bytes]:
    async for chunk in request.content.iter_chunked(READ_SIZE):
        yield chunk


async def relay_http(
    request: web.Request, nc: NATS, *, prefix: str, host: str, headers: Headers
) -> web.StreamResponse:
    """``request`` to ``tunnel://<host><path?query>`` with ``headers``; the desktop's answer back."""
    url = f"tunnel://{host}{request.raw_path}"
    body = _request_body(request) if request.body_exists else None
    try:
        answer = await tunnel.fetch(
            nc, url, prefix=prefix, method=request.method, headers=headers, body=body, timeout=None
        )
    except tunnel.TunnelError as exc:
        return tunnel_failure_page(exc, host)
    async with answer:  # leaving early (the browser went away) aborts the desktop's side
        if answer.status < 200:  # 1xx is no final answer to a plain request (101 only upgrades)
            return page(502, f"Your desktop answered {answer.status} to a plain request.")
        headers = response_headers(answer.headers)
        try:
            declared = declared_length(headers)
        except ValueError:
            return page(502, "Your desktop answered with an invalid Content-Length.")
        if request.method == "HEAD" or answer.status in (204, 304):
            declared = None  # no body follows, whatever the length says
        response = web.StreamResponse(status=answer.status, reason=answer.reason or None)
        for name, value in headers:
            response.headers.add(name, value)
        sent = 0
        try:
            await response.prepare(request)
            async for chunk in answer.aiter_bytes():
                if declared is not None and sent + len(chunk) > declared:
                    raise BodyLengthMismatch(f"more than the {declared} bytes of its Content-Length")
                await response.write(chunk)
                sent += len(chunk)
            if declared is not None and sent != declared:
                raise BodyLengthMismatch(f"{sent} of the {declared} bytes of its Content-Length")
        except ConnectionError:
            log.debug("the browser left during a preview response from %s", host)
            return response  # aiohttp drops a response it cannot finish, quietly
        except (tunnel.TunnelError, BodyLengthMismatch) as exc:
            log.info("preview response from %s broke off: %s", host, exc)
            response.force_close()
            if request.transport is not None:
                request.transport.close()  # no final chunk: the browser sees a broken body
            return response
    await response.write_eof()
    return response


class BodyLengthMismatch(Exception):
    """The desktop's body disagrees with its own Content-Length."""


def declared_length(headers: Headers) -> int | None:
    """The body length ``Content-Length`` declares (None: none); ValueError when its values are
    not one non-negative integer. Checked because aiohttp frames the browser's response by it:
    a shorter body would leave the kept-alive connection waiting for the next response's bytes,
    a longer one would be cut to a body that looks complete."""
    values = {
        token.strip()
        for name, value in headers
        if name.lower() == "content-length"
        for token in value.split(",")
    }
    if not values:
        return None
    if len(values) != 1:
        raise ValueError("conflicting Content-Length values")
    (value,) = values
    if not value.isascii() or not value.isdigit():
        raise ValueError(f"Content-Length is not a number: {value!r}")
    return int(value)
