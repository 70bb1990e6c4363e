"""``studio-gateway``: run the gateway, or mint a development API token.

The CLI only turns flags into configuration and calls the library. Each setting's
option is made from its declaration in :mod:`studio_gateway.config` (flag, environment
variable, type, default, help); typer parses the flag, else the variable, and
:meth:`GatewayConfig.from_settings` checks the values. A mistake in a setting is one
line on stderr naming the flag and variable, exit status 2, no traceback.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
import os
import sys
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Final, NoReturn, Protocol, TypeVar, cast

import typer

from .app import create_app, run_app
from .auth import DEFAULT_TOKEN_TTL_SECONDS, issue_token
from .config import AuthConfig, ConfigError, GatewayConfig
from .logs import JsonAccessLogger, configure_logging
from .settings import (
    GATEWAY_JWT_ALGORITHMS,
    GATEWAY_JWT_AUDIENCE,
    GATEWAY_JWT_SECRET,
    SETTINGS,
    Seconds,
    Setting,
    SettingValues,
    Switch,
    Whole,
)

__all__ = ["app", "main"]

# Exit status for a usage or configuration mistake (as click/typer use for bad flags).
EXIT_USAGE: Final = 2
# In-flight requests get this long to finish on SIGTERM/SIGINT before the gateway stops.
SHUTDOWN_TIMEOUT: Final = 10.0

# Environment variable -> the flag that overrides it, for error messages.
FLAG_FOR_ENV: Final = {setting.env: setting.flag for setting in SETTINGS}
# --log-level LEVEL: the same names in linkctl, linkd and studio-gateway.
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
LOG_LEVEL_ENV: Final = "GATEWAY_LOG_LEVEL"
# The placeholder in the help for a setting's value (the style of linkctl and linkd: upper
# case, naming what to give); settings not named here get one from their type.
METAVARS: Final = {
    "--host": "HOST",
    "--port": "PORT",
    "--nats-url": "URL",
    "--public-url": "URL",
    "--nats-creds": "FILE",
    "--nats-token": "TOKEN|FILE",
    "--session-ttl": "SECONDS",
    "--operator-jwt": "JWT|FILE",
    "--account-jwt": "JWT|FILE",
    "--account-signing-key": "SEED|FILE",
    "--tunnel-prefix": "PREFIX",
    "--jwt-secret": "SECRET|FILE",
    "--jwt-public-key": "PEM|FILE",
    "--jwt-algorithms": "ALGS",
    "--jwt-audience": "AUDIENCE",
    "--runs-runners": "NAMES",
    "--preview-domain": "DOMAIN",
    "--preview-secret": "SECRET|FILE",
}

T = TypeVar("T")
Command = TypeVar("Command", bound=Callable[..., None])

app = typer.Typer(
    name="studio-gateway",
    help="The Studio gateway: link sessions (scoped NATS credentials), live desktop presence and runs.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        try:
            installed = importlib.metadata.version("natslink")
        except importlib.metadata.PackageNotFoundError:  # a source tree that is not installed
            installed = "0.0.0+unknown"
        typer.echo(f"studio-gateway {installed}")
        raise typer.Exit(0)


def _parse_level(value: str) -> str:
    level = value.strip().lower()
    if level not in LOG_LEVELS:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(LOG_LEVELS)}")
    return level


LEVEL_HELP: Final = "How much to log (JSON lines on stderr): debug, info (default), warning or error."


@app.callback()
def _root(
    show_version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    log_level: Annotated[
        str | None,
        typer.Option(
            "--log-level",
            metavar="LEVEL",
            envvar=LOG_LEVEL_ENV,
            parser=_parse_level,
            help=LEVEL_HELP,
            show_default=False,
        ),
    ] = None,
) -> None:
    pass


def _metavar(setting: Setting[Any]) -> str | None:
    if isinstance(setting, Switch):
        return None
    if setting.flag in METAVARS:
        return METAVARS[setting.flag]
    if isinstance(setting, Seconds):
        return "SECONDS"
    if isinstance(setting, Whole):
        return "BYTES" if setting.flag.endswith("-bytes") else "N"
    return "TEXT"


def _fail(message: str) -> NoReturn:
    typer.echo(f"studio-gateway: error: {message}", err=True)
    raise typer.Exit(EXIT_USAGE)


def _config_error(exc: ConfigError) -> NoReturn:
    flag = FLAG_FOR_ENV.get(exc.variable)
    where = f"{flag} / {exc.variable}" if flag else exc.variable
    _fail(f"{where}: {exc.message}")


class _Parsed(SettingValues):
    """The settings a command's options parsed: the flag, else the environment variable."""

    def __init__(self, parsed: Mapping[str, object]) -> None:
        self._parsed = parsed

    def given(self, setting: Setting[T]) -> T | None:
        if setting.name not in self._parsed:
            return None  # not an option of this command
        value = self._parsed[setting.name]
        if value is None and os.environ.get(setting.env) == "":
            # click takes an empty variable for an unset one; the settings may not (TUNNEL_PREFIX=).
            return setting.parse("")
        return cast("T | None", value)


class _Signed(Protocol):
    __signature__: inspect.Signature


def _with_settings(
    *settings: Setting[Any], help_for: Mapping[Setting[Any], str] | None = None
) -> Callable[[Command], Command]:
    """Give a command one option per setting after its own, passed to it in ``**parsed``.

    An option is the setting's flag, falling back to its environment variable, of its
    type, with its help (or the one in ``help_for``) and its default; the command gets None
    where neither was given, so that the setting's default and checks apply.
    """

    def option(setting: Setting[Any]) -> inspect.Parameter:
        text = (help_for or {}).get(setting, setting.help)
        if setting.shown_default is not None:
            text = f"{text.removesuffix('.')} (default: {setting.shown_default})."
        # The option's own default is None (not given), which typer would not show anyway.
        info = typer.Option(
            setting.flag, envvar=setting.env, help=text, show_default=False, metavar=_metavar(setting)
        )
        return inspect.Parameter(
            setting.name,
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[setting.value_type | None, info],
        )

    def decorate(command: Command) -> Command:
        own = inspect.signature(command, eval_str=True)
        kept = [p for p in own.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        parameters = [*kept, *(option(setting) for setting in settings)]
        cast(_Signed, command).__signature__ = own.replace(parameters=parameters)
        return command

    return decorate


Opt = typer.Option


SERVE_EPILOG: Final = """\b
Examples:
  # development: token-mode nats-server on this machine
  export GATEWAY_JWT_SECRET=$(openssl rand -hex 32)
  studio-gateway serve --nats-token s3cret --public-url nats://127.0.0.1:4222

\b
  # production: operator mode, secrets mounted as files
  studio-gateway serve --host 0.0.0.0 --nats-url nats://nats:4222 \\
      --nats-creds /run/secrets/gateway.creds --public-url wss://nats.example.com \\
      --operator-jwt /run/secrets/operator.jwt --account-jwt /run/secrets/account.jwt \\
      --account-signing-key /run/secrets/account-signing.nk

Runs (/api/runs) need JetStream on the gateway's NATS server (nats-server -js); without
it the rest works and runs answer 503 runs_unavailable. See docs/runs.md.

Every flag falls back to its environment variable (shown as "env var"). Secrets and JWTs
may be given inline or as a path to a file; prefer the environment or files for secrets,
since other users can read command lines in the process list.
"""


@app.command(epilog=SERVE_EPILOG)
@_with_settings(*SETTINGS)
def serve(
    ctx: typer.Context,
    *,
    log_level: Annotated[
        str | None,
        Opt("--log-level", metavar="LEVEL", parser=_parse_level, help=LEVEL_HELP, show_default=False),
    ] = None,
    **parsed: object,
) -> None:
    """Run the gateway HTTP service until SIGINT/SIGTERM."""
    if log_level is None:  # then the one before the command (or GATEWAY_LOG_LEVEL), else info
        log_level = ctx.find_root().params.get("log_level") or "info"
    try:
        config = GatewayConfig.from_settings(_Parsed(parsed))
        application = create_app(config)
    except ConfigError as exc:
        _config_error(exc)
    configure_logging(log_level)
    logging.getLogger("studio_gateway").info(
        "starting studio-gateway on http://%s:%d",
        config.host,
        config.port,
        extra={
            "nats_urls": list(config.nats_urls),
            "public_urls": list(config.public_urls),
            "credential_mode": config.credential_mode.value,
            "tunnel_public_enabled": config.tunnel_public_enabled,
            "runs_enabled": config.runs.enabled,
        },
    )
    try:
        run_app(
            application,
            host=config.host,
            port=config.port,
            access_log_class=JsonAccessLogger,
            shutdown_timeout=SHUTDOWN_TIMEOUT,
        )
    except OSError as exc:
        _fail(f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}")


@app.command(
    "issue-token",
    epilog="\b\nExample:\n  TOKEN=$(studio-gateway issue-token --user alice@example.com --ttl 600)\n"
    '  curl -H "Authorization: Bearer $TOKEN" http://127.0.0.1:8080/api/links/me',
)
@_with_settings(
    GATEWAY_JWT_SECRET,
    GATEWAY_JWT_ALGORITHMS,
    GATEWAY_JWT_AUDIENCE,
    help_for={
        GATEWAY_JWT_SECRET: "HS256 secret (same as the gateway's).",
        GATEWAY_JWT_ALGORITHMS: "Token algorithm (first one is used).",
        GATEWAY_JWT_AUDIENCE: "Token audience.",
    },
)
def issue_token_command(
    *,
    user: Annotated[str, Opt("--user", metavar="ID", help="User id (the token's subject).")],
    ttl: Annotated[
        int, Opt("--ttl", metavar="SECONDS", help="Lifetime in seconds.", min=1)
    ] = DEFAULT_TOKEN_TTL_SECONDS,
    scope: Annotated[
        list[str] | None,
        Opt(
            "--scope",
            metavar="SCOPE",
            help="Add SCOPE to the token's scope claim (repeatable), e.g. runs:admin for "
            "GET /api/admin/runs/dead-letters.",
        ),
    ] = None,
    **parsed: object,
) -> None:
    """Print a development bearer token for USER that this gateway accepts."""
    # Issuing needs the secret: a verify-only GATEWAY_JWT_PUBLIC_KEY is no option here, so not given.
    try:
        token = issue_token(AuthConfig.from_settings(_Parsed(parsed)), user, ttl, scope or ())
    except ConfigError as exc:
        _config_error(exc)
    except ValueError as exc:
        _fail(f"--user: {exc}")
    typer.echo(token)


def main() -> None:
    """Console-script entry point (also ``python -m studio_gateway``: the help says studio-gateway)."""
    try:
        app(prog_name="studio-gateway")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
