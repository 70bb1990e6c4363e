"""``linkctl forward`` for upgrade requests (WebSocket: a dev server's HMR socket).

A browser's ``Connection: Upgrade`` + ``Upgrade: websocket`` request (without a body)
is sent as an upgraded tunnel stream (``fetch(..., upgrade=True)``) with ``Upgrade`` and
``Connection: Upgrade`` kept (every other hop-by-hop header is dropped, as for any
request). The desktop's ``101`` is written to the browser with its ``Upgrade`` and
``Sec-WebSocket-*`` headers, and from then on the connection is a raw byte pipe both
ways: frames are never parsed, so text, binary, compressed frames, pings and close codes
pass unchanged. Bytes the browser sent right behind its request head go first.

Ends: the browser closing its side ends the stream's request direction (half-close);
the desktop ending the stream closes the browser's connection. Any other answer is an
ordinary response (nothing of the browser's socket is read for it); a tunnel error
before the head is the forwarder's usual 502/504. The overall ``--timeout`` does not
apply to an upgraded connection (a WebSocket lives as long as the page).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Final

import h11

import tunnel
from contract.http_headers import HOP_BY_HOP, connection_named

__all__ = ["UpgradedPipe", "is_upgrade", "switching_headers", "upgrade_headers"]

READ_SIZE: Final = 64 * 1024


def _tokens(request: h11.Request, name: bytes) -> list[bytes]:
    return [
        token.strip().lower()
        for header, value in request.headers
        if header == name
        for token in value.split(b",")
        if token.strip()
    ]


def is_upgrade(request: h11.Request) -> bool:
    """A body-less request asking to switch protocols (``Connection: upgrade`` and ``Upgrade``).

    One with a body is forwarded as a plain request (its ``Upgrade`` dropped), as before.
    """
    has_body = any(
        (name == b"content-length" and value.strip() != b"0") or name == b"transfer-encoding"
        for name, value in request.headers
    )
    asked = b"upgrade" in _tokens(request, b"connection") and bool(_tokens(request, b"upgrade"))
    return asked and not has_body


def upgrade_headers(request: h11.Request) -> list[tuple[str, str]]:
    """The switch the browser asked for, to add to its (hop-by-hop filtered) headers."""
    upgrade = ", ".join(value.decode("latin-1") for name, value in request.headers if name == b"upgrade")
    return [("upgrade", upgrade), ("connection", "Upgrade")]


def switching_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The desktop's 101 headers for the browser: ``Upgrade`` and ``Sec-WebSocket-*`` as sent,
    ``Connection: Upgrade``, other hop-by-hop headers (and those ``Connection`` named) dropped."""
    # The switch itself (Upgrade) is kept; nothing is framed after a 101 (no Content-Length).
    drop = (HOP_BY_HOP | connection_named(headers) | {"content-length"}) - {"upgrade"}
    out = [(name, value) for name, value in headers if name.lower() not in drop]
    out.append(("connection", "Upgrade"))
    return out


class UpgradedPipe:
    """The byte pipe between a browser's connection and an upgraded tunnel stream.

    :meth:`browser_bytes` is the ``body`` for ``fetch``: it waits until the 101 has been
    written (:meth:`switched`) or the upgrade was refused (:meth:`refused`: it ends at once,
    nothing read), then yields what the browser sends until it closes its side.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.up = 0  # browser -> desktop bytes
        self.down = 0  # desktop -> browser bytes
        self._decided: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()

    def switched(self, early: bytes) -> None:
        """The 101 is written; ``early``: what the browser sent behind its head (h11's trailing data)."""
        if not self._decided.done():
            self._decided.set_result(early)

    def refused(self) -> None:
        if not self._decided.done():
            self._decided.set_result(None)

    async def browser_bytes(self) -> AsyncIterator[bytes]:
        early = await self._decided
        if early is None:
            return
        if early:
            self.up += len(early)
            yield early
        while True:
            try:
                data = await self.reader.read(READ_SIZE)
            except OSError:
                data = b""
            if not data:
                return  # the browser closed its side: half-close the stream
            self.up += len(data)
            yield data

    async def relay(self, response: tunnel.FetchResponse) -> str | None:
        """Desktop -> browser until the stream ends; None when it ended cleanly, else why not."""
        try:
            async for chunk in response.aiter_bytes():
                self.writer.write(chunk)
                await self.writer.drain()
                self.down += len(chunk)
        except tunnel.TunnelError as exc:
            return f"{exc.code}: {exc.message}"
        except OSError as exc:
            return f"the browser left ({type(exc).__name__})"
        finally:
            await response.aclose()
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
        return None
