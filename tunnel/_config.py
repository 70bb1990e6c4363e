"""Named defaults and small option objects; every limit says why it has its value."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

# Reference peers give up after 30 s without any first frame; we match them.
DEFAULT_FIRST_FRAME_TIMEOUT: Final = 30.0
# Heartbeats arrive several times per idle period, so 20 s of silence means the peer is gone.
DEFAULT_IDLE_TIMEOUT: Final = 20.0
# Reference callers republish an unanswered start every second (core NATS may drop it).
DEFAULT_REPUBLISH_INTERVAL: Final = 1.0
# A daemon that is (re)connecting gets this long before "nobody serves this host" is final.
DEFAULT_UNREACHABLE_GRACE: Final = 0.2
# Pause between no-responders retries inside the grace period.
UNREACHABLE_RETRY_INTERVAL: Final = 0.05
# Flow-control window per direction: bounds buffered bytes per request, large
# enough that loopback transfers are limited by CPU, not by waiting for credit.
DEFAULT_WINDOW: Final = 2 * 1024 * 1024
# Largest data frame: big frames amortise per-message cost, but stay well under
# the NATS default max_payload (1 MiB) and a quarter of the window so credit flows.
DEFAULT_MAX_CHUNK: Final = 256 * 1024
# Heartbeats: several per idle timeout; bounded so a caller cannot make a server spam.
HEARTBEATS_PER_IDLE_TIMEOUT: Final = 3
MIN_HEARTBEAT_INTERVAL: Final = 0.05
MAX_HEARTBEAT_INTERVAL: Final = 10.0
# Server: a body-less request answered within this long needs no separate ack (one
# message instead of two); slower handlers still ack long before the 1 s republish.
DEFERRED_ACK_DELAY: Final = 0.02
# Server: how long a request may wait for credit or body bytes before the caller is presumed gone.
DEFAULT_STALL_TIMEOUT: Final = 60.0
# Caller: a response body silent this many server heartbeat intervals is probed (its end may be lost).
PROBE_AFTER_HEARTBEATS: Final = 2.0
# Server: a finished request's final frame is kept this long (bounded) to answer such a probe.
FINAL_FRAME_TTL: Final = 60.0
FINAL_FRAME_LIMIT: Final = 10_000
# Server: time-limited graceful drain on close().
DEFAULT_DRAIN_TIMEOUT: Final = 10.0
# Server: close() waits at most this long for start frames already delivered (then drops them).
REQUEST_DRAIN_LIMIT: Final = 2.0
# Server: reference peers remember request ids 60 s (bounded to 10,000) to re-ack repeats.
SEEN_REQUEST_TTL: Final = 60.0
SEEN_REQUEST_LIMIT: Final = 10_000
# Server: an abort that arrives before its start is remembered this long.
EARLY_ABORT_TTL: Final = 10.0
# Server: handlers running at once per served host; more requests are answered at once with
# HTTP 503 + Retry-After (handler not run), so a flood cannot exhaust the daemon.
DEFAULT_MAX_CONCURRENT: Final = 256
# Server: the Retry-After (seconds) of that 503.
BUSY_RETRY_AFTER: Final = 1


def heartbeat_interval_for(idle_timeout: float | None) -> float:
    """The heartbeat interval a caller asks for, given its idle timeout."""
    if idle_timeout is None:
        return MAX_HEARTBEAT_INTERVAL
    return min(
        MAX_HEARTBEAT_INTERVAL, max(MIN_HEARTBEAT_INTERVAL, idle_timeout / HEARTBEATS_PER_IDLE_TIMEOUT)
    )


@dataclass(frozen=True, slots=True)
class Timeouts:
    """The three separate caller timeouts, in seconds (``None`` disables one).

    - ``first_frame``: from publishing the start until any frame from a server;
    - ``idle``: the longest silence (no data, no heartbeat) once a server answered;
    - ``total``: overall deadline, also sent to the server as ``deadlineUnixMs``.
    """

    first_frame: float | None = DEFAULT_FIRST_FRAME_TIMEOUT
    idle: float | None = DEFAULT_IDLE_TIMEOUT
    total: float | None = None

    def __post_init__(self) -> None:
        for name in ("first_frame", "idle", "total"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"timeout {name} must be positive or None, got {value!r}")
