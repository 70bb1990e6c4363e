"""``linkd``: link this desktop to a Studio gateway and serve it over NATS.

The CLI turns flags into settings (:mod:`linkd.config`: flags > ``LINKD_*`` >
config file) and calls the library. A mistake the user can fix is one line on
stderr (``linkd: error: ...``) and exit status 2, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Any, Final, NoReturn

import typer

from . import __version__
from .config import Settings, check_http_url, default_status_file, dev_stack_status_file, load_settings
from .credentials_store import (
    SEED_KEY,
    TOKEN_KEY,
    FileStore,
    KeyringStore,
    SecretStore,
    StoreUnavailable,
    file_store,
    generate_seed,
    insecure_opt_in,
    keyring_usable,
    load_or_create_seed,
    open_store,
    public_key_of,
)
from .errors import LinkdError
from .login_state import clear_login, read_login_file_store, read_login_gateway, write_login
from .logs import LOG_LEVELS, configure_logging
from .run_events import EventSink, JsonlFileSink, MemoryEventSink, TeeSink
from .session import GatewayClient, GatewayError
from .status_file import pid_alive, read_status
from .tls import nats_tls

__all__ = ["app", "main"]

EXIT_USAGE: Final = 2
EXIT_NOT_RUNNING: Final = 1
TOKEN_ENV: Final = "LINKD_TOKEN"
LOG_LEVEL_ENV: Final = "LINKD_LOG_LEVEL"
LOGIN_CHECK_TIMEOUT: Final = 10.0

app = typer.Typer(
    name="linkd",
    help=(
        "Link this desktop to a Studio gateway: the gateway can then reach it over NATS (status probes,\n"
        "runs, and optionally a local web service), with no inbound port.\n\n"
        "\b\n"
        "Quick start:\n"
        "  linkd login --gateway https://studio.example.com   # paste the API token when asked\n"
        "  linkd up                                           # stay online (Ctrl-C to stop)\n"
        "  linkd status                                       # from another terminal\n\n"
        "\b\n"
        "Settings: flags, then LINKD_* environment variables, then the config file\n"
        "(~/.config/natslink/linkd.toml, or --config / LINKD_CONFIG), e.g.:\n"
        '  gateway = "https://studio.example.com"\n'
        '  upstream = "http://127.0.0.1:3000"\n'
        "  drain_timeout = 10\n"
        "  [runners.command.build]\n"
        '  argv = ["make", "build"]\n'
        '  cwd = "~/src/app"\n'
        '  input = "stdin"        # the work item\'s input arrives as data, never as arguments\n'
        "  [runners.http]\n"
        '  endpoint = "http://127.0.0.1:11434/api/generate"\n\n'
        "Secrets (the gateway token, the desktop's NATS key) live in the OS keyring.\n\n"
        "Logs (`linkd up`) go to stderr; --log-level LEVEL (debug, info, warning, error; env\n"
        "LINKD_LOG_LEVEL) before or after the command sets how much."
    ),
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        metavar="FILE",
        help="Config file (default: linkd.toml in the config dir; env LINKD_CONFIG).",
        show_default=False,
    ),
]
InsecureOption = Annotated[
    bool | None,
    typer.Option(
        "--insecure-file-store/--no-insecure-file-store",
        help="Where no OS keyring exists: keep secrets in files readable only by you (0600). "
        "Env LINKD_INSECURE_FILE_STORE=1, or insecure_file_store = true in the config file; "
        "`linkd up` remembers it from `linkd login`.",
        show_default=False,
    ),
]


def _fail(message: str) -> NoReturn:
    raise LinkdError(message)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"linkd {__version__}")
        raise typer.Exit(0)


def _parse_level(value: str) -> str:
    level = value.strip().lower()
    if level not in LOG_LEVELS:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(LOG_LEVELS)}")
    return level


LogLevelOption = Annotated[
    str | None,
    typer.Option(
        "--log-level",
        metavar="LEVEL",
        parser=_parse_level,
        help="How much to log: debug, info (default), warning or error.",
        show_default=False,
    ),
]


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    log_level: Annotated[
        str | None,
        typer.Option(
            "--log-level",
            metavar="LEVEL",
            envvar=LOG_LEVEL_ENV,
            parser=_parse_level,
            help="How much `linkd up` logs: debug, info (default), warning or error.",
            show_default=False,
        ),
    ] = None,
) -> None:
    pass


def _log_level(ctx: typer.Context, given: str | None, verbose: bool) -> str:
    """The command's ``--log-level``, else ``-v`` (debug), else the one before the command."""
    if given is not None:
        return given
    if verbose:
        return "debug"
    root = ctx.find_root().params.get("log_level")
    return root if isinstance(root, str) else "info"


# ------------------------------------------------------------------------------ secrets


def _stores(insecure: bool) -> list[SecretStore]:
    """Every store that may hold our secrets: the usable keyring; the file store if opted in or present."""
    stores: list[SecretStore] = []
    if keyring_usable()[0]:
        stores.append(KeyringStore())
    files = file_store()
    if insecure or files.directory.is_dir():
        stores.append(files)
    return stores


def _read_token(token: str | None) -> str:
    if token is None:
        if sys.stdin is not None and not sys.stdin.isatty():
            token = sys.stdin.readline()
        else:
            token = typer.prompt("Gateway API token", hide_input=True)
    token = token.strip()
    if not token:
        _fail("the token is empty")
    if any(c.isspace() for c in token):
        _fail("the token must not contain spaces or line breaks")
    return token


async def _check_token(gateway: str, token: str, public_key: str | None) -> None:
    """Returns when the gateway accepts the token; LinkdError (nothing stored) when it refuses it
    or cannot be asked: a login that was never checked must not replace one that works."""
    client = GatewayClient(gateway, lambda: token, timeout=LOGIN_CHECK_TIMEOUT)
    try:
        session = await client.request_session(public_key)
    except GatewayError as exc:
        if exc.auth:
            _fail(
                f"the gateway at {gateway} refused this token ({exc.code or exc.status}); nothing was stored"
            )
        _fail(
            f"could not check the token: {exc.reason}; nothing was stored (check the --gateway URL, "
            "or store the token unchecked with --no-verify)"
        )
    finally:
        await client.aclose()
    typer.echo(f"The gateway accepted the token: this desktop is {session.hostname}")


def _file_store_opt_in(settings: Settings) -> bool:
    """--insecure-file-store, else LINKD_INSECURE_FILE_STORE, else the config file, else what the
    last `linkd login` used (so it is given once, at login)."""
    if settings.insecure_file_store is not None:
        return settings.insecure_file_store
    return read_login_file_store()


@app.command(
    epilog=(
        "\b\n"
        "Examples:\n"
        "  linkd login --gateway https://studio.example.com        # prompts for the token (not echoed)\n"
        "  printf '%s' \"$TOKEN\" | linkd login --gateway https://studio.example.com\n"
        "  linkd login --gateway http://127.0.0.1:8080 --gateway-token eyJ... --no-verify"
    )
)
def login(
    gateway: Annotated[
        str | None,
        typer.Option(
            "--gateway",
            metavar="URL",
            help="Gateway URL (env LINKD_GATEWAY; else the config file).",
            show_default=False,
        ),
    ] = None,
    gateway_token: Annotated[
        str | None,
        typer.Option(
            "--gateway-token",
            metavar="TOKEN",
            help="Gateway API token (as in linkctl; --token is only ever a NATS token). Better: leave "
            "it out and paste it at the prompt, or pipe it on stdin (flags end up in shell history).",
            show_default=False,
        ),
    ] = None,
    token: Annotated[str | None, typer.Option("--token", metavar="TOKEN", hidden=True)] = None,
    verify: Annotated[
        bool, typer.Option("--verify/--no-verify", help="Check the token with the gateway before storing it.")
    ] = True,
    insecure_file_store: InsecureOption = None,
    config: ConfigOption = None,
) -> None:
    """Store the gateway URL and your API token (in the OS keyring), and create this desktop's NATS key."""
    settings = load_settings(
        {"gateway": gateway, "insecure_file_store": insecure_file_store}, config_path=config
    )
    url = settings.gateway_url
    if url is None:
        _fail("which gateway? pass --gateway URL (or set LINKD_GATEWAY)")
    if token is not None:  # the old name, kept working
        typer.echo("linkd: warning: --token is now --gateway-token", err=True)
        gateway_token = gateway_token or token
    store = open_store(insecure_file_store=bool(settings.insecure_file_store))
    secret = _read_token(gateway_token)
    seed = load_or_create_seed(store)
    if verify:
        asyncio.run(_check_token(url, secret, public_key_of(seed)))
    store.set(TOKEN_KEY, secret)
    write_login(url, file_store=isinstance(store, FileStore))
    if isinstance(store, FileStore):
        typer.echo(
            f"linkd: warning: the token is stored in plain files under {store.directory} (0600)", err=True
        )
    typer.echo(f"Logged in to {url}; the token is in {store.description}.")
    typer.echo("Start the daemon with: linkd up")


@app.command(
    epilog=(
        "\b\nExamples:\n  linkd logout\n  linkd logout --forget-key     # also delete this desktop's NATS key"
    )
)
def logout(
    forget_key: Annotated[
        bool,
        typer.Option(
            "--forget-key", help="Also delete this desktop's NATS key (a new one is made at login)."
        ),
    ] = False,
    insecure_file_store: InsecureOption = None,
) -> None:
    """Remove the stored gateway token (and the remembered gateway URL)."""
    stores = _stores(insecure_opt_in(insecure_file_store))
    if not stores:
        _, why = keyring_usable()
        _fail(f"{why}; nothing to log out of (use --insecure-file-store if you logged in with it)")
    removed = [store.description for store in stores if store.delete(TOKEN_KEY)]
    if forget_key:
        for store in stores:
            store.delete(SEED_KEY)
    had_login = clear_login()
    if removed:
        typer.echo(f"Logged out: removed the gateway token from {', '.join(removed)}.")
    elif had_login:
        typer.echo("Logged out (no token was stored).")
    else:
        typer.echo("Not logged in: nothing to remove.")


# ------------------------------------------------------------------------------ up


def _token_provider(store: SecretStore | None) -> Any:
    def provide() -> str | None:
        from_env = os.environ.get(TOKEN_ENV, "").strip()
        if from_env:
            return from_env
        if store is None:
            return None
        try:
            return store.get(TOKEN_KEY)
        except LinkdError:
            return None

    return provide


def _check_not_running(settings: Settings) -> None:
    current = read_status(settings.status_file)
    if current is not None and current.get("pid") != os.getpid() and pid_alive(current.get("pid")):
        _fail(
            f"linkd is already running (pid {current.get('pid')}, status file {settings.status_file}); "
            "stop it first or give this one another --status-file"
        )


async def _serve(
    settings: Settings, gateway: str, store: SecretStore | None, seed: str, events_file: Path | None
) -> None:
    from .daemon import LinkDaemon
    from .uplink import JetStreamUplink

    journal = None
    if settings.uplink and settings.journal:
        from .journal import open_journal

        journal = open_journal(settings.state_dir)
    uplink = JetStreamUplink(journal=journal) if settings.uplink else None
    sink: EventSink = uplink if uplink is not None else MemoryEventSink()
    file_sink = JsonlFileSink(events_file) if events_file is not None else None
    if file_sink is not None:
        sink = TeeSink(file_sink, sink)  # the file first: it shows events even while the uplink waits
    client = GatewayClient(gateway, _token_provider(store))
    daemon = LinkDaemon(settings, client, own_seed=seed, sink=sink, uplink=uplink)
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    signals_seen = 0

    def on_signal(name: str) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            daemon.request_stop(f"received {name}")
        elif main_task is not None:
            main_task.cancel()  # second signal: stop now

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # Windows: no signal handlers
            loop.add_signal_handler(sig, on_signal, sig.name)
    try:
        await daemon.run()
    finally:
        if file_sink is not None:
            file_sink.close()


@app.command(
    epilog=(
        "\b\n"
        "Examples:\n"
        "  linkd up\n"
        "  linkd up --upstream http://127.0.0.1:3000      # also serve a local web app\n"
        "  linkd up --json-logs --drain-timeout 30\n"
        "  LINKD_TOKEN=... linkd up --gateway https://studio.example.com   # headless, no keyring"
    )
)
def up(
    ctx: typer.Context,
    gateway: Annotated[
        str | None,
        typer.Option(
            "--gateway",
            metavar="URL",
            help="Gateway URL (env LINKD_GATEWAY; else config file; else the last login).",
            show_default=False,
        ),
    ] = None,
    upstream: Annotated[
        str | None,
        typer.Option(
            "--upstream",
            metavar="URL",
            help="Forward every other path to this local HTTP service, streaming both ways "
            "(env LINKD_UPSTREAM).",
            show_default=False,
        ),
    ] = None,
    json_logs: Annotated[
        bool | None,
        typer.Option(
            "--json-logs/--no-json-logs",
            help="One JSON object per log line (env LINKD_JSON_LOGS).",
            show_default=False,
        ),
    ] = None,
    drain_timeout: Annotated[
        float | None,
        typer.Option(
            "--drain-timeout",
            metavar="SECONDS",
            help="Seconds in-flight requests get on SIGINT/SIGTERM (default 10; env LINKD_DRAIN_TIMEOUT).",
            show_default=False,
        ),
    ] = None,
    status_file: Annotated[
        Path | None,
        typer.Option(
            "--status-file",
            metavar="FILE",
            help="Where to keep the status file for `linkd status` (env LINKD_STATUS_FILE).",
            show_default=False,
        ),
    ] = None,
    nats_transport: Annotated[
        str | None,
        typer.Option(
            "--nats-transport",
            metavar="MODE",
            help="auto, standard or websocket (env LINKD_NATS_TRANSPORT).",
            show_default=False,
        ),
    ] = None,
    nats_ca: Annotated[
        Path | None,
        typer.Option(
            "--nats-ca",
            metavar="FILE",
            help="Trust this CA (PEM) for tls:// and wss:// NATS URLs instead of the system's "
            "(env LINKD_NATS_CA).",
            show_default=False,
        ),
    ] = None,
    nats_cert: Annotated[
        Path | None,
        typer.Option(
            "--nats-cert",
            metavar="FILE",
            help="Client certificate (PEM) for NATS servers that require one, mTLS (env LINKD_NATS_CERT).",
            show_default=False,
        ),
    ] = None,
    nats_key: Annotated[
        Path | None,
        typer.Option(
            "--nats-key",
            metavar="FILE",
            help="The client certificate's key (env LINKD_NATS_KEY).",
            show_default=False,
        ),
    ] = None,
    events_file: Annotated[
        Path | None,
        typer.Option(
            "--events-file",
            metavar="FILE",
            help="Also append every run event to this file as JSON lines (debugging).",
            show_default=False,
        ),
    ] = None,
    uplink: Annotated[
        bool | None,
        typer.Option(
            "--uplink/--no-uplink",
            help="Deliver run events to the gateway's JetStream stream (default); --no-uplink keeps "
            "them in memory, for a gateway without runs (env LINKD_UPLINK).",
            show_default=False,
        ),
    ] = None,
    heartbeat_interval: Annotated[
        float | None,
        typer.Option(
            "--heartbeat-interval",
            metavar="SECONDS",
            help="Seconds between heartbeat events of a running run (default 10; "
            "env LINKD_HEARTBEAT_INTERVAL).",
            show_default=False,
        ),
    ] = None,
    inspect: Annotated[
        bool | None,
        typer.Option(
            "--inspect/--no-inspect",
            help="The request inspector: a page on 127.0.0.1 listing recent tunnelled requests, with "
            "Replay (default on; env LINKD_INSPECT; docs/inspector.md).",
            show_default=False,
        ),
    ] = None,
    inspect_port: Annotated[
        int | None,
        typer.Option(
            "--inspect-port",
            metavar="PORT",
            help="The inspector's loopback port (default 4041; 0: any free one; env LINKD_INSPECT_PORT).",
            show_default=False,
        ),
    ] = None,
    inspect_size: Annotated[
        int | None,
        typer.Option(
            "--inspect-size",
            metavar="N",
            help="How many recent requests the inspector keeps (default 200; env LINKD_INSPECT_SIZE).",
            show_default=False,
        ),
    ] = None,
    log_level: LogLevelOption = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log library details too (= --log-level debug).")
    ] = False,
    access_log: Annotated[
        bool,
        typer.Option(
            "--access-log/--no-access-log",
            help="One log line per tunnelled request (method, path, status, bytes, ms).",
        ),
    ] = True,
    insecure_file_store: InsecureOption = None,
    config: ConfigOption = None,
) -> None:
    """Connect and serve this desktop until stopped (Ctrl-C or SIGTERM: drain, cancel runs, exit)."""
    flags = {
        "gateway": gateway,
        "upstream": upstream,
        "json_logs": json_logs,
        "drain_timeout": drain_timeout,
        "status_file": status_file,
        "nats_transport": nats_transport,
        "nats_ca": nats_ca,
        "nats_cert": nats_cert,
        "nats_key": nats_key,
        "uplink": uplink,
        "heartbeat_interval": heartbeat_interval,
        "insecure_file_store": insecure_file_store,
        "inspect": inspect,
        "inspect_port": inspect_port,
        "inspect_size": inspect_size,
    }
    settings = load_settings(flags, config_path=config)
    nats_tls(settings)  # a missing or malformed CA/certificate file fails now, in one line
    url = settings.gateway_url or read_login_gateway()
    if url is None:
        _fail("no gateway: run 'linkd login --gateway URL' first (or pass --gateway)")
    url = check_http_url(url, "gateway")
    store: SecretStore | None
    try:
        store = open_store(insecure_file_store=_file_store_opt_in(settings))
    except StoreUnavailable:
        if not os.environ.get(TOKEN_ENV, "").strip():
            raise
        store = None
    token = _token_provider(store)()
    if not token:
        _fail(f"not logged in: run 'linkd login --gateway {url}' (or set {TOKEN_ENV})")
    seed = load_or_create_seed(store) if store is not None else generate_seed()
    _check_not_running(settings)
    configure_logging(json_logs=settings.json_logs, level=_log_level(ctx, log_level, verbose))
    if not access_log:
        from .access_log import ACCESS_LOGGER

        logging.getLogger(ACCESS_LOGGER).setLevel(logging.WARNING)  # the daemon then subscribes none
    if store is None:
        logging.getLogger("linkd").warning("no keyring: using a temporary NATS key for this run")
    try:
        asyncio.run(_serve(settings, url, store, seed, events_file))
    except (KeyboardInterrupt, asyncio.CancelledError):
        raise typer.Exit(130) from None


# ------------------------------------------------------------------------------ status


def _describe(doc: dict[str, Any]) -> list[str]:
    lines = [f"linkd is running (pid {doc.get('pid')}, version {doc.get('version')})"]
    lines.append(f"  state:       {doc.get('message') or doc.get('state')} (since {doc.get('since')})")
    if doc.get("tunnelHostname"):
        lines.append(f"  hostname:    {doc['tunnelHostname']}")
    lines.append(f"  gateway:     {doc.get('gateway')}")
    if doc.get("natsUrl"):
        lines.append(f"  NATS:        {doc['natsUrl']}")
    if doc.get("credentialsExpireAt"):
        lines.append(
            f"  credentials: valid until {doc['credentialsExpireAt']} "
            f"({doc.get('credentialRefreshes', 0)} refreshes)"
        )
    if doc.get("upstream"):
        lines.append(f"  upstream:    {doc['upstream']}")
    inspector = doc.get("inspector")
    if isinstance(inspector, dict) and inspector.get("url"):
        lines.append(f"  inspector:   {inspector['url']}")
    runs = doc.get("runs") or []
    lines.append(f"  in flight:   {doc.get('inFlightRequests', 0)} request(s), {len(runs)} run(s)")
    uplink = doc.get("uplink")
    if isinstance(uplink, dict):
        lines.append(
            f"  run uplink:  {uplink.get('state')}, {uplink.get('outbox', 0)} event(s) waiting, "
            f"{uplink.get('delivered', 0)} delivered"
        )
        if uplink.get("journal"):
            lines.append(
                f"  journal:     {uplink['journal']} ({uplink.get('outboxBytes', 0)} bytes waiting, "
                f"oldest {uplink.get('oldestUnackedSeconds') or 0:g}s)"
            )
    if doc.get("runsResumed") or doc.get("runsEndedDaemonRestarted") or doc.get("reconnects"):
        lines.append(
            f"  restarts:    {doc.get('runsResumed', 0)} run(s) resumed, "
            f"{doc.get('runsEndedDaemonRestarted', 0)} ended daemon_restarted; "
            f"{doc.get('reconnects', 0)} reconnect(s), {doc.get('sleeps', 0)} sleep(s)"
        )
    for run in runs:
        if isinstance(run, dict):
            lines.append(
                f"    run {run.get('runId')} ({run.get('runner')}): "
                f"{run.get('status')}, {run.get('events', 0)} events"
            )
    return lines


@app.command(
    epilog=(
        "\b\nExamples:\n  linkd status\n  linkd status --json | jq .state\n\n"
        "Exit status: 0 running, 1 not running."
    )
)
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print the status document as JSON.")] = False,
    status_file: Annotated[
        Path | None,
        typer.Option(
            "--status-file",
            metavar="FILE",
            help="The daemon's status file (env LINKD_STATUS_FILE).",
            show_default=False,
        ),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Is a daemon running on this desktop? Its hostname, connection state, credential expiry and work.

    Without --status-file (or LINKD_STATUS_FILE, or the config file's), when no daemon runs at
    the usual place, the daemon of a `linkctl dev` stack is found too ($LINKCTL_STATE_DIR or
    the default state directory)."""
    import json

    settings = load_settings({"status_file": status_file}, config_path=config)
    path = settings.status_file
    doc = read_status(path)
    running = doc is not None and pid_alive(doc.get("pid"))
    dev_stack: Path | None = None
    if not running and path == default_status_file():
        # Not told where to look, nothing running here: the daemon of a `linkctl dev` stack?
        dev_path = dev_stack_status_file()
        dev_doc = read_status(dev_path)
        if dev_doc is not None and pid_alive(dev_doc.get("pid")):
            path, doc, running, dev_stack = dev_path, dev_doc, True, dev_path.parent.parent
    if as_json:
        extra = {"devStack": str(dev_stack)} if dev_stack is not None else {}
        typer.echo(
            json.dumps(
                {"running": running, "statusFile": str(path), **extra, **(doc or {})},
                indent=2,
                sort_keys=True,
            )
        )
    elif doc is None:
        typer.echo(f"linkd is not running (no status file at {path})")
    elif not running:
        typer.echo(
            f"linkd is not running (stale status file from pid {doc.get('pid')}, last: {doc.get('message')})"
        )
    else:
        lines = _describe(doc)
        if dev_stack is not None:
            lines.insert(1, f"  stack:       the `linkctl dev` stack in {dev_stack}")
        typer.echo("\n".join(lines))
    if not running:
        raise typer.Exit(EXIT_NOT_RUNNING)


# ------------------------------------------------------------------------------ service, doctor

from .service_cli import service_app  # noqa: E402  (registered last: it reuses _describe lazily)

app.add_typer(service_app, name="service")

from .doctor import DOCTOR_EPILOG, doctor  # noqa: E402

app.command("doctor", epilog=DOCTOR_EPILOG)(doctor)

# ------------------------------------------------------------------------------ entry point


def _usage_error(exc: Exception) -> tuple[str, int] | None:
    """(one line, exit status) for a typer/click usage error, else None.

    Typer's exceptions come from the click it bundles (or from click itself in older
    versions); they all carry ``exit_code`` and ``format_message()``.
    """
    exit_code = getattr(exc, "exit_code", None)
    format_message = getattr(exc, "format_message", None)
    if not isinstance(exit_code, int) or not callable(format_message):
        return None
    if type(exc).__name__ == "NoArgsIsHelpError":  # a bare `linkd`: its message is the help
        return str(format_message()), exit_code
    message = " ".join(str(format_message()).split())
    ctx = getattr(exc, "ctx", None)
    command_path = getattr(ctx, "command_path", None) or "linkd"
    return f"linkd: error: {message} (see '{command_path} --help')", exit_code


def main(argv: list[str] | None = None) -> None:
    """Console script entry point: one line and exit 2 for user mistakes, no tracebacks."""
    try:
        result = app(args=argv, prog_name="linkd", standalone_mode=False)
    except LinkdError as exc:
        typer.echo(f"linkd: error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:
        usage = _usage_error(exc)
        if usage is None:
            if type(exc).__name__ == "Abort":  # Ctrl-C at a prompt
                typer.echo("", err=True)
                sys.exit(130)
            raise
        typer.echo(usage[0], err=True)
        sys.exit(usage[1])
    sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    main()
