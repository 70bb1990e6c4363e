"""``linkctl demo``: the whole product in one command, checked, timed and torn down.

Starts the local stack (:mod:`cli.stack`) in a fresh temporary state directory, probes
presence through the gateway (``GET /api/links/me``), sends a ``mock`` run
(``POST /api/runs``), streams its output live over SSE (``GET /api/runs/{id}/events``),
checks that every event arrived once and in order and the run completed, prints the
timings, and stops everything. Exit status 0 only when all of that held.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Final

import typer

from contract.routes import ME_PATH

from . import exitcodes
from .common import CliError
from .dev import ClusterOpt, StateDirOpt, ignoring_signals, stack_options, stack_signals
from .gateway_api import GatewayClient, GatewayOptions
from .run_stream import END, follow
from .stack import DEFAULT_READY_TIMEOUT, DEFAULT_USER, LocalStack
from .term import Painter

__all__ = ["DemoResult", "register"]

DEFAULT_CHUNKS: Final = 5
DEFAULT_DELAY_MS: Final = 200
# Five chunks 200 ms apart take one second; a loaded machine gets a generous bound.
DEFAULT_RUN_TIMEOUT: Final = 60.0

EPILOG: Final = """\b
Examples:
  linkctl demo
  linkctl demo --chunks 20 --delay-ms 50
  linkctl demo --cluster 3                                 # the same on a 3-node nats-server cluster
  linkctl demo --state-dir ./.linkctl-demo --keep-state   # keep keys and logs to look at

\b
Exit status:
     0  the desktop was online, the run completed with every event in order, all stopped
     2  bad option
     8  a part of the stack did not start or died (its last log lines are printed)
     9  a check failed (desktop offline, run not completed, events missing or out of order)
   130  interrupted (everything is stopped all the same)
"""


class DemoFailed(CliError):
    def __init__(self, message: str) -> None:
        super().__init__(message, exitcodes.DEMO_FAILED)


@dataclass
class DemoResult:
    stack_start: float = 0.0
    probe_ms: float = 0.0
    first_event_ms: float | None = None
    run_seconds: float = 0.0
    events: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)


def check_events(events: list[dict[str, Any]], final: dict[str, Any]) -> None:
    """Every event once, in order (seq 1..n), ending with ``done`` completed, as the state says."""
    seqs = [e.get("seq") for e in events]
    if seqs != list(range(1, len(events) + 1)):
        raise DemoFailed(f"the run's events are not 1..{len(events)} in order: {seqs}")
    if not events or events[-1].get("type") != "done":
        raise DemoFailed("the run's last event is not 'done'")
    done = events[-1]
    if done.get("status") != "completed":
        raise DemoFailed(f"the run ended {done.get('status')}: {done.get('reason') or '-'}")
    if done.get("finalSeq") != done.get("seq"):
        raise DemoFailed(f"done.finalSeq {done.get('finalSeq')} is not its seq {done.get('seq')}")
    if final.get("status") != "completed":
        raise DemoFailed(
            f"the gateway says the run is {final.get('status')} "
            f"({final.get('failureKind')}: {final.get('failureReason')})"
        )
    if final.get("finalSeq") not in (None, len(events)):
        raise DemoFailed(f"the gateway's finalSeq {final.get('finalSeq')} is not {len(events)}")


async def _probe_and_run(
    stack: LocalStack, chunks: int, delay_ms: int, run_timeout: float, result: DemoResult, paint: Painter
) -> None:
    options = GatewayOptions(stack.gateway_url, stack.token)
    async with GatewayClient(options) as client:
        started = time.perf_counter()
        me = await client.call("GET", ME_PATH)
        result.probe_ms = (time.perf_counter() - started) * 1000
        if me.get("online") is not True:
            raise DemoFailed(f"the desktop is not online: {me.get('reason')}: {me.get('detail')}")
        capabilities = ", ".join(map(str, me.get("capabilities") or []))
        print(
            f"{paint('[2/4]', 'bold')} probed presence: GET /api/links/me -> online as "
            f"{me.get('tunnelHostname')} (desktop {me.get('hostname')!r}, capabilities {capabilities}) "
            f"in {result.probe_ms:.1f} ms",
            flush=True,
        )
        body = {
            "runner": "mock",
            "input": {"count": chunks, "delayMs": delay_ms, "prefix": "demo chunk"},
            "title": "linkctl demo",
        }
        dispatched = time.perf_counter()
        accepted = await client.call("POST", "/api/runs", body=body, ok=(200, 201, 202))
        run_id = str(accepted.get("runId"))
        print(
            f"{paint('[3/4]', 'bold')} run: POST /api/runs runner=mock count={chunks} delayMs={delay_ms} "
            f"-> {run_id} ({accepted.get('status')}); streaming GET /api/runs/{run_id}/events",
            flush=True,
        )

        async def stream() -> None:
            async for item in follow(client, run_id):
                if item.kind == END:
                    result.final = item.data
                    return
                event = item.data
                if result.first_event_ms is None:
                    result.first_event_ms = (time.perf_counter() - dispatched) * 1000
                result.events.append(event)
                kind = event.get("type")
                if kind == "output":
                    for line in str(event.get("data", "")).splitlines():
                        print(f"      {paint('|', 'dim')} {line}", flush=True)
                elif kind == "stage":
                    print(paint(f"      · stage {event.get('stage')}", "dim"), flush=True)
                elif kind == "done":
                    print(f"      · done: {event.get('status')}", flush=True)

        try:
            await asyncio.wait_for(stream(), run_timeout)
        except TimeoutError:
            raise DemoFailed(
                f"run {run_id} did not finish within {run_timeout:g} s ({len(result.events)} events so far)"
            ) from None
        result.run_seconds = time.perf_counter() - dispatched
        check_events(result.events, result.final)
        print(
            f"      run {run_id} completed: {len(result.events)} events, "
            f"seq 1..{len(result.events)} in order, none missing or repeated",
            flush=True,
        )


def _timings(result: DemoResult, paint: Painter) -> str:
    first = f"{result.first_event_ms:.1f} ms" if result.first_event_ms is not None else "-"
    rows = [
        ("stack start", f"{result.stack_start:.2f} s"),
        ("presence probe", f"{result.probe_ms:.1f} ms"),
        ("dispatch -> first event", first),
        ("run duration", f"{result.run_seconds:.2f} s"),
    ]
    return "\n".join([paint("Timings:", "bold")] + [f"  {name:<24} {value}" for name, value in rows])


def demo_command(
    state_dir: StateDirOpt = None,
    chunks: Annotated[
        int, typer.Option("--chunks", metavar="N", min=1, max=10000, help="Output chunks of the run.")
    ] = DEFAULT_CHUNKS,
    delay_ms: Annotated[
        int, typer.Option("--delay-ms", metavar="MS", min=0, max=10000, help="Pause before each chunk.")
    ] = DEFAULT_DELAY_MS,
    run_timeout: Annotated[
        float, typer.Option("--run-timeout", metavar="SECONDS", help="Bound on the run.")
    ] = DEFAULT_RUN_TIMEOUT,
    ready_timeout: Annotated[
        float,
        typer.Option("--ready-timeout", metavar="SECONDS", help="How long each part may take to start."),
    ] = DEFAULT_READY_TIMEOUT,
    keep_state: Annotated[
        bool, typer.Option("--keep-state", help="Keep the state directory (keys, logs) afterwards.")
    ] = False,
    cluster: ClusterOpt = 1,
) -> None:
    """Start the local stack, probe presence, stream a run end to end, print timings, tear down."""
    if run_timeout <= 0:
        raise CliError(f"--run-timeout: must be more than 0 seconds (got {run_timeout:g})")
    temporary = state_dir is None
    directory = Path(tempfile.mkdtemp(prefix="linkctl-demo-")) if state_dir is None else state_dir
    options = stack_options(directory, DEFAULT_USER, 0, 0, 0, ready_timeout, cluster)
    paint = Painter.for_stream(sys.stdout)
    result = DemoResult()
    stack = LocalStack(options, say=lambda line: print(line, flush=True))
    status = exitcodes.OK
    failure: CliError | None = None
    servers = "nats-server" if cluster == 1 else f"a {cluster}-node nats-server cluster"
    print(
        paint("linkctl demo", "bold") + f": {servers} + studio-gateway + linkd on this machine, "
        "one presence probe and one run through all of them",
        flush=True,
    )
    print(f"{paint('[1/4]', 'bold')} starting the local stack in {options.state_dir}", flush=True)
    with stack_signals():
        try:
            stack.start()
            result.stack_start = stack.started_in
            print(f"      stack ready in {stack.started_in:.2f} s (gateway {stack.gateway_url})", flush=True)
            asyncio.run(_probe_and_run(stack, chunks, delay_ms, run_timeout, result, paint))
            dead = stack.dead_child()
            if dead is not None:
                raise DemoFailed(f"{dead.name} died during the demo; last lines:\n{dead.log_tail()}")
        except CliError as exc:
            failure = exc
        except KeyboardInterrupt:
            print("\nlinkctl demo: interrupted; stopping", flush=True)
            status = exitcodes.INTERRUPTED
        finally:
            print(f"{paint('[4/4]', 'bold')} tearing down", flush=True)
            with ignoring_signals():
                stack.stop()
            leftovers = [c.name for c in stack.children if c.returncode is None]
            if temporary and not keep_state:
                shutil.rmtree(directory, ignore_errors=True)
    if leftovers:
        failure = failure or DemoFailed(f"still running after the tear-down: {', '.join(leftovers)}")
    print(f"      torn down: {'nothing' if not leftovers else ', '.join(leftovers)} left running", flush=True)
    if failure is not None:
        print(_timings(result, paint), flush=True)
        raise failure
    if status != exitcodes.OK:
        raise typer.Exit(status)
    print(_timings(result, paint), flush=True)
    print(
        paint("demo OK", "bold", "green")
        + ": probed online, run completed with every event in order, everything torn down",
        flush=True,
    )


def register(app: typer.Typer) -> None:
    app.command("demo", epilog=EPILOG)(demo_command)
