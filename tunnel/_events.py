"""What the stream state machines say to the I/O layer (sans-IO): messages to publish, events.

Both ends' machines (:mod:`tunnel._caller`, :mod:`tunnel._server_stream`) take frames in and
give these out; the I/O layer publishes each ``Publish`` and acts on each event.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from . import _frames as f
from ._errors import TunnelError
from ._record import record

Clock = Callable[[], float]

# Plain v1 JSON chunks carry at most what the reference caller sends (64 KiB of data), so a
# v1 peer never sees a frame larger than it would produce itself.
V1_MAX_CHUNK: Final = 64 * 1024
# Responses that never carry a body (RFC 9110): the caller does not wait for one.
NO_BODY_STATUSES: Final = frozenset({204, 205, 304})


@record
class Publish:
    """One NATS message to send."""

    subject: str
    payload: bytes
    reply: str = ""


# ----------------------------------------------------------------------------- events


@record
class Acked:
    """A server took the request; the request body may flow now."""


@record
class ResponseHead:
    status: int
    status_text: str | None
    headers: f.Headers
    has_body: bool
    complete_body: bytes | None = None  # set when the whole body came with the head


@record
class DataReceived:
    data: bytes


@record
class BodyEnded:
    """The peer's body is complete (every frame arrived, in order)."""


@record
class CreditGranted:
    """We may send more body bytes."""


@record
class PeerFailed:
    """The peer ended the stream with an error frame or an abort."""

    error: TunnelError


@record
class HeartbeatReceived:
    """The server is alive but sent nothing else lately: it may be waiting on a lost grant."""


Event = Acked | ResponseHead | DataReceived | BodyEnded | CreditGranted | PeerFailed | HeartbeatReceived
