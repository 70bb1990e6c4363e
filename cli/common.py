"""What every ``linkctl`` command shares: NATS options, the error lines, running async code.

Errors a user can act on are exceptions carrying their one line and exit status
(:class:`CliError`, :class:`TunnelFailure`); :mod:`cli.main` prints them, so no command
ever shows a traceback for a mistake. Tracebacks are for bugs.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import signal
import sys
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final, TypeVar
from urllib.parse import urlsplit

import typer
from nats.aio.client import Client as NATS
from typer.core import TyperArgument

try:  # typer bundles its own click and has no public alias for the current context
    from typer._click.globals import get_current_context
except ImportError:  # pragma: no cover - another typer: flags and env vars are then told apart by value

    def get_current_context(silent: bool = False) -> Any:  # type: ignore[no-redef]
        return None


import tunnel
from contract.logs import JsonFormatter
from tunnel.connect import NatsAuthError, NatsConnectError, NatsTLSError, connect, parse_creds
from tunnel.tls import TLSConfig

from . import exitcodes

__all__ = [
    "DEFAULT_NATS_URL",
    "LOG_LEVELS",
    "CliError",
    "CredsOpt",
    "NatsOptions",
    "NatsUrlOpt",
    "PrefixOpt",
    "TokenOpt",
    "TunnelFailure",
    "check_host",
    "configure_logging",
    "given_on_command_line",
    "nats_connection",
    "parameter_source",
    "parse_log_level",
    "run",
    "stop_on_signals",
    "version",
]

T = TypeVar("T")

DEFAULT_NATS_URL: Final = "nats://127.0.0.1:4222"
NATS_URL_ENV: Final = "LINKCTL_NATS_URL"
NATS_CREDS_ENV: Final = "LINKCTL_NATS_CREDS"
NATS_TOKEN_ENV: Final = "LINKCTL_NATS_TOKEN"
NATS_CA_ENV: Final = "LINKCTL_NATS_CA"
NATS_CERT_ENV: Final = "LINKCTL_NATS_CERT"
NATS_KEY_ENV: Final = "LINKCTL_NATS_KEY"
# How a certificate problem's fix names linkctl's TLS settings.
TLS_CA_HINT: Final = f"--nats-ca FILE (or {NATS_CA_ENV})"
TLS_CERT_HINT: Final = f"--nats-cert FILE --nats-key FILE (or {NATS_CERT_ENV} and {NATS_KEY_ENV})"
PREFIX_ENV: Final = "LINKCTL_TUNNEL_PREFIX"
NATS_SCHEMES: Final = ("nats", "tls", "ws", "wss")

NATS_PANEL: Final = "NATS connection"
# --log-level LEVEL: the same names in linkctl, linkd and studio-gateway.
LOG_LEVELS: Final = ("debug", "info", "warning", "error")


class CliError(Exception):
    """A mistake or condition the user can act on: one line on stderr, then ``exit_code``."""

    def __init__(self, message: str, exit_code: int = exitcodes.USAGE) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code

    def line(self) -> str:
        return f"linkctl: error: {self.message}"


class TunnelFailure(CliError):
    """A typed tunnel error: ``linkctl: <code>: <message>``, exit status per code."""

    def __init__(self, error: tunnel.TunnelError, hostname: str | None = None) -> None:
        status = (
            exitcodes.USAGE
            if isinstance(error, tunnel.LocalProtocolError)
            else exitcodes.for_tunnel_code(error.code)
        )
        message = error.message
        if hostname is not None and hostname not in message:
            message = f"{message} (tunnel://{hostname})"
        super().__init__(message, status)
        self.code = error.code

    def line(self) -> str:
        return f"linkctl: {self.code}: {self.message}"


# -- the NATS options every networked command takes ------------------------------------

NatsUrlOpt = Annotated[
    str,
    typer.Option(
        "--nats",
        metavar="URL",
        envvar=NATS_URL_ENV,
        help="NATS server URL(s), comma-separated (nats://, tls://, ws://, wss://).",
        rich_help_panel=NATS_PANEL,
    ),
]
CredsOpt = Annotated[
    Path | None,
    typer.Option(
        "--creds",
        metavar="FILE",
        envvar=NATS_CREDS_ENV,
        help="NATS credentials file (.creds: user JWT + nkey seed).",
        rich_help_panel=NATS_PANEL,
    ),
]
TokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token",
        metavar="TOKEN",
        envvar=NATS_TOKEN_ENV,
        help="NATS token: --token is always the NATS token, the gateway's is --gateway-token "
        "(prefer the environment variable: command lines are visible to other users).",
        show_default=False,
        rich_help_panel=NATS_PANEL,
    ),
]
NatsCaOpt = Annotated[
    Path | None,
    typer.Option(
        "--nats-ca",
        metavar="FILE",
        envvar=NATS_CA_ENV,
        help="Trust this CA (PEM) for tls:// and wss:// NATS URLs instead of the system's.",
        show_default=False,
        rich_help_panel=NATS_PANEL,
    ),
]
NatsCertOpt = Annotated[
    Path | None,
    typer.Option(
        "--nats-cert",
        metavar="FILE",
        envvar=NATS_CERT_ENV,
        help="Client certificate (PEM) for NATS servers that require one (mTLS).",
        show_default=False,
        rich_help_panel=NATS_PANEL,
    ),
]
NatsKeyOpt = Annotated[
    Path | None,
    typer.Option(
        "--nats-key",
        metavar="FILE",
        envvar=NATS_KEY_ENV,
        help="The client certificate's key (PEM).",
        show_default=False,
        rich_help_panel=NATS_PANEL,
    ),
]
PrefixOpt = Annotated[
    str,
    typer.Option(
        "--prefix",
        metavar="PREFIX",
        envvar=PREFIX_ENV,
        help="Tunnel subject prefix.",
        rich_help_panel=NATS_PANEL,
    ),
]


def _plain_argument_help() -> None:
    """An argument's help row shows its placeholder alone (``URL``), as options do (``--nats
    URL``): typer would append its own type name (``URL <str>``), a second style of placeholder."""
    typed = getattr(TyperArgument, "display_type_rich", None)
    if typed is None:  # another typer: its help keeps its own style, nothing breaks
        return

    def display_type_rich(self: TyperArgument, ctx: Any) -> str | None:
        return None if self.metavar else typed(self, ctx)

    TyperArgument.display_type_rich = display_type_rich  # type: ignore[method-assign,assignment]


_plain_argument_help()


def _check_nats_url(raw: str) -> str:
    url = raw.strip()
    if "://" not in url:
        url = f"nats://{url}"  # host[:port], as nats-py and the nats CLI accept
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise CliError(f"--nats: {raw!r} is not a valid URL ({exc})") from None
    if parts.scheme not in NATS_SCHEMES:
        raise CliError(
            f"--nats: {raw!r} is not a NATS URL (use {', '.join(s + '://' for s in NATS_SCHEMES)})"
        )
    if not parts.hostname:
        raise CliError(f"--nats: {raw!r} has no host")
    if port == 0:
        raise CliError(f"--nats: {raw!r} has port 0")
    return url


@dataclass(frozen=True)
class NatsOptions:
    """Validated ``--nats``/``--creds``/``--token``/``--prefix`` and the TLS files (``--nats-ca``...)."""

    urls: tuple[str, ...]
    creds: Path | None = None
    token: str | None = None
    prefix: str = tunnel.DEFAULT_PREFIX
    tls: TLSConfig | None = None

    @classmethod
    def from_flags(
        cls,
        nats: str,
        creds: Path | None,
        token: str | None,
        prefix: str = tunnel.DEFAULT_PREFIX,
        *,
        nats_ca: Path | None = None,
        nats_cert: Path | None = None,
        nats_key: Path | None = None,
    ) -> NatsOptions:
        urls = tuple(_check_nats_url(part) for part in nats.split(",") if part.strip())
        if not urls:
            raise CliError(f"--nats: no NATS URL given (set --nats or {NATS_URL_ENV})")
        if creds is not None and token:
            # A flag overrides a variable: with dev.env sourced (LINKCTL_NATS_CREDS set),
            # `--token T` means that token. Two flags, or two variables, are a contradiction.
            creds_from, token_from = parameter_source("creds"), parameter_source("token")
            if token_from == "COMMANDLINE" and creds_from != "COMMANDLINE":
                creds = None
            elif creds_from == "COMMANDLINE" and token_from != "COMMANDLINE":
                token = None
            elif creds_from != "ENVIRONMENT" or token_from != "ENVIRONMENT":
                raise CliError("give --creds or --token, not both")
            else:
                raise CliError(
                    f"{NATS_CREDS_ENV} and {NATS_TOKEN_ENV} are both set: unset one, "
                    "or choose with --creds FILE or --token TOKEN"
                )
        if creds is not None:
            check_creds_file(creds)
        try:
            prefix = tunnel.HostSubjects.for_host("x", prefix).prefix
        except tunnel.TunnelError:
            raise CliError(
                f"--prefix: {prefix!r} is not a subject prefix (dot-separated tokens, no wildcards)"
            ) from None
        tls = tls_options(nats_ca, nats_cert, nats_key)
        return cls(urls=urls, creds=creds, token=token or None, prefix=prefix, tls=tls)

    @property
    def display(self) -> str:
        return ",".join(self.urls)


def tls_options(ca: Path | None, cert: Path | None, key: Path | None) -> TLSConfig | None:
    """``--nats-ca``/``--nats-cert``/``--nats-key`` as a TLSConfig, the files read now (CliError if bad)."""
    if ca is None and cert is None and key is None:
        return None
    if key is not None and cert is None:
        raise CliError(f"--nats-key needs --nats-cert ({NATS_CERT_ENV}): the client certificate")
    config = TLSConfig(ca=ca, cert=cert, key=key)
    try:
        config.context()
    except ValueError as exc:
        flag = "--nats-ca" if ca is not None and "CA file" in str(exc) else "--nats-cert"
        raise CliError(f"{flag}: {exc}") from None
    return config


def tls_error_line(exc: NatsTLSError) -> str:
    """``nats <url>: <reason>: <fix>``, the fix naming linkctl's flags and variables."""
    return f"nats {exc.where}: {exc.problem.reason}: {exc.problem.fix(ca=TLS_CA_HINT, cert=TLS_CERT_HINT)}"


def parameter_source(parameter: str) -> str | None:
    """Where the running command's ``parameter`` came from: ``COMMANDLINE``, ``ENVIRONMENT``,
    ``DEFAULT``...; None outside a command (a library call) or for no such parameter."""
    ctx = get_current_context(silent=True)
    source = ctx.get_parameter_source(parameter) if ctx is not None else None
    return getattr(source, "name", None)


def check_creds_file(creds: Path) -> None:
    """CliError naming the file and what is wrong with it, unless it is a NATS .creds file."""
    path = creds.expanduser()
    if not path.is_file():
        raise CliError(f"--creds: {str(creds)!r} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise CliError(f"--creds: cannot read {str(creds)!r} ({why})") from None
    try:
        parse_creds(text)
    except ValueError as exc:
        raise CliError(
            f"--creds: {str(creds)!r} is not a NATS credentials file: {_creds_problem(exc)}"
        ) from None


def _creds_problem(exc: ValueError) -> str:
    """What is wrong, in the file's terms: the library's message, less its advice to API callers
    (``pass ... as creds_text``) and its own "NATS credentials" prefix."""
    text = str(exc).split("; pass ", 1)[0].removeprefix("NATS credentials: ")
    if text.startswith("NATS credentials have "):
        text = "it has " + text.removeprefix("NATS credentials have ")
    return text


def _credentials_hint(options: NatsOptions) -> str:
    if options.creds is not None:
        return f"check the credentials file given by --creds / {NATS_CREDS_ENV} ({options.creds})"
    if options.token:
        return f"check the token given by --token / {NATS_TOKEN_ENV}"
    return (
        f"this server wants credentials: pass --creds FILE ({NATS_CREDS_ENV}) "
        f"or --token TOKEN ({NATS_TOKEN_ENV})"
    )


def given_on_command_line(parameter: str) -> bool:
    """Whether the running command's ``parameter`` was given as a flag (not its variable)."""
    return parameter_source(parameter) == "COMMANDLINE"


def check_host(host: str) -> str:
    """A tunnel HOST argument (``desk.example`` or ``tunnel://desk.example``), lower-cased."""
    if "://" in host:
        try:
            host, _ = tunnel.parse_tunnel_url(host)
        except tunnel.TunnelError as exc:
            raise CliError(f"HOST: {exc.message}") from None
    try:
        tunnel.host_token(host)
    except tunnel.TunnelError as exc:
        raise CliError(f"HOST: {exc.message}") from None
    return host.strip().lower()


@contextlib.asynccontextmanager
async def nats_connection(
    options: NatsOptions, name: str = "linkctl", *, inbox_prefix: str | None = None
) -> AsyncIterator[NATS]:
    """A NATS connection for the command; any failure to connect is a one-line :class:`CliError`.

    ``inbox_prefix``: where replies come back, for credentials that may only hear their own.
    """
    extra: dict[str, Any] = {} if inbox_prefix is None else {"inbox_prefix": inbox_prefix}
    try:
        nc = await connect(
            list(options.urls),
            creds=options.creds,
            token=options.token,
            name=name,
            tls=options.tls,
            **extra,
        )
    except NatsTLSError as exc:  # a certificate problem: say which, and which flag fixes it
        raise CliError(tls_error_line(exc), exitcodes.TLS_ERROR) from None
    except NatsAuthError as exc:  # connected, and refused: the credentials, not the URL
        message = str(exc).removesuffix("; check the credentials")
        raise CliError(f"{message}; {_credentials_hint(options)}") from None
    except NatsConnectError as exc:
        raise CliError(f"{exc} (set --nats or {NATS_URL_ENV})") from None
    except ValueError as exc:  # unreadable or malformed credentials, checked before connecting
        raise CliError(f"--creds: {_creds_problem(exc)}") from None
    try:
        yield nc
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine; Ctrl-C cancels it (its ``finally`` blocks run) and exits 130."""
    return asyncio.run(main)


@contextlib.contextmanager
def stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM set ``stop`` instead of raising (clean shutdown)."""
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError, ValueError):  # Windows, or not the main thread
            continue
        installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def version() -> str:
    """The installed package's version (``linkctl --version``)."""
    try:
        return importlib.metadata.version("natslink")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "0.0.0+unknown"


def parse_log_level(value: str) -> str:
    """``--log-level``: one of :data:`LOG_LEVELS`, any case."""
    level = value.strip().lower()
    if level not in LOG_LEVELS:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(LOG_LEVELS)}")
    return level


def configure_logging(level: str = "warning", *, json_logs: bool = False) -> None:
    """Library messages (e.g. "NATS disconnected; reconnecting") on stderr at ``level``: lines
    ``linkctl: ...``, or with ``json_logs`` one object per line in :mod:`contract.logs`'s schema.

    A no-op when logging is already set up (linkctl called in-process, e.g. from tests).
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_logs else logging.Formatter("linkctl: %(message)s"))
    logging.basicConfig(handlers=[handler], level=level.upper())
