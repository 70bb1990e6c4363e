"""``studio-gateway``: run the gateway, or mint a development API token.

The CLI only turns flags into configuration and calls the library: each flag
overrides the environment variable of the same setting, then
:meth:`GatewayConfig.from_env` validates the result. A mistake in a setting is
one line on stderr naming the flag and variable, exit status 2, no traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Annotated, Final, NoReturn

import typer
from aiohttp import web

from .app import create_app
from .auth import DEFAULT_TOKEN_TTL_SECONDS, issue_token
from .config import AuthConfig, ConfigError, GatewayConfig
from .logs import JsonAccessLogger, configure_logging

__all__ = ["app", "main"]

# Exit status for a usage or configuration mistake (as click/typer use for bad flags).
EXIT_USAGE: Final = 2
# In-flight requests get this long to finish on SIGTERM/SIGINT before the gateway stops.
SHUTDOWN_TIMEOUT: Final = 10.0

# Environment variable -> the flag that overrides it, for error messages.
FLAG_FOR_ENV: Final = {
    "NATS_URL": "--nats-url",
    "NATS_CREDS": "--nats-creds",
    "NATS_TOKEN": "--nats-token",
    "NATS_PUBLIC_URL": "--public-url",
    "NATS_TUNNEL_PUBLIC_ENABLED": "--tunnel-public/--no-tunnel-public",
    "NATS_TUNNEL_SESSION_TTL_SECONDS": "--session-ttl",
    "NATS_OPERATOR_JWT": "--operator-jwt",
    "NATS_ACCOUNT_JWT": "--account-jwt",
    "NATS_ACCOUNT_SIGNING_KEY": "--account-signing-key",
    "TUNNEL_PREFIX": "--tunnel-prefix",
    "GATEWAY_JWT_SECRET": "--jwt-secret",
    "GATEWAY_JWT_PUBLIC_KEY": "--jwt-public-key",
    "GATEWAY_JWT_ALGORITHMS": "--jwt-algorithms",
    "GATEWAY_JWT_AUDIENCE": "--jwt-audience",
    "GATEWAY_HOST": "--host",
    "GATEWAY_PORT": "--port",
    "RUNS_ENABLED": "--runs/--no-runs",
    "RUNS_RUNNERS": "--runs-runners",
    "RUNS_STREAM_MAX_AGE_SECONDS": "--runs-stream-max-age",
    "RUNS_DUPLICATE_WINDOW_SECONDS": "--runs-duplicate-window",
    "RUNS_REPLICAS": "--runs-replicas",
    "RUNS_OUTPUT_MAX_BYTES": "--runs-output-max-bytes",
    "RUNS_RETENTION_SECONDS": "--runs-retention",
    "RUNS_LIVENESS_TIMEOUT_SECONDS": "--runs-liveness-timeout",
    "RUNS_REAPER_INTERVAL_SECONDS": "--runs-reaper-interval",
    "RUNS_DISPATCH_TIMEOUT_SECONDS": "--runs-dispatch-timeout",
    "RUNS_KEEPALIVE_SECONDS": "--runs-keepalive",
    "RUNS_MAX_BODY_BYTES": "--runs-max-body-bytes",
    "RUNS_MAX_EVENTS_PER_RUN": "--runs-max-events-per-run",
    "RUNS_MAX_EVENT_BYTES": "--runs-max-event-bytes",
    "RUNS_HOST_STRAY_EVENTS": "--runs-host-stray-events",
    "RUNS_HOST_STRAY_WINDOW_SECONDS": "--runs-host-stray-window",
}

app = typer.Typer(
    name="studio-gateway",
    help="The Studio gateway: link sessions (scoped NATS credentials), live desktop presence and runs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _fail(message: str) -> NoReturn:
    typer.echo(f"studio-gateway: error: {message}", err=True)
    raise typer.Exit(EXIT_USAGE)


def _config_error(exc: ConfigError) -> NoReturn:
    flag = FLAG_FOR_ENV.get(exc.variable)
    where = f"{flag} / {exc.variable}" if flag else exc.variable
    _fail(f"{where}: {exc.message}")


def _environ(overrides: Mapping[str, str | None]) -> dict[str, str]:
    merged = dict(os.environ)
    merged.update({name: value for name, value in overrides.items() if value is not None})
    return merged


def _bool_env(value: bool | None) -> str | None:
    return None if value is None else str(value).lower()


def _int_env(value: int | None) -> str | None:
    return None if value is None else str(value)


def _float_env(value: float | None) -> str | None:
    return None if value is None else repr(value)


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
def serve(
    host: Annotated[str | None, Opt(help="Listen address.", envvar="GATEWAY_HOST", show_envvar=True)] = None,
    port: Annotated[int | None, Opt(help="Listen port.", envvar="GATEWAY_PORT", show_envvar=True)] = None,
    nats_url: Annotated[
        str | None, Opt(help="The gateway's NATS server(s), comma-separated.", envvar="NATS_URL")
    ] = None,
    nats_creds: Annotated[
        str | None, Opt(help="The gateway's own NATS .creds file (operator mode).", envvar="NATS_CREDS")
    ] = None,
    nats_token: Annotated[
        str | None, Opt(help="NATS token (token mode: also handed to daemons).", envvar="NATS_TOKEN")
    ] = None,
    public_url: Annotated[
        str | None, Opt(help="NATS URL(s) daemons connect to, comma-separated.", envvar="NATS_PUBLIC_URL")
    ] = None,
    tunnel_public: Annotated[
        bool | None,
        Opt(
            "--tunnel-public/--no-tunnel-public",
            help="Hand out link sessions (default: on).",
            envvar="NATS_TUNNEL_PUBLIC_ENABLED",
        ),
    ] = None,
    session_ttl: Annotated[
        int | None,
        Opt(help="Lifetime of minted NATS credentials, seconds.", envvar="NATS_TUNNEL_SESSION_TTL_SECONDS"),
    ] = None,
    operator_jwt: Annotated[str | None, Opt(help="Operator JWT.", envvar="NATS_OPERATOR_JWT")] = None,
    account_jwt: Annotated[str | None, Opt(help="Account JWT.", envvar="NATS_ACCOUNT_JWT")] = None,
    account_signing_key: Annotated[
        str | None, Opt(help="Account signing key seed (SA...).", envvar="NATS_ACCOUNT_SIGNING_KEY")
    ] = None,
    tunnel_prefix: Annotated[str | None, Opt(help="Tunnel subject prefix.", envvar="TUNNEL_PREFIX")] = None,
    jwt_secret: Annotated[
        str | None, Opt(help="HS256 secret for API bearer tokens.", envvar="GATEWAY_JWT_SECRET")
    ] = None,
    jwt_public_key: Annotated[
        str | None, Opt(help="PEM public key for RS/ES API tokens.", envvar="GATEWAY_JWT_PUBLIC_KEY")
    ] = None,
    jwt_algorithms: Annotated[
        str | None, Opt(help="Accepted token algorithms, comma-separated.", envvar="GATEWAY_JWT_ALGORITHMS")
    ] = None,
    jwt_audience: Annotated[
        str | None, Opt(help="Required token audience.", envvar="GATEWAY_JWT_AUDIENCE")
    ] = None,
    runs: Annotated[
        bool | None,
        Opt(
            "--runs/--no-runs", help="Serve /api/runs (needs JetStream; default: on).", envvar="RUNS_ENABLED"
        ),
    ] = None,
    runs_runners: Annotated[
        str | None,
        Opt(
            help="Runner names a run may ask for, comma-separated (default: echo,mock,command,http).",
            envvar="RUNS_RUNNERS",
        ),
    ] = None,
    runs_stream_max_age: Annotated[
        float | None,
        Opt(help="Run events stay in the stream this long, s (1800).", envvar="RUNS_STREAM_MAX_AGE_SECONDS"),
    ] = None,
    runs_duplicate_window: Annotated[
        float | None,
        Opt(help="Event de-duplication window, s (120).", envvar="RUNS_DUPLICATE_WINDOW_SECONDS"),
    ] = None,
    runs_replicas: Annotated[
        int | None, Opt(help="JetStream replicas of the run stream and buckets (1).", envvar="RUNS_REPLICAS")
    ] = None,
    runs_output_max_bytes: Annotated[
        int | None,
        Opt(
            help="Event bytes kept per run for export after retention (1048576).",
            envvar="RUNS_OUTPUT_MAX_BYTES",
        ),
    ] = None,
    runs_retention: Annotated[
        float | None,
        Opt(help="Run state and kept events live this long, s (604800).", envvar="RUNS_RETENTION_SECONDS"),
    ] = None,
    runs_liveness_timeout: Annotated[
        float | None,
        Opt(
            help="A run silent this long fails as desktop_lost, s (60).",
            envvar="RUNS_LIVENESS_TIMEOUT_SECONDS",
        ),
    ] = None,
    runs_reaper_interval: Annotated[
        float | None,
        Opt(help="Reaper scan interval, s (liveness/10, 0.1..5).", envvar="RUNS_REAPER_INTERVAL_SECONDS"),
    ] = None,
    runs_dispatch_timeout: Annotated[
        float | None,
        Opt(help="Delivering a work item or a cancel, s (10).", envvar="RUNS_DISPATCH_TIMEOUT_SECONDS"),
    ] = None,
    runs_keepalive: Annotated[
        float | None, Opt(help="SSE keep-alive interval, s (15).", envvar="RUNS_KEEPALIVE_SECONDS")
    ] = None,
    runs_max_body_bytes: Annotated[
        int | None, Opt(help="Largest POST /api/runs body (524288).", envvar="RUNS_MAX_BODY_BYTES")
    ] = None,
    runs_max_events_per_run: Annotated[
        int | None,
        Opt(
            help="Events one run may publish; more are refused and the run fails as event_limit (100000).",
            envvar="RUNS_MAX_EVENTS_PER_RUN",
        ),
    ] = None,
    runs_max_event_bytes: Annotated[
        int | None,
        Opt(help="Largest run event the stream stores, bytes (1048576).", envvar="RUNS_MAX_EVENT_BYTES"),
    ] = None,
    runs_host_stray_events: Annotated[
        int | None,
        Opt(
            help="Events a desktop may publish for runs it does not have, per window, before its "
            "stored events are purged and its runs fail as quota_exceeded (2000).",
            envvar="RUNS_HOST_STRAY_EVENTS",
        ),
    ] = None,
    runs_host_stray_window: Annotated[
        float | None,
        Opt(help="The window of --runs-host-stray-events, s (60).", envvar="RUNS_HOST_STRAY_WINDOW_SECONDS"),
    ] = None,
    log_level: Annotated[str, Opt(help="debug, info, warning or error.")] = "info",
) -> None:
    """Run the gateway HTTP service until SIGINT/SIGTERM."""
    if log_level.lower() not in ("debug", "info", "warning", "error"):
        _fail(f"--log-level: {log_level!r} is not one of debug, info, warning, error")
    environ = _environ(
        {
            "GATEWAY_HOST": host,
            "GATEWAY_PORT": _int_env(port),
            "NATS_URL": nats_url,
            "NATS_CREDS": nats_creds,
            "NATS_TOKEN": nats_token,
            "NATS_PUBLIC_URL": public_url,
            "NATS_TUNNEL_PUBLIC_ENABLED": _bool_env(tunnel_public),
            "NATS_TUNNEL_SESSION_TTL_SECONDS": _int_env(session_ttl),
            "NATS_OPERATOR_JWT": operator_jwt,
            "NATS_ACCOUNT_JWT": account_jwt,
            "NATS_ACCOUNT_SIGNING_KEY": account_signing_key,
            "TUNNEL_PREFIX": tunnel_prefix,
            "GATEWAY_JWT_SECRET": jwt_secret,
            "GATEWAY_JWT_PUBLIC_KEY": jwt_public_key,
            "GATEWAY_JWT_ALGORITHMS": jwt_algorithms,
            "GATEWAY_JWT_AUDIENCE": jwt_audience,
            "RUNS_ENABLED": _bool_env(runs),
            "RUNS_RUNNERS": runs_runners,
            "RUNS_STREAM_MAX_AGE_SECONDS": _float_env(runs_stream_max_age),
            "RUNS_DUPLICATE_WINDOW_SECONDS": _float_env(runs_duplicate_window),
            "RUNS_REPLICAS": _int_env(runs_replicas),
            "RUNS_OUTPUT_MAX_BYTES": _int_env(runs_output_max_bytes),
            "RUNS_RETENTION_SECONDS": _float_env(runs_retention),
            "RUNS_LIVENESS_TIMEOUT_SECONDS": _float_env(runs_liveness_timeout),
            "RUNS_REAPER_INTERVAL_SECONDS": _float_env(runs_reaper_interval),
            "RUNS_DISPATCH_TIMEOUT_SECONDS": _float_env(runs_dispatch_timeout),
            "RUNS_KEEPALIVE_SECONDS": _float_env(runs_keepalive),
            "RUNS_MAX_BODY_BYTES": _int_env(runs_max_body_bytes),
            "RUNS_MAX_EVENTS_PER_RUN": _int_env(runs_max_events_per_run),
            "RUNS_MAX_EVENT_BYTES": _int_env(runs_max_event_bytes),
            "RUNS_HOST_STRAY_EVENTS": _int_env(runs_host_stray_events),
            "RUNS_HOST_STRAY_WINDOW_SECONDS": _float_env(runs_host_stray_window),
        }
    )
    try:
        config = GatewayConfig.from_env(environ)
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
        web.run_app(
            application,
            host=config.host,
            port=config.port,
            access_log_class=JsonAccessLogger,
            shutdown_timeout=SHUTDOWN_TIMEOUT,
            print=None,
            handle_signals=True,
        )
    except OSError as exc:
        _fail(f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}")


@app.command(
    "issue-token",
    epilog="\b\nExample:\n  TOKEN=$(studio-gateway issue-token --user alice@example.com --ttl 600)\n"
    '  curl -H "Authorization: Bearer $TOKEN" http://127.0.0.1:8080/api/links/me',
)
def issue_token_command(
    user: Annotated[str, Opt("--user", help="User id (the token's subject).")],
    ttl: Annotated[int, Opt(help="Lifetime in seconds.", min=1)] = DEFAULT_TOKEN_TTL_SECONDS,
    jwt_secret: Annotated[
        str | None, Opt(help="HS256 secret (same as the gateway's).", envvar="GATEWAY_JWT_SECRET")
    ] = None,
    jwt_algorithms: Annotated[
        str | None, Opt(help="Token algorithm (first one is used).", envvar="GATEWAY_JWT_ALGORITHMS")
    ] = None,
    jwt_audience: Annotated[str | None, Opt(help="Token audience.", envvar="GATEWAY_JWT_AUDIENCE")] = None,
) -> None:
    """Print a development bearer token for USER that this gateway accepts."""
    environ = _environ(
        {
            "GATEWAY_JWT_SECRET": jwt_secret,
            "GATEWAY_JWT_ALGORITHMS": jwt_algorithms,
            "GATEWAY_JWT_AUDIENCE": jwt_audience,
        }
    )
    environ.pop("GATEWAY_JWT_PUBLIC_KEY", None)  # issuing needs the secret; a verify-only key is irrelevant
    try:
        token = issue_token(AuthConfig.from_env(environ), user, ttl)
    except ConfigError as exc:
        _config_error(exc)
    except ValueError as exc:
        _fail(f"--user: {exc}")
    typer.echo(token)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
