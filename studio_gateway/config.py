"""Gateway configuration: one frozen value object, built from the environment and checked at start-up.

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

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

import tunnel

from . import nats_jwt

__all__ = [
    "DEFAULT_GATEWAY_HOST",
    "DEFAULT_GATEWAY_PORT",
    "DEFAULT_JWT_AUDIENCE",
    "DEFAULT_NATS_URL",
    "DEFAULT_SESSION_TTL_SECONDS",
    "AuthConfig",
    "ConfigError",
    "CredentialMode",
    "GatewayConfig",
    "OperatorKeys",
    "RunsConfig",
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
# Events of one run kept for export after the stream's retention (the done event is always kept).
DEFAULT_RUNS_OUTPUT_MAX_BYTES: Final = 1024 * 1024
# Run state and kept events live this long in their key-value buckets.
DEFAULT_RUNS_RETENTION: Final = 7 * 24 * 3600.0
# A running run whose desktop sent nothing (linkd sends heartbeats) for this long is desktop_lost.
DEFAULT_RUNS_LIVENESS_TIMEOUT: Final = 60.0
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


class ConfigError(ValueError):
    """A setting is missing or malformed; ``variable`` names the environment variable."""

    def __init__(self, variable: str, message: str) -> None:
        super().__init__(f"{variable}: {message}")
        self.variable = variable
        self.message = message


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
        secret = _read_value(environ, "GATEWAY_JWT_SECRET")
        public_key = _read_value(environ, "GATEWAY_JWT_PUBLIC_KEY")
        if secret and public_key:
            raise ConfigError("GATEWAY_JWT_SECRET", "set either it or GATEWAY_JWT_PUBLIC_KEY, not both")
        if not secret and not public_key:
            raise ConfigError(
                "GATEWAY_JWT_SECRET",
                "not set: the gateway needs GATEWAY_JWT_SECRET (HS256) or GATEWAY_JWT_PUBLIC_KEY (RS/ES)",
            )
        raw_algorithms = environ.get("GATEWAY_JWT_ALGORITHMS", "").strip()
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
                "GATEWAY_JWT_ALGORITHMS",
                f"{', '.join(bad) or 'empty'} cannot be used with {kind}; choose from {sorted(allowed)}",
            )
        if secret is not None and len(secret.encode()) < 32:
            raise ConfigError("GATEWAY_JWT_SECRET", "too short: use at least 32 bytes of random data")
        if public_key is not None and "-----BEGIN" not in public_key:
            raise ConfigError("GATEWAY_JWT_PUBLIC_KEY", "not a PEM public key (or a path to one)")
        audience = environ.get("GATEWAY_JWT_AUDIENCE", DEFAULT_JWT_AUDIENCE).strip()
        if not audience:
            raise ConfigError("GATEWAY_JWT_AUDIENCE", "must not be empty")
        return cls(secret=secret, public_key=public_key, algorithms=algorithms, audience=audience)


@dataclass(frozen=True)
class RunsConfig:
    """Runs: dispatch, the JetStream stream and buckets, the reaper (``RUNS_*`` variables)."""

    enabled: bool = True
    runners: tuple[str, ...] = DEFAULT_RUNNERS
    stream_max_age: float = DEFAULT_RUNS_STREAM_MAX_AGE
    duplicate_window: float = DEFAULT_RUNS_DUPLICATE_WINDOW
    replicas: int = 1
    output_max_bytes: int = DEFAULT_RUNS_OUTPUT_MAX_BYTES
    retention: float = DEFAULT_RUNS_RETENTION
    liveness_timeout: float = DEFAULT_RUNS_LIVENESS_TIMEOUT
    # None: a tenth of the liveness timeout, between 0.1 and 5 seconds.
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
        return min(5.0, max(0.1, self.liveness_timeout / 10))

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> RunsConfig:
        raw_runners = environ.get("RUNS_RUNNERS", "").strip()
        runners: tuple[str, ...] = DEFAULT_RUNNERS
        if raw_runners:
            runners = tuple(dict.fromkeys(r.strip() for r in raw_runners.split(",") if r.strip()))
            bad = [r for r in runners if not _RUNNER_NAME.fullmatch(r)]
            if not runners or bad:
                raise ConfigError(
                    "RUNS_RUNNERS", f"{', '.join(bad) or 'empty'}: runner names are 1..64 of a-z 0-9 _ -"
                )
        max_age = _float(
            environ, "RUNS_STREAM_MAX_AGE_SECONDS", DEFAULT_RUNS_STREAM_MAX_AGE, 1.0, 10 * 365 * 86400.0
        )
        window = _float(environ, "RUNS_DUPLICATE_WINDOW_SECONDS", DEFAULT_RUNS_DUPLICATE_WINDOW, 0.1, 86400.0)
        if window > max_age and not environ.get("RUNS_DUPLICATE_WINDOW_SECONDS", "").strip():
            window = max_age  # the default window, for a short stream retention
        if window > max_age:
            raise ConfigError(
                "RUNS_DUPLICATE_WINDOW_SECONDS",
                f"{window:g} s is longer than RUNS_STREAM_MAX_AGE_SECONDS ({max_age:g} s)",
            )
        liveness = _float(
            environ, "RUNS_LIVENESS_TIMEOUT_SECONDS", DEFAULT_RUNS_LIVENESS_TIMEOUT, 0.5, 86400.0
        )
        raw_interval = environ.get("RUNS_REAPER_INTERVAL_SECONDS", "").strip()
        interval = (
            _float(environ, "RUNS_REAPER_INTERVAL_SECONDS", 1.0, 0.05, 3600.0) if raw_interval else None
        )
        return cls(
            enabled=_bool(environ, "RUNS_ENABLED", default=True),
            runners=runners,
            stream_max_age=max_age,
            duplicate_window=window,
            replicas=_int(environ, "RUNS_REPLICAS", default=1, low=1, high=5),
            output_max_bytes=_int(
                environ, "RUNS_OUTPUT_MAX_BYTES", default=DEFAULT_RUNS_OUTPUT_MAX_BYTES, low=0, high=1 << 34
            ),
            retention=_float(
                environ, "RUNS_RETENTION_SECONDS", DEFAULT_RUNS_RETENTION, 60.0, 10 * 365 * 86400.0
            ),
            liveness_timeout=liveness,
            reaper_interval=interval,
            dispatch_timeout=_float(
                environ, "RUNS_DISPATCH_TIMEOUT_SECONDS", DEFAULT_RUNS_DISPATCH_TIMEOUT, 0.1, 600.0
            ),
            keepalive=_float(environ, "RUNS_KEEPALIVE_SECONDS", DEFAULT_RUNS_KEEPALIVE, 0.1, 3600.0),
            max_body_bytes=_int(
                environ, "RUNS_MAX_BODY_BYTES", default=DEFAULT_RUNS_MAX_BODY_BYTES, low=1024, high=16 << 20
            ),
            max_events_per_run=_int(
                environ,
                "RUNS_MAX_EVENTS_PER_RUN",
                default=DEFAULT_RUNS_MAX_EVENTS_PER_RUN,
                low=10,
                high=1 << 30,
            ),
            max_event_bytes=_int(
                environ, "RUNS_MAX_EVENT_BYTES", default=DEFAULT_RUNS_MAX_EVENT_BYTES, low=1024, high=64 << 20
            ),
            host_stray_events=_int(
                environ, "RUNS_HOST_STRAY_EVENTS", default=DEFAULT_RUNS_HOST_STRAY_EVENTS, low=1, high=1 << 30
            ),
            host_stray_window=_float(
                environ, "RUNS_HOST_STRAY_WINDOW_SECONDS", DEFAULT_RUNS_HOST_STRAY_WINDOW, 1.0, 86400.0
            ),
        )


@dataclass(frozen=True)
class GatewayConfig:
    """Everything ``create_app`` needs. Build it with :meth:`from_env` (the CLI overlays its flags)."""

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
        auth = AuthConfig.from_env(environ)
        nats_urls = _url_list(environ, "NATS_URL", required=False) or (DEFAULT_NATS_URL,)
        public_urls = _url_list(environ, "NATS_PUBLIC_URL", required=False)
        nats_creds = environ.get("NATS_CREDS", "").strip() or None
        nats_token = _read_value(environ, "NATS_TOKEN")
        operator = _operator_keys(environ)
        if operator is not None and nats_token is not None:
            raise ConfigError(
                "NATS_TOKEN", "set either NATS_TOKEN (token mode) or the operator keys, not both"
            )
        if nats_creds is not None and nats_token is not None:
            raise ConfigError("NATS_CREDS", "set either NATS_CREDS or NATS_TOKEN, not both")
        if nats_creds is not None and "-----BEGIN" not in nats_creds and not Path(nats_creds).is_file():
            raise ConfigError("NATS_CREDS", f"no such credentials file: {nats_creds}")
        prefix = environ.get("TUNNEL_PREFIX", tunnel.DEFAULT_PREFIX).strip()
        try:
            tunnel.HostSubjects.for_host("probe", prefix)
        except tunnel.LocalProtocolError:
            raise ConfigError("TUNNEL_PREFIX", f"{prefix!r} is not a dot-separated subject prefix") from None
        return cls(
            auth=auth,
            nats_urls=nats_urls,
            nats_creds=nats_creds,
            nats_token=nats_token,
            public_urls=public_urls,
            tunnel_public_enabled=_bool(environ, "NATS_TUNNEL_PUBLIC_ENABLED", default=True),
            session_ttl_seconds=_int(
                environ,
                "NATS_TUNNEL_SESSION_TTL_SECONDS",
                default=DEFAULT_SESSION_TTL_SECONDS,
                low=1,
                high=MAX_SESSION_TTL_SECONDS,
            ),
            operator=operator,
            tunnel_prefix=prefix,
            host=environ.get("GATEWAY_HOST", DEFAULT_GATEWAY_HOST).strip() or DEFAULT_GATEWAY_HOST,
            port=_int(environ, "GATEWAY_PORT", default=DEFAULT_GATEWAY_PORT, low=0, high=65535),
            runs=RunsConfig.from_env(environ),
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


def _read_value(environ: Mapping[str, str], name: str) -> str | None:
    """An inline value, or the content of the file it names (for secrets mounted as files)."""
    raw = environ.get(name, "").strip()
    if not raw:
        return None
    if raw.startswith(("/", "./", "~/")) and "\n" not in raw:
        path = Path(raw).expanduser()
        try:
            return path.read_text(encoding="utf-8").strip() or None
        except OSError as exc:
            raise ConfigError(name, f"cannot read {path}: {exc.strerror}") from None
    return raw


def _url_list(environ: Mapping[str, str], name: str, *, required: bool) -> tuple[str, ...]:
    raw = environ.get(name, "")
    urls = tuple(u.strip() for u in raw.split(",") if u.strip())
    if required and not urls:
        raise ConfigError(name, "not set")
    for url in urls:
        _check_nats_url(name, url)
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


def _bool(environ: Mapping[str, str], name: str, *, default: bool) -> bool:
    raw = environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ConfigError(name, f"{raw!r} is not a boolean (use true/false)")


def _float(environ: Mapping[str, str], name: str, default: float, low: float, high: float) -> float:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(name, f"{raw!r} is not a number (seconds)") from None
    if not low <= value <= high:  # also refuses nan
        raise ConfigError(name, f"{value:g} is out of range [{low:g}, {high:g}]")
    return value


def _int(environ: Mapping[str, str], name: str, *, default: int, low: int, high: int) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(name, f"{raw!r} is not a whole number") from None
    if not low <= value <= high:
        raise ConfigError(name, f"{value} is out of range [{low}, {high}]")
    return value


def _operator_keys(environ: Mapping[str, str]) -> OperatorKeys | None:
    names = ("NATS_OPERATOR_JWT", "NATS_ACCOUNT_JWT", "NATS_ACCOUNT_SIGNING_KEY")
    values = {name: _read_value(environ, name) for name in names}
    missing = [name for name, value in values.items() if value is None]
    if len(missing) == len(names):
        return None
    if missing:
        raise ConfigError(missing[0], "operator mode needs all of " + ", ".join(names))
    operator_jwt, account_jwt, seed = (values[name] or "" for name in names)
    try:
        operator = nats_jwt.decode_jwt(operator_jwt)
    except nats_jwt.JwtError as exc:
        raise ConfigError("NATS_OPERATOR_JWT", str(exc)) from None
    if operator["nats"].get("type") != "operator" or operator.get("iss") != operator.get("sub"):
        raise ConfigError("NATS_OPERATOR_JWT", "not a self-signed operator JWT")
    try:
        account = nats_jwt.decode_jwt(account_jwt)
    except nats_jwt.JwtError as exc:
        raise ConfigError("NATS_ACCOUNT_JWT", str(exc)) from None
    operator_keys = {operator["sub"], *_signing_keys(operator)}
    if account["nats"].get("type") != "account" or account.get("iss") not in operator_keys:
        raise ConfigError("NATS_ACCOUNT_JWT", "not an account JWT issued by the configured operator")
    try:
        signing_public = nats_jwt.keypair_from_seed(seed).public_key.decode("ascii")
    except nats_jwt.JwtError as exc:
        raise ConfigError("NATS_ACCOUNT_SIGNING_KEY", str(exc)) from None
    if not nats_jwt.is_public_key(signing_public, nats_jwt.KeyKind.ACCOUNT):
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
