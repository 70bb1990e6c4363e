"""``linkd doctor``: the checks a user would otherwise do by hand, one line each, with the fix.

In order, each later check skipped when what it needs failed:

- ``keyring``: the OS keyring is usable (or the opted-in file store is used, e.g. remembered
  from ``linkd login --insecure-file-store``), and readable (a locked keyring fails here);
- ``login``: a gateway URL and a gateway token are stored (or ``LINKD_TOKEN`` is set);
- ``gateway``: ``GET <gateway>/healthz`` answers within the timeout (its ``Date`` header is kept
  for the clock check);
- ``session``: the gateway mints a link session, what ``linkd up`` does first (stateless on the
  gateway: it signs a credential, nothing is stored; a desktop without a stored key uses a
  throwaway one, never stored);
- ``nats``: a real NATS connection to the session's URLs with its credential and the TLS
  settings of ``linkd up`` (``--nats-ca`` ...: :mod:`linkd.tls`), closed at once;
- ``clock``: local time against the session JWT's ``iat``/``exp`` and the gateway's ``Date``;
- ``upstream``: a TCP connection to ``--upstream`` (refused: a warning, the dev server may just
  not run yet).

Exit status 0 when nothing failed (warnings and skips included), 3 when a check failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Annotated, Any, Final, Literal
from urllib.parse import urlsplit

import httpx
import typer

from contract.nats_jwt import JwtError, claims_of
from tunnel.connect import NatsAuthError, NatsConnectError, NatsTLSError

from . import __version__
from .config import Settings, check_http_url, load_settings
from .connection import Identity, choose_urls, open_connection, reconnect_policy
from .credentials_store import (
    SEED_KEY,
    TOKEN_KEY,
    FileStore,
    SecretStore,
    generate_seed,
    keyring_usable,
    open_store,
    public_key_of,
)
from .errors import LinkdError
from .login_state import read_login_file_store, read_login_gateway
from .session import GatewayClient, GatewayError, LinkSession
from .tls import explain_tls_error, nats_tls

__all__ = [
    "CHECKS",
    "EXIT_CHECK_FAILED",
    "Check",
    "clock_check",
    "doctor",
    "report",
    "run_checks",
]

Status = Literal["ok", "warn", "fail", "skip"]
CHECKS: Final = ("keyring", "login", "gateway", "session", "nats", "clock", "upstream")
EXIT_CHECK_FAILED: Final = 3
TOKEN_ENV: Final = "LINKD_TOKEN"
DEFAULT_TIMEOUT: Final = 5.0
# Clock skew: NTP keeps clocks within a second; iat has whole seconds and the request takes a
# moment, so a few seconds are noise. Over a minute, certificates and credentials go wrong.
SKEW_WARN_SECONDS: Final = 10.0
SKEW_FAIL_SECONDS: Final = 60.0
CLOCK_FIX: Final = (
    "set this computer's clock right: turn on network time (Linux: timedatectl set-ntp true; "
    "macOS and Windows: Date & Time settings)"
)
UPSTREAM_FIX: Final = "start your dev server or change --upstream (LINKD_UPSTREAM, upstream in linkd.toml)"


@dataclass(frozen=True)
class Check:
    """One check's outcome: ``detail`` says what was found, ``fix`` what to do (failures, warnings)."""

    name: str
    status: Status
    detail: str
    fix: str | None = None

    def line(self) -> str:
        label = {"ok": "ok", "warn": "WARN", "fail": "FAIL", "skip": "skip"}[self.status]
        text = f"{label:<4}  {self.name:<8}  {self.detail}"
        return f"{text}; fix: {self.fix}" if self.fix else text


def _skip(name: str, why: str) -> Check:
    return Check(name, "skip", why)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _describe_offset(offset: float, against: str) -> str:
    way = "ahead of" if offset > 0 else "behind"
    return f"this computer's clock is {abs(offset):.0f} s {way} {against}"


def clock_check(
    jwt: str | None, gateway_date: float | None, now: float, *, date_offset: float = 0.0
) -> Check:
    """Local time ``now`` against the session JWT's ``iat``/``exp`` and the gateway's Date header.

    ``gateway_date``: the Date header's time; ``date_offset``: local seconds elapsed between that
    answer and ``now`` (so a slow check does not look like skew). Pure: tests pass their own JWT.
    """
    offsets: list[tuple[float, str]] = []
    expired_at: float | None = None
    if jwt is not None:
        try:
            claims = claims_of(jwt)
        except JwtError:
            claims = {}
        iat, exp = claims.get("iat"), claims.get("exp")
        if isinstance(iat, int | float) and not isinstance(iat, bool):
            offsets.append(
                (now - float(iat), f"the gateway's (the session JWT was issued at {_iso(float(iat))})")
            )
        if isinstance(exp, int | float) and not isinstance(exp, bool) and float(exp) <= now:
            expired_at = float(exp)
    if gateway_date is not None:
        offsets.append((now - date_offset - gateway_date, "the gateway's HTTP Date header"))
    if expired_at is not None:
        return Check(
            "clock",
            "fail",
            f"the fresh session JWT already expired at {_iso(expired_at)} by this computer's clock "
            f"(local time {_iso(now)})",
            CLOCK_FIX,
        )
    if not offsets:
        return _skip("clock", "no session JWT or Date header to compare with")
    offset, against = max(offsets, key=lambda item: abs(item[0]))
    if abs(offset) > SKEW_FAIL_SECONDS:
        return Check(
            "clock", "fail", f"{_describe_offset(offset, against)}; local time {_iso(now)}", CLOCK_FIX
        )
    if abs(offset) > SKEW_WARN_SECONDS:
        return Check("clock", "warn", _describe_offset(offset, against), CLOCK_FIX)
    return Check("clock", "ok", f"within {max(1.0, abs(offset)):.0f} s of the gateway's clock")


# ------------------------------------------------------------------------------ the checks


@dataclass
class _State:
    """What earlier checks found, for the later ones."""

    store: SecretStore | None = None
    gateway: str | None = None
    token: str | None = None
    gateway_ok: bool = False
    gateway_date: float | None = None
    date_seen_at: float | None = None  # time.monotonic() when the Date header arrived
    session: LinkSession | None = None
    seed: str | None = None


def _keyring_check(settings: Settings, state: _State) -> Check:
    file_opt_in = (
        settings.insecure_file_store if settings.insecure_file_store is not None else read_login_file_store()
    )
    _usable, why = keyring_usable()
    env_token = bool(os.environ.get(TOKEN_ENV, "").strip())
    try:
        store = open_store(insecure_file_store=file_opt_in)
    except LinkdError:
        if env_token:
            return Check(
                "keyring",
                "warn",
                f"{why}; {TOKEN_ENV} is used, with a new NATS key at every start",
                "install and unlock a keyring, or log in with: linkd login --insecure-file-store",
            )
        return Check(
            "keyring",
            "fail",
            why,
            "install and unlock a keyring (GNOME Keyring or KWallet via Secret Service), "
            "or log in with: linkd login --insecure-file-store",
        )
    try:
        store.get(TOKEN_KEY)  # a locked keyring or a file others can read fails here
    except LinkdError as exc:
        return Check("keyring", "fail", str(exc), "unlock the keyring (log in to the desktop session)")
    state.store = store
    if isinstance(store, FileStore):
        source = "--insecure-file-store" if settings.insecure_file_store else "remembered from `linkd login`"
        return Check("keyring", "ok", f"no OS keyring; secrets in {store.directory} (0600, {source})")
    return Check("keyring", "ok", f"the OS keyring is usable ({why})")


def _login_check(settings: Settings, state: _State) -> Check:
    url = settings.gateway_url or read_login_gateway()
    if url is None:
        return Check("login", "fail", "no gateway URL: not logged in", "run: linkd login --gateway URL")
    try:
        url = check_http_url(url, "gateway")
    except LinkdError as exc:
        return Check("login", "fail", str(exc), "run: linkd login --gateway URL")
    state.gateway = url
    env_token = os.environ.get(TOKEN_ENV, "").strip()
    stored: str | None = None
    if state.store is not None:
        stored = state.store.get(TOKEN_KEY)
        seed = state.store.get(SEED_KEY)
        if seed:
            try:
                public_key_of(seed)
                state.seed = seed.strip()
            except LinkdError as exc:
                return Check("login", "fail", str(exc), "run: linkd logout --forget-key, then linkd login")
    if env_token:
        state.token = env_token
        return Check("login", "ok", f"gateway {url}, token from {TOKEN_ENV}")
    if state.store is None:
        return _skip("login", f"gateway {url}; the token needs a secret store (see keyring)")
    if not stored:
        return Check(
            "login",
            "fail",
            f"no gateway token in {state.store.description}",
            f"run: linkd login --gateway {url} (or set {TOKEN_ENV})",
        )
    state.token = stored
    return Check("login", "ok", f"logged in to {url}")


async def _gateway_check(state: _State, timeout: float) -> Check:
    url = state.gateway
    if url is None:
        return _skip("gateway", "no gateway URL (see login)")
    fix = (
        f"start the gateway, or check its URL (--gateway, LINKD_GATEWAY or linkd login --gateway; now {url})"
    )
    started = time.monotonic()
    try:
        async with httpx.AsyncClient(
            timeout=timeout, headers={"User-Agent": f"linkd-doctor/{__version__}"}, follow_redirects=False
        ) as http:
            response = await http.get(url + "/healthz")
    except httpx.TimeoutException:
        return Check("gateway", "fail", f"{url} did not answer within {timeout:g} s", fix)
    except httpx.HTTPError as exc:
        detail = str(exc) or type(exc).__name__
        return Check("gateway", "fail", f"{url} is unreachable ({detail})", fix)
    elapsed = time.monotonic() - started
    state.date_seen_at = time.monotonic()
    date = response.headers.get("Date")
    if date:
        try:
            state.gateway_date = parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError):
            state.gateway_date = None
    if response.status_code != 200:
        return Check(
            "gateway",
            "fail",
            f"{url}/healthz answered {response.status_code}",
            f"is {url} a Studio gateway? check the URL (--gateway, LINKD_GATEWAY or linkd login --gateway)",
        )
    state.gateway_ok = True
    try:
        health = response.json()
    except ValueError:
        health = {}
    if isinstance(health, dict) and health.get("nats") == "disconnected":
        return Check(
            "gateway",
            "warn",
            f"{url} answered, but its own NATS connection is down",
            "the gateway's operator: check its NATS_URL and that nats-server runs",
        )
    return Check("gateway", "ok", f"{url} answered /healthz in {elapsed * 1000:.0f} ms")


_SETUP_CODES: Final = frozenset(
    {"tunnel_disabled", "no_public_url", "tunnel_not_configured", "nats_unavailable"}
)


async def _session_check(state: _State, timeout: float) -> Check:
    if state.gateway is None or state.token is None or not state.gateway_ok:
        return _skip("session", "needs a login and a reachable gateway")
    token = state.token
    seed = state.seed or generate_seed()  # a throwaway key is never stored
    state.seed = seed
    client = GatewayClient(state.gateway, lambda: token, timeout=timeout)
    try:
        session = await client.request_session(public_key_of(seed))
    except GatewayError as exc:
        if exc.auth:
            return Check(
                "session", "fail", exc.reason, f"log in again: linkd login --gateway {state.gateway}"
            )
        if exc.code in _SETUP_CODES:
            fix = f"the gateway is not set up for desktop links ({exc.code}): ask its operator"
        else:
            fix = "check the gateway's log; try again"
        return Check("session", "fail", exc.reason, fix)
    finally:
        await client.aclose()
    state.session = session
    until = f", valid until {_iso(session.expires_at)}" if session.expires_at is not None else ""
    return Check("session", "ok", f"the gateway issues sessions: host {session.hostname}{until}")


def _is_tls(url: str) -> bool:
    return urlsplit(url).scheme in ("tls", "wss")


async def _nats_check(settings: Settings, state: _State, timeout: float) -> Check:
    session = state.session
    if session is None:
        return _skip("nats", "needs a session (see session)")
    try:
        urls = choose_urls(session, settings.nats_transport)
        tls = nats_tls(settings)
    except LinkdError as exc:
        return Check("nats", "fail", str(exc), "fix the setting it names (linkd up uses the same)")
    listed = ", ".join(urls)
    try:
        nc = await asyncio.wait_for(
            open_connection(
                session,
                Identity(state.seed),
                reconnect_policy(),
                transport=settings.nats_transport,
                tls=tls,
                name="linkd-doctor",
            ),
            timeout * 3,
        )
    except NatsTLSError as exc:
        explained = explain_tls_error(exc)
        reason, fix = explained if explained is not None else (str(exc), "check the TLS settings")
        return Check("nats", "fail", f"{exc.where}: {reason}", fix)
    except NatsAuthError:
        return Check(
            "nats",
            "fail",
            f"the NATS server at {listed} refused the session's credential",
            "the gateway's operator: its NATS operator/account keys must match the server's "
            "(or see the clock check: an expired credential is refused too)",
        )
    except NatsConnectError as exc:
        return Check(
            "nats",
            "fail",
            str(exc),
            f"check that nats-server runs and that this computer can reach {listed} (firewall, proxy, VPN); "
            "the gateway hands out its NATS_PUBLIC_URL",
        )
    except TimeoutError:
        return Check(
            "nats", "fail", f"no NATS connection to {listed} within {timeout * 3:g} s", "check the network"
        )
    try:
        connected = str(nc.connected_url.geturl()) if nc.connected_url is not None else urls[0]
    finally:
        await nc.close()
    where = urlsplit(connected)
    shown = (
        f"{where.scheme}://{where.hostname}:{where.port}"
        if where.port
        else f"{where.scheme}://{where.hostname}"
    )
    if _is_tls(shown):
        return Check("nats", "ok", f"connected to {shown} with TLS verified")
    return Check("nats", "ok", f"connected to {shown} (no TLS: a plain {where.scheme}:// URL)")


async def _upstream_check(settings: Settings, timeout: float) -> Check:
    url = settings.upstream_url
    if url is None:
        return _skip("upstream", "no --upstream set (only status and runs are served)")
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except TimeoutError:
        return Check(
            "upstream", "warn", f"{url} did not accept a connection within {timeout:g} s", UPSTREAM_FIX
        )
    except OSError as exc:
        why = (
            "refused the connection" if isinstance(exc, ConnectionRefusedError) else f"is unreachable ({exc})"
        )
        return Check("upstream", "warn", f"{url} {why}", UPSTREAM_FIX)
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return Check("upstream", "ok", f"{url} accepts connections")


def _unexpected(name: str, exc: Exception) -> Check:
    """A check that crashed is one failed line too (a doctor must not end in a traceback)."""
    detail = str(exc) or type(exc).__name__
    return Check(name, "fail", f"the check itself failed ({type(exc).__name__}: {detail})", "report this")


async def run_checks(settings: Settings, *, timeout: float = DEFAULT_TIMEOUT) -> list[Check]:
    """Every check in :data:`CHECKS` order (``timeout``: seconds per network step)."""
    state = _State()

    def clock() -> Check:
        jwt = state.session.jwt if state.session is not None else None
        offset = time.monotonic() - state.date_seen_at if state.date_seen_at is not None else 0.0
        return clock_check(jwt, state.gateway_date, time.time(), date_offset=offset)

    steps: list[tuple[str, Callable[[], Check | Awaitable[Check]]]] = [
        ("keyring", lambda: _keyring_check(settings, state)),
        ("login", lambda: _login_check(settings, state)),
        ("gateway", lambda: _gateway_check(state, timeout)),
        ("session", lambda: _session_check(state, timeout)),
        ("nats", lambda: _nats_check(settings, state, timeout)),
        ("clock", clock),
        ("upstream", lambda: _upstream_check(settings, timeout)),
    ]
    checks: list[Check] = []
    for name, step in steps:
        try:
            result = step()
            checks.append(await result if inspect.isawaitable(result) else result)
        except Exception as exc:
            checks.append(_unexpected(name, exc))
    return checks


# ------------------------------------------------------------------------------ the command


def _summary(checks: list[Check]) -> str:
    failed = sum(c.status == "fail" for c in checks)
    warned = sum(c.status == "warn" for c in checks)
    warnings = f", {warned} warning(s)" if warned else ""
    if failed:
        return f"{failed} check(s) failed{warnings}"
    return f"no check failed{warnings}"


def report(checks: list[Check], *, as_json: bool = False) -> tuple[str, int]:
    """(what ``linkd doctor`` prints, its exit status) for ``checks``."""
    failed = any(c.status == "fail" for c in checks)
    if as_json:
        text = json.dumps({"ok": not failed, "checks": [asdict(c) for c in checks]}, indent=2)
    else:
        text = "\n".join([*(c.line() for c in checks), _summary(checks)])
    return text, EXIT_CHECK_FAILED if failed else 0


def _option(flag: str, metavar: str, text: str) -> Any:
    return typer.Option(flag, metavar=metavar, help=text, show_default=False)


def doctor(
    gateway: Annotated[str | None, _option("--gateway", "URL", "Gateway URL (else as `linkd up`).")] = None,
    upstream: Annotated[
        str | None, _option("--upstream", "URL", "The local service to check (as `linkd up`).")
    ] = None,
    nats_ca: Annotated[
        Path | None, _option("--nats-ca", "FILE", "CA for tls:// and wss:// (as `linkd up`).")
    ] = None,
    nats_cert: Annotated[
        Path | None, _option("--nats-cert", "FILE", "Client certificate (as `linkd up`).")
    ] = None,
    nats_key: Annotated[Path | None, _option("--nats-key", "FILE", "Client key (as `linkd up`).")] = None,
    nats_transport: Annotated[
        str | None, _option("--nats-transport", "MODE", "auto, standard or websocket.")
    ] = None,
    insecure_file_store: Annotated[
        bool | None,
        typer.Option(
            "--insecure-file-store/--no-insecure-file-store", help="As `linkd up`.", show_default=False
        ),
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", metavar="SECONDS", help="Per network step.")
    ] = DEFAULT_TIMEOUT,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document: {ok, checks: [...]}.")] = False,
    config: Annotated[Path | None, _option("--config", "FILE", "Config file (as `linkd up`).")] = None,
) -> None:
    """Check what `linkd up` needs (keyring, login, gateway, session, NATS and TLS, clock, upstream).

    One line per check; a failure names its fix. Exit status 0 when no check failed (warnings
    included), 3 when one did."""
    flags = {
        "gateway": gateway,
        "upstream": upstream,
        "nats_ca": nats_ca,
        "nats_cert": nats_cert,
        "nats_key": nats_key,
        "nats_transport": nats_transport,
        "insecure_file_store": insecure_file_store,
    }
    settings = load_settings(flags, config_path=config)
    checks = asyncio.run(run_checks(settings, timeout=max(0.1, timeout)))
    text, status = report(checks, as_json=as_json)
    typer.echo(text)
    if status:
        raise typer.Exit(status)


DOCTOR_EPILOG: Final = (
    "\b\n"
    "Examples:\n"
    "  linkd doctor\n"
    "  linkd doctor --upstream http://127.0.0.1:3000\n"
    "  linkd doctor --json | jq '.checks[] | select(.status == \"fail\")'\n\n"
    "Exit status: 0 no check failed (warnings included); 2 a bad flag; 3 a check failed."
)
