"""Every gateway setting, declared once: environment variable, flag, type, default and help.

``studio-gateway serve`` makes its options from :data:`SETTINGS` (see :mod:`.cli`), and
:class:`EnvironValues` reads the same settings from the environment; either way
:mod:`.config` builds its value objects from a :class:`SettingValues`, so a setting's
name, default and bounds are written in one place. A value out of bounds or malformed is a
:class:`ConfigError` that names the variable to fix.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass
from typing import Final, Generic, TypeVar

import tunnel

DEFAULT_NATS_URL: Final = "nats://127.0.0.1:4222"
# One hour: short enough that a leaked credential is soon useless, long enough that
# a daemon refreshes rarely (it asks for a new session before expiry).
DEFAULT_SESSION_TTL_SECONDS: Final = 3600
# A NATS credential living longer than a month defeats the point of short-lived credentials.
MAX_SESSION_TTL_SECONDS: Final = 30 * 24 * 3600
DEFAULT_JWT_AUDIENCE: Final = "studio-gateway"
DEFAULT_GATEWAY_HOST: Final = "127.0.0.1"
DEFAULT_GATEWAY_PORT: Final = 8080
# Presence probe: a daemon that is connected answers its status route in milliseconds;
# 2 s without a first frame means it is wedged, and fail-fast covers "not connected".
DEFAULT_PRESENCE_FIRST_FRAME_TIMEOUT: Final = 2.0
# Hard cap on one probe, so /api/links/me never hangs a browser.
DEFAULT_PRESENCE_TIMEOUT: Final = 5.0

# Runs (see docs/runs.md): the runner names a POST may ask for, unless RUNS_RUNNERS says otherwise.
DEFAULT_RUNNERS: Final = ("echo", "mock", "command", "http")
# The run event stream keeps events this long (then export reads the kept copy in the output bucket).
DEFAULT_RUNS_STREAM_MAX_AGE: Final = 30 * 60.0
# JetStream drops a re-published event id within this window (the daemon retries with the same id).
DEFAULT_RUNS_DUPLICATE_WINDOW: Final = 2 * 60.0
# One copy of the run stream and buckets; a NATS cluster wants 3 (docs/runs.md).
DEFAULT_RUNS_REPLICAS: Final = 1
# Events of one run kept for export after the stream's retention (the done event is always kept).
DEFAULT_RUNS_OUTPUT_MAX_BYTES: Final = 1024 * 1024
# Run state and kept events live this long in their key-value buckets.
DEFAULT_RUNS_RETENTION: Final = 7 * 24 * 3600.0
# A running run whose desktop sent nothing (linkd sends heartbeats) for this long is `stalled` ...
DEFAULT_RUNS_LIVENESS_TIMEOUT: Final = 60.0
# ... (a closed lid, lost Wi-Fi): resumed when its events flow again within this window, else
# failed desktop_lost (0: no window, desktop_lost at the liveness timeout).
DEFAULT_RUNS_RESUME_WINDOW: Final = 15 * 60.0
# Unless RUNS_REAPER_INTERVAL_SECONDS says otherwise, the reaper scans this many times per liveness
# timeout, but never more often or more rarely than these bounds.
REAPER_SCANS_PER_LIVENESS_TIMEOUT: Final = 10
REAPER_SCAN_INTERVAL_BOUNDS: Final = (0.1, 5.0)
# Delivering a work item: a connected daemon answers in milliseconds.
DEFAULT_RUNS_DISPATCH_TIMEOUT: Final = 10.0
# SSE comment keep-alives while a run is quiet (proxies close idle connections).
DEFAULT_RUNS_KEEPALIVE: Final = 15.0
# A run's POST body (runner, input, title): the daemon takes work items of up to 1 MiB.
DEFAULT_RUNS_MAX_BODY_BYTES: Final = 512 * 1024
# Tenant limits (docs/runs.md, "Tenants"): events one run may publish (the stream refuses more of
# one run's subject; the projector fails the run as event_limit when it reaches this many) ...
DEFAULT_RUNS_MAX_EVENTS_PER_RUN: Final = 100_000
# ... the largest event the stream stores (a bigger publish is refused; NATS's default max_payload) ...
DEFAULT_RUNS_MAX_EVENT_BYTES: Final = 1024 * 1024
# ... and events a host may publish for runs it does not have (unknown, ended, another host's)
# within RUNS_HOST_STRAY_WINDOW before it is over quota: its stored events are purged and its
# active runs fail as quota_exceeded.
DEFAULT_RUNS_HOST_STRAY_EVENTS: Final = 2000
DEFAULT_RUNS_HOST_STRAY_WINDOW: Final = 60.0

# Processors (docs/runs.md, "Processors"): a claim on a side effect whose claimer vanished is
# taken over after this.
DEFAULT_RUNS_PROCESSOR_LEASE: Final = 30.0
# Webhooks: attempts and age before a delivery is failed for good; the retry delays (doubling,
# with jitter) and one POST's timeout.
DEFAULT_WEBHOOKS_MAX_ATTEMPTS: Final = 10
DEFAULT_WEBHOOKS_MAX_AGE: Final = 24 * 3600.0
DEFAULT_WEBHOOKS_RETRY_BASE: Final = 5.0
DEFAULT_WEBHOOKS_RETRY_MAX: Final = 3600.0
DEFAULT_WEBHOOKS_TIMEOUT: Final = 10.0

# Preview (see docs/preview.md): a ticket URL from POST /api/links/preview is good this long,
# enough to open it right away, too short to be worth stealing from a log or a screen.
DEFAULT_PREVIEW_TICKET_TTL: Final = 60.0
# The preview cookie a ticket sets lasts a working day; a new ticket renews it.
DEFAULT_PREVIEW_COOKIE_TTL: Final = 8 * 3600.0

_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})
_TEN_YEARS: Final = 10 * 365 * 86400.0
_DAY: Final = 86400.0

T = TypeVar("T")
N = TypeVar("N", int, float)


class ConfigError(ValueError):
    """A setting is missing or malformed; ``variable`` names the environment variable."""

    def __init__(self, variable: str, message: str) -> None:
        super().__init__(f"{variable}: {message}")
        self.variable = variable
        self.message = message


# ------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class Setting(Generic[T]):
    """One setting: environment variable, flag (a typer option declaration) and help.

    ``default`` is the value when the setting is not given; ``default_help`` says what it is
    where that is computed (the help shows one or the other).
    """

    env: str
    flag: str
    help: str
    _: KW_ONLY
    default: T | None = None
    default_help: str | None = None

    @property
    def name(self) -> str:
        """The flag as a parameter name.

        ``--runs-replicas`` -> ``runs_replicas``; ``--runs/--no-runs`` -> ``runs``.
        """
        return self.flag.split("/")[0].removeprefix("--").replace("-", "_")

    @property
    @abc.abstractmethod
    def value_type(self) -> type[T]:
        """The type of the value (what typer parses the flag and the variable as)."""

    @property
    def shown_default(self) -> str | None:
        """The default as the help shows it; None where there is none."""
        if self.default_help is not None:
            return self.default_help
        return None if self.default is None else self.show(self.default)

    def show(self, value: T) -> str:
        return str(value)

    @abc.abstractmethod
    def parse(self, raw: str | None) -> T | None:
        """The value an environment variable gives (None: not given); :class:`ConfigError` if malformed."""

    def check(self, value: T) -> T:
        """``value``, or :class:`ConfigError` where it is out of bounds."""
        return value

    def value(self, given: T | None) -> T:
        """``given`` checked, else the default."""
        if given is not None:
            return self.check(given)
        if self.default is None:
            raise TypeError(f"{self.env} has no default; read what was given")
        return self.default


@dataclass(frozen=True)
class Text(Setting[str]):
    """A string, read as given (an empty one too): its consumer splits it, reads a file, ..."""

    @property
    def value_type(self) -> type[str]:
        return str

    def parse(self, raw: str | None) -> str | None:
        return raw


@dataclass(frozen=True)
class _Number(Setting[N]):
    """A number within ``[low, high]``; a blank variable is not given."""

    _: KW_ONLY
    low: N
    high: N

    def check(self, value: N) -> N:
        if not self.low <= value <= self.high:  # also refuses nan
            raise ConfigError(
                self.env,
                f"{self.show(value)} is out of range [{self.show(self.low)}, {self.show(self.high)}]",
            )
        return value


@dataclass(frozen=True)
class Whole(_Number[int]):
    @property
    def value_type(self) -> type[int]:
        return int

    def parse(self, raw: str | None) -> int | None:
        text = (raw or "").strip()
        if not text:
            return None
        try:
            return int(text)
        except ValueError:
            raise ConfigError(self.env, f"{text!r} is not a whole number") from None


@dataclass(frozen=True)
class Seconds(_Number[float]):
    @property
    def value_type(self) -> type[float]:
        return float

    def show(self, value: float) -> str:
        return f"{value:g}"

    def parse(self, raw: str | None) -> float | None:
        text = (raw or "").strip()
        if not text:
            return None
        try:
            return float(text)
        except ValueError:
            raise ConfigError(self.env, f"{text!r} is not a number (seconds)") from None


@dataclass(frozen=True)
class Switch(Setting[bool]):
    """On or off: ``--x/--no-x``; the variable takes 1/true/yes/on or 0/false/no/off."""

    @property
    def value_type(self) -> type[bool]:
        return bool

    def show(self, value: bool) -> str:
        return "on" if value else "off"

    def parse(self, raw: str | None) -> bool | None:
        text = (raw or "").strip().lower()
        if not text:
            return None
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ConfigError(self.env, f"{text!r} is not a boolean (use true/false)")


GATEWAY_HOST: Final = Text("GATEWAY_HOST", "--host", "Listen address.", default=DEFAULT_GATEWAY_HOST)
GATEWAY_PORT: Final = Whole(
    "GATEWAY_PORT", "--port", "Listen port.", default=DEFAULT_GATEWAY_PORT, low=0, high=65535
)
NATS_URL: Final = Text(
    "NATS_URL", "--nats-url", "The gateway's NATS server(s), comma-separated.", default=DEFAULT_NATS_URL
)
NATS_CREDS: Final = Text("NATS_CREDS", "--nats-creds", "The gateway's own NATS .creds file (operator mode).")
NATS_TOKEN: Final = Text("NATS_TOKEN", "--nats-token", "NATS token (token mode: also handed to daemons).")
# TLS for the gateway's own NATS connection (tls:// or wss:// NATS_URL): a private CA, mTLS.
NATS_CA: Final = Text(
    "NATS_CA", "--nats-ca", "CA file (PEM) trusted for the gateway's tls:// or wss:// NATS_URL."
)
NATS_CERT: Final = Text(
    "NATS_CERT", "--nats-cert", "Client certificate (PEM) where NATS requires one (mTLS)."
)
NATS_KEY: Final = Text("NATS_KEY", "--nats-key", "The client certificate's key (PEM).")
NATS_PUBLIC_URL: Final = Text(
    "NATS_PUBLIC_URL", "--public-url", "NATS URL(s) daemons connect to, comma-separated."
)
NATS_TUNNEL_PUBLIC_ENABLED: Final = Switch(
    "NATS_TUNNEL_PUBLIC_ENABLED",
    "--tunnel-public/--no-tunnel-public",
    "Hand out link sessions.",
    default=True,
)
NATS_TUNNEL_SESSION_TTL_SECONDS: Final = Whole(
    "NATS_TUNNEL_SESSION_TTL_SECONDS",
    "--session-ttl",
    "Lifetime of minted NATS credentials, seconds.",
    default=DEFAULT_SESSION_TTL_SECONDS,
    low=1,
    high=MAX_SESSION_TTL_SECONDS,
)
NATS_OPERATOR_JWT: Final = Text("NATS_OPERATOR_JWT", "--operator-jwt", "Operator JWT.")
NATS_ACCOUNT_JWT: Final = Text("NATS_ACCOUNT_JWT", "--account-jwt", "Account JWT.")
NATS_ACCOUNT_SIGNING_KEY: Final = Text(
    "NATS_ACCOUNT_SIGNING_KEY", "--account-signing-key", "Account signing key seed (SA...)."
)
TUNNEL_PREFIX: Final = Text(
    "TUNNEL_PREFIX", "--tunnel-prefix", "Tunnel subject prefix.", default=tunnel.DEFAULT_PREFIX
)
GATEWAY_JWT_SECRET: Final = Text("GATEWAY_JWT_SECRET", "--jwt-secret", "HS256 secret for API bearer tokens.")
GATEWAY_JWT_PUBLIC_KEY: Final = Text(
    "GATEWAY_JWT_PUBLIC_KEY", "--jwt-public-key", "PEM public key for RS/ES API tokens."
)
GATEWAY_JWT_ALGORITHMS: Final = Text(
    "GATEWAY_JWT_ALGORITHMS",
    "--jwt-algorithms",
    "Accepted token algorithms, comma-separated.",
    default_help="HS256 with a secret, RS256,ES256 with a public key",
)
GATEWAY_JWT_AUDIENCE: Final = Text(
    "GATEWAY_JWT_AUDIENCE", "--jwt-audience", "Required token audience.", default=DEFAULT_JWT_AUDIENCE
)
GATEWAY_METRICS_TOKEN: Final = Text(
    "GATEWAY_METRICS_TOKEN",
    "--metrics-token",
    "Bearer token a /metrics scrape must send (>= 16 characters, or a file).",
    default_help="unset: /metrics answers loopback peers only",
)
RUNS_ENABLED: Final = Switch(
    "RUNS_ENABLED", "--runs/--no-runs", "Serve /api/runs (needs JetStream).", default=True
)
RUNS_RUNNERS: Final = Text(
    "RUNS_RUNNERS",
    "--runs-runners",
    "Runner names a run may ask for, comma-separated.",
    default_help=",".join(DEFAULT_RUNNERS),
)
RUNS_STREAM_MAX_AGE: Final = Seconds(
    "RUNS_STREAM_MAX_AGE_SECONDS",
    "--runs-stream-max-age",
    "Run events stay in the stream this long, s.",
    default=DEFAULT_RUNS_STREAM_MAX_AGE,
    low=1.0,
    high=_TEN_YEARS,
)
RUNS_DUPLICATE_WINDOW: Final = Seconds(
    "RUNS_DUPLICATE_WINDOW_SECONDS",
    "--runs-duplicate-window",
    "Event de-duplication window, s.",
    default_help=f"{DEFAULT_RUNS_DUPLICATE_WINDOW:g}, or the stream max age if shorter",
    default=DEFAULT_RUNS_DUPLICATE_WINDOW,
    low=0.1,
    high=_DAY,
)
RUNS_REPLICAS: Final = Whole(
    "RUNS_REPLICAS",
    "--runs-replicas",
    "JetStream replicas of the run stream and buckets.",
    default=DEFAULT_RUNS_REPLICAS,
    low=1,
    high=5,
)
RUNS_OUTPUT_MAX_BYTES: Final = Whole(
    "RUNS_OUTPUT_MAX_BYTES",
    "--runs-output-max-bytes",
    "Event bytes kept per run for export after retention.",
    default=DEFAULT_RUNS_OUTPUT_MAX_BYTES,
    low=0,
    high=1 << 34,
)
RUNS_RETENTION: Final = Seconds(
    "RUNS_RETENTION_SECONDS",
    "--runs-retention",
    "Run state and kept events live this long, s.",
    default=DEFAULT_RUNS_RETENTION,
    low=60.0,
    high=_TEN_YEARS,
)
RUNS_LIVENESS_TIMEOUT: Final = Seconds(
    "RUNS_LIVENESS_TIMEOUT_SECONDS",
    "--runs-liveness-timeout",
    "A run silent this long is stalled (desktop_lost after --runs-resume-window), s.",
    default=DEFAULT_RUNS_LIVENESS_TIMEOUT,
    low=0.5,
    high=_DAY,
)
RUNS_RESUME_WINDOW: Final = Seconds(
    "RUNS_RESUME_WINDOW_SECONDS",
    "--runs-resume-window",
    "A silent run is stalled this long (resumed if its desktop comes back) before it fails "
    "as desktop_lost, s; 0: no resume window.",
    default=DEFAULT_RUNS_RESUME_WINDOW,
    low=0.0,
    high=7 * _DAY,
)
RUNS_REAPER_INTERVAL: Final = Seconds(
    "RUNS_REAPER_INTERVAL_SECONDS",
    "--runs-reaper-interval",
    "Reaper scan interval, s.",
    default_help="liveness timeout/{}, within {:g}..{:g}".format(
        REAPER_SCANS_PER_LIVENESS_TIMEOUT, *REAPER_SCAN_INTERVAL_BOUNDS
    ),
    low=0.05,
    high=3600.0,
)
RUNS_DISPATCH_TIMEOUT: Final = Seconds(
    "RUNS_DISPATCH_TIMEOUT_SECONDS",
    "--runs-dispatch-timeout",
    "Delivering a work item or a cancel, s.",
    default=DEFAULT_RUNS_DISPATCH_TIMEOUT,
    low=0.1,
    high=600.0,
)
RUNS_KEEPALIVE: Final = Seconds(
    "RUNS_KEEPALIVE_SECONDS",
    "--runs-keepalive",
    "SSE keep-alive interval, s.",
    default=DEFAULT_RUNS_KEEPALIVE,
    low=0.1,
    high=3600.0,
)
RUNS_MAX_BODY_BYTES: Final = Whole(
    "RUNS_MAX_BODY_BYTES",
    "--runs-max-body-bytes",
    "Largest POST /api/runs body.",
    default=DEFAULT_RUNS_MAX_BODY_BYTES,
    low=1024,
    high=16 << 20,
)
RUNS_MAX_EVENTS_PER_RUN: Final = Whole(
    "RUNS_MAX_EVENTS_PER_RUN",
    "--runs-max-events-per-run",
    "Events one run may publish; more are refused and the run fails as event_limit.",
    default=DEFAULT_RUNS_MAX_EVENTS_PER_RUN,
    low=10,
    high=1 << 30,
)
RUNS_MAX_EVENT_BYTES: Final = Whole(
    "RUNS_MAX_EVENT_BYTES",
    "--runs-max-event-bytes",
    "Largest run event the stream stores, bytes.",
    default=DEFAULT_RUNS_MAX_EVENT_BYTES,
    low=1024,
    high=64 << 20,
)
RUNS_HOST_STRAY_EVENTS: Final = Whole(
    "RUNS_HOST_STRAY_EVENTS",
    "--runs-host-stray-events",
    "Events a desktop may publish for runs it does not have, per window, before its "
    "stored events are purged and its runs fail as quota_exceeded.",
    default=DEFAULT_RUNS_HOST_STRAY_EVENTS,
    low=1,
    high=1 << 30,
)
RUNS_HOST_STRAY_WINDOW: Final = Seconds(
    "RUNS_HOST_STRAY_WINDOW_SECONDS",
    "--runs-host-stray-window",
    "The window of --runs-host-stray-events, s.",
    default=DEFAULT_RUNS_HOST_STRAY_WINDOW,
    low=1.0,
    high=_DAY,
)

RUNS_PROCESSORS: Final = Text(
    "RUNS_PROCESSORS",
    "--runs-processors",
    "More run processors, comma-separated module:attribute (docs/runs.md, Processors).",
    default="",
    default_help="none",
)
RUNS_PROCESSOR_LEASE: Final = Seconds(
    "RUNS_PROCESSOR_LEASE_SECONDS",
    "--runs-processor-lease",
    "A processor's claim on a side effect that never completed is taken over after this, s.",
    default=DEFAULT_RUNS_PROCESSOR_LEASE,
    low=0.1,
    high=_DAY,
)
WEBHOOKS_ALLOW_HTTP: Final = Switch(
    "WEBHOOKS_ALLOW_HTTP",
    "--webhooks-allow-http/--no-webhooks-allow-http",
    "Accept http:// webhook URLs (else https only).",
    default=False,
)
WEBHOOKS_ALLOW_PRIVATE: Final = Switch(
    "WEBHOOKS_ALLOW_PRIVATE",
    "--webhooks-allow-private/--no-webhooks-allow-private",
    "Deliver webhooks to loopback, private and link-local addresses (off: SSRF guard).",
    default=False,
)
WEBHOOKS_MAX_ATTEMPTS: Final = Whole(
    "WEBHOOKS_MAX_ATTEMPTS",
    "--webhooks-max-attempts",
    "A delivery that failed this many times is failed for good.",
    default=DEFAULT_WEBHOOKS_MAX_ATTEMPTS,
    low=1,
    high=1000,
)
WEBHOOKS_MAX_AGE: Final = Seconds(
    "WEBHOOKS_MAX_AGE_SECONDS",
    "--webhooks-max-age",
    "A delivery not delivered this long after its event is failed for good, s.",
    default=DEFAULT_WEBHOOKS_MAX_AGE,
    low=1.0,
    high=30 * _DAY,
)
WEBHOOKS_RETRY_BASE: Final = Seconds(
    "WEBHOOKS_RETRY_BASE_SECONDS",
    "--webhooks-retry-base",
    "First retry delay of a webhook delivery, doubling per attempt (with jitter), s.",
    default=DEFAULT_WEBHOOKS_RETRY_BASE,
    low=0.01,
    high=_DAY,
)
WEBHOOKS_RETRY_MAX: Final = Seconds(
    "WEBHOOKS_RETRY_MAX_SECONDS",
    "--webhooks-retry-max",
    "Longest delay between two attempts of a webhook delivery, s.",
    default=DEFAULT_WEBHOOKS_RETRY_MAX,
    low=0.01,
    high=_DAY,
)
WEBHOOKS_TIMEOUT: Final = Seconds(
    "WEBHOOKS_TIMEOUT_SECONDS",
    "--webhooks-timeout",
    "One webhook POST may take this long, s.",
    default=DEFAULT_WEBHOOKS_TIMEOUT,
    low=0.1,
    high=300.0,
)

GATEWAY_PREVIEW_DOMAIN: Final = Text(
    "GATEWAY_PREVIEW_DOMAIN",
    "--preview-domain",
    "Serve desktop previews at LABEL.DOMAIN ([http://|https://]host[:port]); unset: no previews.",
)
GATEWAY_PREVIEW_SECRET: Final = Text(
    "GATEWAY_PREVIEW_SECRET",
    "--preview-secret",
    "Key signing preview tickets and cookies (>= 32 bytes, or a file); one per gateway fleet.",
    default_help="random per process",
)
GATEWAY_PREVIEW_TICKET_TTL: Final = Seconds(
    "GATEWAY_PREVIEW_TICKET_TTL_SECONDS",
    "--preview-ticket-ttl",
    "A preview ticket URL is good this long, s.",
    default=DEFAULT_PREVIEW_TICKET_TTL,
    low=5.0,
    high=600.0,
)
GATEWAY_PREVIEW_COOKIE_TTL: Final = Seconds(
    "GATEWAY_PREVIEW_COOKIE_TTL_SECONDS",
    "--preview-cookie-ttl",
    "The preview cookie a ticket sets lasts this long, s.",
    default=DEFAULT_PREVIEW_COOKIE_TTL,
    low=60.0,
    high=7 * _DAY,
)

# Every setting, in the order ``studio-gateway serve --help`` lists them.
SETTINGS: Final[tuple[Setting[str] | Setting[int] | Setting[float] | Setting[bool], ...]] = (
    GATEWAY_HOST,
    GATEWAY_PORT,
    NATS_URL,
    NATS_CREDS,
    NATS_TOKEN,
    NATS_CA,
    NATS_CERT,
    NATS_KEY,
    NATS_PUBLIC_URL,
    NATS_TUNNEL_PUBLIC_ENABLED,
    NATS_TUNNEL_SESSION_TTL_SECONDS,
    NATS_OPERATOR_JWT,
    NATS_ACCOUNT_JWT,
    NATS_ACCOUNT_SIGNING_KEY,
    TUNNEL_PREFIX,
    GATEWAY_JWT_SECRET,
    GATEWAY_JWT_PUBLIC_KEY,
    GATEWAY_JWT_ALGORITHMS,
    GATEWAY_JWT_AUDIENCE,
    GATEWAY_METRICS_TOKEN,
    RUNS_ENABLED,
    RUNS_RUNNERS,
    RUNS_STREAM_MAX_AGE,
    RUNS_DUPLICATE_WINDOW,
    RUNS_REPLICAS,
    RUNS_OUTPUT_MAX_BYTES,
    RUNS_RETENTION,
    RUNS_LIVENESS_TIMEOUT,
    RUNS_RESUME_WINDOW,
    RUNS_REAPER_INTERVAL,
    RUNS_DISPATCH_TIMEOUT,
    RUNS_KEEPALIVE,
    RUNS_MAX_BODY_BYTES,
    RUNS_MAX_EVENTS_PER_RUN,
    RUNS_MAX_EVENT_BYTES,
    RUNS_HOST_STRAY_EVENTS,
    RUNS_HOST_STRAY_WINDOW,
    RUNS_PROCESSORS,
    RUNS_PROCESSOR_LEASE,
    WEBHOOKS_ALLOW_HTTP,
    WEBHOOKS_ALLOW_PRIVATE,
    WEBHOOKS_MAX_ATTEMPTS,
    WEBHOOKS_MAX_AGE,
    WEBHOOKS_RETRY_BASE,
    WEBHOOKS_RETRY_MAX,
    WEBHOOKS_TIMEOUT,
    GATEWAY_PREVIEW_DOMAIN,
    GATEWAY_PREVIEW_SECRET,
    GATEWAY_PREVIEW_TICKET_TTL,
    GATEWAY_PREVIEW_COOKIE_TTL,
)


class SettingValues(abc.ABC):
    """What was given for each setting: read from the environment, or as typer parsed the flags."""

    @abc.abstractmethod
    def given(self, setting: Setting[T]) -> T | None:
        """The value given for ``setting``, of its type but not yet checked; None where not given."""

    def value(self, setting: Setting[T]) -> T:
        """The value given, checked, else the setting's default."""
        return setting.value(self.given(setting))

    def checked(self, setting: Setting[T]) -> T | None:
        """The value given, checked; None where not given."""
        given = self.given(setting)
        return None if given is None else setting.check(given)


class EnvironValues(SettingValues):
    """Settings from environment variables (the strings parsed as :meth:`Setting.parse` says)."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def given(self, setting: Setting[T]) -> T | None:
        return setting.parse(self._environ.get(setting.env))
