"""``linkctl webhooks add|list|remove|deliveries``: the caller's webhooks on the gateway.

A webhook gets a signed POST for each run event it subscribes to (docs/runs.md, "Webhooks"):
``add`` registers a URL (all the user's runs, or one with ``--run``; ``done`` events unless
``--event`` says otherwise) and prints its signing secret, which the gateway never shows again.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import Annotated, Any, Final
from urllib.parse import quote, urlencode

import typer

from . import exitcodes
from .common import CliError, run
from .gateway_api import (
    DEFAULT_GATEWAY,
    GatewayClient,
    GatewayOpt,
    GatewayOptions,
    GatewayTokenOpt,
    LegacyTokenOpt,
)
from .term import Painter

__all__ = ["register"]

PATH: Final = "/api/webhooks"
EVENT_TYPES: Final = ("stage", "output", "done")

HELP: Final = """\
Webhooks: signed POSTs to your URL for your runs' events (retried until delivered).

\b
Examples:
  linkctl webhooks add https://hooks.example.com/natslink             # every run's done event
  linkctl webhooks add https://hooks.example.com/x --run RUN_ID --event stage --event done
  linkctl webhooks list --json
  linkctl webhooks deliveries WEBHOOK_ID
  linkctl webhooks remove WEBHOOK_ID
"""

EXIT_STATUS: Final = """\b
Exit status:
     0  done
     2  usage error; the gateway unreachable or refusing the token; a URL it refuses (422)
     3  the gateway answered an unexpected error
     4  no such webhook (or not yours)
     5  add: you have as many webhooks as the gateway allows
"""

JsonOpt = Annotated[bool, typer.Option("--json", help="JSON for scripts, not human output.")]


def _when(ms: object) -> str:
    if not isinstance(ms, int) or isinstance(ms, bool):
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _check_id(value: str, what: str) -> str:
    value = value.strip()
    if not value or len(value) > 128 or not all(c.isascii() and (c.isalnum() or c in "_-") for c in value):
        raise CliError(f"{what}: {value!r} is not an id")
    return value


def _emit(doc: dict[str, Any], as_json: bool, lines: list[str]) -> int:
    if as_json:
        print(json.dumps(doc), flush=True)
    else:
        for line in lines:
            print(line, flush=True)
    return exitcodes.OK


def _hook_line(hook: dict[str, Any], paint: Painter) -> str:
    scope = f"run {hook.get('runId')}" if hook.get("runId") else "all runs"
    types = ",".join(str(t) for t in hook.get("eventTypes") or [])
    return f"{paint(str(hook.get('id')), 'bold')}  {hook.get('url')}  ({scope}; {types})"


async def _add(
    options: GatewayOptions, url: str, run_id: str | None, events: list[str], as_json: bool
) -> int:
    body: dict[str, Any] = {"url": url}
    if run_id:
        body["runId"] = run_id
    if events:
        body["eventTypes"] = events
    async with GatewayClient(options) as client:
        doc = await client.call("POST", PATH, body=body, ok=(201,))
    paint = Painter.for_stream(sys.stdout)
    lines = [
        _hook_line(doc, paint),
        f"secret: {doc.get('secret')}",
        "(shown once: verify X-Natslink-Signature with it; see docs/runs.md)",
    ]
    return _emit(doc, as_json, lines)


async def _list(options: GatewayOptions, run_id: str | None, as_json: bool) -> int:
    query = f"?{urlencode({'runId': run_id})}" if run_id else ""
    async with GatewayClient(options) as client:
        doc = await client.call("GET", PATH + query)
    hooks = doc.get("webhooks")
    if not isinstance(hooks, list):
        raise CliError("the gateway's answer has no webhooks list", exitcodes.GATEWAY_ERROR)
    paint = Painter.for_stream(sys.stdout)
    if not hooks and not as_json:
        print(Painter.for_stream(sys.stderr)("no webhooks", "dim"), file=sys.stderr, flush=True)
    return _emit(doc, as_json, [_hook_line(h, paint) for h in hooks if isinstance(h, dict)])


async def _remove(options: GatewayOptions, webhook_id: str, as_json: bool) -> int:
    async with GatewayClient(options) as client:
        doc = await client.call("DELETE", f"{PATH}/{quote(webhook_id)}")
    return _emit(doc, as_json, [f"removed {webhook_id}"])


async def _deliveries(options: GatewayOptions, webhook_id: str, as_json: bool) -> int:
    async with GatewayClient(options) as client:
        doc = await client.call("GET", f"{PATH}/{quote(webhook_id)}/deliveries")
    rows = doc.get("deliveries")
    if not isinstance(rows, list):
        raise CliError("the gateway's answer has no deliveries list", exitcodes.GATEWAY_ERROR)
    paint = Painter.for_stream(sys.stdout)
    lines = []
    for row in (r for r in rows if isinstance(r, dict)):
        status = str(row.get("status"))
        color = {"succeeded": "green", "failed": "red"}.get(status, "yellow")
        last = row.get("lastStatus") or row.get("lastError") or "-"
        when = _when(row.get("nextAttemptAt")) if status == "pending" else _when(row.get("updatedAt"))
        lines.append(
            f"{row.get('id')}  {paint(status.ljust(9), color)}  {str(row.get('type')).ljust(6)}  "
            f"run {row.get('runId')}  attempts {row.get('attempts')}  last {last}  "
            f"{'next' if status == 'pending' else 'at'} {when}"
        )
    if not rows and not as_json:
        print(Painter.for_stream(sys.stderr)("no deliveries yet", "dim"), file=sys.stderr, flush=True)
    return _emit(doc, as_json, lines)


def add_command(
    url: Annotated[
        str, typer.Argument(metavar="URL", help="Where to POST (https://...).", show_default=False)
    ],
    run_id: Annotated[
        str | None,
        typer.Option("--run", metavar="RUN_ID", help="Only this run's events.", show_default=False),
    ] = None,
    events: Annotated[
        list[str] | None,
        typer.Option(
            "--event",
            metavar="TYPE",
            help=f"Event type ({', '.join(EVENT_TYPES)}); repeatable; default done.",
        ),
    ] = None,
    as_json: JsonOpt = False,
    gateway: GatewayOpt = DEFAULT_GATEWAY,
    gateway_token: GatewayTokenOpt = None,
    token: LegacyTokenOpt = None,
) -> None:
    """Register a webhook; prints its id and signing secret (shown once)."""
    options = GatewayOptions.from_flags(gateway, gateway_token, token)
    for event in events or []:
        if event not in EVENT_TYPES:
            raise CliError(f"--event: {event!r} is not one of {', '.join(EVENT_TYPES)}")
    run_id = _check_id(run_id, "--run") if run_id is not None else None
    raise typer.Exit(run(_add(options, url, run_id, list(events or []), as_json)))


def list_command(
    run_id: Annotated[
        str | None,
        typer.Option("--run", metavar="RUN_ID", help="Only webhooks of this run.", show_default=False),
    ] = None,
    as_json: JsonOpt = False,
    gateway: GatewayOpt = DEFAULT_GATEWAY,
    gateway_token: GatewayTokenOpt = None,
    token: LegacyTokenOpt = None,
) -> None:
    """List your webhooks (never their secrets)."""
    options = GatewayOptions.from_flags(gateway, gateway_token, token)
    run_id = _check_id(run_id, "--run") if run_id is not None else None
    raise typer.Exit(run(_list(options, run_id, as_json)))


def remove_command(
    webhook_id: Annotated[str, typer.Argument(metavar="WEBHOOK_ID", show_default=False)],
    as_json: JsonOpt = False,
    gateway: GatewayOpt = DEFAULT_GATEWAY,
    gateway_token: GatewayTokenOpt = None,
    token: LegacyTokenOpt = None,
) -> None:
    """Remove a webhook (deliveries still pending for it end failed: webhook_deleted)."""
    options = GatewayOptions.from_flags(gateway, gateway_token, token)
    raise typer.Exit(run(_remove(options, _check_id(webhook_id, "WEBHOOK_ID"), as_json)))


def deliveries_command(
    webhook_id: Annotated[str, typer.Argument(metavar="WEBHOOK_ID", show_default=False)],
    as_json: JsonOpt = False,
    gateway: GatewayOpt = DEFAULT_GATEWAY,
    gateway_token: GatewayTokenOpt = None,
    token: LegacyTokenOpt = None,
) -> None:
    """A webhook's deliveries, oldest first: status, attempts, last answer, next attempt."""
    options = GatewayOptions.from_flags(gateway, gateway_token, token)
    raise typer.Exit(run(_deliveries(options, _check_id(webhook_id, "WEBHOOK_ID"), as_json)))


def register(app: typer.Typer) -> None:
    webhooks_app = typer.Typer(
        name="webhooks", help=HELP, no_args_is_help=True, rich_markup_mode=None, epilog=EXIT_STATUS
    )
    for name, func in (
        ("add", add_command),
        ("list", list_command),
        ("remove", remove_command),
        ("deliveries", deliveries_command),
    ):
        webhooks_app.command(name, epilog=EXIT_STATUS)(func)
    app.add_typer(webhooks_app, name="webhooks")
