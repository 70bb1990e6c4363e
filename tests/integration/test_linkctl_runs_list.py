"""``linkctl runs list`` (a real linkctl process) against a real gateway on a JetStream nats-server."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import pytest

from cli import exitcodes
from cli.nats_server import NatsServer
from studio_gateway.auth import issue_token
from tests.helpers import NatsServerFactory
from tests.integration.gateway_runs_harness import RunsGateway, runs_gateway
from tests.integration.linkctl_harness import LINKCTL

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def js_server(nats_server_factory: NatsServerFactory) -> NatsServer:
    return nats_server_factory(jetstream=True)


async def linkctl(gw: RunsGateway, user: str, *args: str, gateway: str | None = None) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINKCTL_")}
    env.update(
        NO_COLOR="1",
        LINKCTL_GATEWAY=gateway or str(gw.client.make_url("")).rstrip("/"),
        LINKCTL_TOKEN=issue_token(gw.config.auth, user, 300),
    )
    proc = await asyncio.create_subprocess_exec(
        *LINKCTL, "runs", "list", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def ended_runs(gw: RunsGateway, user: str, count: int) -> list[dict[str, Any]]:
    """``count`` runs (failed at once: no desktop), newest first, as GET /api/runs/{id} shows them."""
    ids = [await gw.start_run(user, {"runner": "echo", "title": f"job  {i}\nx"}) for i in range(count)]
    states = [await gw.wait_status(user, run_id, {"failed"}) for run_id in ids]
    return sorted(states, key=lambda s: (s["createdAt"], s["runId"]), reverse=True)


async def test_runs_list_lines_json_paging_and_all(js_server: NatsServer) -> None:
    async with runs_gateway(js_server.url) as gw:
        runs = await ended_runs(gw, "cli-lister", 3)
        await ended_runs(gw, "cli-other", 1)

        code, out, err = await linkctl(gw, "cli-lister")
        assert code == 0, err
        lines = out.splitlines()
        assert [line.split()[0] for line in lines] == [s["runId"] for s in runs]
        for line, state in zip(lines, runs, strict=True):
            assert line.split()[1:3] == ["failed", "echo"]
            assert line.endswith(f"  {' '.join(state['title'].split())}")
        assert "Traceback" not in err and "more:" not in err

        code, out, err = await linkctl(gw, "cli-lister", "--limit", "2", "--json")
        assert code == 0, err
        page = json.loads(out)
        assert page["runs"] == runs[:2] and page["next"]
        code, out, err = await linkctl(gw, "cli-lister", "-n", "2")
        assert code == 0 and len(out.splitlines()) == 2
        assert f"--before {page['next']}" in err
        code, out, err = await linkctl(gw, "cli-lister", "--before", page["next"], "--json")
        assert code == 0, err
        assert json.loads(out) == {"runs": runs[2:], "next": None}

        code, out, err = await linkctl(gw, "cli-lister", "--limit", "1", "--all", "--json")
        assert code == 0, err
        assert json.loads(out) == {"runs": runs, "next": None}
        code, out, err = await linkctl(gw, "cli-lister", "--limit", "1", "--all")
        assert code == 0 and [line.split()[0] for line in out.splitlines()] == [s["runId"] for s in runs]

        code, out, err = await linkctl(gw, "cli-nobody")
        assert (code, out) == (0, "") and "no runs" in err


async def test_runs_list_errors_are_one_line_with_the_exit_status(js_server: NatsServer) -> None:
    async with runs_gateway(js_server.url) as gw:
        for args in (("--limit", "0"), ("--limit", "101"), ("--before", "not a cursor")):
            code, out, err = await linkctl(gw, "cli-errors", *args)
            assert code == exitcodes.USAGE, (args, err)
            assert out == "" and "Traceback" not in err
        # A cursor of the right characters but the wrong shape: the gateway's 422, said in one line.
        code, out, err = await linkctl(gw, "cli-errors", "--before", "abc")
        assert code == exitcodes.USAGE and "invalid_field" in err and "before" in err
        assert "Traceback" not in err
        code, _, err = await linkctl(gw, "cli-errors", "--gateway-token", "wrong")
        assert code == exitcodes.USAGE and "refused the token" in err and "Traceback" not in err
    code, _, err = await linkctl(gw, "cli-errors", gateway="http://127.0.0.1:1")
    assert code == exitcodes.USAGE and "cannot reach the gateway" in err and "Traceback" not in err
