"""linkd's tunnel routes over a real nats-server: status, work validation and acceptance, control."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from nats.aio.client import Client

import tunnel
from cli.nats_server import NatsServer
from linkd.config import CommandTemplate
from linkd.routes import MAX_WORK_BYTES, LinkRoutes
from linkd.run_events import MemoryEventSink
from linkd.runners import CommandRunner, EchoRunner, MockRunner
from linkd.runs import RunManager
from linkd.upstream import UpstreamProxy
from tests.integration.tunnel_harness import connect_peers, serving

HOST = "desk-routes"
TIMEOUT = 5.0


@dataclass
class Desk:
    nc: Client
    runs: RunManager
    sink: MemoryEventSink

    async def call(
        self, method: str, path: str, body: Any = None, raw: bytes | None = None
    ) -> tuple[int, dict[str, str], Any]:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        async with await tunnel.fetch(
            self.nc, f"tunnel://{HOST}{path}", method=method, body=data, first_frame_timeout=TIMEOUT
        ) as resp:
            content = await resp.read()
            headers = {k.lower(): v for k, v in resp.headers}
            return resp.status, headers, json.loads(content) if content else None


@asynccontextmanager
async def desk(server: NatsServer, upstream: UpstreamProxy | None = None) -> AsyncIterator[Desk]:
    sink = MemoryEventSink()
    runners: dict[str, Any] = {
        "mock": MockRunner(),
        "echo": EchoRunner(),
        "command": CommandRunner({"hello": CommandTemplate("hello", ("echo", "hello"))}),
    }
    runs = RunManager(runners, sink, heartbeat_interval=60)
    routes = LinkRoutes(runs, upstream=upstream, machine_name=lambda: "my-laptop")
    async with connect_peers(server) as peers, serving(peers.server_nc, HOST, routes):
        try:
            yield Desk(peers.caller_nc, runs, sink)
        finally:
            await runs.shutdown(TIMEOUT)
            if upstream is not None:
                await upstream.aclose()


def work(run_id: str = "run-1", **overrides: Any) -> dict[str, Any]:
    item: dict[str, Any] = {
        "runId": run_id,
        "threadId": "thread-1",
        "userId": "user-1",
        "runFenceToken": 1,
        "runner": "mock",
        "input": {"count": 2},
    }
    item.update(overrides)
    return item


async def test_status(nats_server: NatsServer) -> None:
    async with desk(nats_server) as d:
        status, headers, doc = await d.call("GET", "/api/links/status")
        assert status == 200 and headers["content-type"] == "application/json"
        assert doc == {
            "hostname": "my-laptop",
            "tunnelHostname": HOST,
            "capabilities": ["command", "echo", "mock", "cancel"],
            "cliVersion": doc["cliVersion"],
            "commandTemplates": ["hello"],
            "messageKinds": {"command": ["context", "signal"], "mock": ["context", "signal"]},
        }
        status, _, doc = await d.call("HEAD", "/api/links/status")
        assert (status, doc) == (200, None)
        status, headers, doc = await d.call("POST", "/api/links/status", {})
        assert (
            status == 405 and headers["allow"] == "GET, HEAD" and doc["error"]["code"] == "method_not_allowed"
        )
        for path in ("/api/links/nope", "/elsewhere"):
            status, _, doc = await d.call("GET", path)
            assert status == 404 and doc["error"]["code"] == "not_found"


@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [
        (b"{not json", 400, "invalid_json", None),
        (b"[1, 2]", 400, "invalid_json", None),
        (b"", 400, "invalid_json", None),
        (work(runId=None), 422, "invalid_work_item", "runId"),
        (work(runId="has space"), 422, "invalid_work_item", "runId"),
        (work(runId="x" * 129), 422, "invalid_work_item", "runId"),
        (work(threadId=""), 422, "invalid_work_item", "threadId"),
        (work(userId=5), 422, "invalid_work_item", "userId"),
        (work(runFenceToken=None), 422, "invalid_work_item", "runFenceToken"),
        (work(runFenceToken=-1), 422, "invalid_work_item", "runFenceToken"),
        (work(runFenceToken=True), 422, "invalid_work_item", "runFenceToken"),
        (work(runner=""), 422, "invalid_work_item", "runner"),
        ({k: v for k, v in work().items() if k != "input"}, 422, "invalid_work_item", "input"),
        (work(runner="gpt"), 422, "unknown_runner", None),
        (work(input={"count": "many"}), 422, "invalid_input", None),
        (work(runner="command", input={"template": "hello", "argv": ["rm"]}), 422, "invalid_input", None),
        (work(runner="command", input={"template": "rm"}), 422, "invalid_input", None),
    ],
)
async def test_work_validation(
    nats_server: NatsServer, body: Any, status: int, code: str, field: str | None
) -> None:
    async with desk(nats_server) as d:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        got, headers, doc = await d.call("POST", "/api/links/work", raw=raw or b" ")
        assert (got, doc["error"]["code"]) == (status, code), doc
        assert headers["content-type"] == "application/json" and doc["error"]["message"]
        if field is not None:
            assert doc["error"]["field"] == field
        if code == "unknown_runner":
            assert doc["error"]["runners"] == ["command", "echo", "mock"]
        assert d.runs.active() == [] and d.sink.events("run-1") == []


async def test_work_body_too_large(nats_server: NatsServer) -> None:
    async with desk(nats_server) as d:
        big = json.dumps(work(input={"pad": "x" * MAX_WORK_BYTES})).encode()
        status, _, doc = await d.call("POST", "/api/links/work", raw=big)
        assert status == 413 and doc["error"]["code"] == "body_too_large"


async def test_work_is_accepted_runs_in_the_background_and_redelivery_is_idempotent(
    nats_server: NatsServer,
) -> None:
    async with desk(nats_server) as d:
        item = work(input={"count": 50, "delayMs": 20}, runFenceToken="f-7")
        status, _, doc = await d.call("POST", "/api/links/work", item)
        assert (status, doc) == (202, {"accepted": True, "runId": "run-1", "fence": "f-7"})
        status, _, doc = await d.call("POST", "/api/links/work", item)
        assert status == 202 and doc["duplicate"] is True and doc["status"] == "running"
        status, _, doc = await d.call("POST", "/api/links/work", {**item, "runFenceToken": "f-8"})
        assert (
            status == 409 and doc["error"]["code"] == "run_conflict" and doc["error"]["runningFence"] == "f-7"
        )
        assert len(d.runs.active()) == 1

        # Cancel it over /control.
        status, _, doc = await d.call("POST", "/api/links/control", {"runId": "run-1", "action": "cancel"})
        assert (status, doc["status"]) == (202, "cancelling")
        await d.runs.wait_finished("run-1", TIMEOUT)
        events = d.sink.events("run-1")
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        assert events[-1].data["status"] == "cancelled"
        status, _, doc = await d.call("POST", "/api/links/control", {"runId": "run-1", "action": "cancel"})
        assert (status, doc["status"]) == (200, "cancelled")
        status, _, doc = await d.call("POST", "/api/links/work", item)
        assert status == 202 and doc["duplicate"] is True and doc["status"] == "cancelled"


async def test_control(nats_server: NatsServer) -> None:
    async with desk(nats_server) as d:
        status, _, doc = await d.call("POST", "/api/links/control", {"runId": "nope", "action": "cancel"})
        assert status == 404 and doc["error"]["code"] == "unknown_run"
        status, _, doc = await d.call("POST", "/api/links/control", {"runId": "r", "action": "pause"})
        assert status == 422 and doc["error"]["field"] == "action"
        status, _, doc = await d.call("POST", "/api/links/control", {"action": "cancel"})
        assert status == 422 and doc["error"]["field"] == "runId"
        status, _, _ = await d.call("GET", "/api/links/control")
        assert status == 405
        await d.call("POST", "/api/links/work", work("quick", runner="echo", input="hi"))
        await d.runs.wait_finished("quick", TIMEOUT)
        status, _, doc = await d.call("POST", "/api/links/control", {"runId": "quick", "action": "cancel"})
        assert (
            status == 409
            and doc["error"]["code"] == "run_finished"
            and doc["error"]["runStatus"] == "completed"
        )


async def test_unreachable_upstream_is_a_502_json(nats_server: NatsServer) -> None:
    from cli.nats_server import free_port

    async with desk(nats_server, UpstreamProxy(f"http://127.0.0.1:{free_port()}")) as d:
        status, headers, doc = await d.call("GET", "/app")
        assert status == 502 and headers["content-type"] == "application/json"
        assert doc["error"]["code"] == "upstream_unreachable" and "cannot connect" in doc["error"]["message"]
        status, _, doc = await d.call("GET", "/api/links/status")
        assert status == 200 and "upstream" in doc["capabilities"]
