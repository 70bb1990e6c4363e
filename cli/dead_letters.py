"""``linkctl runs dead-letters``: the run events the gateway could not apply (for operators).

The gateway parks an event whose apply step kept raising (docs/runs.md, "Poison events") and
fails its run as ``event_rejected``; this lists them, newest first, from
``GET /api/admin/runs/dead-letters``. It needs a gateway token with the ``runs:admin`` scope.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import Annotated, Any, Final
from urllib.parse import urlencode

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
from .term import Painter

__all__ = ["DEAD_LETTERS_EPILOG", "dead_letters_command", "render_dead_letter"]

PATH: Final = "/api/admin/runs/dead-letters"
MAX_LIMIT: Final = 1000
# The message text shown per letter in human output (--json has all the gateway kept).
PREVIEW_CHARS: Final = 200

DEAD_LETTERS_EPILOG: Final = """\b
Examples:
  linkctl runs dead-letters
  linkctl runs dead-letters --run RUN_ID --json | jq '.deadLetters[].error'

\b
Needs a gateway token whose scope claim holds runs:admin (403 otherwise: exit status 2).
"""


def _when(ms: object) -> str:
    if not isinstance(ms, int) or isinstance(ms, bool):
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def render_dead_letter(record: dict[str, Any], paint: Painter) -> str:
    """A few lines per letter: which run and event, why, and the start of the message."""
    data = str(record.get("data") or "")
    preview = data[:PREVIEW_CHARS] + ("…" if len(data) > PREVIEW_CHARS or record.get("truncated") else "")
    rows = [
        ("event", f"seq {record.get('seq')}  (stream seq {record.get('streamSeq')})"),
        ("error", str(record.get("error") or "-")),
        ("deliveries", str(record.get("deliveries") or "-")),
        ("stored", _when(record.get("storedAt"))),
        ("parked", _when(record.get("deadAt"))),
        ("subject", str(record.get("subject") or "-")),
        ("message", " ".join(preview.split())),
    ]
    head = f"run {paint(str(record.get('runId')), 'bold')}"
    return "\n".join([head] + [f"  {paint(k.ljust(10), 'dim')}  {v}" for k, v in rows])


async def _list(options: GatewayOptions, run_id: str | None, limit: int, as_json: bool) -> int:
    query = {"limit": str(limit), **({"runId": run_id} if run_id else {})}
    async with GatewayClient(options) as client:
        try:
            doc = await client.call("GET", f"{PATH}?{urlencode(query)}")
        except GatewayApiError as exc:
            if exc.status == 403:
                raise CliError(
                    "the gateway refused: listing dead letters needs a token with the runs:admin scope",
                    exitcodes.USAGE,
                ) from None
            raise
    letters = doc.get("deadLetters")
    if not isinstance(letters, list):
        raise CliError("the gateway's answer has no deadLetters list", exitcodes.GATEWAY_ERROR)
    if as_json:
        print(json.dumps(doc), flush=True)
        return exitcodes.OK
    paint = Painter.for_stream(sys.stdout)
    for record in letters:
        if isinstance(record, dict):
            print(render_dead_letter(record, paint), flush=True)
    note = Painter.for_stream(sys.stderr)
    total = doc.get("total")
    if not letters:
        print(note("no dead letters", "dim"), file=sys.stderr, flush=True)
    elif isinstance(total, int) and total > len(letters):
        print(note(f"{len(letters)} of {total} shown (--limit)", "dim"), file=sys.stderr, flush=True)
    return exitcodes.OK


def dead_letters_command(
    run_id: Annotated[
        str | None,
        typer.Option("--run", metavar="RUN_ID", help="Only this run's.", show_default=False),
    ] = None,
    limit: Annotated[
        int,
        typer.Option("--limit", "-n", metavar="N", min=1, max=MAX_LIMIT, help=f"At most N (1-{MAX_LIMIT})."),
    ] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="JSON for scripts, not human output.")] = False,
    gateway: GatewayOpt = DEFAULT_GATEWAY,
    gateway_token: GatewayTokenOpt = None,
    token: LegacyTokenOpt = None,
) -> None:
    """List run events the gateway could not apply (dead letters), newest first (operators)."""
    options = GatewayOptions.from_flags(gateway, gateway_token, token)
    if run_id is not None:
        run_id = run_id.strip()
        valid = all(c.isascii() and (c.isalnum() or c in "_-") for c in run_id)
        if not run_id or len(run_id) > 128 or not valid:
            raise CliError(f"--run: {run_id!r} is not a run id")
    raise typer.Exit(run(_list(options, run_id, limit, as_json)))
