"""``LinkDaemon`` with its JetStream uplink, the real gateway (operator mode, runs on) and nats-server.

The daemon's credential comes from the gateway (the uplink grant and the host inbox prefix are
what make its publish acks arrive); the run is created through ``POST /api/runs`` and the
gateway's own projector has to agree that it completed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from nats.js import JetStreamContext

import tunnel
from contract.run_protocol import RUN_STREAM, run_event_subject, split_events
from linkd.config import RunnerSettings
from linkd.credentials_store import generate_seed
from linkd.daemon import LinkDaemon, State
from linkd.session import GatewayClient
from linkd.uplink import JetStreamUplink
from tests.helpers import NatsServerFactory, wait_until
from tests.integration.gateway_harness import OperatorServer, start_operator_server
from tests.integration.linkd_harness import LiveGateway, daemon_settings, live_gateway
from tunnel.backoff import Backoff

pytestmark = pytest.mark.timeout(90)

TIMEOUT = 20.0


@pytest.fixture
def op(nats_server_factory: NatsServerFactory, tmp_path: Path) -> OperatorServer:
    return start_operator_server(nats_server_factory, tmp_path, jetstream=True)


@asynccontextmanager
async def daemon_with_uplink(
    tmp_path: Path, gw: LiveGateway, user: str, *, drain: float = 2.0
) -> AsyncIterator[tuple[LinkDaemon, JetStreamUplink, asyncio.Task[None]]]:
    uplink = JetStreamUplink()
    settings = replace(
        daemon_settings(tmp_path, runners=RunnerSettings(heartbeat_interval=0.2)), drain_timeout=drain
    )
    daemon = LinkDaemon(
        settings,
        GatewayClient(gw.url, lambda: gw.token(user)),
        own_seed=generate_seed(),
        uplink=uplink,
        machine_name=lambda: "uplink-desktop",
        retry_backoff=Backoff(initial=0.2, cap=1.0),
    )
    task = asyncio.ensure_future(daemon.run())
    try:
        await wait_until(lambda: daemon.state is State.ONLINE, TIMEOUT, message="daemon never online")
        yield daemon, uplink, task
    finally:
        daemon.request_stop("test over")
        await asyncio.wait_for(task, TIMEOUT)


async def post_run(http: httpx.AsyncClient, body: dict[str, Any]) -> str:
    """``POST /api/runs`` once the gateway's runs are ready (503 ``runs_unavailable`` while starting)."""
    answers: list[httpx.Response] = []

    async def accepted() -> bool:
        answers.append(await http.post("/api/runs", json=body))
        return answers[-1].status_code != 503

    await wait_until(accepted, TIMEOUT, interval=0.1, message="the gateway's runs never became ready")
    assert answers[-1].status_code == 202, answers[-1].text
    run_id: str = answers[-1].json()["runId"]
    return run_id


async def stored(js: JetStreamContext, subject: str) -> list[tuple[str, dict[str, Any]]]:
    """(msg id, event) of every message of one run subject, in stream order."""
    info = await js.stream_info(RUN_STREAM)
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg(RUN_STREAM, seq)
        if msg.subject == subject and msg.data is not None:
            for line in split_events(msg.data):  # one event, or a batch (one per line)
                out.append(((msg.headers or {}).get("Nats-Msg-Id", ""), json.loads(line)))
    return out


async def test_a_run_from_the_gateway_is_uplinked_exactly_once_and_the_projector_completes_it(
    op: OperatorServer, tmp_path: Path
) -> None:
    async with (
        live_gateway(op.env()) as gw,
        daemon_with_uplink(tmp_path, gw, "alice") as (daemon, uplink, _),
        httpx.AsyncClient(base_url=gw.url, headers={"Authorization": f"Bearer {gw.token('alice')}"}) as http,
    ):
        run_id = await post_run(http, {"runner": "mock", "input": {"count": 300}})

        async def finished() -> bool:
            state = (await http.get(f"/api/runs/{run_id}")).json()
            return bool(state["status"] == "completed")

        await wait_until(finished, TIMEOUT, interval=0.1, message="the gateway never saw the run complete")
        state = (await http.get(f"/api/runs/{run_id}")).json()
        assert await uplink.flush(TIMEOUT)
        doc = daemon.status_document()["uplink"]
        assert doc["outbox"] == 0 and doc["lastError"] is None and doc["delivered"] >= state["finalSeq"]

        assert daemon.session is not None
        subjects = tunnel.HostSubjects.for_host(daemon.session.hostname, daemon.session.prefix)
        events = await stored(gw.nc.jetstream(), run_event_subject(subjects, run_id))
        final_seq = state["finalSeq"]
        assert [e["seq"] for _, e in events] == list(range(1, final_seq + 1))
        execution = events[0][0].rsplit(":", 1)[1]
        assert len(execution) == 16
        for msg_id, event in events:  # its own id, or its batch's: <run>:<fence>:<first>-<last>:<execution>
            head, _, seqs = msg_id.removesuffix(f":{execution}").rpartition(":")
            first, _, last = seqs.partition("-")
            assert head == f"{run_id}:{event['fence']}", msg_id
            assert int(first) <= event["seq"] <= int(last or first), msg_id
        assert events[-1][1]["type"] == "done" and events[-1][1]["status"] == "completed"
        assert sum(1 for _, e in events if e["type"] == "output") == 300


async def test_stopping_the_daemon_mid_run_flushes_the_cancelled_run_before_the_connection_closes(
    op: OperatorServer, tmp_path: Path
) -> None:
    async with live_gateway(op.env()) as gw:
        headers = {"Authorization": f"Bearer {gw.token('bob')}"}
        async with (
            httpx.AsyncClient(base_url=gw.url, headers=headers) as http,
            daemon_with_uplink(tmp_path, gw, "bob", drain=3.0) as (daemon, uplink, task),
        ):
            run_id = await post_run(http, {"runner": "mock", "input": {"count": 100000, "delayMs": 5}})
            await wait_until(lambda: uplink.outbox.acked_total >= 20, TIMEOUT, message="no events delivered")
            assert daemon.session is not None
            subject = run_event_subject(
                tunnel.HostSubjects.for_host(daemon.session.hostname, daemon.session.prefix), run_id
            )
            daemon.request_stop("SIGTERM in a test")
            await asyncio.wait_for(task, 3.0 + 2.0)
            assert daemon.state is State.STOPPED
            assert uplink.status()["state"] == "closed" and len(uplink.outbox) == 0

        events = await stored(gw.nc.jetstream(), subject)
        seqs = [e["seq"] for _, e in events]
        assert seqs == list(range(1, len(seqs) + 1))
        done = events[-1][1]
        assert done["type"] == "done" and done["status"] == "cancelled"
        assert done["reason"] == "the desktop daemon is shutting down"


async def test_a_run_spanning_credential_refreshes_is_uplinked_exactly_once(
    op: OperatorServer, tmp_path: Path
) -> None:
    async with (
        live_gateway(op.env(NATS_TUNNEL_SESSION_TTL_SECONDS="4")) as gw,
        daemon_with_uplink(tmp_path, gw, "carol") as (daemon, uplink, _),
        httpx.AsyncClient(base_url=gw.url, headers={"Authorization": f"Bearer {gw.token('carol')}"}) as http,
    ):
        run_id = await post_run(http, {"runner": "mock", "input": {"count": 1500, "delayMs": 4}})

        async def finished() -> bool:
            return bool((await http.get(f"/api/runs/{run_id}")).json()["status"] == "completed")

        await wait_until(finished, 45.0, interval=0.1, message="the gateway never saw the run complete")
        assert daemon.refreshes >= 2, "the run did not span two credential refreshes"
        assert await uplink.flush(TIMEOUT)
        assert daemon.session is not None
        subject = run_event_subject(
            tunnel.HostSubjects.for_host(daemon.session.hostname, daemon.session.prefix), run_id
        )
        events = await stored(gw.nc.jetstream(), subject)
        final_seq = (await http.get(f"/api/runs/{run_id}")).json()["finalSeq"]
        assert sorted(e["seq"] for _, e in events) == list(range(1, final_seq + 1))
        print(f"\n{final_seq} events across {daemon.refreshes} refreshes, {uplink.retries} re-sent")
