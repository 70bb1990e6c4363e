"""``linkctl status HOST``: is the desktop online right now? A live probe, never a cached flag.

Today the probe goes directly over NATS (``--nats``). The gateway variant (``--gateway
URL``, through its ``GET /api/links/me``, which also knows which host is yours) plugs in at
:func:`_prober`: it only has to return a :class:`cli.presence.Presence`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated, Any, Final

import typer
from typer.core import TyperCommand

import tunnel

from . import exitcodes
from .common import (
    DEFAULT_NATS_URL,
    CliError,
    CredsOpt,
    NatsOptions,
    NatsUrlOpt,
    PrefixOpt,
    TokenOpt,
    check_host,
    nats_connection,
    run,
    stop_on_signals,
)
from .presence import DEFAULT_PROBE_TIMEOUT, Presence, probe
from .term import Painter

__all__ = ["register"]

DEFAULT_WATCH_INTERVAL: Final = 2.0
Prober = Callable[[], Awaitable[Presence]]

EPILOG: Final = """\b
Examples:
  linkctl status desk.example
  linkctl status desk.example --json
  linkctl status desk.example --watch          # probe every 2 s until Ctrl-C
  linkctl status desk.example --watch=10 --json >> presence.ndjson
  until linkctl status desk.example >/dev/null; do sleep 1; done   # wait for it

\b
Exit status:
     0  online
     1  offline (nobody serves the host, or it did not answer in time)
     2  error: bad flag or host, NATS unreachable, or the desktop's answer
        was not a status document
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


def _check_target(host: str | None, gateway: str | None) -> str:
    if gateway is not None:
        raise CliError(
            "--gateway: presence through the gateway (/api/links/me) is not available yet; "
            "probe the desktop directly: linkctl status HOST --nats URL"
        )
    if host is None:
        raise CliError("give the desktop's tunnel HOST (e.g. linkctl status desk.example)")
    return check_host(host)


# -- rendering -----------------------------------------------------------------------

_STATE_STYLE: Final = {"online": "green", "offline": "red", "error": "yellow"}


def render_block(presence: Presence, paint: Painter) -> str:
    state = paint(presence.state, "bold", _STATE_STYLE[presence.state])
    if not presence.online:
        return f"{presence.tunnel_hostname}: {state} ({presence.reason}: {presence.detail})"
    rows = [
        ("hostname", presence.hostname or "-"),
        ("capabilities", ", ".join(presence.capabilities) or "-"),
        ("cliVersion", presence.cli_version or "-"),
        ("latency", f"{presence.latency_ms:.1f} ms"),
    ]
    lines = [f"{presence.tunnel_hostname}: {state}"]
    lines += [f"  {paint(name.ljust(12), 'dim')}  {value}" for name, value in rows]
    return "\n".join(lines)


def render_line(presence: Presence, paint: Painter) -> str:
    clock = presence.checked_at.astimezone().strftime("%H:%M:%S")
    state = paint(presence.state.ljust(7), "bold", _STATE_STYLE[presence.state])
    head = f"{paint(clock, 'dim')}  {presence.tunnel_hostname}  {state}"
    if not presence.online:
        return f"{head}  {presence.reason}: {presence.detail}"
    caps = ",".join(presence.capabilities) or "-"
    return (
        f"{head}  {presence.latency_ms:7.1f} ms  hostname={presence.hostname or '-'}"
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
            prober = _prober(client, host, timeout)
            if watch is None:
                return await _once(prober, as_json)
            return await _watch(prober, watch, count, as_json)
        finally:
            await client.aclose()


def _prober(client: tunnel.TunnelClient, host: str, timeout: float) -> Prober:
    """The seam for the gateway variant: any coroutine function returning a Presence."""

    async def direct() -> Presence:
        return await probe(client, host, timeout)

    return direct


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
            help="Probe through the gateway's /api/links/me (not available yet).",
            show_default=False,
        ),
    ] = None,
    nats: NatsUrlOpt = DEFAULT_NATS_URL,
    creds: CredsOpt = None,
    token: TokenOpt = None,
    prefix: PrefixOpt = tunnel.DEFAULT_PREFIX,
) -> None:
    """Probe a linked desktop: online or offline, its hostname, capabilities, version, latency."""
    hostname = _check_target(host, gateway)
    if timeout <= 0:
        raise CliError(f"--timeout: must be more than 0 seconds (got {timeout:g})")
    if watch is not None and watch <= 0:
        raise CliError(f"--watch: must be more than 0 seconds (got {watch:g})")
    if count is not None and watch is None:
        raise CliError("--count needs --watch")
    options = NatsOptions.from_flags(nats, creds, token, prefix)
    raise typer.Exit(run(_status(hostname, options, timeout, watch, count, as_json)))


def register(app: typer.Typer) -> None:
    app.command("status", cls=WatchCommand, epilog=EPILOG)(status_command)
