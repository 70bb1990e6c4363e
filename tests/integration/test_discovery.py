"""NATS micro service discovery: real linkd daemons and a real gateway on an operator-mode
nats-server answer ``$SRV.PING/INFO/STATS``; stats count real traffic; one tenant's
credential never discovers another tenant's desktop; ``linkctl services`` lists what the
caller may see.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from nats.aio.client import Client, RawCredentials

import tunnel
from cli.services import Instance, discover
from contract.discovery import GATEWAY_HEALTH_SUBJECT, GATEWAY_SERVICE, desktop_service_name, status_subject
from contract.run_protocol import uplink_inbox_prefix
from tests.helpers import NatsServerFactory, wait_until
from tests.integration.gateway_harness import OperatorServer, start_operator_server
from tests.integration.linkd_harness import EVENT_TIMEOUT, RunningDaemon, live_gateway, probe, running_daemon

LINKCTL = (sys.executable, "-m", "cli")
WAIT = 1.0  # how long discovery waits for answers (local server: they take milliseconds)
REQUESTS = 7


@pytest.fixture
def op(nats_server_factory: NatsServerFactory, tmp_path: Path) -> OperatorServer:
    return start_operator_server(nats_server_factory, tmp_path)


@asynccontextmanager
async def connected(url: str, creds: str, inbox_prefix: str | None = None) -> AsyncIterator[Client]:
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)  # a tenant's denied publish lands here; the connection stays up

    options: dict[str, Any] = {"inbox_prefix": inbox_prefix} if inbox_prefix else {}
    nc = await nats.connect(
        url,
        user_credentials=RawCredentials(creds),
        error_cb=on_error,
        connect_timeout=EVENT_TIMEOUT,
        **options,
    )
    try:
        yield nc
    finally:
        await nc.close()


async def session_creds(gateway_url: str, token: str) -> tuple[str, str]:
    """(hostname, .creds text) the gateway mints for the token's user (what ``linkctl session`` gets)."""
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(timeout=EVENT_TIMEOUT) as http:
        resp = await http.post(f"{gateway_url}/api/links/session", headers=headers)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    return body["tunnelHostname"], body["credentials"]["creds"]


def by_name(instances: list[Instance]) -> dict[str, Instance]:
    return {i.name: i for i in instances}


def endpoint(instance: Instance, name: str) -> dict[str, Any]:
    assert instance.stats is not None, f"{instance.name} sent no STATS"
    (found,) = [e for e in instance.stats["endpoints"] if e["name"] == name]
    return found


async def wait_serving(desk: RunningDaemon) -> None:
    await wait_until(lambda: desk.daemon.discovery.service is not None, EVENT_TIMEOUT, message="no service")


async def linkctl(*args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINKCTL_")}
    env["NO_COLOR"] = "1"
    proc = await asyncio.create_subprocess_exec(
        *LINKCTL, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_linkd_and_the_gateway_answer_ping_info_stats_with_real_counts(
    op: OperatorServer, tmp_path: Path
) -> None:
    async with (
        live_gateway(op.env()) as gw,
        running_daemon(tmp_path, gw.url, gw.token("alice")) as desk,
        connected(op.server.url, op.gateway_creds.read_text()) as nc,
    ):
        await wait_serving(desk)
        host = desk.hostname
        for _ in range(REQUESTS):
            assert (await probe(nc, host))["tunnelHostname"] == host
        status = json.loads(
            (await nc.request(status_subject(tunnel.HostSubjects.for_host(host)), b"", 5)).data
        )
        assert status["tunnelHostname"] == host and status["state"] == "online"
        for _ in range(3):
            health = json.loads((await nc.request(GATEWAY_HEALTH_SUBJECT, b"", 5)).data)
            assert health["status"] == "ok" and health["nats"] == "connected"

        found = by_name(await discover(nc, own_host=None, timeout=WAIT))
        desktop = found[desktop_service_name(host)]
        assert desktop.metadata["hostname"] == host and desktop.metadata["machine"] == "test-desktop"
        assert desktop.info is not None
        assert {e["name"] for e in desktop.info["endpoints"]} == {"status", "tunnel"}
        tunnelled = endpoint(desktop, "tunnel")
        assert tunnelled["num_requests"] == REQUESTS and tunnelled["num_errors"] == 0
        assert tunnelled["processing_time"] > 0
        assert tunnelled["average_processing_time"] == tunnelled["processing_time"] // REQUESTS
        assert endpoint(desktop, "status")["num_requests"] == 1  # micro's own count

        gateway = found[GATEWAY_SERVICE]
        assert gateway.info is not None and [e["name"] for e in gateway.info["endpoints"]] == ["health"]
        assert endpoint(gateway, "health")["num_requests"] == 3


async def test_a_tenant_discovers_its_own_desktop_and_the_gateway_never_another_tenants(
    op: OperatorServer, tmp_path: Path
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    async with (
        live_gateway(op.env()) as gw,
        running_daemon(tmp_path / "a", gw.url, gw.token("alice")) as alice,
        running_daemon(tmp_path / "b", gw.url, gw.token("bob")) as bob,
    ):
        await wait_serving(alice)
        await wait_serving(bob)
        host, creds = await session_creds(gw.url, gw.token("alice"))
        assert host == alice.hostname
        inbox = uplink_inbox_prefix(tunnel.HostSubjects.for_host(host))
        mine, theirs = desktop_service_name(alice.hostname), desktop_service_name(bob.hostname)

        async with connected(op.server.url, creds, inbox) as tenant:
            names = set(by_name(await discover(tenant, own_host=host, timeout=WAIT)))
            assert names == {mine, GATEWAY_SERVICE}
            # Asking for bob's desktop by name, or everyone at once, is refused by NATS: silence.
            for subject in (f"$SRV.PING.{theirs}", f"$SRV.INFO.{theirs}", "$SRV.PING", "$SRV.STATS"):
                with pytest.raises(nats.errors.TimeoutError):
                    await tenant.request(subject, b"", timeout=WAIT)
        # The operator (the gateway's unrestricted credential) sees both desktops.
        async with connected(op.server.url, op.gateway_creds.read_text()) as operator:
            names = set(by_name(await discover(operator, own_host=None, timeout=WAIT)))
            assert {mine, theirs, GATEWAY_SERVICE} <= names

        # linkctl services with alice's credential: the same view, as a table and as JSON.
        creds_file = tmp_path / "alice.creds"
        creds_file.write_text(creds)
        code, out, err = await linkctl(
            "services", "--nats", op.server.url, "--creds", str(creds_file), "--json"
        )
        assert code == 0, err
        assert {doc["name"] for doc in json.loads(out)} == {mine, GATEWAY_SERVICE}
        code, out, err = await linkctl("services", "--nats", op.server.url, "--creds", str(creds_file))
        assert code == 0, err
        assert mine in out and alice.hostname in out and theirs not in out and bob.hostname not in out


async def test_linkctl_services_says_so_in_one_line_when_nothing_answers(
    nats_server_factory: NatsServerFactory,
) -> None:
    server = nats_server_factory()
    code, out, err = await linkctl("services", "--nats", server.url, "--timeout", "0.3")
    assert code == 1
    assert out == ""
    assert err.strip().splitlines() == [err.strip()] and "no answer from any service within 0.3 s" in err
