"""Gateway configuration: one frozen value object, built from the settings and checked at start-up.

Every setting is declared once, below: its environment variable, its ``studio-gateway
serve`` flag, its type, default and help (:data:`SETTINGS`). :meth:`GatewayConfig.from_env`
reads the variables; the CLI hands over the values typer parsed (the flag, else the
variable) to :meth:`GatewayConfig.from_settings`. Both run the same checks.

Why validate here: a bad public URL or a signing key that does not belong to the
account would otherwise surface much later, as a daemon's "Authorization
Violation" with the real reason only in the nats-server log. Every problem is a
:class:`ConfigError` that names the variable to fix.

Credential modes for link sessions (what ``POST /api/links/session`` hands out):

- operator: ``NATS_OPERATOR_JWT`` + ``NATS_ACCOUNT_JWT`` + ``NATS_ACCOUNT_SIGNING_KEY`` all set;
- token: ``NATS_TOKEN`` set (dev servers with ``authorization { token }``);
- none: neither; sessions answer 503 (the gateway itself may still use a plain server).

Values that hold a secret or a JWT may be given inline or as a path to a file holding it.
"""

from __future__ import annotations

import abc
import enum
import re
from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Final, Generic, TypeVar
from urllib.parse import urlsplit

import tunnel
from contract.nats_jwt import JwtError, KeyKind, decode_jwt, is_public_key

from . import nats_jwt

__all__ = [
    "DEFAULT_GATEWAY_HOST",
    "DEFAULT_GATEWAY_PORT",
    "DEFAULT_JWT_AUDIENCE",
    "DEFAULT_NATS_URL",
    "DEFAULT_SESSION_TTL_SECONDS",
    "SETTINGS",
    "AuthConfig",
    "ConfigError",
    "CredentialMode",
    "EnvironValues",
    "GatewayConfig",
    "OperatorKeys",
    "RunsConfig",
    "Seconds",
    "Setting",
    "SettingValues",
    "Switch",
    "Text",
    "Whole",
    "allowed_connection_types",
]

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
# A running run whose desktop sent nothing (linkd sends heartbeats) for this long is desktop_lost.
DEFAULT_RUNS_LIVENESS_TIMEOUT: Final = 60.0
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

_HMAC_ALGORITHMS: Final = frozenset({"HS256", "HS384", "HS512"})
_PUBLIC_KEY_ALGORITHMS: Final = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
_NATS_SCHEMES: Final = {"nats": "STANDARD", "tls": "STANDARD", "ws": "WEBSOCKET", "wss": "WEBSOCKET"}
_RUNNER_NAME: Final = re.compile(r"[a-z0-9_-]{1,64}")
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
    "A run silent this long fails as desktop_lost, s.",
    default=DEFAULT_RUNS_LIVENESS_TIMEOUT,
    low=0.5,
    high=_DAY,
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

# Every setting, in the order ``studio-gateway serve --help`` lists them.
SETTINGS: Final[tuple[Setting[str] | Setting[int] | Setting[float] | Setting[bool], ...]] = (
    GATEWAY_HOST,
    GATEWAY_PORT,
    NATS_URL,
    NATS_CREDS,
    NATS_TOKEN,
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
    RUNS_ENABLED,
    RUNS_RUNNERS,
    RUNS_STREAM_MAX_AGE,
    RUNS_DUPLICATE_WINDOW,
    RUNS_REPLICAS,
    RUNS_OUTPUT_MAX_BYTES,
    RUNS_RETENTION,
    RUNS_LIVENESS_TIMEOUT,
    RUNS_REAPER_INTERVAL,
    RUNS_DISPATCH_TIMEOUT,
    RUNS_KEEPALIVE,
    RUNS_MAX_BODY_BYTES,
    RUNS_MAX_EVENTS_PER_RUN,
    RUNS_MAX_EVENT_BYTES,
    RUNS_HOST_STRAY_EVENTS,
    RUNS_HOST_STRAY_WINDOW,
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


# ------------------------------------------------------------------------------ configuration


class CredentialMode(enum.Enum):
    OPERATOR = "operator"
    TOKEN = "token"
    NONE = "none"


@dataclass(frozen=True)
class OperatorKeys:
    """The account the gateway mints users for, checked against the operator at start-up."""

    operator_jwt: str
    account_jwt: str
    signing_key_seed: str = field(repr=False)
    operator_public_key: str
    account_public_key: str
    signing_public_key: str


@dataclass(frozen=True)
class AuthConfig:
    """How the gateway checks its own API's bearer tokens (not NATS credentials)."""

    secret: str | None = field(default=None, repr=False)
    public_key: str | None = None
    algorithms: tuple[str, ...] = ("HS256",)
    audience: str = DEFAULT_JWT_AUDIENCE

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> AuthConfig:
        return cls.from_settings(EnvironValues(environ))

    @classmethod
    def from_settings(cls, values: SettingValues) -> AuthConfig:
        secret = _read_value(values, GATEWAY_JWT_SECRET)
        public_key = _read_value(values, GATEWAY_JWT_PUBLIC_KEY)
        if secret and public_key:
            raise ConfigError(GATEWAY_JWT_SECRET.env, "set either it or GATEWAY_JWT_PUBLIC_KEY, not both")
        if not secret and not public_key:
            raise ConfigError(
                GATEWAY_JWT_SECRET.env,
                "not set: the gateway needs GATEWAY_JWT_SECRET (HS256) or GATEWAY_JWT_PUBLIC_KEY (RS/ES)",
            )
        raw_algorithms = (values.given(GATEWAY_JWT_ALGORITHMS) or "").strip()
        if raw_algorithms:
            algorithms = tuple(a.strip() for a in raw_algorithms.split(",") if a.strip())
        else:
            algorithms = ("HS256",) if secret else ("RS256", "ES256")
        allowed = _HMAC_ALGORITHMS if secret else _PUBLIC_KEY_ALGORITHMS
        # Never mix families: accepting HS256 with a public key lets anyone forge tokens with it.
        bad = [a for a in algorithms if a not in allowed]
        if not algorithms or bad:
            kind = "a shared secret" if secret else "a public key"
            raise ConfigError(
                GATEWAY_JWT_ALGORITHMS.env,
                f"{', '.join(bad) or 'empty'} cannot be used with {kind}; choose from {sorted(allowed)}",
            )
        if secret is not None and len(secret.encode()) < 32:
            raise ConfigError(GATEWAY_JWT_SECRET.env, "too short: use at least 32 bytes of random data")
        if public_key is not None and "-----BEGIN" not in public_key:
            raise ConfigError(GATEWAY_JWT_PUBLIC_KEY.env, "not a PEM public key (or a path to one)")
        audience = values.value(GATEWAY_JWT_AUDIENCE).strip()
        if not audience:
            raise ConfigError(GATEWAY_JWT_AUDIENCE.env, "must not be empty")
        return cls(secret=secret, public_key=public_key, algorithms=algorithms, audience=audience)


@dataclass(frozen=True)
class RunsConfig:
    """Runs: dispatch, the JetStream stream and buckets, the reaper (``RUNS_*`` settings)."""

    enabled: bool = True
    runners: tuple[str, ...] = DEFAULT_RUNNERS
    stream_max_age: float = DEFAULT_RUNS_STREAM_MAX_AGE
    duplicate_window: float = DEFAULT_RUNS_DUPLICATE_WINDOW
    replicas: int = DEFAULT_RUNS_REPLICAS
    output_max_bytes: int = DEFAULT_RUNS_OUTPUT_MAX_BYTES
    retention: float = DEFAULT_RUNS_RETENTION
    liveness_timeout: float = DEFAULT_RUNS_LIVENESS_TIMEOUT
    # None: REAPER_SCANS_PER_LIVENESS_TIMEOUT scans per liveness timeout, within REAPER_SCAN_INTERVAL_BOUNDS.
    reaper_interval: float | None = None
    dispatch_timeout: float = DEFAULT_RUNS_DISPATCH_TIMEOUT
    keepalive: float = DEFAULT_RUNS_KEEPALIVE
    max_body_bytes: int = DEFAULT_RUNS_MAX_BODY_BYTES
    max_events_per_run: int = DEFAULT_RUNS_MAX_EVENTS_PER_RUN
    max_event_bytes: int = DEFAULT_RUNS_MAX_EVENT_BYTES
    host_stray_events: int = DEFAULT_RUNS_HOST_STRAY_EVENTS
    host_stray_window: float = DEFAULT_RUNS_HOST_STRAY_WINDOW

    @property
    def reaper_scan_interval(self) -> float:
        """How often each instance scans for silent runs: small next to the liveness timeout."""
        if self.reaper_interval is not None:
            return self.reaper_interval
        low, high = REAPER_SCAN_INTERVAL_BOUNDS
        return min(high, max(low, self.liveness_timeout / REAPER_SCANS_PER_LIVENESS_TIMEOUT))

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> RunsConfig:
        return cls.from_settings(EnvironValues(environ))

    @classmethod
    def from_settings(cls, values: SettingValues) -> RunsConfig:
        raw_runners = (values.given(RUNS_RUNNERS) or "").strip()
        runners: tuple[str, ...] = DEFAULT_RUNNERS
        if raw_runners:
            runners = tuple(dict.fromkeys(r.strip() for r in raw_runners.split(",") if r.strip()))
            bad = [r for r in runners if not _RUNNER_NAME.fullmatch(r)]
            if not runners or bad:
                raise ConfigError(
                    RUNS_RUNNERS.env, f"{', '.join(bad) or 'empty'}: runner names are 1..64 of a-z 0-9 _ -"
                )
        max_age = values.value(RUNS_STREAM_MAX_AGE)
        window = values.value(RUNS_DUPLICATE_WINDOW)
        if window > max_age and values.given(RUNS_DUPLICATE_WINDOW) is None:
            window = max_age  # the default window, for a short stream retention
        if window > max_age:
            raise ConfigError(
                RUNS_DUPLICATE_WINDOW.env,
                f"{window:g} s is longer than RUNS_STREAM_MAX_AGE_SECONDS ({max_age:g} s)",
            )
        liveness = values.value(RUNS_LIVENESS_TIMEOUT)
        interval = values.checked(RUNS_REAPER_INTERVAL)
        return cls(
            enabled=values.value(RUNS_ENABLED),
            runners=runners,
            stream_max_age=max_age,
            duplicate_window=window,
            replicas=values.value(RUNS_REPLICAS),
            output_max_bytes=values.value(RUNS_OUTPUT_MAX_BYTES),
            retention=values.value(RUNS_RETENTION),
            liveness_timeout=liveness,
            reaper_interval=interval,
            dispatch_timeout=values.value(RUNS_DISPATCH_TIMEOUT),
            keepalive=values.value(RUNS_KEEPALIVE),
            max_body_bytes=values.value(RUNS_MAX_BODY_BYTES),
            max_events_per_run=values.value(RUNS_MAX_EVENTS_PER_RUN),
            max_event_bytes=values.value(RUNS_MAX_EVENT_BYTES),
            host_stray_events=values.value(RUNS_HOST_STRAY_EVENTS),
            host_stray_window=values.value(RUNS_HOST_STRAY_WINDOW),
        )


@dataclass(frozen=True)
class GatewayConfig:
    """Everything ``create_app`` needs: :meth:`from_env`, or :meth:`from_settings` (the CLI)."""

    auth: AuthConfig
    nats_urls: tuple[str, ...] = (DEFAULT_NATS_URL,)
    nats_creds: str | None = None
    nats_token: str | None = field(default=None, repr=False)
    public_urls: tuple[str, ...] = ()
    tunnel_public_enabled: bool = True
    session_ttl_seconds: int = DEFAULT_SESSION_TTL_SECONDS
    operator: OperatorKeys | None = None
    tunnel_prefix: str = tunnel.DEFAULT_PREFIX
    host: str = DEFAULT_GATEWAY_HOST
    port: int = DEFAULT_GATEWAY_PORT
    presence_first_frame_timeout: float = DEFAULT_PRESENCE_FIRST_FRAME_TIMEOUT
    presence_timeout: float = DEFAULT_PRESENCE_TIMEOUT
    runs: RunsConfig = field(default_factory=RunsConfig)

    @property
    def credential_mode(self) -> CredentialMode:
        if self.operator is not None:
            return CredentialMode.OPERATOR
        if self.nats_token is not None:
            return CredentialMode.TOKEN
        return CredentialMode.NONE

    @property
    def allowed_connection_types(self) -> tuple[str, ...]:
        return allowed_connection_types(self.public_urls)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> GatewayConfig:
        """Read and validate every setting; :class:`ConfigError` names the first bad variable."""
        return cls.from_settings(EnvironValues(environ))

    @classmethod
    def from_settings(cls, values: SettingValues) -> GatewayConfig:
        """Validate every setting given; :class:`ConfigError` names the first bad variable."""
        auth = AuthConfig.from_settings(values)
        nats_urls = _url_list(values, NATS_URL) or (DEFAULT_NATS_URL,)
        public_urls = _url_list(values, NATS_PUBLIC_URL)
        nats_creds = (values.given(NATS_CREDS) or "").strip() or None
        nats_token = _read_value(values, NATS_TOKEN)
        operator = _operator_keys(values)
        if operator is not None and nats_token is not None:
            raise ConfigError(
                NATS_TOKEN.env, "set either NATS_TOKEN (token mode) or the operator keys, not both"
            )
        if nats_creds is not None and nats_token is not None:
            raise ConfigError(NATS_CREDS.env, "set either NATS_CREDS or NATS_TOKEN, not both")
        if nats_creds is not None and "-----BEGIN" not in nats_creds and not Path(nats_creds).is_file():
            raise ConfigError(NATS_CREDS.env, f"no such credentials file: {nats_creds}")
        prefix = values.value(TUNNEL_PREFIX).strip()
        try:
            tunnel.HostSubjects.for_host("probe", prefix)
        except tunnel.LocalProtocolError:
            raise ConfigError(
                TUNNEL_PREFIX.env, f"{prefix!r} is not a dot-separated subject prefix"
            ) from None
        return cls(
            auth=auth,
            nats_urls=nats_urls,
            nats_creds=nats_creds,
            nats_token=nats_token,
            public_urls=public_urls,
            tunnel_public_enabled=values.value(NATS_TUNNEL_PUBLIC_ENABLED),
            session_ttl_seconds=values.value(NATS_TUNNEL_SESSION_TTL_SECONDS),
            operator=operator,
            tunnel_prefix=prefix,
            host=values.value(GATEWAY_HOST).strip() or DEFAULT_GATEWAY_HOST,
            port=values.value(GATEWAY_PORT),
            runs=RunsConfig.from_settings(values),
        )


def allowed_connection_types(public_urls: tuple[str, ...]) -> tuple[str, ...]:
    """``wss://``/``ws://`` only -> WEBSOCKET; any ``nats://``/``tls://`` -> STANDARD and WEBSOCKET.

    A daemon told to use only websocket URLs has no business opening a plain NATS
    connection with the same credential, so the credential forbids it.
    """
    kinds = {_NATS_SCHEMES[urlsplit(u).scheme] for u in public_urls}
    if not kinds:
        return ()
    return ("STANDARD", "WEBSOCKET") if "STANDARD" in kinds else ("WEBSOCKET",)


# ------------------------------------------------------------------------------ parsing helpers


def _read_value(values: SettingValues, setting: Text) -> str | None:
    """An inline value, or the content of the file it names (for secrets mounted as files)."""
    raw = (values.given(setting) or "").strip()
    if not raw:
        return None
    if raw.startswith(("/", "./", "~/")) and "\n" not in raw:
        path = Path(raw).expanduser()
        try:
            return path.read_text(encoding="utf-8").strip() or None
        except OSError as exc:
            raise ConfigError(setting.env, f"cannot read {path}: {exc.strerror}") from None
    return raw


def _url_list(values: SettingValues, setting: Text) -> tuple[str, ...]:
    raw = values.given(setting) or ""
    urls = tuple(u.strip() for u in raw.split(",") if u.strip())
    for url in urls:
        _check_nats_url(setting.env, url)
    return urls


def _check_nats_url(name: str, url: str) -> None:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(name, f"{url!r} is not a valid URL ({exc})") from None
    if parts.scheme not in _NATS_SCHEMES:
        raise ConfigError(
            name, f"{url!r}: scheme must be one of nats://, tls://, ws://, wss:// (got {parts.scheme!r})"
        )
    if not parts.hostname:
        raise ConfigError(name, f"{url!r} has no host")
    if port == 0:
        raise ConfigError(name, f"{url!r} has port 0")


def _operator_keys(values: SettingValues) -> OperatorKeys | None:
    settings = (NATS_OPERATOR_JWT, NATS_ACCOUNT_JWT, NATS_ACCOUNT_SIGNING_KEY)
    names = tuple(setting.env for setting in settings)
    read = {setting.env: _read_value(values, setting) for setting in settings}
    missing = [name for name, value in read.items() if value is None]
    if len(missing) == len(names):
        return None
    if missing:
        raise ConfigError(missing[0], "operator mode needs all of " + ", ".join(names))
    operator_jwt, account_jwt, seed = (read[name] or "" for name in names)
    try:
        operator = decode_jwt(operator_jwt)
    except JwtError as exc:
        raise ConfigError("NATS_OPERATOR_JWT", str(exc)) from None
    if operator["nats"].get("type") != "operator" or operator.get("iss") != operator.get("sub"):
        raise ConfigError("NATS_OPERATOR_JWT", "not a self-signed operator JWT")
    try:
        account = decode_jwt(account_jwt)
    except JwtError as exc:
        raise ConfigError("NATS_ACCOUNT_JWT", str(exc)) from None
    operator_keys = {operator["sub"], *_signing_keys(operator)}
    if account["nats"].get("type") != "account" or account.get("iss") not in operator_keys:
        raise ConfigError("NATS_ACCOUNT_JWT", "not an account JWT issued by the configured operator")
    try:
        signing_public = nats_jwt.keypair_from_seed(seed).public_key.decode("ascii")
    except JwtError as exc:
        raise ConfigError("NATS_ACCOUNT_SIGNING_KEY", str(exc)) from None
    if not is_public_key(signing_public, KeyKind.ACCOUNT):
        raise ConfigError("NATS_ACCOUNT_SIGNING_KEY", "not an account seed (SA...)")
    account_keys = {account["sub"], *_signing_keys(account)}
    if signing_public not in account_keys:
        raise ConfigError("NATS_ACCOUNT_SIGNING_KEY", "this key is not a signing key of NATS_ACCOUNT_JWT")
    if signing_public in _signing_keys(account, scoped=True):
        # nats-server applies a scoped key's template instead of the permissions we sign,
        # which would silently undo the per-host confinement.
        raise ConfigError(
            "NATS_ACCOUNT_SIGNING_KEY", "is a scoped signing key; use an unscoped one (per-host permissions)"
        )
    return OperatorKeys(
        operator_jwt=operator_jwt,
        account_jwt=account_jwt,
        signing_key_seed=seed,
        operator_public_key=operator["sub"],
        account_public_key=account["sub"],
        signing_public_key=signing_public,
    )


def _signing_keys(claims: Mapping[str, object], *, scoped: bool | None = None) -> list[str]:
    """Signing keys of an operator/account JWT: plain strings, or scoped ones (``{"key": ...}``).

    ``scoped``: None for all, True for scoped ones only.
    """
    nats = claims.get("nats")
    entries = nats.get("signing_keys", []) if isinstance(nats, dict) else []
    keys: list[str] = []
    for entry in entries if isinstance(entries, list) else []:
        is_scoped = isinstance(entry, dict)
        key = entry.get("key") if is_scoped else entry
        if isinstance(key, str) and (scoped is None or scoped == is_scoped):
            keys.append(key)
    return keys
