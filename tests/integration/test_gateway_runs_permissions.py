"""Daemon credentials and the run uplink in operator mode (real nats-server with JetStream).

A minted credential may publish its own host's run events and receive the JetStream acks
under its own inbox prefix, and may not publish another host's run events. A whole run
then goes through with the daemon on exactly those permissions.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tunnel
from contract.run_protocol import RUN_STREAM, run_event_subject, uplink_inbox_prefix
from linkd.routes import LinkRoutes
from linkd.runners import MockRunner
from linkd.runs import RunManager
from linkd.uplink import JetStreamUplink
from studio_gateway.hostnames import tunnel_hostname
from tests.helpers import NatsServerFactory
from tests.integration.gateway_harness import (
    OperatorServer,
    connect_daemon,
    creds_auth,
    start_operator_server,
)
from tests.integration.gateway_runs_harness import runs_gateway

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def op(nats_server_factory: NatsServerFactory, tmp_path: Path) -> OperatorServer:
    return start_operator_server(nats_server_factory, tmp_path, jetstream=True)


async def test_daemon_credentials_publish_their_own_run_events_only(op: OperatorServer) -> None:
    async with runs_gateway(op.server.url, env=op.env()) as gw:
        resp = await gw.client.post("/api/links/session", headers=gw.headers("olga"))
        assert resp.status == 200, await resp.text()
        session = await resp.json()
        host = session["tunnelHostname"]
        subjects = tunnel.HostSubjects.for_host(host)
        daemon = await connect_daemon(
            op.server.url,
            inbox_prefix=uplink_inbox_prefix(subjects),
            **creds_auth(session["credentials"]["creds"]),
        )
        try:
            js = daemon.nc.jetstream()
            event = {"runId": "r1", "fence": 1, "seq": 1, "ts": 0, "type": "heartbeat"}
            ack = await js.publish(
                run_event_subject(subjects, "r1"),
                json.dumps(event).encode(),
                headers={"Nats-Msg-Id": "r1:1:1"},
            )
            assert ack.stream == RUN_STREAM and ack.seq >= 1
            assert daemon.errors == []
            other = tunnel.HostSubjects.for_host(tunnel_hostname("somebody-else"))
            await daemon.nc.publish(run_event_subject(other, "r1"), b"{}")
            error = await daemon.wait_error("permissions violation")
            assert other.token.lower() in error.lower()
        finally:
            await daemon.nc.close()


async def test_a_run_completes_with_the_daemon_on_minted_credentials(op: OperatorServer) -> None:
    async with runs_gateway(op.server.url, env=op.env()) as gw:
        resp = await gw.client.post("/api/links/session", headers=gw.headers("pavel"))
        session = await resp.json()
        host = session["tunnelHostname"]
        subjects = tunnel.HostSubjects.for_host(host)
        daemon = await connect_daemon(
            op.server.url,
            inbox_prefix=uplink_inbox_prefix(subjects),
            **creds_auth(session["credentials"]["creds"]),
        )
        uplink = JetStreamUplink(ack_timeout=2.0)
        uplink.attach(daemon.nc, subjects)
        manager = RunManager({"mock": MockRunner()}, uplink, heartbeat_interval=0.5)
        server = await tunnel.serve(daemon.nc, host, LinkRoutes(manager))
        try:
            run_id = await gw.start_run("pavel", {"runner": "mock", "input": {"count": 3}})
            state = await gw.wait_status("pavel", run_id, {"completed", "failed"})
            assert state["status"] == "completed", state
            outputs = [e["data"] for e in await gw.export("pavel", run_id) if e["type"] == "output"]
            assert outputs == ["chunk 0\n", "chunk 1\n", "chunk 2\n"]
            assert daemon.errors == []
        finally:
            await server.close()
            await manager.shutdown(2.0)
            await uplink.aclose(2.0)
            await daemon.nc.close()
