"""Pieces for the gateway runs tests: a JetStream-backed gateway app, desktops, an SSE reader.

- :func:`runs_gateway`: ``create_app`` behind aiohttp's test server with runs settings
  overridden (short liveness timeouts), waiting until NATS and the run machinery are up;
- :func:`start_desktop`: a real linkd :class:`~linkd.runs.RunManager` behind the real
  :class:`~linkd.routes.LinkRoutes`, served with ``tunnel.serve``, publishing events through
  the real :class:`~linkd.uplink.JetStreamUplink`;
- :func:`accepting_desktop`: a desktop that accepts work items and does nothing else, so
  a test publishes the run's events itself (``publish_event``);
- :func:`parse_sse`: SSE text -> messages.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field, replace
from typing import Any

import nats
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from nats.aio.client import Client

import tunnel
from contract.run_protocol import run_event_subject
from linkd.routes import LinkRoutes
from linkd.runners import EchoRunner, MockRunner, Runner
from linkd.runs import RunManager
from linkd.uplink import JetStreamUplink
from studio_gateway.app import create_app
from studio_gateway.auth import issue_token
from studio_gateway.config import GatewayConfig
from studio_gateway.hostnames import tunnel_hostname
from studio_gateway.natsconn import GATEWAY_NATS
from studio_gateway.runs.service import RUNS, RunsService
from tests.helpers import settled_value, wait_until
from tests.integration.gateway_harness import SECRET
from tests.prom import sample_value

TIMEOUT = 10.0


def runs_env(url: str, **overrides: str) -> dict[str, str]:
    env = {"GATEWAY_JWT_SECRET": SECRET, "NATS_URL": url}
    env.update(overrides)
    return env


@dataclass
class RunsGateway:
    client: TestClient[Any, Any]
    config: GatewayConfig
    app: web.Application

    @property
    def service(self) -> RunsService:
        return self.app[RUNS]

    def headers(self, user: str, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {issue_token(self.config.auth, user, 300)}", **extra}

    async def post_run(self, user: str, body: Any, path: str = "/api/runs") -> tuple[int, dict[str, Any]]:
        resp = await self.client.post(path, headers=self.headers(user), data=json.dumps(body))
        return resp.status, await resp.json()

    async def start_run(self, user: str, body: Any) -> str:
        status, payload = await self.post_run(user, body)
        assert status == 202, payload
        run_id: str = payload["runId"]
        return run_id

    async def get_run(self, user: str, run_id: str) -> dict[str, Any]:
        resp = await self.client.get(f"/api/runs/{run_id}", headers=self.headers(user))
        assert resp.status == 200, await resp.text()
        state: dict[str, Any] = await resp.json()
        return state

    async def wait_status(
        self, user: str, run_id: str, statuses: set[str], timeout: float = TIMEOUT
    ) -> dict[str, Any]:
        last: dict[str, Any] = {}

        async def reached() -> bool:
            nonlocal last
            last = await self.get_run(user, run_id)
            return last["status"] in statuses

        try:
            await wait_until(reached, timeout, interval=0.02)
        except AssertionError:
            raise AssertionError(f"run {run_id} never reached {statuses}: {last}") from None
        return last

    async def events_text(
        self, user: str, run_id: str, *, query: str = "", **headers: str
    ) -> tuple[str, str]:
        """The whole body of an events request (it ends when the run ends) and its content type."""
        resp = await self.client.get(
            f"/api/runs/{run_id}/events{query}", headers=self.headers(user, **headers)
        )
        assert resp.status == 200, await resp.text()
        text = await asyncio.wait_for(resp.text(), TIMEOUT)
        return text, resp.headers["Content-Type"]

    async def sse(self, user: str, run_id: str, *, query: str = "", **headers: str) -> list[dict[str, Any]]:
        text, content_type = await self.events_text(user, run_id, query=query, **headers)
        assert content_type.startswith("text/event-stream")
        return parse_sse(text)

    async def export(self, user: str, run_id: str) -> list[dict[str, Any]]:
        resp = await self.client.get(f"/api/runs/{run_id}/export", headers=self.headers(user))
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("application/x-ndjson")
        return [json.loads(line) for line in (await resp.text()).splitlines()]

    async def cancel(self, user: str, run_id: str) -> tuple[int, dict[str, Any]]:
        resp = await self.client.post(f"/api/runs/{run_id}/cancel", headers=self.headers(user))
        return resp.status, await resp.json()

    async def metrics(self) -> str:
        resp = await self.client.get("/metrics")
        assert resp.status == 200
        return await resp.text()

    async def metric(self, sample: str) -> float:
        """The value of one sample (``name{labels}``, any label order), 0 when absent."""
        return sample_value(await self.metrics(), sample) or 0.0

    async def settled_metric(self, sample: str, at_least: float, timeout: float = TIMEOUT) -> float:
        """The sample once it reaches ``at_least`` (see :func:`tests.helpers.settled_value`)."""
        return await settled_value(lambda: self.metric(sample), at_least, timeout, what=sample)


@asynccontextmanager
async def runs_gateway(
    url: str, env: Mapping[str, str] | None = None, **runs: Any
) -> AsyncIterator[RunsGateway]:
    """A gateway on ``url`` (JetStream) with ``RunsConfig`` fields overridden by ``runs``."""
    config = GatewayConfig.from_env(runs_env(url, **(env or {})))
    if runs:
        config = replace(config, runs=replace(config.runs, **runs))
    app = create_app(config)
    client: TestClient[Any, Any] = TestClient(TestServer(app))
    await client.start_server()
    try:
        assert await app[GATEWAY_NATS].wait_connected(TIMEOUT), "gateway never connected to NATS"
        assert await app[RUNS].wait_ready(TIMEOUT), app[RUNS].unavailable_reason()
        yield RunsGateway(client, config, app)
    finally:
        await client.close()


@dataclass
class Desktop:
    nc: Client
    hostname: str
    server: tunnel.TunnelServer
    runs: RunManager | None = None
    uplink: JetStreamUplink | None = None
    work: list[dict[str, Any]] = field(default_factory=list)
    controls: list[dict[str, Any]] = field(default_factory=list)

    async def close(self) -> None:
        with suppress(Exception):
            await self.server.close()
        if self.runs is not None:
            await self.runs.shutdown(2.0)
        if self.uplink is not None:
            await self.uplink.aclose(2.0)
        await self.nc.close()


async def start_desktop(
    url: str,
    user: str,
    *,
    heartbeat_interval: float = 0.3,
    runners: Mapping[str, Runner] | None = None,
    prefix: str = tunnel.DEFAULT_PREFIX,
) -> Desktop:
    """The user's desktop: real routes, runs and JetStream uplink."""
    hostname = tunnel_hostname(user)
    nc = await nats.connect(url, name=f"desktop {user}")
    uplink = JetStreamUplink(ack_timeout=2.0)
    uplink.attach(nc, tunnel.HostSubjects.for_host(hostname, prefix))
    manager = RunManager(
        dict(runners or {"echo": EchoRunner(), "mock": MockRunner()}),
        uplink,
        heartbeat_interval=heartbeat_interval,
    )
    server = await tunnel.serve(nc, hostname, LinkRoutes(manager), prefix=prefix)
    return Desktop(nc, hostname, server, manager, uplink)


async def accepting_desktop(url: str, user: str, *, control_status: int = 202) -> Desktop:
    """A desktop that accepts every work item (202) and records it; events are up to the test."""
    hostname = tunnel_hostname(user)
    nc = await nats.connect(url, name=f"accepting desktop {user}")
    desktop: Desktop

    async def handler(request: tunnel.Request) -> tunnel.Response:
        body = await request.json() if request.method == "POST" else None
        if request.path == "/api/links/work":
            desktop.work.append(body)
            return tunnel.Response(202, [("content-type", "application/json")], b'{"accepted":true}')
        if request.path == "/api/links/control":
            desktop.controls.append(body)
            if control_status == 404:
                error = {"error": {"code": "unknown_run", "message": "no such run"}}
                return tunnel.Response(404, [("content-type", "application/json")], json.dumps(error))
            return tunnel.Response(control_status, [("content-type", "application/json")], b"{}")
        return tunnel.Response(404, [], b"")

    server = await tunnel.serve(nc, hostname, handler)
    desktop = Desktop(nc, hostname, server)
    return desktop


async def publish_event(
    nc: Client,
    hostname: str,
    run_id: str,
    seq: int,
    kind: str = "heartbeat",
    *,
    fence: int = 1,
    prefix: str = tunnel.DEFAULT_PREFIX,
    **data: Any,
) -> None:
    """Publish one run event as a daemon would (JetStream publish with the de-duplication id)."""
    event = {"runId": run_id, "fence": fence, "seq": seq, "ts": 0, "type": kind, **data}
    subject = run_event_subject(tunnel.HostSubjects.for_host(hostname, prefix), run_id)
    await nc.jetstream().publish(
        subject, json.dumps(event).encode(), headers={"Nats-Msg-Id": f"{run_id}:{fence}:{seq}"}
    )


def parse_sse(text: str) -> list[dict[str, Any]]:
    """SSE text -> ``[{"id", "event", "data"}]`` (comments dropped; data JSON-decoded)."""
    messages: list[dict[str, Any]] = []
    for block in text.split("\n\n"):
        fields: dict[str, Any] = {}
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(": ")
            fields[name] = value
        if fields:
            if "data" in fields:
                fields["data"] = json.loads(fields["data"])
            messages.append(fields)
    return messages
