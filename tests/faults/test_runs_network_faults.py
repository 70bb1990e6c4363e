"""Runs while the desktop's network misbehaves: every run ends, no event is lost or applied twice.

Real pieces: an operator-mode nats-server with JetStream, the gateway app on a port (runs,
projector, reaper), and an in-process ``LinkDaemon`` with the JetStream run uplink, exactly
as ``linkd up`` wires it. The daemon's NATS connection goes through a ``FaultProxy`` (the
gateway hands out the proxy's URL as the public NATS URL). Every event the daemon emitted is
also written to a JSONL file: that is the desktop's truth the gateway's export is compared to.

Faults, each with several mock runs in flight:
- a pause shorter than the reaper's liveness timeout: every run completes, and the gateway has
  exactly the desktop's events (same seq, same content, none twice);
- a blackhole, then the link healed (the connection is reset, nats-py reconnects, the uplink
  redelivers what was not acknowledged): same promise, message-id dedup proven by the export;
- nats-server killed with SIGKILL and restarted (JetStream keeps its file store): every run
  ends, and the gateway's events are still a duplicate-free prefix of (or equal to) the truth;
- a pause longer than the liveness timeout: runs may be failed ``desktop_lost`` by the reaper
  (or complete, if their end got through first), but every run is terminal, events that arrive
  late never revive it, and whatever the gateway kept is a duplicate-free prefix of the truth.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import httpx
import pytest

from linkd.config import RunnerSettings
from linkd.credentials_store import generate_seed
from linkd.daemon import LinkDaemon, State
from linkd.run_events import JsonlFileSink, TeeSink
from linkd.session import GatewayClient
from linkd.uplink import JetStreamUplink
from tests.faultproxy import FaultProxy
from tests.helpers import NatsServerFactory, wait_until
from tests.integration.gateway_harness import start_operator_server
from tests.integration.linkd_harness import daemon_settings, live_gateway
from tests.integration.runs_harness import RunsApi
from tests.linkd_support import jsonl
from tunnel.backoff import Backoff

pytestmark = pytest.mark.timeout(120)

LIVENESS: Final = 4.0  # the reaper fails a run silent for this long
# The uplink republishes an event whose ack has not come back after this long. Production
# defaults are 5 s against a 60 s liveness timeout; both are scaled down here, keeping
# the ack timeout well inside the liveness timeout as the defaults do.
ACK_TIMEOUT: Final = 0.5
RUNS_PER_FAULT: Final = 3
TERMINAL: Final = ("completed", "failed", "cancelled")


@asynccontextmanager
async def uplinked_daemon(tmp_path: Path, gateway_url: str, token: str) -> AsyncIterator[LinkDaemon]:
    uplink = JetStreamUplink(ack_timeout=ACK_TIMEOUT)
    sink = TeeSink(JsonlFileSink(tmp_path / "events.jsonl"), uplink)
    settings = daemon_settings(tmp_path, runners=RunnerSettings(heartbeat_interval=0.3))
    daemon = LinkDaemon(
        settings,
        GatewayClient(gateway_url, lambda: token),
        own_seed=generate_seed(),
        sink=sink,
        uplink=uplink,
        machine_name=lambda: "chaos-desktop",
        retry_backoff=Backoff(initial=0.2, cap=1.0),
    )
    task = asyncio.ensure_future(daemon.run())
    try:
        await wait_until(lambda: daemon.state is State.ONLINE, 15.0, message=f"daemon: {daemon.message}")
        yield daemon
    finally:
        daemon.request_stop("test over")
        await asyncio.wait_for(task, 15.0)


def desktop_events(tmp_path: Path, run_id: str) -> list[dict[str, Any]]:
    return [e for e in jsonl(tmp_path / "events.jsonl") if e.get("runId") == run_id]


def check_exactly_once(truth: list[dict[str, Any]], got: list[dict[str, Any]], *, complete: bool) -> None:
    """``got`` (the gateway's export) holds each of ``truth``'s events once, unchanged."""
    seqs = [e["seq"] for e in got]
    assert len(seqs) == len(set(seqs)), f"an event was applied twice: {seqs}"
    assert seqs == sorted(seqs), f"export out of order: {seqs}"
    by_seq = {e["seq"]: e for e in truth}
    for event in got:
        assert event["seq"] in by_seq, f"the gateway has an event the desktop never sent: {event}"
        sent = by_seq[event["seq"]]
        assert {k: event.get(k) for k in sent} == sent, (sent, event)
    if complete:
        assert seqs == sorted(by_seq), f"events lost: desktop {sorted(by_seq)}, gateway {seqs}"
    else:
        assert seqs == list(range(1, len(seqs) + 1)) or not seqs, f"not a prefix: {seqs}"


async def under_fault(
    api: RunsApi, fault: Callable[[], Awaitable[None]], *, count: int, delay_ms: int
) -> list[str]:
    """Start runs, let them get going, apply ``fault``; returns the run ids."""
    run_ids = [
        (await api.create("mock", {"count": count, "delayMs": delay_ms, "prefix": f"r{i}"}))["runId"]
        for i in range(RUNS_PER_FAULT)
    ]
    for run_id in run_ids:
        await api.wait_state(run_id, lambda s: (s.get("seq") or 0) >= 2, 10.0, f"{run_id} never started")
    await fault()
    return run_ids


async def test_runs_survive_pauses_and_a_blackhole_of_the_desktops_link(
    nats_server_factory: NatsServerFactory, tmp_path: Path
) -> None:
    op = start_operator_server(nats_server_factory, tmp_path, jetstream=True)
    async with FaultProxy(op.server.port) as proxy:
        env = op.env(
            NATS_PUBLIC_URL=proxy.url,
            NATS_TUNNEL_SESSION_TTL_SECONDS="600",
            RUNS_LIVENESS_TIMEOUT_SECONDS=str(LIVENESS),
            RUNS_REAPER_INTERVAL_SECONDS="0.2",
        )
        async with (
            live_gateway(env) as gw,
            uplinked_daemon(tmp_path, gw.url, gw.token("rita")) as daemon,
            httpx.AsyncClient(trust_env=False, timeout=15.0) as http,
        ):
            api = RunsApi(gw.url, gw.token("rita"), http)

            async def runs_ready() -> bool:
                resp = await http.get(f"{gw.url}/api/runs/nope", headers=api.headers)
                return resp.status_code == 404

            await wait_until(runs_ready, 15.0, interval=0.1, message="runs API never ready")

            async def short_pause() -> None:
                proxy.pause()
                await asyncio.sleep(LIVENESS / 4)  # the fault's duration
                proxy.resume()

            async def blackhole() -> None:
                proxy.blackhole()
                await asyncio.sleep(LIVENESS / 3)
                proxy.pass_through()  # the damaged connection is reset: nats-py reconnects

            async def long_pause() -> None:
                proxy.pause()
                await asyncio.sleep(LIVENESS + 1.5)
                proxy.resume()

            async def kill_nats() -> None:
                op.server.kill()  # SIGKILL; JetStream's file store survives, as on a real crash
                op.server.start()

            report: dict[str, dict[str, int]] = {}
            for name, fault, must_complete in (
                ("short-pause", short_pause, True),
                ("blackhole", blackhole, True),
                ("long-pause", long_pause, False),
                ("nats-kill-9", kill_nats, False),
            ):
                run_ids = await under_fault(api, fault, count=25, delay_ms=80)
                finals = [await api.wait_terminal(run_id, 30.0) for run_id in run_ids]
                statuses = [f["status"] for f in finals]
                report[name] = {s: statuses.count(s) for s in set(statuses)}
                # The desktop finishes every run (it never lost them), so its truth is complete.
                for run_id in run_ids:
                    await wait_until(
                        lambda r=run_id: any(e["type"] == "done" for e in desktop_events(tmp_path, r)),  # type: ignore[misc]
                        20.0,
                        message=f"the desktop never finished {run_id}",
                    )
                # Let the uplink deliver what it buffered, then compare.
                await wait_until(
                    lambda: daemon.uplink is not None and daemon.uplink.status().get("outbox", 0) == 0,
                    20.0,
                    message="the uplink never emptied its outbox",
                )
                for run_id, final in zip(run_ids, finals, strict=True):
                    truth = desktop_events(tmp_path, run_id)
                    exported = await api.export(run_id)
                    if must_complete:
                        assert final["status"] == "completed", (
                            name,
                            final["failureKind"],
                            final["failureReason"],
                        )
                        assert final["finalSeq"] == truth[-1]["seq"]
                    else:
                        assert final["status"] in TERMINAL, (name, final)
                        if final["status"] == "failed":
                            assert final["failureKind"] == "desktop_lost", final
                    check_exactly_once(truth, exported, complete=final["status"] == "completed")
                    # Terminal is final: late events did not revive or rewrite the run.
                    again = await api.get(run_id)
                    assert (again["status"], again["finalSeq"]) == (final["status"], final["finalSeq"]), (
                        final,
                        again,
                    )
            print(json.dumps(report))
            assert daemon.state is State.ONLINE
