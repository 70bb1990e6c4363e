"""``linkctl status``: is the desktop online right now? A live probe, never a cached flag.

Two ways, one output: ``linkctl status HOST`` probes directly over NATS (``--nats``);
``linkctl status --gateway URL`` (or ``$LINKCTL_GATEWAY`` and no HOST) asks the gateway's
``GET /api/links/me``, which knows which host is yours. Both are a :data:`Prober` returning
a :class:`cli.presence.Presence`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated, Any, Final

import typer
from typer.core import TyperCommand

import tunnel
from contract.routes import ME_PATH

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
    given_on_command_line,
    nats_connection,
    run,
    stop_on_signals,
)
from .gateway_api import GATEWAY_ENV, GATEWAY_PANEL, TOKEN_ENV, GatewayApiError, GatewayClient, GatewayOptions
from .presence import DEFAULT_PROBE_TIMEOUT, Presence, from_gateway, probe
from .term import Painter

__all__ = ["register"]

DEFAULT_WATCH_INTERVAL: Final = 2.0
# Through the gateway, its own probe (up to ~5 s) plus HTTP: our bound is --timeout plus this.
GATEWAY_MARGIN: Final = 5.0
Prober = Callable[[], Awaitable[Presence]]

EPILOG: Final = """\b
Examples:
  linkctl status desk.example
  linkctl status --gateway http://127.0.0.1:8080   # your own desktop (--gateway-token or LINKCTL_TOKEN)
  linkctl status desk.example --token s3cret    # NATS token; overrides LINKCTL_NATS_CREDS from dev.env
  linkctl status desk.example --json
  linkctl status desk.example --watch          # probe every 2 s until Ctrl-C
  linkctl status desk.example --watch=10 --json >> presence.ndjson
  until linkctl status desk.example >/dev/null; do sleep 1; done   # wait for it

\b
Exit status:
     0  online
     1  offline (nobody serves the host, or it did not answer in time)
     2  error: bad flag or host, NATS or the gateway unreachable, the token
        refused, or the desktop's answer was not a status document
With --watch, the status of the last probe.
"""


class WatchCommand(TyperCommand):
    """Lets ``--watch`` take an optional value: ``--watch``, ``--watch 5``, ``--watch=5``."""

    optional_value_flags: Final = ("--watch", "-w")

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        return super().parse_args(ctx, _default_watch(args, self.optional_value_flags))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _default_watch(args: Sequence[str], flags: Sequence[str]) -> list[str]:
    out: list[str] = []
    items = list(args)
    for i, arg in enumerate(items):
        if arg == "--":
            out.extend(items[i:])
            break
        following = items[i + 1] if i + 1 < len(items) else None
        if arg in flags and (following is None or not _is_number(following)):
            out.append(f"--watch={DEFAULT_WATCH_INTERVAL:g}")
        else:
            out.append(arg)
    return out


def _check_target(host: str | None, gateway: str | None) -> str | None:
    """The HOST to probe directly over NATS, or None to probe through the gateway."""
    if gateway is not None:
        if host is not None:
            raise CliError(
                "give HOST (a direct probe over NATS) or --gateway URL (your own desktop, through the "
                "gateway), not both"
            )
        return None
    if host is None:
        raise CliError(
            "give the desktop's tunnel HOST (e.g. linkctl status desk.example), or probe your own "
            f"desktop through the gateway: --gateway URL (or set {GATEWAY_ENV})"
        )
    return check_host(host)


# -- rendering -----------------------------------------------------------------------

_STATE_STYLE: Final = {"online": "green", "offline": "red", "error": "yellow"}


def _label(presence: Presence) -> str:
    return presence.tunnel_hostname or f"your desktop (via {presence.via})"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def render_block(presence: Presence, paint: Painter) -> str:
    state = paint(presence.state, "bold", _STATE_STYLE[presence.state])
    if not presence.online:
        return f"{_label(presence)}: {state} ({presence.reason}: {presence.detail})"
    rows = [
        ("hostname", presence.hostname or "-"),
        ("capabilities", ", ".join(presence.capabilities) or "-"),
        ("cliVersion", presence.cli_version or "-"),
        ("latency", _ms(presence.latency_ms)),
    ]
    if presence.via is not None:
        rows += [("via", presence.via), ("round trip", _ms(presence.round_trip_ms))]
    lines = [f"{_label(presence)}: {state}"]
    lines += [f"  {paint(name.ljust(12), 'dim')}  {value}" for name, value in rows]
    return "\n".join(lines)


def render_line(presence: Presence, paint: Painter) -> str:
    clock = presence.checked_at.astimezone().strftime("%H:%M:%S")
    state = paint(presence.state.ljust(7), "bold", _STATE_STYLE[presence.state])
    head = f"{paint(clock, 'dim')}  {_label(presence)}  {state}"
    if not presence.online:
        return f"{head}  {presence.reason}: {presence.detail}"
    caps = ",".join(presence.capabilities) or "-"
    return (
        f"{head}  {_ms(presence.latency_ms):>10}  hostname={presence.hostname or '-'}"
        f"  cliVersion={presence.cli_version or '-'}  capabilities={caps}"
    )


def _state_key(presence: Presence) -> tuple[Any, ...]:
    return (presence.online, presence.reason, presence.hostname, presence.capabilities, presence.cli_version)


# -- the command -------------------------------------------------------------------------


async def _once(prober: Prober, as_json: bool) -> int:
    presence = await prober()
    if as_json:
        print(json.dumps(presence.as_json()), flush=True)
    else:
        print(render_block(presence, Painter.for_stream(sys.stdout)), flush=True)
    return presence.exit_code


async def _watch(prober: Prober, interval: float, count: int | None, as_json: bool) -> int:
    stop = asyncio.Event()
    paint = Painter.for_stream(sys.stdout)
    live = paint.enabled and not as_json  # redraw in place while nothing changes
    last: Presence | None = None
    probes = 0
    with stop_on_signals(stop):
        while not stop.is_set():
            started = time.monotonic()
            task = asyncio.ensure_future(prober())
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                break
            presence = task.result()
            if as_json:
                print(json.dumps(presence.as_json()), flush=True)
            else:
                line = render_line(presence, paint)
                if live and last is not None and _state_key(last) == _state_key(presence):
                    sys.stdout.write("\r\033[K" + line)
                else:
                    sys.stdout.write(
                        ("\n" if live and last is not None else "") + line + ("" if live else "\n")
                    )
                sys.stdout.flush()
            last = presence
            probes += 1
            if count is not None and probes >= count:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(interval - (time.monotonic() - started), 0.0))
    if live and last is not None:
        sys.stdout.write("\n")
        sys.stdout.flush()
    return last.exit_code if last is not None else exitcodes.INTERRUPTED


async def _status(
    host: str, nats: NatsOptions, timeout: float, watch: float | None, count: int | None, as_json: bool
) -> int:
    async with nats_connection(nats) as nc:
        client = tunnel.TunnelClient(nc, prefix=nats.prefix)
        try:
            return await _probe_loop(_prober(client, host, timeout), watch, count, as_json)
        finally:
            await client.aclose()


async def _probe_loop(prober: Prober, watch: float | None, count: int | None, as_json: bool) -> int:
    if watch is None:
        return await _once(prober, as_json)
    return await _watch(prober, watch, count, as_json)


async def _status_via_gateway(
    options: GatewayOptions, timeout: float, watch: float | None, count: int | None, as_json: bool
) -> int:
    async with GatewayClient(options) as client:
        return await _probe_loop(_gateway_prober(client, timeout), watch, count, as_json)


def _prober(client: tunnel.TunnelClient, host: str, timeout: float) -> Prober:
    """A direct probe over NATS; any coroutine function returning a Presence will do."""

    async def direct() -> Presence:
        return await probe(client, host, timeout)

    return direct


def _gateway_prober(client: GatewayClient, timeout: float) -> Prober:
    """``GET /api/links/me``: the gateway knows which host is ours and probes it.

    An unreachable gateway or a 5xx is an answer (``gateway_unavailable``, exit status 2), so
    ``--watch`` keeps going through a gateway restart; a refused token is a usage error.
    """
    via = client.options.url

    async def through_gateway() -> Presence:
        started = time.perf_counter()
        doc: dict[str, Any] | None = None
        problem: str | None = None
        try:
            doc = await asyncio.wait_for(client.call("GET", ME_PATH), timeout + GATEWAY_MARGIN)
        except TimeoutError:
            problem = f"the gateway did not answer within {timeout + GATEWAY_MARGIN:g} s"
        except GatewayApiError as exc:
            if exc.status in (401, 403):
                raise
            problem = exc.message
        round_trip = round((time.perf_counter() - started) * 1000, 2)
        if problem is not None:
            return Presence(
                "",
                online=False,
                reason="gateway_unavailable",
                detail=problem,
                via=via,
                round_trip_ms=round_trip,
            )
        return from_gateway(doc, via, round_trip)

    return through_gateway


Opt = typer.Option


def status_command(
    host: Annotated[
        str | None,
        typer.Argument(metavar="HOST", help="The desktop's tunnel hostname.", show_default=False),
    ] = None,
    watch: Annotated[
        float | None,
        Opt(
            "--watch",
            "-w",
            metavar="[SECONDS]",
            help=f"Probe again every SECONDS (default {DEFAULT_WATCH_INTERVAL:g}) until Ctrl-C.",
            show_default=False,
        ),
    ] = None,
    count: Annotated[
        int | None, Opt("--count", "-c", metavar="N", help="With --watch: stop after N probes.", min=1)
    ] = None,
    as_json: Annotated[
        bool, Opt("--json", help="One JSON object per probe (the gateway's /api/links/me shape).")
    ] = False,
    timeout: Annotated[
        float, Opt("--timeout", metavar="SECONDS", help="How long the desktop may take to answer.")
    ] = DEFAULT_PROBE_TIMEOUT,
    gateway: Annotated[
        str | None,
        Opt(
            "--gateway",
            metavar="URL",
            help=f"Probe your own desktop through the gateway's /api/links/me (default without HOST: "
            f"${GATEWAY_ENV}).",
            show_default=False,
            rich_help_panel=GATEWAY_PANEL,
        ),
    ] = None,
    gateway_token: Annotated[
        str | None,
        Opt(
            "--gateway-token",
            metavar="TOKEN",
            envvar=TOKEN_ENV,
            help="Gateway API token for --gateway (--token is the NATS token, for HOST).",
            show_default=False,
            rich_help_panel=GATEWAY_PANEL,
        ),
    ] = None,
    nats: NatsUrlOpt = DEFAULT_NATS_URL,
    creds: CredsOpt = None,
    token: TokenOpt = None,
    prefix: PrefixOpt = tunnel.DEFAULT_PREFIX,
    nats_ca: NatsCaOpt = None,
    nats_cert: NatsCertOpt = None,
    nats_key: NatsKeyOpt = None,
) -> None:
    """Probe a linked desktop: online or offline, its hostname, capabilities, version, latency."""
    if gateway is None and host is None:
        gateway = os.environ.get(GATEWAY_ENV, "").strip() or None
    hostname = _check_target(host, gateway)
    if timeout <= 0:
        raise CliError(f"--timeout: must be more than 0 seconds (got {timeout:g})")
    if watch is not None and watch <= 0:
        raise CliError(f"--watch: must be more than 0 seconds (got {watch:g})")
    if count is not None and watch is None:
        raise CliError("--count needs --watch")
    if hostname is None:
        if given_on_command_line("token"):
            raise CliError(
                "--token is the NATS token, for a direct probe of HOST; through the gateway give its "
                f"API token as --gateway-token TOKEN (or set {TOKEN_ENV})"
            )
        gateway_options = GatewayOptions.from_flags(gateway, gateway_token)
        raise typer.Exit(run(_status_via_gateway(gateway_options, timeout, watch, count, as_json)))
    options = NatsOptions.from_flags(
        nats, creds, token, prefix, nats_ca=nats_ca, nats_cert=nats_cert, nats_key=nats_key
    )
    raise typer.Exit(run(_status(hostname, options, timeout, watch, count, as_json)))


def register(app: typer.Typer) -> None:
    app.command("status", cls=WatchCommand, epilog=EPILOG)(status_command)
