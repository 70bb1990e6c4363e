"""Oversized bodies get a typed 413 (or a documented 4xx), whole bodies within limits are read whole.

Gateway: ``POST /api/runs`` (limit ``RUNS_MAX_BODY_BYTES``), ``POST /api/links/session``
(16 KiB, documented as ``400 invalid_body``). Bodies are sent both with a Content-Length and
streamed in small chunks (as a slow network delivers them), because a handler that reads
"up to N bytes" once sees only the first chunk. Daemon: ``/api/links/work`` (1 MiB) and
``/api/links/control`` (16 KiB) through a real tunnel answer ``413 body_too_large``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

import pytest

import tunnel
from cli.nats_server import NatsServer
from linkd.config import RunnerSettings
from linkd.routes import MAX_CONTROL_BYTES, MAX_WORK_BYTES, LinkRoutes
from linkd.run_events import MemoryEventSink
from linkd.runners import build_runners
from linkd.runs import RunManager
from studio_gateway.config import DEFAULT_RUNS_MAX_BODY_BYTES
from tests.helpers import NatsServerFactory
from tests.integration.gateway_harness import running_gateway, start_operator_server
from tests.integration.gateway_runs_harness import runs_gateway
from tests.integration.tunnel_harness import connect_peers, serving

pytestmark = pytest.mark.timeout(60)

HOST: Final = "desk-bodies"
TIMEOUT: Final = 10.0
PIECE: Final = 4096


async def trickle(data: bytes) -> AsyncIterator[bytes]:
    """The body in small pieces with a pause between: what a slow network delivers."""
    for i in range(0, len(data), PIECE):
        yield data[i : i + PIECE]
        await asyncio.sleep(0.001)


def run_body(size: int) -> bytes:
    """A valid run request of about ``size`` bytes."""
    body = json.dumps({"runner": "echo", "input": ""}).encode()
    return json.dumps({"runner": "echo", "input": "x" * max(0, size - len(body))}).encode()


@pytest.fixture
def js_server(nats_server_factory: NatsServerFactory) -> NatsServer:
    return nats_server_factory(jetstream=True)


async def post(client: Any, path: str, headers: dict[str, str], data: Any) -> tuple[int, dict[str, Any]]:
    resp = await client.post(path, headers={**headers, "Content-Type": "application/json"}, data=data)
    text = await resp.text()
    assert resp.content_type == "application/json", text[:200]
    assert "Traceback" not in text
    return resp.status, json.loads(text)


@pytest.mark.parametrize("streamed", [False, True], ids=["content-length", "chunked"])
async def test_oversized_run_bodies_are_413_payload_too_large(js_server: NatsServer, streamed: bool) -> None:
    async with runs_gateway(js_server.url) as gw:
        big = run_body(2 * DEFAULT_RUNS_MAX_BODY_BYTES)
        status, payload = await post(
            gw.client, "/api/runs", gw.headers("olga"), trickle(big) if streamed else big
        )
        assert (status, payload["error"]["code"]) == (413, "payload_too_large"), payload
        for path in ("/api/threads/t-1/messages",):
            status, payload = await post(gw.client, path, gw.headers("olga"), big)
            assert (status, payload["error"]["code"]) == (413, "payload_too_large"), payload


async def test_a_valid_run_body_larger_than_one_read_is_read_whole(js_server: NatsServer) -> None:
    async with runs_gateway(js_server.url) as gw:
        body = run_body(300_000)  # under the 512 KiB limit
        status, payload = await post(gw.client, "/api/runs", gw.headers("olga"), body)
        assert status == 202, payload
        status, payload = await post(gw.client, "/api/runs", gw.headers("olga"), trickle(body))
        assert status == 202, payload
        big = run_body(2 * DEFAULT_RUNS_MAX_BODY_BYTES)
        status, payload = await post(gw.client, "/api/runs", gw.headers("olga"), trickle(big))
        assert (status, payload["error"]["code"]) == (413, "payload_too_large"), payload


async def test_oversized_session_bodies_are_refused_with_a_typed_4xx(
    nats_server_factory: NatsServerFactory, tmp_path: Path
) -> None:
    op = start_operator_server(nats_server_factory, tmp_path)
    async with running_gateway(op.env()) as gw:
        for size in (16 * 1024 + 1, 2 * 1024 * 1024):
            body = json.dumps({"publicKey": "U" * size}).encode()
            resp = await gw.client.post("/api/links/session", headers=gw.headers("olga"), data=body)
            text = await resp.text()
            assert resp.status in (400, 413), (size, resp.status, text[:200])
            assert json.loads(text)["error"]["code"] in ("invalid_body", "payload_too_large")
        health = await gw.client.get("/healthz")
        assert health.status == 200


async def test_oversized_work_and_control_bodies_through_the_tunnel_are_413(nats_server: NatsServer) -> None:
    runs = RunManager(build_runners(RunnerSettings()), MemoryEventSink())
    routes = LinkRoutes(runs)
    async with connect_peers(nats_server) as peers, serving(peers.server_nc, HOST, routes):
        for path, limit in (("/api/links/work", MAX_WORK_BYTES), ("/api/links/control", MAX_CONTROL_BYTES)):
            body = b'{"pad":"' + b"p" * (limit + 10) + b'"}'
            for content in (body, trickle(body)):
                async with await tunnel.fetch(
                    peers.caller_nc,
                    f"tunnel://{HOST}{path}",
                    method="POST",
                    headers=[("content-type", "application/json")],
                    body=content,
                    first_frame_timeout=TIMEOUT,
                    timeout=TIMEOUT,
                ) as resp:
                    payload = json.loads(await resp.read())
                assert (resp.status, payload["error"]["code"]) == (413, "body_too_large"), (path, payload)
        # Still serving normally afterwards.
        async with await tunnel.fetch(
            peers.caller_nc, f"tunnel://{HOST}/api/links/status", first_frame_timeout=TIMEOUT
        ) as resp:
            assert resp.status == 200
    await runs.shutdown(1.0)
