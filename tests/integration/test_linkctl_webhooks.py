"""``linkctl webhooks add|list|deliveries|remove`` (a real linkctl process) against a real gateway
(in-process) on a JetStream nats-server, delivering to a real receiver."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from cli import exitcodes
from cli.nats_server import NatsServer, free_port
from studio_gateway.auth import issue_token
from tests.helpers import NatsServerFactory, wait_until
from tests.integration.gateway_runs_harness import RunsGateway, accepting_desktop, publish_event
from tests.integration.linkctl_harness import LINKCTL
from tests.integration.test_webhooks import TEST_ENV, started_run, webhook_gateway
from tests.integration.webhook_receiver import WebhookReceiver

pytestmark = pytest.mark.timeout(120)

USER = "cli-hooks"


@pytest.fixture
def js_server(nats_server_factory: NatsServerFactory) -> NatsServer:
    return nats_server_factory(jetstream=True)


async def linkctl(gw: RunsGateway, *args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINKCTL_")}
    env.update(
        NO_COLOR="1",
        LINKCTL_GATEWAY=str(gw.client.make_url("")).rstrip("/"),
        LINKCTL_TOKEN=issue_token(gw.config.auth, USER, 300),
    )
    proc = await asyncio.create_subprocess_exec(
        *LINKCTL, "webhooks", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_linkctl_webhooks(js_server: NatsServer) -> None:
    receiver = WebhookReceiver(free_port())
    await receiver.start()
    async with webhook_gateway(js_server.url, TEST_ENV) as gw:
        desktop = await accepting_desktop(js_server.url, USER)
        try:
            run_id = await started_run(gw, desktop, USER)
            code, out, err = await linkctl(gw, "add", receiver.url, "--run", run_id, "--json")
            assert code == 0, err
            hook = json.loads(out)
            assert hook["runId"] == run_id and hook["secret"].startswith("whsec_")
            receiver.secrets.append(hook["secret"])
            code, out, err = await linkctl(gw, "add", receiver.url, "--event", "stage")
            assert code == 0, err
            assert "secret: whsec_" in out and "shown once" in out
            await publish_event(
                desktop.nc, desktop.hostname, run_id, 1, "done", finalSeq=1, status="completed"
            )
            await wait_until(lambda: len(receiver.unique) == 1, 20)

            async def succeeded() -> str | None:
                code, out, _ = await linkctl(gw, "deliveries", hook["id"])
                return out if code == 0 and "succeeded" in out else None

            line = await wait_until(succeeded, 20, interval=0.2)
            assert run_id in line and "attempts 1" in line and "last 200" in line
            code, out, err = await linkctl(gw, "deliveries", hook["id"], "--json")
            assert code == 0, err
            assert [d["status"] for d in json.loads(out)["deliveries"]] == ["succeeded"]
            code, out, err = await linkctl(gw, "list", "--run", run_id, "--json")
            assert code == 0 and [h["id"] for h in json.loads(out)["webhooks"]] == [hook["id"]]
            code, out, err = await linkctl(gw, "list")
            assert code == 0 and len(out.splitlines()) == 2 and "secret" not in out
            code, out, err = await linkctl(gw, "remove", hook["id"])
            assert code == 0 and f"removed {hook['id']}" in out
            code, out, err = await linkctl(gw, "remove", hook["id"])
            assert code == exitcodes.NOT_FOUND and "webhook_not_found" in err and len(err.splitlines()) == 1
            code, out, err = await linkctl(gw, "add", "ftp://example.com/x")
            assert code == exitcodes.USAGE and "invalid_url" in err
            code, out, err = await linkctl(gw, "add", receiver.url, "--event", "heartbeat")
            assert code == exitcodes.USAGE and "--event" in err
        finally:
            await desktop.close()
            await receiver.stop()
