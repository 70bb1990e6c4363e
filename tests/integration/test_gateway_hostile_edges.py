"""The gateway against hostile HTTP clients: deep JSON, huge declared lengths, long headers,
clients leaving a live event stream.

The real application (``create_app``) on a real nats-server, served by ``GatewayRunner``
(the runner ``studio-gateway serve`` uses: its connections answer unparseable requests
themselves); raw sockets where a well-behaved HTTP client cannot send the request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from cli.nats_server import free_port
from studio_gateway.app import GatewayRunner, create_app
from studio_gateway.auth import issue_token
from studio_gateway.bodies import MAX_JSON_DEPTH
from studio_gateway.config import GatewayConfig
from studio_gateway.natsconn import GATEWAY_NATS
from studio_gateway.runs.service import RUNS
from tests.helpers import NatsServerFactory, wait_until, wait_until_sync
from tests.integration.gateway_harness import SECRET as GATEWAY_SECRET
from tests.integration.gateway_harness import start_operator_server
from tests.integration.gateway_runs_harness import accepting_desktop, publish_event, runs_env

pytestmark = pytest.mark.timeout(60)

TIMEOUT: Final = 10.0
# "At once": far below any read timeout, far above a loaded machine's scheduling delays.
AT_ONCE: Final = 2.0
USER: Final = "edge@example.com"


class GatewayTestServer(TestServer):
    """aiohttp's TestServer with the production runner and settings.

    TestServer turns on ``handler_cancellation`` (a client leaving cancels its handler);
    ``studio-gateway serve`` leaves it off, as aiohttp does by default, so a handler learns
    that its client left only when it writes: the case that logged tracebacks.
    """

    async def _make_runner(self, **kwargs: Any) -> web.BaseRunner:
        kwargs.pop("handler_cancellation", None)
        return GatewayRunner(self.app, **kwargs)


@dataclass
class Edge:
    client: TestClient[Any, Any]
    config: GatewayConfig
    app: web.Application
    server: GatewayTestServer
    nats_url: str

    def auth(self, user: str = USER) -> dict[str, str]:
        return {"Authorization": f"Bearer {issue_token(self.config.auth, user, 300)}"}

    def auth_line(self, user: str = USER) -> bytes:
        return f"Authorization: {self.auth(user)['Authorization']}\r\n".encode()

    @property
    def port(self) -> int:
        port = self.server.port
        assert port is not None
        return port

    async def raw(self, data: bytes, *, close_after_head: bool = False) -> tuple[int, bytes, bytes]:
        """Send ``data`` on a new connection; the status, head and body of the answer."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(data)
            await writer.drain()
            async with asyncio.timeout(TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                body = await reader.readexactly(length)
            return status, head, body
        finally:
            writer.close()

    def connections(self) -> int:
        runner = self.server.runner
        assert runner is not None and runner.server is not None
        return len(runner.server.connections)


@asynccontextmanager
async def edge_gateway(env: dict[str, str], *, runs_ready: bool = True, **runs: Any) -> AsyncIterator[Edge]:
    config = GatewayConfig.from_env(env)
    if runs:
        config = replace(config, runs=replace(config.runs, **runs))
    app = create_app(config)
    server = GatewayTestServer(app)
    client: TestClient[Any, Any] = TestClient(server)
    await client.start_server()
    try:
        assert await app[GATEWAY_NATS].wait_connected(TIMEOUT), "gateway never connected to NATS"
        if runs_ready:
            assert await app[RUNS].wait_ready(TIMEOUT), app[RUNS].unavailable_reason()
        yield Edge(client, config, app, server, env.get("NATS_URL", ""))
    finally:
        await client.close()


@pytest.fixture
async def edge(nats_server_factory: NatsServerFactory) -> AsyncIterator[Edge]:
    server = nats_server_factory(jetstream=True)
    async with edge_gateway(runs_env(server.url), keepalive=0.05) as gw:
        yield gw


@pytest.fixture
async def session_edge(nats_server_factory: NatsServerFactory, tmp_path: Path) -> AsyncIterator[Edge]:
    op = start_operator_server(nats_server_factory, tmp_path)
    async with edge_gateway(op.env(), runs_ready=False) as gw:
        yield gw


def nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = [value]
    return value


def deep_text(depth: int) -> str:
    return "[" * depth + "]" * depth


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.WARNING]


# -- deep JSON ------------------------------------------------------------------------------------


async def test_100k_deep_json_nesting_in_a_run_body_is_400_not_500(
    edge: Edge, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    body = '{"runner": "echo", "input": ' + deep_text(100_000) + "}"
    assert len(body) < edge.config.runs.max_body_bytes  # the depth is refused, not the size
    for text in (body, deep_text(100_000)):
        resp = await edge.client.post("/api/runs", headers=edge.auth(), data=text)
        payload = await resp.json()
        assert resp.status == 400, payload
        assert payload["error"]["code"] == "invalid_json"
        assert f"deeper than {MAX_JSON_DEPTH} levels" in payload["error"]["message"]
    # Below Python's recursion limit but over the gateway's: refused the same way.
    over = {"runner": "echo", "input": nested(MAX_JSON_DEPTH)}
    resp = await edge.client.post("/api/runs", headers=edge.auth(), data=json.dumps(over))
    assert resp.status == 400, await resp.text()
    # At the limit: accepted (the body's object is level 1).
    at_limit = {"runner": "echo", "input": nested(MAX_JSON_DEPTH - 2)}
    resp = await edge.client.post("/api/runs", headers=edge.auth(), data=json.dumps(at_limit))
    assert resp.status == 202, await resp.text()
    # The cancel body goes through the same reader.
    run_id = (await resp.json())["runId"]
    resp = await edge.client.post(f"/api/runs/{run_id}/cancel", headers=edge.auth(), data=deep_text(5000))
    assert resp.status == 400, await resp.text()
    assert errors_logged(caplog) == []
    assert not any(r.exc_info for r in caplog.records if r.name.startswith(("studio_gateway", "aiohttp")))


async def test_deep_json_nesting_in_a_session_body_is_400_invalid_body(
    session_edge: Edge, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    body = '{"publicKey": ' + deep_text(5000) + "}"  # under the 16 KiB limit
    resp = await session_edge.client.post("/api/links/session", headers=session_edge.auth(), data=body)
    payload = await resp.json()
    assert resp.status == 400, payload
    assert payload["error"]["code"] == "invalid_body"
    assert "deeper than" in payload["error"]["message"]
    resp = await session_edge.client.post("/api/links/session", headers=session_edge.auth(), data=b"")
    assert resp.status == 200, await resp.text()  # an empty body still means "no publicKey"
    assert errors_logged(caplog) == []


# -- declared lengths -------------------------------------------------------------------------------


async def timed_raw(edge: Edge, data: bytes) -> tuple[int, bytes, bytes, float]:
    started = time.monotonic()
    status, head, body = await edge.raw(data)
    return status, head, body, time.monotonic() - started


@pytest.mark.parametrize("path", ["/api/runs", "/api/threads/t-1/messages", "/healthz", "/nowhere"])
async def test_a_huge_declared_content_length_with_1_kb_sent_is_413_at_once(edge: Edge, path: str) -> None:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        "Content-Length: 1000000000000\r\n"
    ).encode()
    status, out_head, body, elapsed = await timed_raw(edge, head + edge.auth_line() + b"\r\n" + b"x" * 1024)
    assert status == 413, body
    assert json.loads(body)["error"]["code"] == "payload_too_large"
    assert b"connection: close" in out_head.lower()
    assert elapsed < AT_ONCE, f"answered after {elapsed:.2f} s"


@pytest.mark.parametrize("path", ["/api/runs", "/api/threads/t-1/messages", "/api/links/session"])
async def test_expect_100_continue_with_a_huge_length_gets_413_not_an_invitation(
    edge: Edge, path: str
) -> None:
    # aiohttp's own expect handler sends "100 Continue" before any middleware can refuse.
    head = (
        f"POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        "Content-Length: 1000000000000\r\nExpect: 100-continue\r\n"
    ).encode()
    status, _, body, elapsed = await timed_raw(edge, head + edge.auth_line() + b"\r\n")
    assert status == 413, body
    assert json.loads(body)["error"]["code"] == "payload_too_large"
    assert elapsed < AT_ONCE


async def test_expect_100_continue_within_the_limit_is_invited_and_served(edge: Edge) -> None:
    payload = json.dumps({"runner": "echo", "input": "x"}).encode()
    head = (
        "POST /api/runs HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nExpect: 100-continue\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
    try:
        writer.write(head + edge.auth_line() + b"\r\n")
        await writer.drain()
        async with asyncio.timeout(TIMEOUT):
            interim = await reader.readuntil(b"\r\n\r\n")
            assert interim.startswith(b"HTTP/1.1 100 Continue")
            writer.write(payload)
            await writer.drain()
            final = await reader.readuntil(b"\r\n\r\n")
        assert final.startswith(b"HTTP/1.1 202"), final
    finally:
        writer.close()


async def test_a_declared_length_over_a_routes_own_limit_is_refused_at_once(
    edge: Edge, session_edge: Edge
) -> None:
    # Under the gateway-wide limit (the runs body limit), over the route's own.
    resp = await edge.client.post("/api/runs", headers=edge.auth(), data=json.dumps({"runner": "echo"}))
    run_id = (await resp.json())["runId"]
    cancel = f"POST /api/runs/{run_id}/cancel HTTP/1.1\r\nHost: gw\r\nContent-Length: 20000\r\n".encode()
    status, _, body, elapsed = await timed_raw(edge, cancel + edge.auth_line() + b"\r\n" + b"{" * 1024)
    assert (status, json.loads(body)["error"]["code"]) == (413, "payload_too_large")
    assert elapsed < AT_ONCE
    session = b"POST /api/links/session HTTP/1.1\r\nHost: gw\r\nContent-Length: 20000\r\n"
    status, _, body, elapsed = await timed_raw(
        session_edge, session + session_edge.auth_line() + b"\r\n" + b"{" * 1024
    )
    assert (status, json.loads(body)["error"]["code"]) == (400, "invalid_body")  # as documented
    assert elapsed < AT_ONCE


async def test_a_bad_chunk_size_in_a_run_body_is_400(edge: Edge, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    head = (
        b"POST /api/runs HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n" + edge.auth_line() + b"\r\n"
    )
    status, _, body = await edge.raw(head + b'5\r\n{"a":\r\nzz-secret\r\n')
    assert status == 400, body
    assert b"secret" not in body
    assert errors_logged(caplog) == []


# -- header bytes never echoed -----------------------------------------------------------------------

SECRET: Final = b"tok_SECRET"


@pytest.mark.parametrize(
    ("request_bytes", "reason"),
    [
        (
            b"GET /healthz HTTP/1.1\r\nHost: gw\r\nX-Api-Key: " + SECRET + b"A" * 9000 + b"\r\n\r\n",
            "request line or header too long",
        ),
        (
            b"GET /healthz HTTP/1.1\r\nHost: gw\r\nCookie: s=" + SECRET + b"B" * 9000 + b"\r\n\r\n",
            "request line or header too long",
        ),
        (
            b"GET /" + SECRET + b"C" * 9000 + b" HTTP/1.1\r\nHost: gw\r\n\r\n",
            "request line or header too long",
        ),
        (
            b"GET /healthz HTTP/1.1\r\nHost: gw\r\nX-" + SECRET + b" bad\x01: v\r\n\r\n",
            "malformed HTTP request",
        ),
        (
            b"GET /healthz HTTP/1.1\r\nHost: gw\r\nX-Key: " + SECRET + b"\x01\r\n\r\n",
            "malformed HTTP request",
        ),
        (b"GET /" + SECRET + b" x HTTP/1.1\r\nHost: gw\r\n\r\n", "invalid request line"),
        (  # request smuggling: aiohttp's parser refuses it
            b"POST /" + SECRET + b" HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
            "malformed HTTP request",
        ),
    ],
    ids=[
        "long-header",
        "long-cookie",
        "long-request-line",
        "bad-header-name",
        "bad-header-value",
        "bad-line",
        "cl-and-te",
    ],
)
async def test_header_bytes_are_never_echoed_in_the_400_or_the_log(
    edge: Edge, caplog: pytest.LogCaptureFixture, request_bytes: bytes, reason: str
) -> None:
    caplog.set_level(logging.DEBUG, logger="aiohttp")
    caplog.set_level(logging.DEBUG, logger="studio_gateway")
    status, head, body = await edge.raw(request_bytes)
    assert status == 400
    assert json.loads(body) == {"error": {"code": "bad_request", "message": reason}}
    assert b"application/json" in head.lower()
    assert SECRET not in head + body
    logged = [r for r in caplog.records if r.name.startswith(("aiohttp", "studio_gateway"))]
    assert SECRET.decode() not in caplog.text  # messages and tracebacks alike
    refusals = [r for r in logged if r.name == "studio_gateway.errors"]
    assert [(r.levelno, r.getMessage()) for r in refusals] == [
        (logging.INFO, f"refused a malformed request from 127.0.0.1: {reason}")
    ]
    assert errors_logged(caplog) == []
    health = await edge.client.get("/healthz")  # and the gateway serves on
    assert health.status == 200


# -- a client leaving a live event stream -----------------------------------------------------------


@pytest.mark.parametrize("accept", ["text/event-stream", "application/x-ndjson"])
async def test_a_client_leaving_a_live_event_stream_logs_at_most_one_info_line(
    edge: Edge, caplog: pytest.LogCaptureFixture, accept: str
) -> None:
    caplog.set_level(logging.INFO)
    desktop = await accepting_desktop(
        edge.nats_url, USER
    )  # takes the work, sends no events: the run stays live
    try:
        resp = await edge.client.post("/api/runs", headers=edge.auth(), data=json.dumps({"runner": "echo"}))
        assert resp.status == 202, await resp.text()
        run_id = (await resp.json())["runId"]
        seq = 0

        async def publish() -> None:
            nonlocal seq
            seq += 1
            await publish_event(
                desktop.nc, desktop.hostname, run_id, seq, "output", stream="stdout", data="x\n"
            )

        before = edge.connections()
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        writer.write(
            f"GET /api/runs/{run_id}/events HTTP/1.1\r\nHost: gw\r\nAccept: {accept}\r\n".encode()
            + edge.auth_line()
            + b"\r\n"
        )
        async with asyncio.timeout(TIMEOUT):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 "), head
            await publish()
            await reader.readuntil(b"x\\n")  # the stream is live
        caplog.clear()
        writer.transport.abort()  # the client is gone (Ctrl-C on `linkctl runs attach`)

        async def left() -> list[logging.LogRecord]:
            # The gateway notices when it next writes: an event (or, for SSE, a keepalive).
            await publish()
            return [r for r in caplog.records if r.name == "studio_gateway.errors"]

        await wait_until(left, TIMEOUT, interval=0.05, message="the gateway never noticed the client leaving")
        await wait_until(lambda: edge.connections() <= before, TIMEOUT, message="the handler never ended")
        # One info line; no traceback anywhere (the gateway's error middleware, aiohttp's server).
        about_it = [r for r in caplog.records if r.name in ("studio_gateway.errors", "aiohttp.server")]
        assert [(r.levelno, r.getMessage()) for r in about_it] == [
            (logging.INFO, f"GET /api/runs/{run_id}/events: the client left before the response ended")
        ]
        assert [r.getMessage() for r in caplog.records if r.exc_info] == []
        assert errors_logged(caplog) == []
        state = await edge.client.get(f"/api/runs/{run_id}", headers=edge.auth())
        assert (await state.json())["status"] not in ("failed",)  # leaving does not touch the run
    finally:
        await desktop.close()


# -- the same through `studio-gateway serve` ---------------------------------------------------------


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_studio_gateway_serve_answers_a_long_header_without_echoing_it_and_stops_cleanly(
    nats_server_factory: NatsServerFactory, stop: signal.Signals
) -> None:
    nats = nats_server_factory(token="tok")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "GATEWAY_", "TUNNEL_"))}
    env.update({"GATEWAY_JWT_SECRET": GATEWAY_SECRET, "NATS_TOKEN": "tok"})
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "studio_gateway.cli",
            "serve",
            "--port",
            str(port),
            "--nats-url",
            nats.url,
            "--public-url",
            nats.url,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def answer(data: bytes) -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
                sock.sendall(data)
                out = b""
                while chunk := sock.recv(65536):
                    out += chunk
                return out

        def ready() -> bool:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                out = answer(b"GET /healthz HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
            except OSError:
                return False
            head, _, body = out.partition(b"\r\n\r\n")
            return head.startswith(b"HTTP/1.1 200 ") and json.loads(body)["nats"] == "connected"

        wait_until_sync(ready, TIMEOUT, interval=0.05, message="the gateway never became ready")
        out = answer(b"GET /healthz HTTP/1.1\r\nHost: gw\r\nX-Api-Key: " + SECRET + b"A" * 9000 + b"\r\n\r\n")
        head, _, body = out.partition(b"\r\n\r\n")
        assert head.split(b" ", 2)[1] == b"400", out[:300]
        assert json.loads(body) == {
            "error": {"code": "bad_request", "message": "request line or header too long"}
        }
        proc.send_signal(stop)
        _, stderr = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    assert SECRET.decode() not in stderr and "Traceback" not in stderr, stderr
    records = [json.loads(line) for line in stderr.splitlines() if line.strip().startswith("{")]
    refusals = [r for r in records if r["logger"] == "studio_gateway.errors"]
    assert [(r["level"], r["message"]) for r in refusals] == [
        ("info", "refused a malformed request from 127.0.0.1: request line or header too long")
    ], records
