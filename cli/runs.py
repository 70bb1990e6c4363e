"""``linkctl runs send|list|show|attach|cancel|dead-letters`` (and ``context|signal|messages|validate``,
:mod:`.run_messages`): work for your desktop, through the gateway.

Human output on a terminal: the run's own output on stdout (so it can be piped), status
lines on stderr, colour only on a tty. ``--json`` prints JSON for scripts: the gateway's
answers, and for ``attach`` one event per line ending with ``{"type": "end", "run": {...}}``
(the same shape as the gateway's ``application/x-ndjson`` stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Final
from urllib.parse import urlencode

import typer

from . import exitcodes
from .common import CliError, run, stop_on_signals
from .dead_letters import DEAD_LETTERS_EPILOG, dead_letters_command
from .gateway_api import (
    DEFAULT_GATEWAY,
    GatewayClient,
    GatewayOpt,
    GatewayOptions,
    GatewayTokenOpt,
    LegacyTokenOpt,
)
from .run_stream import DEFAULT_GIVE_UP_AFTER, END, STATE, Item, follow, run_path
from .term import Painter, human_bytes

__all__ = ["exit_status_for", "parse_input", "register", "render_row", "render_state"]

TERMINAL: Final = frozenset({"completed", "failed", "cancelled"})
_STATUS_STYLE: Final = {
    "completed": ("green",),
    "failed": ("red",),
    "cancelled": ("yellow",),
    "dispatching": ("cyan",),
    "in_progress": ("cyan",),
    "stalled": ("yellow",),
}
# The gateway's page size bounds (GET /api/runs?limit=N).
LIST_DEFAULT_LIMIT: Final = 20
LIST_MAX_LIMIT: Final = 100
# Widest status (in_progress): the columns line up.
_STATUS_WIDTH: Final = 11
# Work items are small documents; a bigger input is a mistake (use the http runner for data).
MAX_INPUT_BYTES: Final = 1024 * 1024

RUNS_HELP: Final = """\
Send work to your linked desktop and follow it, through the gateway.

\b
Examples:
  linkctl runs send mock '{"count": 5, "delayMs": 200}' --attach
  RUN=$(linkctl runs send echo '"hello"')   # prints the run id
  linkctl runs list                          # your runs, newest first
  linkctl runs show RUN_ID
  linkctl runs attach RUN_ID                 # live output; survives dropped connections
  linkctl runs cancel RUN_ID
  linkctl runs context RUN_ID '"a note"'    # talk to a running run (also: signal)
  linkctl runs messages RUN_ID               # what was sent to the desktop, and its status
  linkctl runs validate mock '{"count": 3}'  # check a request without sending it
  linkctl runs dead-letters                  # operators: events the gateway could not apply

Every command takes --gateway URL (LINKCTL_GATEWAY) and --gateway-token TOKEN (LINKCTL_TOKEN).
"""

EXIT_STATUS: Final = """\b
Exit status:
     0  done (attach: the run completed)
     1  validate: the desktop is offline
     2  usage error; the gateway unreachable or refusing the token; invalid input (422)
     3  the gateway answered an unexpected error
     4  no such run (or not yours)
     5  cancel: the run had already finished
     6  attach: the run failed
     7  attach: the run was cancelled
   130  interrupted (attach only detaches: the run goes on)
"""


# -- input and rendering ------------------------------------------------------------------


def parse_input(raw: str | None, stdin: Any = None) -> Any:
    """INPUT as JSON: inline text, ``@FILE``, or ``@-`` for stdin. None when not given."""
    if raw is None:
        return None
    where = "INPUT"
    if raw.startswith("@"):
        name = raw[1:]
        where = f"INPUT {raw}"
        try:
            if name == "-":
                text = (stdin if stdin is not None else sys.stdin).read(MAX_INPUT_BYTES + 1)
            else:
                with Path(name).expanduser().open(encoding="utf-8") as f:
                    text = f.read(MAX_INPUT_BYTES + 1)
        except OSError as exc:
            raise CliError(f"{where}: cannot read it ({exc.strerror or exc})") from None
        except UnicodeDecodeError:
            raise CliError(f"{where}: not UTF-8 text") from None
    else:
        text = raw
    if len(text.encode("utf-8", errors="replace")) > MAX_INPUT_BYTES:
        raise CliError(f"{where}: more than {human_bytes(MAX_INPUT_BYTES)}")
    try:
        return json.loads(text)
    except ValueError as exc:
        hint = "" if raw.startswith("@") else " (quote it for the shell, e.g. '{\"count\": 3}' or '\"text\"')"
        raise CliError(f"{where}: not valid JSON ({exc}){hint}") from None


def _when(ms: object) -> str:
    if not isinstance(ms, int | float) or isinstance(ms, bool):
        return "-"
    moment = datetime.fromtimestamp(ms / 1000, UTC)
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _duration(start: object, end: object) -> str | None:
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (start, end)):
        return None
    return f"{(float(end) - float(start)) / 1000:.2f} s"  # type: ignore[arg-type]


def render_state(state: dict[str, Any], paint: Painter) -> str:
    status = str(state.get("status") or "?")
    head = f"run {state.get('runId')}  {paint(status, 'bold', *_STATUS_STYLE.get(status, ()))}"
    rows: list[tuple[str, str]] = [
        ("runner", str(state.get("runner") or "-")),
        ("thread", str(state.get("threadId") or "-")),
    ]
    if state.get("title"):
        rows.append(("title", str(state["title"])))
    rows.append(("desktop", str(state.get("hostname") or "-")))
    if status not in TERMINAL:  # the last stage a finished run reached is history, not its state
        rows.append(("stage", str(state.get("stage") or "-")))
    rows += [
        (
            "events",
            f"{state.get('seq') or 0}" + (f" of {state['finalSeq']}" if state.get("finalSeq") else ""),
        ),
    ]
    if isinstance(state.get("outputBytes"), int):
        rows.append(("output", human_bytes(state["outputBytes"])))
    rows.append(("created", _when(state.get("createdAt"))))
    if state.get("finishedAt") is not None:
        took = _duration(state.get("createdAt"), state.get("finishedAt"))
        rows.append(("finished", _when(state.get("finishedAt")) + (f"  (took {took})" if took else "")))
    elif state.get("lastEventAt") is not None:
        rows.append(("last event", _when(state.get("lastEventAt"))))
    if status == "stalled":
        rows.append(("stalled", stalled_note(state)))
    why = ending(state)
    if why:
        rows.append(("failure" if status == "failed" else "reason", why))
    return "\n".join([head] + [f"  {paint(k.ljust(10), 'dim')}  {v}" for k, v in rows])


def render_row(state: dict[str, Any], paint: Painter) -> str:
    """One line of ``runs list``: id, status, runner, created, title."""
    status = str(state.get("status") or "?")
    cells = [
        str(state.get("runId") or "?"),
        paint(status.ljust(_STATUS_WIDTH), *_STATUS_STYLE.get(status, ())),
        str(state.get("runner") or "-"),
        _when(state.get("createdAt")),
    ]
    if state.get("title"):
        cells.append(" ".join(str(state["title"]).split()))  # one line, whatever the title holds
    return "  ".join(cells)


def stalled_note(state: dict[str, Any]) -> str:
    """Since when a stalled run's desktop is silent, and until when it may come back."""
    return (
        f"since {_when(state.get('stalledSince'))}: the desktop is silent; the run resumes if its "
        f"events flow again by {_when(state.get('resumeDeadline'))}, else it fails as desktop_lost"
    )


def ending(state: dict[str, Any]) -> str:
    """Why a run ended the way it did: ``kind: reason``, or whichever of the two there is."""
    parts = [str(state[key]) for key in ("failureKind", "failureReason") if state.get(key)]
    return ": ".join(parts)


def exit_status_for(state: dict[str, Any]) -> int:
    status = state.get("status")
    if status == "failed":
        return exitcodes.RUN_FAILED
    if status == "cancelled":
        return exitcodes.RUN_CANCELLED
    return exitcodes.OK


# -- attach -------------------------------------------------------------------------------


class _Printer:
    """Writes one follow() item: output to stdout/stderr, status lines to stderr, or JSON lines."""

    def __init__(self, as_json: bool, quiet: bool) -> None:
        self.as_json = as_json
        self.quiet = quiet
        self.paint = Painter.for_stream(sys.stderr)
        self.started = time.monotonic()
        self.ended_with_newline = True

    def note(self, text: str) -> None:
        if self.quiet:
            return
        prefix = "" if self.ended_with_newline else "\n"
        sys.stdout.flush()
        print(prefix + self.paint(text, "dim"), file=sys.stderr, flush=True)
        self.ended_with_newline = True

    def item(self, item: Item) -> None:
        if self.as_json:
            doc = {"type": item.kind, "run": item.data} if item.kind in (END, STATE) else item.data
            print(json.dumps(doc), flush=True)
            return
        if item.kind == END:
            return
        if item.kind == STATE:
            if item.data.get("status") == "stalled":
                self.note(f"· stalled {stalled_note(item.data)}")
            else:
                self.note(f"· resumed ({item.data.get('status')})")
            return
        event = item.data
        kind = event.get("type")
        if kind == "output":
            data = event.get("data")
            if isinstance(data, str) and data:
                stream = sys.stderr if event.get("stream") == "stderr" else sys.stdout
                stream.write(data)
                stream.flush()
                self.ended_with_newline = data.endswith("\n")
        elif kind == "stage":
            self.note(f"· stage {event.get('stage')}")
        elif kind == "done":
            status = str(event.get("status"))
            reason = f": {event['reason']}" if event.get("reason") else ""
            styled = self.paint(status, "bold", *_STATUS_STYLE.get(status, ()))
            if not self.quiet:
                prefix = "" if self.ended_with_newline else "\n"
                print(
                    f"{prefix}run {event.get('runId')} {styled}{reason} "
                    f"({event.get('seq')} events, {time.monotonic() - self.started:.2f} s)",
                    file=sys.stderr,
                    flush=True,
                )
                self.ended_with_newline = True

    def reconnect(self, attempt: int, last: int, error: BaseException) -> None:
        self.note(
            f"· connection lost ({type(error).__name__}); resuming after event {last} (attempt {attempt})"
        )


async def attach(
    client: GatewayClient, run_id: str, after: int, as_json: bool, quiet: bool, give_up_after: float
) -> int:
    printer = _Printer(as_json, quiet)
    final: dict[str, Any] | None = None
    done: dict[str, Any] | None = None
    last = after
    stop = asyncio.Event()

    async def consume() -> None:
        nonlocal final, done, last
        async for item in follow(
            client, run_id, after=after, give_up_after=give_up_after, on_reconnect=printer.reconnect
        ):
            printer.item(item)
            if item.kind == END:
                final = item.data
            elif item.kind == STATE:
                continue
            else:
                last = int(item.data["seq"])
                if item.data.get("type") == "done":
                    done = item.data

    with stop_on_signals(stop):
        task = asyncio.ensure_future(consume())
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            printer.note(f"detached; the run goes on. Resume: linkctl runs attach {run_id} --after {last}")
            return exitcodes.INTERRUPTED
        task.result()
    assert final is not None
    final = _settled(final, done, printer)
    if not as_json and final.get("status") == "failed" and not quiet:
        print(printer.paint(f"failure: {ending(final) or 'failed'}", "red"), file=sys.stderr, flush=True)
    return exit_status_for(final)


def _settled(final: dict[str, Any], done: dict[str, Any] | None, printer: _Printer) -> dict[str, Any]:
    """The final state, or, when the gateway ended the stream before recording the desktop's
    ``done`` (its projector running behind), the status that ``done`` reported."""
    if final.get("status") in TERMINAL or done is None or done.get("status") not in TERMINAL:
        return final
    printer.note(
        f"· the gateway had not recorded the end yet (state {final.get('status')}); "
        f"the desktop reported {done['status']}"
    )
    settled = {**final, "status": done["status"]}
    if done["status"] == "failed":
        settled["failureKind"] = final.get("failureKind") or "run_failed"
        settled["failureReason"] = final.get("failureReason") or done.get("reason")
    return settled


# -- commands -------------------------------------------------------------------------------

Opt = typer.Option
JsonOpt = Annotated[bool, Opt("--json", help="JSON for scripts instead of human output.")]
RunIdArg = Annotated[str, typer.Argument(metavar="RUN_ID", help="The run id (from `runs send`).")]
AfterOpt = Annotated[
    int, Opt("--after", metavar="SEQ", min=0, help="Only events after this sequence number.")
]
GiveUpOpt = Annotated[
    float,
    Opt(
        "--give-up-after",
        metavar="SECONDS",
        help="Stop reconnecting after this long without an event.",
    ),
]
QuietOpt = Annotated[bool, Opt("--quiet", "-q", help="Only the run's output: no status lines.")]


def _check_run_id(run_id: str) -> str:
    run_id = run_id.strip()
    if not run_id or len(run_id) > 256 or any(c.isspace() or ord(c) < 32 for c in run_id):
        raise CliError(f"RUN_ID: {run_id!r} is not a run id")
    return run_id


def _check_give_up(value: float) -> float:
    if value <= 0:
        raise CliError(f"--give-up-after: must be more than 0 seconds (got {value:g})")
    return value


async def _send(
    options: GatewayOptions,
    body: dict[str, Any],
    as_json: bool,
    attach_after: bool,
    quiet: bool,
    give_up_after: float,
) -> int:
    async with GatewayClient(options) as client:
        accepted = await client.call("POST", "/api/runs", body=body, ok=(200, 201, 202))
        run_id = accepted.get("runId")
        if not isinstance(run_id, str) or not run_id:
            raise CliError("the gateway accepted the run but sent no runId", exitcodes.GATEWAY_ERROR)
        if as_json and not attach_after:
            print(json.dumps(accepted), flush=True)
            return exitcodes.OK
        if as_json:
            print(json.dumps({"type": "accepted", **accepted}), flush=True)
        elif not quiet:
            paint = Painter.for_stream(sys.stderr)
            print(
                f"run {paint(run_id, 'bold')} accepted (thread {accepted.get('threadId')}, "
                f"status {accepted.get('status')})",
                file=sys.stderr,
                flush=True,
            )
            if not attach_after:
                print(f"follow it with: linkctl runs attach {run_id}", file=sys.stderr, flush=True)
        if not attach_after:
            # The result of `send` is the run id: on stdout, alone, for RUN=$(linkctl runs send ...).
            # (With --attach, stdout is the run's output and the id is in the status line.)
            print(run_id, flush=True)
            return exitcodes.OK
        return await attach(client, run_id, 0, as_json, quiet, give_up_after)


def send_command(
    runner: Annotated[
        str, typer.Argument(metavar="RUNNER", help="Runner name: echo, mock, command, http...")
    ],
    input_: Annotated[
        str | None,
        typer.Argument(
            metavar="INPUT",
            help="The run's input as JSON, or @FILE, or @- for stdin.",
            show_default=False,
        ),
    ] = None,
    thread: Annotated[
        str | None, Opt("--thread", metavar="ID", help="Add to this thread.", show_default=False)
    ] = None,
    title: Annotated[str | None, Opt("--title", metavar="TEXT", help="A title.", show_default=False)] = None,
    attach_after: Annotated[bool, Opt("--attach", "-a", help="Stream the run's output right away.")] = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    give_up_after: GiveUpOpt = DEFAULT_GIVE_UP_AFTER,
    gateway: GatewayOpt = DEFAULT_GATEWAY,
    gateway_token: GatewayTokenOpt = None,
    token: LegacyTokenOpt = None,
) -> None:
    """Send a run to your desktop (202: accepted, even when the desktop is offline); prints its id."""
    options = GatewayOptions.from_flags(gateway, gateway_token, token)
    runner = runner.strip()
    if not runner:
        raise CliError("RUNNER: give a runner name (e.g. mock)")
    body: dict[str, Any] = {"runner": runner}
    value = parse_input(input_)
    if input_ is not None:
        body["input"] = value
    if thread is not None:
        body["threadId"] = thread
    if title is not None:
        body["title"] = title
    raise typer.Exit(run(_send(options, body, as_json, attach_after, quiet, _check_give_up(give_up_after))))


async def _show(options: GatewayOptions, run_id: str, as_json: bool) -> int:
    async with GatewayClient(options) as client:
        state = await client.call("GET", run_path(run_id))
    if as_json:
        print(json.dumps(state), flush=True)
    else:
        print(render_state(state, Painter.for_stream(sys.stdout)), flush=True)
    return exitcodes.OK


def show_command(
    run_id: RunIdArg,
    as_json: JsonOpt = False,
    gateway: GatewayOpt = DEFAULT_GATEWAY,
    gateway_token: GatewayTokenOpt = None,
    token: LegacyTokenOpt = None,
) -> None:
    """Show a run's state: status, stage, events, timings, failure."""
    options = GatewayOptions.from_flags(gateway, gateway_token, token)
    raise typer.Exit(run(_show(options, _check_run_id(run_id), as_json)))


def _check_cursor(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    if not value or len(value) > 256 or not all(c.isascii() and (c.isalnum() or c in "._-") for c in value):
        raise CliError(f"--before: {value!r} is not a cursor (use the `next` of an earlier page)")
    return value


async def _list(
    options: GatewayOptions, limit: int, before: str | None, follow_all: bool, as_json: bool
) -> int:
    runs: list[dict[str, Any]] = []
    cursor = before
    async with GatewayClient(options) as client:
        while True:
            query = {"limit": str(limit), **({"before": cursor} if cursor else {})}
            page = await client.call("GET", f"/api/runs?{urlencode(query)}")
            items = page.get("runs")
            nxt = page.get("next")
            if not isinstance(items, list) or not (nxt is None or isinstance(nxt, str)):
                raise CliError("the gateway's run list is not {runs: [...], next}", exitcodes.GATEWAY_ERROR)
            runs += [item for item in items if isinstance(item, dict)]
            cursor = nxt
            if not follow_all or cursor is None:
                break
    if as_json:
        print(json.dumps({"runs": runs, "next": cursor}), flush=True)
        return exitcodes.OK
    paint = Painter.for_stream(sys.stdout)
    for state in runs:
        print(render_row(state, paint), flush=True)
    note = Painter.for_stream(sys.stderr)
    if not runs:
        print(note("no runs", "dim"), file=sys.stderr, flush=True)
    if cursor is not None:
        print(
            note(f"more: linkctl runs list --before {cursor} (or --all)", "dim"), file=sys.stderr, flush=True
        )
    return exitcodes.OK


def list_command(
    limit: Annotated[
        int,
        Opt(
            "--limit",
            "-n",
            metavar="N",
            min=1,
            max=LIST_MAX_LIMIT,
            help=f"Runs per page (1-{LIST_MAX_LIMIT}).",
        ),
    ] = LIST_DEFAULT_LIMIT,
    before: Annotated[
        str | None,
        Opt(
            "--before",
            metavar="CURSOR",
            help="Runs older than this (an earlier page's `next`).",
            show_default=False,
        ),
    ] = None,
    follow_all: Annotated[bool, Opt("--all", help="Every run: follow the pages to the end.")] = False,
    as_json: JsonOpt = False,
    gateway: GatewayOpt = DEFAULT_GATEWAY,
    gateway_token: GatewayTokenOpt = None,
    token: LegacyTokenOpt = None,
) -> None:
    """List your runs, newest first: id, status, runner, created, title."""
    options = GatewayOptions.from_flags(gateway, gateway_token, token)
    raise typer.Exit(run(_list(options, limit, _check_cursor(before), follow_all, as_json)))


async def _attach(
    options: GatewayOptions, run_id: str, after: int, as_json: bool, quiet: bool, give_up_after: float
) -> int:
    async with GatewayClient(options) as client:
        return await attach(client, run_id, after, as_json, quiet, give_up_after)


def attach_command(
    run_id: RunIdArg,
    after: AfterOpt = 0,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    give_up_after: GiveUpOpt = DEFAULT_GIVE_UP_AFTER,
    gateway: GatewayOpt = DEFAULT_GATEWAY,
    gateway_token: GatewayTokenOpt = None,
    token: LegacyTokenOpt = None,
) -> None:
    """Stream a run's output live until it ends; resumes by itself after a dropped connection."""
    options = GatewayOptions.from_flags(gateway, gateway_token, token)
    raise typer.Exit(
        run(_attach(options, _check_run_id(run_id), after, as_json, quiet, _check_give_up(give_up_after)))
    )


async def _cancel(options: GatewayOptions, run_id: str, as_json: bool) -> int:
    async with GatewayClient(options) as client:
        answer = await client.call("POST", run_path(run_id, "/cancel"), ok=(200, 202))
    if as_json:
        print(json.dumps(answer), flush=True)
    else:
        print(f"cancel requested for run {run_id} (status {answer.get('status')})", flush=True)
    return exitcodes.OK


def cancel_command(
    run_id: RunIdArg,
    as_json: JsonOpt = False,
    gateway: GatewayOpt = DEFAULT_GATEWAY,
    gateway_token: GatewayTokenOpt = None,
    token: LegacyTokenOpt = None,
) -> None:
    """Ask the desktop to cancel a run (it ends `cancelled`)."""
    options = GatewayOptions.from_flags(gateway, gateway_token, token)
    raise typer.Exit(run(_cancel(options, _check_run_id(run_id), as_json)))


_EPILOGS: Final = {
    "send": """\b
Examples:
  linkctl runs send mock '{"count": 5, "delayMs": 200}' --attach
  RUN=$(linkctl runs send echo '"hello"')        # the run id on stdout
  linkctl runs send echo '"hello"' --json | jq -r .runId
  linkctl runs send command @work.json --thread t-42 --title 'nightly build'
  echo '{"count": 3}' | linkctl runs send mock @- -a
""",
    "list": """\b
Examples:
  linkctl runs list
  linkctl runs list --limit 5
  linkctl runs list --all --json | jq -r '.runs[] | select(.status == "failed") | .runId'

\b
--json prints the gateway's document {"runs": [...], "next": CURSOR | null}; with --all, every
run in one document. Runs created before the gateway kept its per-user index are not listed.
""",
    "show": """\b
Examples:
  linkctl runs show RUN_ID
  linkctl runs show RUN_ID --json | jq .status
""",
    "attach": """\b
Examples:
  linkctl runs attach RUN_ID
  linkctl runs attach RUN_ID --after 40        # skip the first 40 events
  linkctl runs attach RUN_ID --json > run.ndjson
""",
    "cancel": """\b
Examples:
  linkctl runs cancel RUN_ID
""",
}


def register(app: typer.Typer) -> None:
    runs_app = typer.Typer(
        name="runs", help=RUNS_HELP, no_args_is_help=True, rich_markup_mode=None, epilog=EXIT_STATUS
    )
    for name, func in (
        ("send", send_command),
        ("list", list_command),
        ("show", show_command),
        ("attach", attach_command),
        ("cancel", cancel_command),
    ):
        runs_app.command(name, epilog=_EPILOGS[name] + "\n" + EXIT_STATUS)(func)
    runs_app.command("dead-letters", epilog=DEAD_LETTERS_EPILOG + "\n" + EXIT_STATUS)(dead_letters_command)
    from .run_messages import register as register_messages  # it uses parse_input from here

    register_messages(runs_app, EXIT_STATUS)
    app.add_typer(runs_app, name="runs")
