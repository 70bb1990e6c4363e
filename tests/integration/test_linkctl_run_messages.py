"""``linkctl runs context|signal|messages|validate`` as real processes against a real gateway app
(JetStream nats-server) and a real linkd desktop (routes, run manager, mock runner, uplink)."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator

import pytest

from cli import exitcodes
from cli.nats_server import NatsServer
from linkd.runners import EchoRunner, MockRunner
from studio_gateway.auth import issue_token
from tests.helpers import NatsServerFactory
from tests.integration.gateway_runs_harness import Desktop, RunsGateway, runs_gateway, start_desktop
from tests.integration.linkctl_harness import LINKCTL

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def js_server(nats_server_factory: NatsServerFactory) -> NatsServer:
    return nats_server_factory(jetstream=True)


@pytest.fixture
async def gw(js_server: NatsServer) -> AsyncIterator[RunsGateway]:
    async with runs_gateway(js_server.url) as gateway:
        yield gateway


@pytest.fixture
async def desk(js_server: NatsServer) -> AsyncIterator[Desktop]:
    desktop = await start_desktop(js_server.url, "erin", runners={"echo": EchoRunner(), "mock": MockRunner()})
    try:
        yield desktop
    finally:
        await desktop.close()


async def linkctl(gw: RunsGateway, *args: str, user: str = "erin") -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINKCTL_")}
    env.update(
        NO_COLOR="1",
        LINKCTL_GATEWAY=str(gw.client.make_url("")).rstrip("/"),
        LINKCTL_TOKEN=issue_token(gw.config.auth, user, 300),
    )
    proc = await asyncio.create_subprocess_exec(
        *LINKCTL, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_context_signal_messages_and_validate(gw: RunsGateway, desk: Desktop) -> None:
    code, out, err = await linkctl(gw, "runs", "validate", "mock", '{"count": 2}', "--json")
    assert code == exitcodes.OK, err
    assert json.loads(out)["ok"] is True
    code, out, err = await linkctl(gw, "runs", "validate", "mock", '{"count": 2}', user="nobody")
    assert code == exitcodes.OFFLINE and "desktop_unreachable" in err and "Traceback" not in err
    code, _, err = await linkctl(gw, "runs", "validate", "mock", '{"count": -2}')
    assert code == exitcodes.USAGE and "invalid_field" in err

    run_id = await gw.start_run("erin", {"runner": "mock", "input": {"count": 4000, "delayMs": 50}})
    await gw.wait_status("erin", run_id, {"in_progress"})
    code, out, err = await linkctl(gw, "runs", "context", run_id, "--text", "use staging", "--key", "c1")
    assert code == exitcodes.OK, err
    message_id = out.strip()
    assert message_id.startswith("msg_") and "acknowledged" in err
    code, out, err = await linkctl(
        gw, "runs", "context", run_id, "--text", "use staging", "--key", "c1", "--json"
    )
    assert (
        code == exitcodes.OK
        and json.loads(out)["messageId"] == message_id
        and json.loads(out)["idempotentReplay"]
    )
    code, out, err = await linkctl(
        gw,
        "runs",
        "signal",
        run_id,
        "build.pause",
        "--severity",
        "warning",
        "--payload",
        '{"s": 5}',
        "--json",
    )
    assert code == exitcodes.OK, err
    assert json.loads(out)["kind"] == "signal" and json.loads(out)["status"] == "acknowledged"
    code, _, err = await linkctl(gw, "runs", "signal", run_id, "x", "--severity", "loud")
    assert code == exitcodes.USAGE and "--severity" in err

    code, out, err = await linkctl(gw, "runs", "messages", run_id, "--json")
    assert code == exitcodes.OK, err
    listing = json.loads(out)
    assert [m["kind"] for m in listing["messages"]] == ["kickoff", "context", "signal"]
    code, out, err = await linkctl(gw, "runs", "messages", run_id)
    assert code == exitcodes.OK, err
    lines = out.splitlines()
    assert len(lines) == 3 and message_id in lines[1] and "acknowledged" in lines[1]

    await gw.cancel("erin", run_id)
    await gw.wait_status("erin", run_id, {"cancelled"})
    code, _, err = await linkctl(gw, "runs", "context", run_id, '"late"')
    assert code == exitcodes.CONFLICT and "run_finished" in err
    code, _, err = await linkctl(gw, "runs", "messages", "run_nope")
    assert code == exitcodes.NOT_FOUND
