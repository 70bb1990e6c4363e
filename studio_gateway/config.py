"""Gateway configuration: one frozen value object, built from the settings and checked at start-up.

Every setting is declared once, in :mod:`.settings`: its environment variable, its
``studio-gateway serve`` flag, its type, default and help. :meth:`GatewayConfig.from_env`
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

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TypeVar
from urllib.parse import urlsplit

import tunnel
from contract.nats_jwt import JwtError, KeyKind, decode_jwt, is_public_key
from tunnel.tls import TLSConfig

from . import nats_jwt
from .preview.config import PreviewConfig
from .runs.processors.config import ProcessorsConfig
from .settings import (
    DEFAULT_GATEWAY_HOST,
    DEFAULT_GATEWAY_PORT,
    DEFAULT_JWT_AUDIENCE,
    DEFAULT_NATS_URL,
    DEFAULT_PRESENCE_FIRST_FRAME_TIMEOUT,
    DEFAULT_PRESENCE_TIMEOUT,
    DEFAULT_RUNNERS,
    DEFAULT_RUNS_DISPATCH_TIMEOUT,
    DEFAULT_RUNS_DUPLICATE_WINDOW,
    DEFAULT_RUNS_HOST_STRAY_EVENTS,
    DEFAULT_RUNS_HOST_STRAY_WINDOW,
    DEFAULT_RUNS_KEEPALIVE,
    DEFAULT_RUNS_LIVENESS_TIMEOUT,
    DEFAULT_RUNS_MAX_BODY_BYTES,
    DEFAULT_RUNS_MAX_EVENT_BYTES,
    DEFAULT_RUNS_MAX_EVENTS_PER_RUN,
    DEFAULT_RUNS_OUTPUT_MAX_BYTES,
    DEFAULT_RUNS_REPLICAS,
    DEFAULT_RUNS_RESUME_WINDOW,
    DEFAULT_RUNS_RETENTION,
    DEFAULT_RUNS_STREAM_MAX_AGE,
    DEFAULT_SESSION_TTL_SECONDS,
    GATEWAY_HOST,
    GATEWAY_JWT_ALGORITHMS,
    GATEWAY_JWT_AUDIENCE,
    GATEWAY_JWT_PUBLIC_KEY,
    GATEWAY_JWT_SECRET,
    GATEWAY_METRICS_TOKEN,
    GATEWAY_PORT,
    NATS_ACCOUNT_JWT,
    NATS_ACCOUNT_SIGNING_KEY,
    NATS_CA,
    NATS_CERT,
    NATS_CREDS,
    NATS_KEY,
    NATS_OPERATOR_JWT,
    NATS_PUBLIC_URL,
    NATS_TOKEN,
    NATS_TUNNEL_PUBLIC_ENABLED,
    NATS_TUNNEL_SESSION_TTL_SECONDS,
    NATS_URL,
    REAPER_SCAN_INTERVAL_BOUNDS,
    REAPER_SCANS_PER_LIVENESS_TIMEOUT,
    RUNS_DISPATCH_TIMEOUT,
    RUNS_DUPLICATE_WINDOW,
    RUNS_ENABLED,
    RUNS_HOST_STRAY_EVENTS,
    RUNS_HOST_STRAY_WINDOW,
    RUNS_KEEPALIVE,
    RUNS_LIVENESS_TIMEOUT,
    RUNS_MAX_BODY_BYTES,
    RUNS_MAX_EVENT_BYTES,
    RUNS_MAX_EVENTS_PER_RUN,
    RUNS_OUTPUT_MAX_BYTES,
    RUNS_REAPER_INTERVAL,
    RUNS_REPLICAS,
    RUNS_RESUME_WINDOW,
    RUNS_RETENTION,
    RUNS_RUNNERS,
    RUNS_STREAM_MAX_AGE,
    TUNNEL_PREFIX,
    ConfigError,
    EnvironValues,
    SettingValues,
    Text,
)
from .webhooks.config import WebhooksConfig

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


_HMAC_ALGORITHMS: Final = frozenset({"HS256", "HS384", "HS512"})
_PUBLIC_KEY_ALGORITHMS: Final = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
_NATS_SCHEMES: Final = {"nats": "STANDARD", "tls": "STANDARD", "ws": "WEBSOCKET", "wss": "WEBSOCKET"}
_RUNNER_NAME: Final = re.compile(r"[a-z0-9_-]{1,64}")


T = TypeVar("T")
N = TypeVar("N", int, float)


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
    # A silent run is `stalled` this long before it fails desktop_lost (0: at once).
    resume_window: float = DEFAULT_RUNS_RESUME_WINDOW
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
            resume_window=values.value(RUNS_RESUME_WINDOW),
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
    # NATS_CA / NATS_CERT / NATS_KEY: TLS for the gateway's own connection (None: system CAs).
    nats_tls: TLSConfig | None = None
    public_urls: tuple[str, ...] = ()
    tunnel_public_enabled: bool = True
    session_ttl_seconds: int = DEFAULT_SESSION_TTL_SECONDS
    operator: OperatorKeys | None = None
    tunnel_prefix: str = tunnel.DEFAULT_PREFIX
    host: str = DEFAULT_GATEWAY_HOST
    port: int = DEFAULT_GATEWAY_PORT
    presence_first_frame_timeout: float = DEFAULT_PRESENCE_FIRST_FRAME_TIMEOUT
    presence_timeout: float = DEFAULT_PRESENCE_TIMEOUT
    # GATEWAY_METRICS_TOKEN: a /metrics scrape sends it as a bearer token (None: loopback only).
    metrics_token: str | None = field(default=None, repr=False)
    runs: RunsConfig = field(default_factory=RunsConfig)
    preview: PreviewConfig = field(default_factory=PreviewConfig)
    processors: ProcessorsConfig = field(default_factory=ProcessorsConfig)
    webhooks: WebhooksConfig = field(default_factory=WebhooksConfig)

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
        nats_tls = _nats_tls(values)
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
            nats_tls=nats_tls,
            public_urls=public_urls,
            tunnel_public_enabled=values.value(NATS_TUNNEL_PUBLIC_ENABLED),
            session_ttl_seconds=values.value(NATS_TUNNEL_SESSION_TTL_SECONDS),
            operator=operator,
            tunnel_prefix=prefix,
            host=values.value(GATEWAY_HOST).strip() or DEFAULT_GATEWAY_HOST,
            port=values.value(GATEWAY_PORT),
            metrics_token=_metrics_token(values),
            runs=RunsConfig.from_settings(values),
            preview=PreviewConfig.from_settings(values),
            processors=ProcessorsConfig.from_settings(values),
            webhooks=WebhooksConfig.from_settings(values),
        )


# A guessable scrape token would be no protection.
MIN_METRICS_TOKEN_LENGTH: Final = 16


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


def _nats_tls(values: SettingValues) -> TLSConfig | None:
    """NATS_CA / NATS_CERT / NATS_KEY as a TLSConfig, its files read once now (ConfigError if bad)."""
    ca, cert, key = ((values.given(s) or "").strip() or None for s in (NATS_CA, NATS_CERT, NATS_KEY))
    if ca is None and cert is None and key is None:
        return None
    if key is not None and cert is None:
        raise ConfigError(NATS_KEY.env, "NATS_KEY needs NATS_CERT (the client certificate)")
    config = TLSConfig(ca=ca, cert=cert, key=key)
    try:
        config.context()
    except ValueError as exc:
        variable = NATS_CA.env if ca is not None and "CA file" in str(exc) else NATS_CERT.env
        raise ConfigError(variable, str(exc)) from None
    return config


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


def _metrics_token(values: SettingValues) -> str | None:
    token = _read_value(values, GATEWAY_METRICS_TOKEN)
    if token is not None and len(token) < MIN_METRICS_TOKEN_LENGTH:
        raise ConfigError(
            GATEWAY_METRICS_TOKEN.env, f"too short: use at least {MIN_METRICS_TOKEN_LENGTH} random characters"
        )
    return token


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
