"""``linkd up`` as a process with its JetStream uplink (the default) and with ``--no-uplink``."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import httpx
import pytest

from tests.helpers import NatsServerFactory, wait_until
from tests.integration.gateway_harness import OperatorServer, start_operator_server
from tests.integration.linkd_harness import live_gateway
from tests.integration.test_linkd_cli_process import linkd, linkd_up, login
from tests.linkd_support import jsonl, subprocess_env

pytestmark = [pytest.mark.timeout(90), pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")]

TIMEOUT = 20.0


@pytest.fixture
def op(nats_server_factory: NatsServerFactory, tmp_path: Path) -> OperatorServer:
    return start_operator_server(nats_server_factory, tmp_path, jetstream=True)


async def test_linkd_up_uplinks_runs_by_default_and_status_shows_the_outbox(
    op: OperatorServer, tmp_path: Path
) -> None:
    env = subprocess_env(tmp_path)
    events_file = tmp_path / "events.jsonl"
    async with live_gateway(op.env()) as gw:
        token = await login(gw, env, "dora")
        headers = {"Authorization": f"Bearer {token}"}
        async with (
            linkd_up(env, "--events-file", str(events_file), "--heartbeat-interval", "0.2") as daemon,
            httpx.AsyncClient(base_url=gw.url, headers=headers) as http,
        ):
            await daemon.wait_state("online")
            answers: list[httpx.Response] = []

            async def posted() -> bool:
                body = {"runner": "mock", "input": {"count": 200, "delayMs": 2}}
                answers.append(await http.post("/api/runs", json=body))
                return answers[-1].status_code != 503  # the gateway's runs may still be starting

            await wait_until(posted, TIMEOUT, interval=0.1)
            assert answers[-1].status_code == 202, answers[-1].text
            run_id = answers[-1].json()["runId"]

            async def completed() -> bool:
                return bool((await http.get(f"/api/runs/{run_id}")).json()["status"] == "completed")

            await wait_until(
                completed, TIMEOUT, interval=0.1, message="the gateway never saw the run complete"
            )
            state = (await http.get(f"/api/runs/{run_id}")).json()
            tee = [e for e in jsonl(events_file) if e["runId"] == run_id]  # --events-file still works
            assert [e["seq"] for e in tee] == list(range(1, state["finalSeq"] + 1))
            assert any(e["type"] == "heartbeat" for e in tee)  # --heartbeat-interval 0.2 over ~0.4 s

            async def status_idle() -> bool:
                code, out, _ = await linkd(env, "status")
                return code == 0 and "run uplink:  idle, 0 event(s) waiting" in out

            await wait_until(
                status_idle, TIMEOUT, interval=0.5, message="linkd status never showed the uplink"
            )
            _, out, _ = await linkd(env, "status", "--json")
            uplink = json.loads(out)["uplink"]
            assert (
                uplink["outbox"] == 0
                and uplink["delivered"] >= state["finalSeq"]
                and uplink["lastError"] is None
            )

            daemon.proc.send_signal(signal.SIGTERM)
            assert await daemon.proc.wait() == 0
        assert not any("were not delivered" in line.get("message", "") for line in daemon.lines)


async def test_linkd_up_no_uplink_keeps_events_in_memory(op: OperatorServer, tmp_path: Path) -> None:
    env = subprocess_env(tmp_path)
    async with live_gateway(op.env()) as gw:
        await login(gw, env, "erin")
        async with linkd_up(env, "--no-uplink") as daemon:
            await daemon.wait_state("online")
            code, out, _ = await linkd(env, "status", "--json")
            assert code == 0 and json.loads(out)["uplink"] is None
            code, out, _ = await linkd(env, "status")
            assert code == 0 and "run uplink" not in out
            daemon.proc.send_signal(signal.SIGTERM)
            assert await daemon.proc.wait() == 0
