"""Relay one WebSocket between a browser and its desktop, message by message.

Order: the desktop side first (:func:`tunnel.websocket.websocket_connect`, offering the
browser's subprotocols), and only once it accepted, the browser (aiohttp's
``WebSocketResponse`` with the subprotocol the desktop chose). A refused desktop handshake
is that HTTP status and body to the browser; a tunnel failure is the HTTP relay's page.

Then two loops, one per direction, each awaiting every send (a slow reader slows the
writer on the other side; what is held is one message per direction plus each side's own
bounded buffers). Text stays text and binary stays binary. Closing:

- the browser closes with (code, reason): the desktop gets the same, and the browser's close
  is answered with the desktop's reply;
- the desktop closes: the browser gets its code and reason; a desktop that vanished (1006:
  no close frame, the tunnel failed) is ``1014 bad gateway``;
- the browser vanishes: the desktop gets ``1001 going away``.

Codes that may not be sent on the wire (1005 "none given", 1006, 1015) become 1000, or
1014 for a desktop that vanished.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Final

from aiohttp import WSMsgType, web
from nats.aio.client import Client as NATS

import tunnel
from tunnel.websocket import (
    DEFAULT_MAX_MESSAGE_SIZE,
    TunnelWebSocket,
    WebSocketClosed,
    WebSocketHandshakeError,
    websocket_connect,
)

from .headers import Headers, response_headers
from .http_relay import tunnel_failure_page
from .pages import page

__all__ = ["BAD_GATEWAY", "relay_websocket", "wire_code"]

log = logging.getLogger("studio_gateway.preview")

NORMAL: Final = 1000
GOING_AWAY: Final = 1001
ABNORMAL: Final = 1006
BAD_GATEWAY: Final = 1014
# Close codes an endpoint must never put in a close frame (RFC 6455 7.4.1).
_NOT_ON_THE_WIRE: Final = frozenset({1004, 1005, 1006, 1015})
# A close reason is at most 123 bytes of UTF-8 (a control frame holds 125, the code takes 2).
MAX_REASON_BYTES: Final = 123
# Browser liveness: aiohttp pings this often and drops a browser that does not answer.
BROWSER_HEARTBEAT: Final = 30.0
# The close handshake with each side, at most.
CLOSE_TIMEOUT: Final = 5.0


def wire_code(code: int | None, *, vanished: int = NORMAL) -> int:
    """A close code fit for a close frame: ``vanished`` for 1006 (no close came), 1000 for the
    other reserved ones and anything out of range, else ``code``."""
    if code == ABNORMAL:
        return vanished
    if code is None or code in _NOT_ON_THE_WIRE or not 1000 <= code <= 4999:
        return NORMAL
    return code


def _reason(text: str) -> str:
    data = text.encode("utf-8")[:MAX_REASON_BYTES]
    return data.decode("utf-8", "ignore")


@dataclass(frozen=True)
class _Closed:
    """How one direction ended: ``by`` the browser or the desktop, and with which close."""

    by: str  # "browser", "desktop", "browser-gone"
    code: int = NORMAL
    reason: str = ""


async def relay_websocket(
    request: web.Request, nc: NATS, *, prefix: str, host: str, headers: Headers
) -> web.StreamResponse:
    offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
    if not web.WebSocketResponse().can_prepare(request).ok:  # the browser's handshake, before the desktop's
        return page(400, "This is no valid WebSocket handshake (Sec-WebSocket-Key and -Version 13 needed).")
    try:
        desktop = await websocket_connect(
            nc, f"tunnel://{host}{request.raw_path}", subprotocols=offered, headers=headers, prefix=prefix
        )
    except WebSocketHandshakeError as exc:
        if exc.status == 101:  # a 101 that is no valid WebSocket answer
            return page(502, "Your desktop answered the WebSocket handshake wrongly.", exc.message)
        refusal = web.Response(status=exc.status, body=exc.body)
        for name, value in response_headers(exc.headers):
            if name.lower() not in ("content-length", "content-encoding"):
                refusal.headers.add(name, value)
        return refusal
    except tunnel.TunnelError as exc:
        return tunnel_failure_page(exc, host)
    try:
        browser = web.WebSocketResponse(
            protocols=[desktop.subprotocol] if desktop.subprotocol else (),
            autoclose=False,
            max_msg_size=DEFAULT_MAX_MESSAGE_SIZE,
            heartbeat=BROWSER_HEARTBEAT,
            timeout=CLOSE_TIMEOUT,
        )
        await browser.prepare(request)
    except BaseException:
        await desktop.close(GOING_AWAY)
        raise
    await _relay(browser, desktop, host)
    return browser


async def _relay(browser: web.WebSocketResponse, desktop: TunnelWebSocket, host: str) -> None:
    upward = asyncio.create_task(_browser_to_desktop(browser, desktop))
    downward = asyncio.create_task(_desktop_to_browser(browser, desktop))
    try:
        done, _ = await asyncio.wait({upward, downward}, return_when=asyncio.FIRST_COMPLETED)
        if downward in done:
            ended = downward.result()
            if ended.by == "desktop":
                code = wire_code(ended.code, vanished=BAD_GATEWAY)
                reason = "bad gateway" if ended.code == ABNORMAL else ended.reason
                await browser.close(code=code, message=_reason(reason).encode("utf-8"))
            await _finish(upward)
            await desktop.close(GOING_AWAY if ended.by == "browser-gone" else NORMAL, timeout=CLOSE_TIMEOUT)
            return
        ended = upward.result()
        if ended.by == "browser":
            # Hand the browser's close on; the desktop's reply answers the browser.
            await desktop.close(wire_code(ended.code), _reason(ended.reason), timeout=CLOSE_TIMEOUT)
            reply = await _finish(downward)
            code, reason = ended.code, ended.reason
            if reply is not None and reply.by == "desktop" and reply.code != ABNORMAL:
                code, reason = reply.code, reply.reason
            await browser.close(code=wire_code(code), message=_reason(reason).encode("utf-8"))
            return
        if ended.by == "browser-gone":
            await desktop.close(GOING_AWAY, timeout=CLOSE_TIMEOUT)
            await _finish(downward)
            return
        # The desktop closed while a message went up: the downward loop has its close.
        ended = await downward
        await browser.close(
            code=wire_code(ended.code, vanished=BAD_GATEWAY), message=_reason(ended.reason).encode("utf-8")
        )
        await _finish(upward)
    finally:
        for task in (upward, downward):
            task.cancel()
        for task in (upward, downward):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        # Every way out ends the desktop's stream, also when its close frame already came: a
        # desktop that closed but never ends its stream would otherwise keep it (and the
        # subscription) for as long as it sends heartbeats. (Closing twice is harmless.)
        with contextlib.suppress(Exception):
            await desktop.close(GOING_AWAY, timeout=CLOSE_TIMEOUT)
        log.debug("preview WebSocket to %s ended", host)


async def _finish(task: asyncio.Task[_Closed]) -> _Closed | None:
    """The task's result once it ended by itself (within the close timeout), else None."""
    try:
        return await asyncio.wait_for(asyncio.shield(task), CLOSE_TIMEOUT)
    except (TimeoutError, Exception):
        return None


async def _browser_to_desktop(browser: web.WebSocketResponse, desktop: TunnelWebSocket) -> _Closed:
    while True:
        msg = await browser.receive()
        try:
            if msg.type is WSMsgType.TEXT:
                await desktop.send_text(msg.data)
            elif msg.type is WSMsgType.BINARY:
                await desktop.send_bytes(msg.data)
            elif msg.type is WSMsgType.CLOSE:
                return _Closed("browser", msg.data or NORMAL, msg.extra or "")
            elif msg.type is WSMsgType.CLOSING:
                return _Closed("desktop")  # our own close of the browser (the desktop ended)
            elif msg.type in (WSMsgType.CLOSED, WSMsgType.ERROR):
                return _Closed("browser-gone", GOING_AWAY)
        except WebSocketClosed as exc:
            return _Closed("desktop", exc.code, exc.reason)


async def _desktop_to_browser(browser: web.WebSocketResponse, desktop: TunnelWebSocket) -> _Closed:
    while True:
        try:
            msg = await desktop.receive()
        except WebSocketClosed as exc:
            return _Closed("desktop", exc.code, exc.reason)
        try:
            if msg.kind == "text":
                assert isinstance(msg.data, str)
                await browser.send_str(msg.data)
            else:
                assert isinstance(msg.data, bytes | bytearray)
                await browser.send_bytes(bytes(msg.data))
        except ConnectionError:
            return _Closed("browser-gone", GOING_AWAY)
