"""Typed tunnel errors with stable codes.

Every error carries a stable ``code`` (part of the public API, safe to match on
and to put in logs or JSON) and the HTTP status a gateway should answer when
it surfaces the error to its own caller.

The tree::

    TunnelError                      code: varies           status: 502
    ├── LocalProtocolError           tunnel_bad_request     400  (we misused the API:
    │                                                              bad URL, header, hostname)
    ├── TunnelUnreachable            tunnel_unreachable     503  (nobody serves the host)
    ├── TunnelTimeout                                       504
    │   ├── NoFirstFrameTimeout      tunnel_no_first_frame
    │   ├── IdleTimeout              tunnel_idle_timeout
    │   ├── DeadlineExceeded         tunnel_timeout
    │   └── StallTimeout             tunnel_stalled         (server side: the caller stopped
    │                                                              granting credit or sending its body)
    ├── TunnelAborted                tunnel_aborted         499  (cancelled by a peer or by us)
    ├── RemoteProtocolError          tunnel_protocol_error  502  (the peer broke the protocol:
    │   │                                                          gap, duplicate, bad frame)
    │   └── IntegrityError           tunnel_integrity_error (a body's byte count or checksum at
    │                                                              its end differs from what arrived)
    ├── RemoteError                  code sent by the peer  502  (response.error / request.error,
    │                                                              e.g. tunnel_handler_error)
    ├── BufferLimitExceeded          tunnel_buffer_limit    502  (a plain v1 peer, which has no
    │                                                              flow control, ran too far ahead)
    ├── TunnelConnectionError        tunnel_connection_closed 502 (our NATS connection failed)
    ├── UpgradeUnsupported           tunnel_upgrade_unsupported 502 (an upgrade asked of a server
    │                                                              that cannot carry one: plain v1)
    └── PermissionDenied             tunnel_permission_denied 403 (NATS refused a subscription a
                                                                   server needs: serve() fails)

``LocalProtocolError`` versus ``RemoteProtocolError`` follows h11: the first is a
bug or bad input on our side, the second is the other end's fault.
"""

from __future__ import annotations

from typing import Final


class ErrorCode:
    """Stable error codes; the string values travel on the wire and in logs."""

    BAD_REQUEST: Final = "tunnel_bad_request"
    UNREACHABLE: Final = "tunnel_unreachable"
    NO_FIRST_FRAME: Final = "tunnel_no_first_frame"
    IDLE_TIMEOUT: Final = "tunnel_idle_timeout"
    TIMEOUT: Final = "tunnel_timeout"
    ABORTED: Final = "tunnel_aborted"
    PROTOCOL_ERROR: Final = "tunnel_protocol_error"
    HANDLER_ERROR: Final = "tunnel_handler_error"
    CONNECTION_CLOSED: Final = "tunnel_connection_closed"
    SERVER_CLOSING: Final = "tunnel_server_closing"
    BODY_ERROR: Final = "tunnel_body_error"
    OVERLOADED: Final = "tunnel_overloaded"
    BUFFER_LIMIT: Final = "tunnel_buffer_limit"
    STALLED: Final = "tunnel_stalled"
    UPGRADE_UNSUPPORTED: Final = "tunnel_upgrade_unsupported"
    INTEGRITY: Final = "tunnel_integrity_error"
    PERMISSION_DENIED: Final = "tunnel_permission_denied"


class TunnelError(Exception):
    """Base of every tunnel error; ``code`` is stable, ``message`` is for humans."""

    code: str = ErrorCode.PROTOCOL_ERROR
    http_status: int = 502

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r})"


class LocalProtocolError(TunnelError):
    """We were asked to do something the protocol cannot express (caller's mistake)."""

    code = ErrorCode.BAD_REQUEST
    http_status = 400


class TunnelUnreachable(TunnelError):
    """No server is subscribed for the host (NATS no-responders), after the grace retries."""

    code = ErrorCode.UNREACHABLE
    http_status = 503


class TunnelTimeout(TunnelError):
    """Base of the three separate timeouts."""

    code = ErrorCode.TIMEOUT
    http_status = 504


class NoFirstFrameTimeout(TunnelTimeout):
    """A server took the request start but never answered with any frame."""

    code = ErrorCode.NO_FIRST_FRAME


class IdleTimeout(TunnelTimeout):
    """No frame (data or heartbeat) arrived within the idle timeout: the peer is gone."""

    code = ErrorCode.IDLE_TIMEOUT


class DeadlineExceeded(TunnelTimeout):
    """The overall deadline passed."""

    code = ErrorCode.TIMEOUT


class StallTimeout(TunnelTimeout):
    """The server waited its stall timeout for the caller: no new credit (it stopped reading
    the response), or no request-body bytes although it could send. The caller is alive
    (it would otherwise see an idle timeout first) but not making progress."""

    code = ErrorCode.STALLED


class TunnelAborted(TunnelError):
    """The request was cancelled (by the caller, the server, or an abort frame)."""

    code = ErrorCode.ABORTED
    http_status = 499


class RemoteProtocolError(TunnelError):
    """The peer sent something the protocol forbids (gap, duplicate, malformed frame)."""

    code = ErrorCode.PROTOCOL_ERROR
    http_status = 502


class IntegrityError(RemoteProtocolError):
    """A body arrived with another byte count or checksum than its sender's end frame states:
    corrupted or truncated somewhere between the two ends. Never delivered as success."""

    code = ErrorCode.INTEGRITY


class RemoteError(TunnelError):
    """The peer reported an error frame; ``code`` is the code it sent."""

    code = ErrorCode.HANDLER_ERROR
    http_status = 502


class BufferLimitExceeded(TunnelError):
    """A peer without flow control sent more unread bytes than we are willing to hold."""

    code = ErrorCode.BUFFER_LIMIT
    http_status = 502


class TunnelConnectionError(TunnelError):
    """Our NATS connection is closed or failed while the request was in flight."""

    code = ErrorCode.CONNECTION_CLOSED
    http_status = 502


class UpgradeUnsupported(TunnelError):
    """The caller asked for an upgraded stream (a WebSocket, say) and the server that took the
    request cannot carry one: a plain v1 peer, or one without the ``upgrade`` extension."""

    code = ErrorCode.UPGRADE_UNSUPPORTED
    http_status = 502


class PermissionDenied(TunnelError):
    """NATS refused a subscription the server needs (its credentials do not allow serving the
    host): ``serve()`` raises it instead of reporting success and never answering."""

    code = ErrorCode.PERMISSION_DENIED
    http_status = 403


_BY_CODE: dict[str, type[TunnelError]] = {
    ErrorCode.BAD_REQUEST: LocalProtocolError,
    ErrorCode.UNREACHABLE: TunnelUnreachable,
    ErrorCode.NO_FIRST_FRAME: NoFirstFrameTimeout,
    ErrorCode.IDLE_TIMEOUT: IdleTimeout,
    ErrorCode.TIMEOUT: DeadlineExceeded,
    ErrorCode.STALLED: StallTimeout,
    ErrorCode.ABORTED: TunnelAborted,
    ErrorCode.PROTOCOL_ERROR: RemoteProtocolError,
    ErrorCode.INTEGRITY: IntegrityError,
}


def error_from_remote(code: str, message: str) -> TunnelError:
    """Map an error frame from the peer to the matching typed error.

    Codes we know keep their class (a server reporting ``tunnel_timeout`` is a
    timeout to the caller too); anything else is a ``RemoteError`` with that code.
    """
    cls = _BY_CODE.get(code, RemoteError)
    if cls is LocalProtocolError:
        # The *peer* judged our request bad: still a remote verdict, not our local misuse.
        cls = RemoteError
    return cls(message, code=code)
