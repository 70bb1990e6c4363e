"""Named defaults and small option objects; every limit says why it has its value."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Final, TypedDict, TypeVar

# Reference peers give up after 30 s without any first frame; we match them.
DEFAULT_FIRST_FRAME_TIMEOUT: Final = 30.0
# Heartbeats arrive several times per idle period, so 20 s of silence means the peer is gone.
DEFAULT_IDLE_TIMEOUT: Final = 20.0
# Reference callers republish an unanswered start every second (core NATS may drop it).
DEFAULT_REPUBLISH_INTERVAL: Final = 1.0
# A host this client saw serving lately gets this long before "nobody serves this host" is
# final: its daemon may be reconnecting. A host not seen lately is reported within a
# millisecond or two (FIRST_CONTACT_RETRY).
DEFAULT_UNREACHABLE_GRACE: Final = 1.0
# First contact: no-responders is looked at once more after this long (a server that subscribed
# a moment ago may not be known yet to every node of a cluster: interest typically crosses a
# route in well under a millisecond on a LAN), then it is final. 3 ms made offline detection
# 5-6 ms on a busy 2-core machine (asyncio timers fire up to ~1 ms late); 1 ms: ~2.5 ms.
FIRST_CONTACT_RETRY: Final = 0.001
# "Lately": a host that answered this client within this many seconds.
RECENTLY_SEEN: Final = 30.0
# A compact request.start that went unanswered (it may have reached an older server sharing
# the queue group, which drops it) makes the caller send JSON starts to that host this long.
COMPACT_START_COOLDOWN: Final = 60.0
# First contact with a host whose subjects someone else watches (a monitoring tap hides NATS's
# no-responders answer): after this long without a frame the caller asks NATS whether one of
# our servers holds the host's readiness subject (outside the prefix, so a tap on the prefix
# does not hide it). Nobody there: unreachable at once, unless a plain server without one
# (a reference peer, or ours under the reference permissions) acks within this long.
DEFAULT_PRESENCE_TIMEOUT: Final = 0.03
# The same when NATS cannot tell (the readiness subjects are tapped too, or we may not publish
# there): a server must ack within this long. A live server acks within a millisecond or two,
# but its event loop may stall (a garbage collection, a CPU-bound handler): 30 ms reported such
# a host offline, so this leaves room for a 0.1-0.2 s stall.
DEFAULT_PRESENCE_FALLBACK: Final = 0.25
# Pause between no-responders retries inside the grace period.
UNREACHABLE_RETRY_INTERVAL: Final = 0.05
# Flow-control window per direction: bounds buffered bytes per request, large
# enough that loopback transfers are limited by CPU, not by waiting for credit.
DEFAULT_WINDOW: Final = 2 * 1024 * 1024
# The most a window grows to while its reader keeps up (see _flow.ReceiveWindow). Measured on
# loopback: a fixed 2 MiB window held 64 MiB transfers to ~0.72 of raw NATS in each direction
# (credit came back too late), 8-16 MiB to ~0.9. A reader that falls behind never grows it.
DEFAULT_MAX_WINDOW: Final = 16 * 1024 * 1024
# How far all windows of one server (or client) may grow past their initial size together:
# what stalled handlers could hold beyond the initial windows (see _flow.GrowthBudget).
DEFAULT_WINDOW_BUDGET: Final = 64 * 1024 * 1024
# Largest data frame: big frames amortise per-message cost, but stay well under
# the NATS default max_payload (1 MiB) and a quarter of the window so credit flows.
DEFAULT_MAX_CHUNK: Final = 256 * 1024
# Body pieces a sender has ready at once are joined into one frame up to this many bytes (see
# _natsio/coalesce.py). Not up to max_chunk: joining 64 KiB pieces into 256 KiB frames cost the
# sender ~18% more CPU per MiB (the join is a copy) and saved the receiver nothing measurable.
COALESCE_LIMIT: Final = 64 * 1024
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
# Upgraded streams: the caller sends a keepalive after this many heartbeat intervals of its own
# silence, and the server gives up on a caller it has not heard from for PEER_SILENCE_HEARTBEATS
# intervals (three keepalives lost in a row: the caller is gone, not quiet).
UPGRADED_KEEPALIVE_HEARTBEATS: Final = 1.0
PEER_SILENCE_HEARTBEATS: Final = 4.0
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
# Server: a plain v1 caller (no credit) gets this many response-body bytes at full speed, then
# DEFAULT_V1_PACE bytes/s, so NATS never holds more for it than its slow-consumer limit
# (64 MiB by default) while it reads at 10 MB/s or faster.
DEFAULT_V1_BURST: Final = 16 * 1024 * 1024
DEFAULT_V1_PACE: Final = 8 * 1024 * 1024
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
    """How long a caller waits, in seconds (``None`` disables a timeout).

    Kept apart because each failure means something else to the caller:

    - ``first_frame``: from publishing the start until any frame from a server
      (``tunnel_no_first_frame``: nobody took the request);
    - ``idle``: the longest silence (no data, no heartbeat) once a server answered
      (``tunnel_idle_timeout``: the server is gone);
    - ``total``: overall deadline, also sent to the server as ``deadlineUnixMs``;
    - ``unreachable_grace``: for a host this client saw serving in the last 30 s, how
      long "nobody serves this host" may last before it is final, so a daemon that is
      reconnecting is not reported gone (0: at once). A host not seen lately is
      reported unreachable at once, on NATS's no-responders answer;
    - ``presence``: first contact with a host whose subjects a non-server subscriber
      watches (a monitoring tap on the prefix hides the no-responders answer): after this
      long without a frame, NATS is asked whether a server holds the host's readiness
      subject; if none does (and nothing taps those subjects), the host is unreachable;
    - ``presence_fallback``: the same when NATS cannot tell (the readiness subjects are
      tapped too): a server must answer within this long (it acks such a start at once);
    - ``republish_interval``: an unanswered start is published again this often
      (core NATS may drop it).

    ``TunnelClient(nc, timeouts=...)`` sets a client's; ``client.fetch(url, timeouts=...)``
    replaces them as a whole for one request.
    """

    first_frame: float | None = DEFAULT_FIRST_FRAME_TIMEOUT
    idle: float | None = DEFAULT_IDLE_TIMEOUT
    total: float | None = None
    unreachable_grace: float = DEFAULT_UNREACHABLE_GRACE
    republish_interval: float = DEFAULT_REPUBLISH_INTERVAL
    presence: float = DEFAULT_PRESENCE_TIMEOUT
    presence_fallback: float = DEFAULT_PRESENCE_FALLBACK

    def __post_init__(self) -> None:
        for name in ("first_frame", "idle", "total"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"timeout {name} must be positive or None, got {value!r}")
        if not self.unreachable_grace >= 0:
            raise ValueError(f"unreachable_grace must be 0 or more seconds, got {self.unreachable_grace!r}")
        if not self.republish_interval > 0:
            raise ValueError(f"republish_interval must be positive, got {self.republish_interval!r}")
        if not self.presence > 0:
            raise ValueError(f"presence must be positive, got {self.presence!r}")
        if not self.presence_fallback >= self.presence:
            raise ValueError(
                f"presence_fallback must be at least presence ({self.presence!r}), "
                f"got {self.presence_fallback!r}"
            )


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_max_window(value: int | None) -> None:
    if value is not None:
        _check_positive_int("max_window", value)


def _effective_max_window(window: int, max_window: int | None) -> int:
    """An unset ``max_window``: growth by default, but a window someone chose stays fixed
    (it was set to bound memory before windows could grow)."""
    if max_window is not None:
        return max(window, max_window)
    return DEFAULT_MAX_WINDOW if window == DEFAULT_WINDOW else window


def _check_non_negative_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


@dataclass(frozen=True, slots=True)
class Limits:
    """Sizes that bound what a caller holds per request, in bytes.

    - ``window``: flow-control window offered to the server: response bytes it may
      send ahead of our reads at first;
    - ``max_window``: what the window may grow to (doubling) whenever we read everything
      that came and waited for more; a reader never buffers more than this. Unset: 16 MiB
      with the default ``window``, and ``window`` itself (a fixed window) when you chose
      one, so a window set to bound memory still does;
    - ``window_budget``: how far the windows of all this client's requests may grow past
      ``window`` together, counting what has arrived and is not read yet (bytes; 0:
      windows never grow);
    - ``max_chunk``: largest request-body data frame we send (the connection's
      ``max_payload`` bounds it too).
    """

    window: int = DEFAULT_WINDOW
    max_chunk: int = DEFAULT_MAX_CHUNK
    max_window: int | None = None  # None: see above (``effective_max_window``)
    window_budget: int = DEFAULT_WINDOW_BUDGET

    def __post_init__(self) -> None:
        _check_positive_int("window", self.window)
        _check_positive_int("max_chunk", self.max_chunk)
        _check_max_window(self.max_window)
        _check_non_negative_int("window_budget", self.window_budget)

    @property
    def effective_max_window(self) -> int:
        """What the window may grow to, with an unset ``max_window`` filled in."""
        return _effective_max_window(self.window, self.max_window)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """How a server treats the requests it serves: ``serve(nc, host, handler, config=...)``.

    - ``window``: flow-control window offered to callers for request bodies at first;
    - ``max_window``: what that window may grow to (doubling) whenever the handler read
      everything that came and waited for more: request-body bytes buffered per request at
      most. Unset: 16 MiB with the default ``window``, and ``window`` itself (a fixed
      window) when you chose one;
    - ``window_budget``: how far the request-body windows of all requests in flight may
      grow past ``window`` together (bytes; 0: windows never grow), so handlers of callers
      with flow control that stall after their windows grew hold at most
      ``max_concurrent * window`` plus this. (A plain v1 caller has no flow control: its
      upload is refused past 64 MiB unread, per request.);
    - ``max_chunk``: largest response-body data frame, in bytes;
    - ``stall_timeout``: seconds a request may wait for credit or body bytes before
      the caller is presumed gone (``tunnel_stalled``; ``None``: wait forever);
    - ``max_concurrent``: handlers running at once; a request beyond it is answered
      at once with HTTP 503 + Retry-After, so a flood cannot exhaust the server;
    - ``fast_path``: accept the extensions callers offer (binary frames, credit,
      heartbeats, one-message responses); ``False`` answers as a reference v1 server;
    - ``v1_pace``, ``v1_burst``: a plain v1 caller has no flow control and cannot say how
      fast it reads, while NATS cuts a caller that falls more than its slow-consumer limit
      (64 MiB by default) behind: such a caller gets ``v1_burst`` bytes of a response body
      at full speed, then ``v1_pace`` bytes per second (``None``: unpaced).
    """

    window: int = DEFAULT_WINDOW
    max_chunk: int = DEFAULT_MAX_CHUNK
    stall_timeout: float | None = DEFAULT_STALL_TIMEOUT
    max_concurrent: int = DEFAULT_MAX_CONCURRENT
    fast_path: bool = True
    v1_pace: float | None = DEFAULT_V1_PACE
    v1_burst: int = DEFAULT_V1_BURST
    max_window: int | None = None  # None: see above (``effective_max_window``)
    window_budget: int = DEFAULT_WINDOW_BUDGET

    @property
    def effective_max_window(self) -> int:
        """What the request-body window may grow to, with an unset ``max_window`` filled in."""
        return _effective_max_window(self.window, self.max_window)

    def __post_init__(self) -> None:
        _check_max_window(self.max_window)
        _check_non_negative_int("window_budget", self.window_budget)
        if self.v1_pace is not None and not self.v1_pace > 0:
            raise ValueError(f"v1_pace must be positive bytes/s or None, got {self.v1_pace!r}")
        _check_positive_int("v1_burst", self.v1_burst)
        _check_positive_int("window", self.window)
        _check_positive_int("max_chunk", self.max_chunk)
        if self.stall_timeout is not None and not self.stall_timeout > 0:
            raise ValueError(f"stall_timeout must be positive or None, got {self.stall_timeout!r}")
        _check_positive_int("max_concurrent", self.max_concurrent)


DEFAULT_TIMEOUTS: Final = Timeouts()
DEFAULT_LIMITS: Final = Limits()
DEFAULT_SERVER_CONFIG: Final = ServerConfig()


# -- the keyword arguments these objects replace (deprecated; removed in the next release) --


class LegacyClientKwargs(TypedDict, total=False):
    """``TunnelClient``'s keyword arguments before ``timeouts=``/``limits=``."""

    timeout: float | None
    first_frame_timeout: float | None
    idle_timeout: float | None
    unreachable_grace: float
    republish_interval: float
    window: int
    max_chunk: int


class LegacyServerKwargs(TypedDict, total=False):
    """``serve``'s and ``TunnelServer``'s keyword arguments before ``config=``."""

    window: int
    max_chunk: int
    stall_timeout: float | None
    max_concurrent: int
    fast_path: bool


# old keyword -> (new keyword, field of its object)
_CLIENT_RENAMES: Final = {
    "timeout": ("timeouts", "total"),
    "first_frame_timeout": ("timeouts", "first_frame"),
    "idle_timeout": ("timeouts", "idle"),
    "unreachable_grace": ("timeouts", "unreachable_grace"),
    "republish_interval": ("timeouts", "republish_interval"),
    "window": ("limits", "window"),
    "max_chunk": ("limits", "max_chunk"),
}
_SERVER_RENAMES: Final = {name: ("config", name) for name in LegacyServerKwargs.__annotations__}

_C = TypeVar("_C", Timeouts, Limits, ServerConfig)


def _from_legacy(
    owner: str,
    param: str,
    given: _C | None,
    default: _C,
    legacy: Mapping[str, object],
    renames: Mapping[str, tuple[str, str]],
    stacklevel: int,
) -> _C:
    """``given`` (or ``default``) with the fields the old keywords for ``param`` set, each one warned."""
    changes: dict[str, Any] = {}
    for name, value in legacy.items():
        target = renames.get(name)
        if target is None:
            raise TypeError(f"{owner}() got an unexpected keyword argument {name!r}")
        new_param, field = target
        if new_param != param:
            continue
        cls = type(default).__name__
        if given is not None:
            raise TypeError(f"{owner}(): {name}= and {param}= given together; set {cls}({field}=...) only")
        warnings.warn(
            f"{owner}({name}=...) is deprecated and goes away in the next release; "
            f"use {owner}({param}=tunnel.{cls}({field}=...))",
            DeprecationWarning,
            stacklevel=stacklevel + 3,
        )
        changes[field] = value
    if given is not None:
        return given
    return replace(default, **changes) if changes else default


def client_config(
    owner: str,
    timeouts: Timeouts | None,
    limits: Limits | None,
    legacy: Mapping[str, object],
    *,
    stacklevel: int = 1,
) -> tuple[Timeouts, Limits]:
    """A client's ``(timeouts, limits)`` from the new arguments and any deprecated ones.

    ``stacklevel``: how far above the function calling this one the user's call is (for the warning).
    """
    return (
        _from_legacy(owner, "timeouts", timeouts, DEFAULT_TIMEOUTS, legacy, _CLIENT_RENAMES, stacklevel),
        _from_legacy(owner, "limits", limits, DEFAULT_LIMITS, legacy, _CLIENT_RENAMES, stacklevel),
    )


def server_config(
    owner: str, config: ServerConfig | None, legacy: Mapping[str, object], *, stacklevel: int = 1
) -> ServerConfig:
    """A server's config from ``config=`` and any deprecated keyword arguments (see :func:`client_config`)."""
    return _from_legacy(owner, "config", config, DEFAULT_SERVER_CONFIG, legacy, _SERVER_RENAMES, stacklevel)
