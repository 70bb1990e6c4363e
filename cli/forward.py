"""``linkctl forward --listen 127.0.0.1:PORT HOST``: reach a linked desktop with curl or a browser.

The typer command: flags, checks, the NATS connection, start-up and stop messages. The HTTP
proxying itself is :class:`cli.local_proxy.Forwarder`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import sys
import time
from typing import Annotated, Final

import typer

import tunnel

from . import exitcodes
from .common import (
    DEFAULT_NATS_URL,
    CliError,
    CredsOpt,
    NatsCaOpt,
    NatsCertOpt,
    NatsKeyOpt,
    NatsOptions,
    NatsUrlOpt,
    PrefixOpt,
    TokenOpt,
    check_host,
    nats_connection,
    run,
    stop_on_signals,
)
from .local_proxy import HEADER_TIMEOUT, Forwarder

__all__ = ["parse_listen", "register"]

DEFAULT_LISTEN: Final = "127.0.0.1:8080"
TIMEOUTS_PANEL: Final = "Timeouts (per request)"

EPILOG: Final = """\b
Examples:
  linkctl forward desk.example                      # http://127.0.0.1:8080
  linkctl forward --listen 127.0.0.1:9000 desk.example
  curl -i http://127.0.0.1:9000/api/links/status
  curl -T big.iso http://127.0.0.1:9000/upload     # streamed, chunked or not

Requests and responses stream both ways; connections are kept alive; WebSockets
(Upgrade, e.g. a dev server's hot reload) are piped through unchanged. A request the
tunnel cannot deliver gets 502 (504 for a timeout) with the tunnel error code in the
X-Tunnel-Error header, e.g. "X-Tunnel-Error: tunnel_unreachable" while the desktop
is offline. A request with both Content-Length and Transfer-Encoding, or a malformed
body, gets 400 and the connection is closed; a request head slower than
--header-timeout (10 s) gets 408 and is closed; idle connections close after 75 s.
One line per request is logged on stderr (-q to silence). Ctrl-C stops.

\b
Exit status:
     0  stopped by Ctrl-C or SIGTERM
     2  bad flag or host, NATS unreachable, or the address is in use
"""


def parse_listen(value: str) -> tuple[str, int]:
    """``PORT``, ``HOST:PORT`` or ``[IPv6]:PORT`` -> (host, port)."""
    text = value.strip()
    if text.isdigit():
        host, port_text = "127.0.0.1", text
    elif text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise CliError(f"--listen: {value!r} is not [IPv6]:PORT")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise CliError(f"--listen: {value!r} is not HOST:PORT")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise CliError(f"--listen: {port_text!r} is not a port number (0-65535)")
    return host, int(port_text)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _eprint(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _access_log(line: str) -> None:
    _eprint(f"{time.strftime('%H:%M:%S')} {line}")


async def _forward(
    hostname: str,
    listen: tuple[str, int],
    nats: NatsOptions,
    *,
    timeout: float | None,
    first_frame_timeout: float,
    idle_timeout: float,
    header_timeout: float,
    quiet: bool,
    allowed_hosts: frozenset[str],
) -> int:
    async with nats_connection(nats, name="linkctl-forward") as nc:
        client = tunnel.TunnelClient(nc, prefix=nats.prefix)
        forwarder = Forwarder(
            client,
            hostname,
            timeout=timeout,
            first_frame_timeout=first_frame_timeout,
            idle_timeout=idle_timeout,
            header_timeout=header_timeout,
            log=None if quiet else _access_log,
            allowed_hosts=allowed_hosts,
        )
        host, port = listen
        try:
            try:
                server = await forwarder.start(host, port)
            except OSError as exc:
                raise CliError(f"--listen: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
            bound = server.sockets[0].getsockname()
            url = f"http://{_url_host(host)}:{bound[1]}"
            if not _is_loopback(host):
                _eprint(
                    f"linkctl: warning: listening on {host}: anyone who can reach this machine "
                    f"can reach tunnel://{hostname}"
                )
            _eprint(f"linkctl: forwarding {url} -> tunnel://{hostname} (Ctrl-C to stop)")
            stop = asyncio.Event()
            with stop_on_signals(stop):
                await stop.wait()
            _eprint("linkctl: stopping")
        finally:
            await forwarder.close()
            await client.aclose()
    return exitcodes.OK


Opt = typer.Option


def forward_command(
    host: Annotated[str, typer.Argument(metavar="HOST", help="The desktop's tunnel hostname.")],
    listen: Annotated[
        str,
        Opt("--listen", "-l", metavar="[HOST:]PORT", help="Local address to serve HTTP on (port 0: any)."),
    ] = DEFAULT_LISTEN,
    quiet: Annotated[bool, Opt("--quiet", "-q", help="No per-request log lines.")] = False,
    allow_host: Annotated[
        list[str] | None,
        Opt(
            "--allow-host",
            metavar="NAME",
            help="Also answer requests whose Host is NAME (repeatable; '*': any). Loopback names "
            "and IP addresses always pass; other names are refused (403) as DNS rebinding.",
        ),
    ] = None,
    timeout: Annotated[
        float | None,
        Opt(
            "--timeout",
            metavar="SECONDS",
            help="Overall deadline per request (default: none).",
            rich_help_panel=TIMEOUTS_PANEL,
        ),
    ] = None,
    first_frame_timeout: Annotated[
        float,
        Opt(
            "--first-frame-timeout",
            metavar="SECONDS",
            help="How long the desktop may take to answer at all.",
            rich_help_panel=TIMEOUTS_PANEL,
        ),
    ] = tunnel.DEFAULT_FIRST_FRAME_TIMEOUT,
    idle_timeout: Annotated[
        float,
        Opt(
            "--idle-timeout",
            metavar="SECONDS",
            help="Longest silence (no data, no heartbeat) before the desktop counts as gone.",
            rich_help_panel=TIMEOUTS_PANEL,
        ),
    ] = tunnel.DEFAULT_IDLE_TIMEOUT,
    header_timeout: Annotated[
        float,
        Opt(
            "--header-timeout",
            metavar="SECONDS",
            help="How long a client may take to send a request's head (line and headers); "
            "slower ones get 408 and are disconnected.",
            rich_help_panel=TIMEOUTS_PANEL,
        ),
    ] = HEADER_TIMEOUT,
    nats: NatsUrlOpt = DEFAULT_NATS_URL,
    creds: CredsOpt = None,
    token: TokenOpt = None,
    prefix: PrefixOpt = tunnel.DEFAULT_PREFIX,
    nats_ca: NatsCaOpt = None,
    nats_cert: NatsCertOpt = None,
    nats_key: NatsKeyOpt = None,
) -> None:
    """Serve HTTP on a local port and forward every request over the tunnel to HOST."""
    hostname = check_host(host)
    address = parse_listen(listen)
    for flag, value in (
        ("--timeout", timeout),
        ("--first-frame-timeout", first_frame_timeout),
        ("--idle-timeout", idle_timeout),
        ("--header-timeout", header_timeout),
    ):
        if value is not None and value <= 0:
            raise CliError(f"{flag}: must be more than 0 seconds (got {value:g})")
    options = NatsOptions.from_flags(
        nats, creds, token, prefix, nats_ca=nats_ca, nats_cert=nats_cert, nats_key=nats_key
    )
    status = run(
        _forward(
            hostname,
            address,
            options,
            timeout=timeout,
            first_frame_timeout=first_frame_timeout,
            idle_timeout=idle_timeout,
            header_timeout=header_timeout,
            quiet=quiet,
            allowed_hosts=frozenset(allow_host or ()),
        )
    )
    raise typer.Exit(status)


def register(app: typer.Typer) -> None:
    app.command("forward", epilog=EPILOG)(forward_command)
