"""Build a nats-py connection with the settings a long-lived tunnel peer wants.

::

    nc = await connect("nats://hub.example:4222", creds="~/.config/natslink/user.creds")
    nc = await connect(["nats://a:4222", "nats://b:4222"], token="s3cret", name="linkd")
    nc = await connect(url, nkey_seed=seed, jwt_cb=lambda: current_jwt)

Authentication: at most one of ``creds`` (a .creds file path), ``creds_text`` (its
content), ``nkey_seed`` (optionally with ``jwt_cb``) and ``token``. Credentials are
checked before connecting, so a malformed one is a ``ValueError`` at once (nats-py
would otherwise loop forever on creds text without a JWT header line).

The first connect tries each server a couple of times and fails with
:class:`NatsConnectError` (:class:`NatsAuthError` when a server refused our
credentials, :class:`NatsTLSError` when the TLS handshake failed: unknown CA, wrong host
name, expired certificate, client certificate required). Once connected, the connection
reconnects forever, with a short jittered wait (a :class:`tunnel.backoff.ReconnectPolicy`),
and resubscribes by itself.
Disconnects, reconnects and errors are logged on ``tunnel.connect``; your own callbacks
(sync or async) run after that.

TLS (``tls://`` and ``wss://`` URLs, or a server that requires TLS): ``tls=TLSConfig(ca=...,
cert=..., key=...)`` trusts a private CA and presents a client certificate (mTLS); see
:mod:`tunnel.tls`. Without it the system's CA store is used.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import inspect
import logging
import os
import re
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import nkeys
from nats.aio.client import Client as NATS
from nats.aio.client import RawCredentials
from nats.errors import Error as NatsError
from nats.errors import NoServersError

from .backoff import ReconnectPolicy
from .tls import TLSConfig, TLSProblem, classify_tls_error, quiet_asyncio_tls_eof_warning

__all__ = [
    "CONNECT_TIMEOUT",
    "MAX_OUTSTANDING_PINGS",
    "PING_INTERVAL",
    "RECONNECT_JITTER",
    "RECONNECT_TIME_WAIT",
    "NatsAuthError",
    "NatsConnectError",
    "NatsTLSError",
    "connect",
    "parse_creds",
]

log = logging.getLogger("tunnel.connect")

# A daemon or gateway must come back by itself after any outage, however long:
# never give up reconnecting (nats-py's default gives up after 60 attempts).
MAX_RECONNECT_ATTEMPTS: Final = -1
# Wait between attempts on the same server: short, because a restarted or failed-over
# server is usually back within seconds and callers fail with tunnel_unreachable meanwhile.
RECONNECT_TIME_WAIT: Final = 1.0
# Random extra wait per attempt, so a fleet of daemons does not reconnect in lockstep
# when a server restarts (thundering herd).
RECONNECT_JITTER: Final = 1.0
# The first attempt after a drop waits only a little jitter: the drop may be the
# server's own restart, or a load balancer that already has another one.
FIRST_RECONNECT_JITTER: Final = 0.25
# Client PINGs detect a dead TCP path (NAT timeout, sleeping laptop) within about
# PING_INTERVAL * MAX_OUTSTANDING_PINGS = 60 s instead of nats-py's default 4 minutes;
# 20 s is also below the idle timeout of common NATs and proxies, keeping them open.
PING_INTERVAL: Final = 20
MAX_OUTSTANDING_PINGS: Final = 3
# A TCP + TLS + CONNECT handshake to a reachable server takes well under a second.
CONNECT_TIMEOUT: Final = 5
# First connect: attempts per server before NatsConnectError (nats-py counts retries,
# so 1 means "try twice"); a wrong URL should fail in seconds, not hang a CLI.
INITIAL_CONNECT_RETRIES: Final = 1
# Outgoing bytes buffered while reconnecting (nats-py default 2 MiB): one tunnel
# window's worth, so an in-flight body survives a short blip.
PENDING_SIZE: Final = 2 * 1024 * 1024
# Closing a client whose first connect failed: at once normally, but after a failed TLS upgrade
# nats-py waits forever for the plain stream's close (its protocol was swapped out by start_tls;
# the socket itself is already closed), so that wait is cut short.
FAILED_CLOSE_TIMEOUT: Final = 0.25

_JWT_BEGIN: Final = "-----BEGIN NATS USER JWT-----"
_JWT_END: Final = "------END NATS USER JWT------"
_SEED_BEGIN: Final = "-----BEGIN USER NKEY SEED-----"
_SEED_END: Final = "------END USER NKEY SEED------"
_JWT_RE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_SEED_RE = re.compile(r"SU[A-Z2-7]{50,}")

ErrorCallback = Callable[[Exception], Awaitable[None] | None]
EventCallback = Callable[[], Awaitable[None] | None]


class NatsConnectError(ConnectionError):
    """The first connect failed (no server reachable, or one refused us)."""


class NatsAuthError(NatsConnectError):
    """A NATS server refused our credentials (authorization violation)."""


class NatsTLSError(NatsConnectError):
    """The TLS handshake with the NATS server failed; ``problem`` says why, ``where`` names the URL(s)."""

    def __init__(self, message: str, *, where: str, problem: TLSProblem) -> None:
        super().__init__(message)
        self.where = where
        self.problem = problem


def parse_creds(text: str) -> tuple[str, str]:
    """(user JWT, user nkey seed) from .creds text; ``ValueError`` naming what is wrong.

    Accepts CRLF line ends and surrounding blank lines; never puts secrets in the message.
    """
    lines = [line.strip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]

    def block(begin: str, what: str) -> str:
        try:
            start = lines.index(begin)
        except ValueError:
            raise ValueError(
                f"NATS credentials have no {what} block (expected a line {begin!r}); "
                "pass the content of a .creds file as creds_text, or its path as creds"
            ) from None
        for line in lines[start + 1 :]:
            if line:
                return line
        raise ValueError(f"NATS credentials: the {what} block is empty")

    jwt = block(_JWT_BEGIN, "user JWT")
    if not _JWT_RE.fullmatch(jwt):
        raise ValueError("NATS credentials: the user JWT block does not hold a JWT")
    seed = block(_SEED_BEGIN, "user nkey seed")
    if not _SEED_RE.fullmatch(seed):
        raise ValueError("NATS credentials: the nkey seed block does not hold a user seed (SU...)")
    _check_seed(seed)
    return jwt, seed


def _check_seed(seed: str) -> None:
    """A well-formed nkey seed: base32, right length, CRC16 intact (nkeys checks no CRC)."""
    try:
        encoded = seed.encode("ascii")
        raw = base64.b32decode(encoded + b"=" * (-len(encoded) % 8))
    except (UnicodeError, binascii.Error):
        raise ValueError("invalid NATS nkey seed: not base32") from None
    if len(raw) != 36:
        raise ValueError("invalid NATS nkey seed: wrong length")
    if raw[-2:] != nkeys.crc16_checksum(raw[:-2]):
        raise ValueError("invalid NATS nkey seed: checksum mismatch (truncated or mistyped?)")
    try:
        keypair = nkeys.from_seed(bytearray(encoded))
    except nkeys.NkeysError as exc:
        raise ValueError(f"invalid NATS nkey seed ({type(exc).__name__})") from None
    keypair.wipe()


def _canonical_creds(jwt: str, seed: str) -> str:
    # nats-py reads the line after each BEGIN marker and drops its last character,
    # so it needs exactly this shape (LF line ends, no blank line after the marker).
    return f"{_JWT_BEGIN}\n{jwt}\n{_JWT_END}\n\n{_SEED_BEGIN}\n{seed}\n{_SEED_END}\n"


def _creds_option(
    creds: str | os.PathLike[str] | None, creds_text: str | None
) -> str | RawCredentials | None:
    if creds_text is not None:
        return RawCredentials(_canonical_creds(*parse_creds(creds_text)))
    if creds is None:
        return None
    path = Path(creds).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read NATS credentials file {str(path)!r}: {exc.strerror}") from None
    jwt, seed = parse_creds(text)
    if "\r" not in text and f"{_JWT_BEGIN}\n{jwt}\n" in text and f"{_SEED_BEGIN}\n{seed}\n" in text:
        return str(path)  # nats-py re-reads the file on each (re)connect: rotation works
    log.debug("credentials file %s is not in canonical form; using its parsed content", path)
    return RawCredentials(_canonical_creds(jwt, seed))


async def _call_user(cb: Callable[..., Any] | None, *args: Any) -> None:
    if cb is None:
        return
    try:
        result = cb(*args)
        if inspect.isawaitable(result):
            await result
    except Exception:
        log.exception("user NATS callback %r failed", cb)


class _Callbacks:
    """nats-py callbacks that log, then call the user's."""

    def __init__(
        self,
        nc: NATS,
        error_cb: ErrorCallback | None,
        disconnected_cb: EventCallback | None,
        reconnected_cb: EventCallback | None,
        closed_cb: EventCallback | None,
    ) -> None:
        self.nc = nc
        self.user_error = error_cb
        self.user_disconnected = disconnected_cb
        self.user_reconnected = reconnected_cb
        self.user_closed = closed_cb
        self.connected_once = False
        self._disconnected = False
        self._errors_while_down = 0
        self.last_error: Exception | None = None

    async def error(self, exc: Exception) -> None:
        self.last_error = exc
        if not self.connected_once:
            log.debug("NATS connect attempt failed: %s", _describe(exc))  # connect() raises anyway
        elif self._disconnected:
            # While reconnecting every failed attempt reports an error: log the first, count the rest.
            self._errors_while_down += 1
            level = logging.WARNING if self._errors_while_down == 1 else logging.DEBUG
            log.log(level, "NATS connect attempt failed: %s", _describe(exc))
        else:
            log.warning("NATS error: %s", _describe(exc))
        await _call_user(self.user_error, exc)

    async def disconnected(self) -> None:
        if self.connected_once and not self.nc.is_closed:
            self._disconnected = True
            self._errors_while_down = 0
            log.warning("NATS disconnected; reconnecting")
        await _call_user(self.user_disconnected)

    async def reconnected(self) -> None:
        self._disconnected = False
        url = self.nc.connected_url
        log.info(
            "NATS reconnected to %s after %d failed attempt(s)",
            _public_netloc(url),
            self._errors_while_down,
        )
        await _call_user(self.user_reconnected)

    async def closed(self) -> None:
        if self.connected_once:
            log.info("NATS connection closed")
        await _call_user(self.user_closed)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _reconnect_policy() -> ReconnectPolicy:
    """Rotate through the servers, wait RECONNECT_TIME_WAIT plus jitter (a constant backoff)."""
    return ReconnectPolicy(
        initial=RECONNECT_TIME_WAIT,
        cap=RECONNECT_TIME_WAIT,
        jitter=RECONNECT_JITTER,
        first_jitter=FIRST_RECONNECT_JITTER,
    )


def _supports(option: str) -> bool:
    return option in inspect.signature(NATS.connect).parameters


async def connect(
    urls: str | list[str],
    *,
    creds: str | os.PathLike[str] | None = None,
    creds_text: str | None = None,
    nkey_seed: str | None = None,
    jwt_cb: Callable[[], str | bytes] | None = None,
    token: str | None = None,
    name: str | None = None,
    inbox_prefix: str | None = None,
    tls: TLSConfig | ssl.SSLContext | None = None,
    error_cb: ErrorCallback | None = None,
    disconnected_cb: EventCallback | None = None,
    reconnected_cb: EventCallback | None = None,
    closed_cb: EventCallback | None = None,
    **overrides: Any,
) -> NATS:
    """Connect to NATS (see the module docstring).

    ``overrides`` go to nats-py's ``connect`` as they are, except ``allow_reconnect`` and
    ``max_reconnect_attempts``, which set the policy once connected (default: forever).
    """
    servers = [urls] if isinstance(urls, str) else list(urls)
    if not servers or not all(isinstance(u, str) and u.strip() for u in servers):
        raise ValueError("connect() needs at least one NATS server URL")
    given = {"creds": creds, "creds_text": creds_text, "nkey_seed": nkey_seed, "token": token}
    methods = [key for key, value in given.items() if value is not None]
    if len(methods) > 1:
        raise ValueError(f"give one authentication method, not {' and '.join(methods)}")
    if jwt_cb is not None and nkey_seed is None:
        raise ValueError("jwt_cb needs nkey_seed (the JWT's nonce is signed with that key)")

    options: dict[str, Any] = {
        "servers": servers,
        "name": name,
        "connect_timeout": CONNECT_TIMEOUT,
        "reconnect_time_wait": RECONNECT_TIME_WAIT,
        "ping_interval": PING_INTERVAL,
        "max_outstanding_pings": MAX_OUTSTANDING_PINGS,
        "pending_size": PENDING_SIZE,
        # First connect: fail fast (auth refused: at once; unreachable: after the retries);
        # switched to "reconnect forever" below once connected.
        "allow_reconnect": False,
        "max_reconnect_attempts": INITIAL_CONNECT_RETRIES,
    }
    creds_option = _creds_option(creds, creds_text)
    if creds_option is not None:
        options["user_credentials"] = creds_option
    if nkey_seed is not None:
        seed = nkey_seed.strip()
        _check_seed(seed)
        options["nkeys_seed_str"] = seed
        if jwt_cb is not None:
            user_jwt = jwt_cb

            def jwt_bytes() -> bytes:
                value = user_jwt()
                return value.encode("ascii") if isinstance(value, str) else bytes(value)

            options["user_jwt_cb"] = jwt_bytes
    if token is not None:
        options["token"] = token
    if inbox_prefix is not None:
        options["inbox_prefix"] = inbox_prefix
    if tls is not None or any(urlsplit(u).scheme in ("tls", "wss") for u in servers):
        quiet_asyncio_tls_eof_warning()
    if isinstance(tls, ssl.SSLContext):
        options["tls"] = tls
    elif tls is not None:
        options["tls"] = tls.context()  # built once: every reconnect reuses it
        if tls.hostname is not None:
            options["tls_hostname"] = tls.hostname
    if _supports("reconnect_to_server_handler"):
        options["reconnect_to_server_handler"] = _reconnect_policy()
    # The reconnect policy applies once connected (the first connect always fails fast).
    allow_reconnect = bool(overrides.pop("allow_reconnect", True))
    max_attempts = int(overrides.pop("max_reconnect_attempts", MAX_RECONNECT_ATTEMPTS))
    options.update(overrides)

    nc = NATS()
    cbs = _Callbacks(nc, error_cb, disconnected_cb, reconnected_cb, closed_cb)
    options.update(
        error_cb=cbs.error,
        disconnected_cb=cbs.disconnected,
        reconnected_cb=cbs.reconnected,
        closed_cb=cbs.closed,
    )
    try:
        await nc.connect(**options)
    except (NatsError, OSError, TimeoutError) as exc:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), FAILED_CLOSE_TIMEOUT)
        where = ", ".join(redact_url(server) for server in servers)
        if "authorization violation" in str(exc).lower():
            raise NatsAuthError(
                f"NATS server at {where} refused the connection: authorization violation "
                f"({_auth_kind(methods)}); check the credentials"
            ) from exc
        cause: BaseException = exc
        if isinstance(exc, NoServersError) and cbs.last_error is not None:
            cause = cbs.last_error  # why the last attempt failed, not just "no servers"
        problem = classify_tls_error(cause)
        if problem is None and _client_cert_missing(nc, tls, cause):
            problem = TLSProblem.of("client_cert_required", _describe(cause))
        if problem is not None:
            raise NatsTLSError(
                f"cannot connect to NATS at {where}: {problem.reason}", where=where, problem=problem
            ) from exc
        raise NatsConnectError(f"cannot connect to NATS at {where}: {_describe(cause)}") from exc
    # Connected: from now on reconnect (forever, unless overridden). nats-py reads these
    # options at each disconnect, so changing them here is how its first connect and its
    # reconnects get different policies.
    nc.options["allow_reconnect"] = allow_reconnect
    nc.options["max_reconnect_attempts"] = max_attempts
    cbs.connected_once = True
    url = nc.connected_url
    log.info("connected to NATS at %s", _public_netloc(url))
    return nc


def _client_cert_missing(nc: NATS, tls: TLSConfig | ssl.SSLContext | None, cause: BaseException) -> bool:
    """The connection dropped right after TLS to a server that verifies clients, and we have no cert.

    With TLS 1.3 the server checks the client certificate after the client's handshake is done,
    so its "certificate required" alert races our first write: we may read the alert, or only a
    reset or a broken pipe. The server's INFO (``tls_verify``) tells which it was.
    """
    info = getattr(nc, "_server_info", None) or {}
    has_cert = isinstance(tls, ssl.SSLContext) or (tls is not None and tls.cert is not None)
    return bool(info.get("tls_verify")) and not has_cert and isinstance(cause, ConnectionError | ssl.SSLError)


def redact_url(url: str) -> str:
    """``url`` without user info: ``nats://user:pw@host:4222`` -> ``nats://***@host:4222``.

    A token or password inside a server URL is a secret; logs and error messages name
    the server without it.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    authority, slash, path = rest.partition("/")
    _, at, hostpart = authority.rpartition("@")
    if not at:
        return url
    return f"{scheme}{sep}***@{hostpart}{slash}{path}"


def _public_netloc(url: Any) -> str:
    """host:port of a nats-py ``ParseResult`` (``connected_url``), never its user info."""
    if url is None:
        return "?"
    host = url.hostname or "?"
    return f"{host}:{url.port}" if url.port else host


def _auth_kind(methods: list[str]) -> str:
    return f"authenticated with {methods[0]}" if methods else "no credentials given"
