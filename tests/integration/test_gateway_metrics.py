"""The gateway's ``/metrics``: its own series counted by real traffic, both exposition formats
parsed back with ``prometheus_client``'s parsers, and who may scrape it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import NatsServerFactory, wait_until
from tests.integration.gateway_harness import (
    EVENT_TIMEOUT,
    Gateway,
    OperatorServer,
    connect_daemon,
    creds_auth,
    running_gateway,
    serve_status,
    start_operator_server,
)
from tests.prom import parse_samples, sample_value

TOKEN = "metrics-token-0123456789abcdef"
OPENMETRICS = "application/openmetrics-text; version=1.0.0"
PROBES = 4


@pytest.fixture
def op(nats_server_factory: NatsServerFactory, tmp_path: Path) -> OperatorServer:
    return start_operator_server(nats_server_factory, tmp_path)


async def scrape(gw: Gateway, *, accept: str | None = None, token: str | None = TOKEN) -> str:
    headers = {"Accept": accept} if accept else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    resp = await gw.client.get("/metrics", headers=headers)
    assert resp.status == 200, await resp.text()
    expected = "application/openmetrics-text; version=1.0.0" if accept else "text/plain; version=0.0.4"
    assert resp.headers["Content-Type"].startswith(expected)
    return await resp.text()


async def test_metrics_count_sessions_probes_and_tunnel_requests(op: OperatorServer) -> None:
    async with running_gateway(op.env(GATEWAY_METRICS_TOKEN=TOKEN)) as gw:
        sessions = [await gw.ok_session("alice") for _ in range(3)]
        status, _ = await gw.session("alice", {"publicKey": "not-a-key"})
        assert status == 400
        daemon = await connect_daemon(op.server.url, **creds_auth(sessions[0]["credentials"]["creds"]))
        try:
            server = await serve_status(daemon.nc, sessions[0]["tunnelHostname"])
            for _ in range(PROBES):
                assert (await gw.me("alice"))["online"] is True
            assert (await gw.me("bob"))["reason"] == "not_connected"
            await server.close()
        finally:
            await daemon.nc.close()

        for accept in (None, OPENMETRICS):
            text = await scrape(gw, accept=accept)
            om = accept is not None
            names = {s.name for s in parse_samples(text, openmetrics=om)}

            def value(sample: str, text: str = text, om: bool = om) -> float | None:
                return sample_value(text, sample, openmetrics=om)

            assert value('studio_link_sessions_total{outcome="issued"}') == 3
            assert value('studio_link_sessions_total{outcome="invalid_public_key"}') == 1
            assert value('studio_presence_probes_total{result="online"}') == PROBES
            assert value('studio_presence_probes_total{result="not_connected"}') == 1
            assert value('studio_presence_probe_seconds_count{result="online"}') == PROBES
            assert value('studio_presence_probe_seconds_bucket{result="online",le="+Inf"}') == PROBES
            # The probes are the gateway's tunnel requests: PROBES answered, bob's no responder.
            assert value('studio_tunnel_requests_total{outcome="ok"}') == PROBES
            assert (value("studio_tunnel_request_seconds_count") or 0) >= PROBES
            assert value("studio_nats_connected") == 1
            assert value("studio_nats_disconnects_total") == 0
            assert value("studio_runs_created_total") == 0  # the run series are on the same registry
            assert {"process_cpu_seconds_total", "process_resident_memory_bytes", "python_info"} <= names


async def test_nats_disconnects_and_reconnects_are_counted(op: OperatorServer) -> None:
    async with running_gateway(op.env(GATEWAY_METRICS_TOKEN=TOKEN)) as gw:
        op.server.restart()

        async def reconnected() -> bool:
            text = await scrape(gw)
            return sample_value(text, "studio_nats_reconnects_total") == 1

        await wait_until(reconnected, EVENT_TIMEOUT * 3, message="the gateway's reconnect was not counted")
        text = await scrape(gw)
        assert sample_value(text, "studio_nats_disconnects_total") == 1
        assert sample_value(text, "studio_nats_connected") == 1


async def test_a_token_guards_metrics(op: OperatorServer) -> None:
    async with running_gateway(op.env(GATEWAY_METRICS_TOKEN=TOKEN), wait_nats=False) as gw:
        for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": TOKEN}):
            resp = await gw.client.get("/metrics", headers=headers)
            assert resp.status == 401
            assert (await resp.json())["error"]["code"] == "unauthorized"
        assert "studio_link_sessions_total" in await scrape(gw)


async def test_without_a_token_metrics_answer_direct_loopback_peers_only(op: OperatorServer) -> None:
    async with running_gateway(op.env(), wait_nats=False) as gw:
        assert "studio_runs_created_total" in await scrape(gw, token=None)
        # A proxy on the same host makes every peer loopback; its forwarding header gives it away.
        for header in ("X-Forwarded-For", "Forwarded", "X-Real-IP"):
            resp = await gw.client.get("/metrics", headers={header: "203.0.113.7"})
            assert resp.status == 403, header
            assert (await resp.json())["error"]["code"] == "metrics_forbidden"
