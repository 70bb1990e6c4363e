"""What the raw-socket paths to the local service share: its connection, its errors.

Requests with a body (:mod:`linkd.upstream_upload`) and upgrades
(:mod:`linkd.upstream_upgrade`) speak h11 on their own TCP/TLS connection instead of
httpx; both open it the same way, and every ``--upstream`` failure is answered the same
way (a JSON error whose code the request's traffic record and access line carry).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
from typing import Final

import httpx

import tunnel

from .traffic import note_error

__all__ = [
    "MAX_HEAD_SIZE",
    "READ_SIZE",
    "UpstreamConnectFailed",
    "describe",
    "error_response",
    "open_connection",
    "ssl_context",
]

log = logging.getLogger("linkd.upstream")

READ_SIZE: Final = 64 * 1024
# A response head larger than this is not one a dev server sends (the tunnel carries 512 headers).
MAX_HEAD_SIZE: Final = 256 * 1024


def error_response(status: int, code: str, message: str) -> tunnel.Response:
    """Our answer when the local service could not give one; noted on the traffic record."""
    note_error(code, message)
    body = json.dumps({"error": {"code": code, "message": message}})
    return tunnel.Response(status, [("content-type", "application/json")], body)


def describe(exc: BaseException) -> str:
    """The reason behind ``exc``: its message and those of its causes, without repeats."""
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current) or type(current).__name__
        if isinstance(current, OSError) and current.strerror:
            text = current.strerror
            if current.errno and os.strerror(current.errno) not in text:
                # asyncio's "Connect call failed (host, port)" alone hides the reason.
                text = f"{os.strerror(current.errno)} ({text})"
        if text not in parts:
            parts.append(text)
        current = current.__cause__ or current.__context__
    return ": ".join(parts)


def ssl_context() -> ssl.SSLContext:
    """What the httpx path verifies with (certifi, no environment), speaking HTTP/1.1 only."""
    context = httpx.create_ssl_context(trust_env=False)
    context.set_alpn_protocols(["http/1.1"])
    return context


class UpstreamConnectFailed(Exception):
    """No connection to the local service; ``response`` is the caller's answer (502 or 504)."""

    def __init__(self, response: tunnel.Response) -> None:
        super().__init__(response.status)
        self.response = response


async def open_connection(
    base: httpx.URL, base_url: str, timeout: float, *, purpose: str = ""
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP (TLS for https) connection to the service, within ``timeout`` s.

    Failures are logged once (``purpose``, e.g. " for an upgrade", says what it was for) and
    raised as :class:`UpstreamConnectFailed` carrying the 504/502 answer.
    """
    host = base.host
    port = base.port or (443 if base.scheme == "https" else 80)
    context = ssl_context() if base.scheme == "https" else None
    try:
        async with asyncio.timeout(timeout):
            return await asyncio.open_connection(
                host, port, ssl=context, server_hostname=host if context else None, limit=READ_SIZE
            )
    except TimeoutError:
        log.warning("upstream %s: no connection%s within %ss", base_url, purpose, timeout)
        raise UpstreamConnectFailed(
            error_response(504, "upstream_timeout", f"{base_url} did not answer in time (connect timeout)")
        ) from None
    except OSError as exc:
        log.warning("upstream %s is unreachable%s: %s", base_url, purpose, describe(exc))
        raise UpstreamConnectFailed(
            error_response(502, "upstream_unreachable", f"cannot connect to {base_url}: {describe(exc)}")
        ) from None
