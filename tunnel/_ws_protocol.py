"""Sans-IO WebSocket framing for upgraded tunnel streams (RFC 6455, after the handshake).

Bytes in, whole messages out; messages in, bytes out. wsproto does the framing
(masking in the client role, UTF-8 checks, control frames); this class adds what
both ends of the tunnel need on top: reassembling fragmented messages under a
size limit, answering pings and close frames, and one close code for the socket.
No I/O and no clock: :mod:`tunnel.websocket` and :mod:`tunnel.asgi` drive it.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from typing import Final, Literal

from wsproto.connection import CLIENT, SERVER, Connection, ConnectionState
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage
from wsproto.utilities import LocalProtocolError as WsprotoLocalError

# RFC 6455 section 1.3: the GUID appended to Sec-WebSocket-Key for Sec-WebSocket-Accept.
_ACCEPT_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: Close codes (RFC 6455 section 7.4.1).
NORMAL_CLOSURE: Final = 1000
GOING_AWAY: Final = 1001
NO_STATUS_RCVD: Final = 1005
ABNORMAL_CLOSURE: Final = 1006
MESSAGE_TOO_BIG: Final = 1009
INTERNAL_ERROR: Final = 1011
#: The largest message either end reassembles by default.
DEFAULT_MAX_MESSAGE_SIZE: Final = 16 * 1024 * 1024
# Unsent control replies (pongs) beyond this are dropped: a peer flooding pings while we
# cannot send must not grow memory (RFC 6455 5.5.3 allows answering only the latest ping).
_MAX_PENDING_CONTROL: Final = 64 * 1024
# Codes a peer may not put in a close frame (RFC 6455 7.4.1: reserved for local use).
_NOT_ON_THE_WIRE: Final = frozenset({1005, 1006, 1015})


def new_key() -> str:
    """A random Sec-WebSocket-Key (16 random bytes, base64)."""
    return base64.b64encode(os.urandom(16)).decode("ascii")


def accept_token(key: str) -> str:
    """The Sec-WebSocket-Accept value a server answers to ``key``."""
    # SHA-1 because RFC 6455 says so: a handshake check, not a security property.
    digest = hashlib.sha1(key.encode("ascii") + _ACCEPT_GUID, usedforsecurity=False).digest()
    return base64.b64encode(digest).decode("ascii")


def valid_key(key: str | None) -> bool:
    """A Sec-WebSocket-Key is base64 of exactly 16 bytes (RFC 6455 4.2.1)."""
    if key is None:
        return False
    try:
        return len(base64.b64decode(key.strip(), validate=True)) == 16
    except ValueError:
        return False


def split_tokens(values: list[str]) -> list[str]:
    """Comma-separated header values (Sec-WebSocket-Protocol, Connection) as a list of tokens."""
    return [token.strip() for value in values for token in value.split(",") if token.strip()]


def valid_close_code(code: int) -> bool:
    """A code an application may send (RFC 6455 7.4: 1000-4999, minus the local-only ones)."""
    return 1000 <= code <= 4999 and code not in _NOT_ON_THE_WIRE


@dataclass(frozen=True)
class WebSocketMessage:
    """One whole message: ``kind`` "text" (``data`` is str) or "binary" (``data`` is bytes)."""

    kind: Literal["text", "binary"]
    data: str | bytes


class WebSocketProtocol:
    """One end of a WebSocket after the handshake.

    ``receive_data`` returns the whole messages the bytes completed; ``data_to_send``
    hands out what must go to the peer (frames, pongs, close replies). Once a close
    frame went both ways (or the stream ended), ``closed`` is True and ``close_code``
    / ``close_reason`` say why: the code in the first close frame received, or ours
    when we failed the connection, or 1006 when the stream ended without one.
    """

    def __init__(self, *, client: bool, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        if max_message_size <= 0:
            raise ValueError("max_message_size must be positive")
        self._conn = Connection(CLIENT if client else SERVER)
        self.max_message_size = max_message_size
        self._out: list[bytes] = []
        self._pending_control = 0
        # The message being reassembled, as the bytes of the wire (text as UTF-8): one growing
        # buffer, so a message sent as millions of empty or 1-byte fragments costs its bytes,
        # not a Python object per fragment.
        self._message = bytearray()
        self._kind: Literal["text", "binary"] | None = None
        self.close_code: int | None = None
        self.close_reason = ""
        self.ended = False  # the byte stream from the peer ended
        self.failed = False  # we closed because of the peer's bytes (protocol error, too big)
        self._broken = False  # the peer's bytes could not be parsed: stop feeding them
        self.pongs_received = 0
        #: Set False by the I/O side while it cannot send: pings then go unanswered (RFC 6455
        #: 5.5.3 allows answering only the latest), so a peer that pings without reading
        #: cannot grow our outgoing queue.
        self.answer_pings = True
        self.last_pong: bytes | None = None

    # -- state -------------------------------------------------------------------------

    @property
    def open(self) -> bool:
        """Messages may still be sent (no close frame sent or received)."""
        return self._conn.state is ConnectionState.OPEN and not self.ended

    @property
    def close_sent(self) -> bool:
        return self._conn.state in (ConnectionState.LOCAL_CLOSING, ConnectionState.CLOSED)

    @property
    def closed(self) -> bool:
        """No more messages come in: a close frame arrived, we failed the socket, or the stream ended."""
        return self.close_code is not None

    @property
    def finished(self) -> bool:
        """Nothing more will go out: close frames both ways, or the stream ended."""
        return self._conn.state is ConnectionState.CLOSED or self.ended

    @property
    def buffered(self) -> int:
        """Bytes of the message being reassembled."""
        return len(self._message)

    # -- outgoing ----------------------------------------------------------------------

    def send_text(self, text: str) -> bytes:
        return self._send(TextMessage(data=text))

    def send_bytes(self, data: bytes) -> bytes:
        return self._send(BytesMessage(data=data))

    def ping(self, payload: bytes = b"") -> bytes:
        if len(payload) > 125:
            raise ValueError("a ping carries at most 125 bytes")
        return self._send(Ping(payload=payload))

    def close(self, code: int = NORMAL_CLOSURE, reason: str = "") -> bytes:
        """Start (or answer) the close handshake; b"" if a close frame already went out."""
        if not valid_close_code(code):
            raise ValueError(f"not a close code an endpoint may send: {code}")
        if len(reason.encode("utf-8")) > 123:
            raise ValueError("a close reason is at most 123 bytes of UTF-8")
        if self.close_sent or self.ended:
            return b""
        return self._conn.send(CloseConnection(code=code, reason=reason))

    def _send(self, event: TextMessage | BytesMessage | Ping) -> bytes:
        if not self.open:
            raise WsprotoLocalError("the WebSocket is closing or closed")
        return self._conn.send(event)

    def data_to_send(self) -> bytes:
        """Control replies produced by received data (pongs, the close reply, a failing close)."""
        out = b"".join(self._out)
        self._out.clear()
        self._pending_control = 0
        return out

    # -- incoming ----------------------------------------------------------------------

    def receive_data(self, data: bytes | None) -> list[WebSocketMessage]:
        """Feed bytes from the peer (None: the stream ended); returns the completed messages."""
        if data is None:
            self.ended = True
            if self.close_code is None:
                self.close_code = ABNORMAL_CLOSURE
            self._drop_partial()
            return []
        if self._broken or self._conn.state is ConnectionState.CLOSED:
            return []  # after the close handshake (or bytes we could not parse) the rest is ignored
        self._conn.receive_data(data)
        messages: list[WebSocketMessage] = []
        for event in self._conn.events():
            if isinstance(event, TextMessage | BytesMessage):
                if self.closed:
                    continue  # we failed the socket: nothing more is delivered
                message = self._assemble(event)
                if message is not None:
                    messages.append(message)
            elif isinstance(event, Ping):
                if (
                    self.answer_pings
                    and self._conn.state is ConnectionState.OPEN
                    and self._pending_control < _MAX_PENDING_CONTROL
                ):
                    pong = self._conn.send(event.response())
                    self._out.append(pong)
                    self._pending_control += len(pong)
            elif isinstance(event, Pong):
                self.pongs_received += 1
                self.last_pong = bytes(event.payload)
            elif isinstance(event, CloseConnection):
                self._on_close(event)
                if self._broken or self.finished:
                    break
        return messages

    def _assemble(self, event: TextMessage | BytesMessage) -> WebSocketMessage | None:
        kind: Literal["text", "binary"] = "text" if isinstance(event, TextMessage) else "binary"
        self._kind = kind
        # Counted in bytes on the wire: a text part is UTF-8 there (up to 4 bytes a character).
        data = event.data
        part = data.encode("utf-8") if isinstance(data, str) else data
        if len(self._message) + len(part) > self.max_message_size:
            self._fail(MESSAGE_TOO_BIG, f"message over {self.max_message_size} bytes")
            return None
        self._message += part
        if not event.message_finished:
            return None
        message, self._message = bytes(self._message), bytearray()
        self._kind = None
        if kind == "text":
            return WebSocketMessage("text", message.decode("utf-8"))  # wsproto checked the UTF-8
        return WebSocketMessage("binary", message)

    def _on_close(self, event: CloseConnection) -> None:
        state = self._conn.state
        if state is ConnectionState.OPEN or state is ConnectionState.LOCAL_CLOSING:
            # wsproto reports bytes it cannot parse as a CloseConnection without changing
            # state (a real close frame moves it on): that is our failure, answered with a
            # close frame carrying its code; the frame parser is unusable from here on.
            self._broken = True
            if self.close_code is None:
                code = event.code if valid_close_code(event.code) else 1002
                self._fail(code, event.reason or "")
            return
        if not self.failed:
            self.close_code = event.code
            self.close_reason = event.reason or ""
        self._drop_partial()
        if state is ConnectionState.REMOTE_CLOSING:
            code = event.code if valid_close_code(event.code) else NORMAL_CLOSURE
            self._out.append(self._conn.send(CloseConnection(code=code, reason=event.reason or "")))

    def _fail(self, code: int, reason: str) -> None:
        self.failed = True
        self.close_code = code
        self.close_reason = reason
        self._drop_partial()
        reason_bytes = reason.encode("utf-8")[:123]
        self._out.append(self.close(code, reason_bytes.decode("utf-8", "ignore")))

    def _drop_partial(self) -> None:
        self._message = bytearray()
        self._kind = None
