"""``linkctl runs context|signal|messages|validate``: talk to a running run, see what was sent.

- ``context RUN_ID CONTEXT``: ``POST /api/runs/{id}/context`` (JSON, ``@FILE``, ``@-``, or
  ``--text`` for plain text); ``signal RUN_ID TYPE``: ``POST /api/runs/{id}/signals`` with
  ``--severity`` and ``--payload``. Both take ``--key`` (an idempotency key: a retry with the
  same key is delivered once) and print the message id (``--json``: the gateway's answer).
- ``messages RUN_ID``: every message the gateway sent the desktop for the run, with its
  status (``GET /api/runs/{id}/messages``).
- ``validate RUNNER [INPUT]``: what ``runs send`` would do, without creating a run
  (``POST /api/runs/validate``); exit status 1 when the desktop is offline.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import Annotated, Any, Final

import typer

from . import exitcodes
from .common import CliError, run
from .gateway_api import (
    DEFAULT_GATEWAY,
    GatewayApiError,
    GatewayClient,
    GatewayOpt,
    GatewayOptions,
    GatewayTokenOpt,
    LegacyTokenOpt,
)
from .run_stream import run_path
from .runs import parse_input
from .term import Painter

__all__ = [
    "EPILOGS",
    "context_command",
    "messages_command",
    "render_message",
    "signal_command",
    "validate_command",
]

SEVERITIES: Final = ("info", "warning", "error", "critical")
_STATUS_STYLE: Final = {
    "acknowledged": ("green",),
    "failed": ("red",),
    "sent": ("yellow",),
    "queued": ("cyan",),
}

EPILOGS: Final = {
    "context": """\b
Examples:
  linkctl runs context RUN_ID '{"files": ["a.py"]}'
  linkctl runs context RUN_ID --text 'use the staging database'
  linkctl runs context RUN_ID @notes.json --key notes-1    # a retry with the same key: delivered once
""",
    "signal": """\b
Examples:
  linkctl runs signal RUN_ID build.pause --severity warning
  linkctl runs signal RUN_ID deploy.window --payload '{"minutes": 10}' --key win-1 --json
""",
    "messages": """\b
Examples:
  linkctl runs messages RUN_ID
  linkctl runs messages RUN_ID --json | jq '.messages[] | select(.status != "acknowledged")'
""",
    "validate": """\b
Examples:
  linkctl runs validate mock '{"count": 3}'
  linkctl runs validate command @work.json --json
""",
}

Opt = typer.Option
JsonOpt = Annotated[bool, Opt("--json", help="JSON for scripts instead of human output.")]
RunIdArg = Annotated[str, typer.Argument(metavar="RUN_ID", help="The run id (from `runs send`).")]
KeyOpt = Annotated[
    str | None,
    Opt(
        "--key",
        metavar="KEY",
        help="Idempotency key: a retry with the same key is delivered once.",
        show_default=False,
    ),
]


def _when(ms: object) -> str:
    if not isinstance(ms, int) or isinstance(ms, bool):
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).astimezone().strftime("%H:%M:%S")


def _run_id(value: str) -> str:
    value = value.strip()
    if not value or len(value) > 256 or any(c.isspace() or ord(c) < 32 for c in value):
        raise CliError(f"RUN_ID: {value!r} is not a run id")
    return value


def render_message(record: dict[str, Any], paint: Painter) -> str:
    """One line per message: id, kind, status, attempts, when, and why it failed."""
    status = str(record.get("status") or "?")
    cells = [
        str(record.get("messageId") or "?"),
        str(record.get("kind") or "?").ljust(7),
        paint(status.ljust(12), *_STATUS_STYLE.get(status, ())),
        f"x{record.get('attempts') or 0}",
        _when(record.get("updatedAt")),
    ]
    error = record.get("error")
    if isinstance(error, dict) and (status == "failed" or record.get("lastError")):
        cells.append(f"{error.get('code')}: {error.get('message')}")
    elif isinstance(record.get("lastError"), dict):
        cells.append(f"last try: {record['lastError'].get('code')}")
    if (record.get("ack") or {}).get("duplicate"):
        cells.append("(desktop had it already)")
    return "  ".join(cells)


async def _post_message(
    options: GatewayOptions, run_id: str, path: str, body: dict[str, Any], as_json: bool
) -> int:
    async with GatewayClient(options) as client:
        answer = await client.call("POST", run_path(run_id, path), body=body, ok=(200, 202))
    if as_json:
        print(json.dumps(answer), flush=True)
        return exitcodes.OK
    print(answer.get("messageId"), flush=True)
    note = f"{answer.get('kind')} {answer.get('status')}"
    if answer.get("idempotentReplay"):
        note += " (sent before with this key: not sent again)"
    elif answer.get("status") == "sent":
        note += " (no answer from the desktop yet: the gateway resends it with the same id)"
    print(Painter.for_stream(sys.stderr)(note, "dim"), file=sys.stderr, flush=True)
    return exitcodes.OK


def context_command(
    run_id: RunIdArg,
    context: Annotated[
        str,
        typer.Argument(metavar="CONTEXT", help="JSON, or @FILE, or @- for stdin (with --text: plain text)."),
    ],
    text: Annotated[bool, Opt("--text", help="CONTEXT is plain text, not JSON.")] = False,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
    gateway: GatewayOpt = DEFAULT_GATEWAY,
    gateway_token: GatewayTokenOpt = None,
    token: LegacyTokenOpt = None,
) -> None:
    """Send context to a running run (its runner gets it while it works); prints the message id."""
    options = GatewayOptions.from_flags(gateway, gateway_token, token)
    body: dict[str, Any] = {"context": context if text else parse_input(context)}
    if key is not None:
        body["idempotencyKey"] = key
    raise typer.Exit(run(_post_message(options, _run_id(run_id), "/context", body, as_json)))


def signal_command(
    run_id: RunIdArg,
    signal_type: Annotated[str, typer.Argument(metavar="TYPE", help="The signal type, e.g. build.pause.")],
    severity: Annotated[
        str, Opt("--severity", "-s", metavar="LEVEL", help="info, warning, error or critical.")
    ] = "info",
    payload: Annotated[
        str | None,
        Opt("--payload", "-p", metavar="JSON", help="A JSON object, @FILE or @-.", show_default=False),
    ] = None,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
    gateway: GatewayOpt = DEFAULT_GATEWAY,
    gateway_token: GatewayTokenOpt = None,
    token: LegacyTokenOpt = None,
) -> None:
    """Send a typed signal to a running run; prints the message id."""
    options = GatewayOptions.from_flags(gateway, gateway_token, token)
    if severity not in SEVERITIES:
        raise CliError(f"--severity: one of {', '.join(SEVERITIES)} (got {severity!r})")
    body: dict[str, Any] = {"signalType": signal_type, "severity": severity}
    if payload is not None:
        value = parse_input(payload)
        if not isinstance(value, dict):
            raise CliError("--payload: a JSON object")
        body["payload"] = value
    if key is not None:
        body["idempotencyKey"] = key
    raise typer.Exit(run(_post_message(options, _run_id(run_id), "/signals", body, as_json)))


async def _messages(options: GatewayOptions, run_id: str, as_json: bool) -> int:
    async with GatewayClient(options) as client:
        listing = await client.call("GET", run_path(run_id, "/messages"))
    if as_json:
        print(json.dumps(listing), flush=True)
        return exitcodes.OK
    records = listing.get("messages")
    if not isinstance(records, list):
        raise CliError("the gateway's answer has no messages list", exitcodes.GATEWAY_ERROR)
    paint = Painter.for_stream(sys.stdout)
    for record in records:
        if isinstance(record, dict):
            print(render_message(record, paint), flush=True)
    if not records:
        print(Painter.for_stream(sys.stderr)("no messages", "dim"), file=sys.stderr, flush=True)
    return exitcodes.OK


def messages_command(
    run_id: RunIdArg,
    as_json: JsonOpt = False,
    gateway: GatewayOpt = DEFAULT_GATEWAY,
    gateway_token: GatewayTokenOpt = None,
    token: LegacyTokenOpt = None,
) -> None:
    """List what the gateway sent the desktop for a run (work item, context, signals, cancels)."""
    options = GatewayOptions.from_flags(gateway, gateway_token, token)
    raise typer.Exit(run(_messages(options, _run_id(run_id), as_json)))


async def _validate(options: GatewayOptions, body: dict[str, Any], as_json: bool) -> int:
    async with GatewayClient(options) as client:
        try:
            answer = await client.call("POST", "/api/runs/validate", body=body)
        except GatewayApiError as exc:
            if exc.code == "desktop_unreachable":
                raise CliError(str(exc), exitcodes.OFFLINE) from None
            raise
    if as_json:
        print(json.dumps(answer), flush=True)
        return exitcodes.OK
    target = answer.get("wouldDispatchTo") or {}
    print(
        f"ok: runner {answer.get('runner')} would run on {target.get('hostname')} "
        f"({target.get('tunnelHostname')}, linkd {target.get('cliVersion')})",
        flush=True,
    )
    return exitcodes.OK


def validate_command(
    runner: Annotated[
        str, typer.Argument(metavar="RUNNER", help="Runner name: echo, mock, command, http...")
    ],
    input_: Annotated[
        str | None,
        typer.Argument(
            metavar="INPUT", help="The run's input as JSON, or @FILE, or @- for stdin.", show_default=False
        ),
    ] = None,
    thread: Annotated[
        str | None, Opt("--thread", metavar="ID", help="In this thread.", show_default=False)
    ] = None,
    title: Annotated[str | None, Opt("--title", metavar="TEXT", help="A title.", show_default=False)] = None,
    as_json: JsonOpt = False,
    gateway: GatewayOpt = DEFAULT_GATEWAY,
    gateway_token: GatewayTokenOpt = None,
    token: LegacyTokenOpt = None,
) -> None:
    """Check a run request (runner, input, desktop online) without sending it."""
    options = GatewayOptions.from_flags(gateway, gateway_token, token)
    body: dict[str, Any] = {"runner": runner.strip()}
    if input_ is not None:
        body["input"] = parse_input(input_)
    if thread is not None:
        body["threadId"] = thread
    if title is not None:
        body["title"] = title
    raise typer.Exit(run(_validate(options, body, as_json)))


def register(runs_app: typer.Typer, exit_status: str) -> None:
    for name, func in (
        ("context", context_command),
        ("signal", signal_command),
        ("messages", messages_command),
        ("validate", validate_command),
    ):
        runs_app.command(name, epilog=EPILOGS[name] + "\n" + exit_status)(func)
