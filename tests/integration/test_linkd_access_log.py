"""``linkd up`` logs one line per tunnelled request: a real daemon process, gateway, nats-server and upstream.

JSON (``--json-logs``): the ``linkd.access`` record carries method, path, status, bytesIn,
bytesOut, ms, route and error; text: ``GET /path 200 0B in 5B out 1.2ms``; an upstream
failure adds one WARNING line naming the upstream and its cause; ``--no-access-log``
leaves the lines out. Header values and bodies never appear.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

import tunnel
from cli.nats_server import free_port
from tests.helpers import NatsServerFactory, wait_until
from tests.integration.gateway_harness import OperatorServer, start_operator_server
from tests.integration.linkd_harness import LiveGateway, live_gateway
from tests.linkd_support import subprocess_env
from tunnel.websocket import WebSocketHandshakeError

pytestmark = [pytest.mark.timeout(90), pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")]

LINKD = [sys.executable, "-m", "linkd.cli"]
TIMEOUT = 20.0  # a cold Python start of the CLI is part of it
SECRET_HEADER = "Bearer hdr-secret-3f9a"
SECRET_BODY = b"body-secret-77c1" * 8


@pytest.fixture
def op(nats_server_factory: NatsServerFactory, tmp_path: Path) -> OperatorServer:
    return start_operator_server(nats_server_factory, tmp_path)


@dataclass
class Proc:
    proc: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)

    def json_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.lines:
            with suppress(ValueError):
                out.append(json.loads(line))
        return out

    def access(self) -> list[dict[str, Any]]:
        return [line for line in self.json_lines() if line.get("logger") == "linkd.access"]

    def text(self) -> str:
        return "\n".join(self.lines)


@asynccontextmanager
async def linkd_up(env: dict[str, str], *args: str) -> AsyncIterator[Proc]:
    proc = await asyncio.create_subprocess_exec(
        *LINKD,
        "up",
        "--no-inspect",
        *args,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    daemon = Proc(proc)

    async def read() -> None:
        assert proc.stderr is not None
        async for raw in proc.stderr:
            daemon.lines.append(raw.decode(errors="replace").rstrip("\n"))

    reader = asyncio.ensure_future(read())
    try:
        yield daemon
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), TIMEOUT) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await asyncio.gather(reader, return_exceptions=True)


async def login(gw: LiveGateway, env: dict[str, str], user: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *LINKD,
        "login",
        "--gateway",
        gw.url,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate((gw.token(user) + "\n").encode()), TIMEOUT)
    assert proc.returncode == 0, err


@asynccontextmanager
async def local_service() -> AsyncIterator[str]:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    async def echo(request: web.Request) -> web.Response:
        return web.Response(body=await request.read())

    async def ws_echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            await ws.send_str(message.data)
        return ws

    app = web.Application()
    app.router.add_get("/hello", hello)
    app.router.add_get("/ws", ws_echo)
    app.router.add_post("/echo", echo)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def online_host(daemon: Proc, *, json_mode: bool) -> str:
    if json_mode:
        line = await wait_until(
            lambda: next((line for line in daemon.json_lines() if line.get("state") == "online"), None),
            TIMEOUT,
            message=lambda: f"linkd never online: {daemon.lines[-10:]}",
        )
        return str(line["tunnel_hostname"])
    match = await wait_until(
        lambda: re.search(r"online as (\S+)", daemon.text()),
        TIMEOUT,
        message=lambda: f"linkd never online: {daemon.lines[-10:]}",
    )
    return match.group(1).rstrip(",;")


async def fetch(gw: LiveGateway, url: str, **kwargs: Any) -> tuple[int, bytes]:
    async with await tunnel.fetch(gw.nc, url, first_frame_timeout=TIMEOUT, **kwargs) as resp:
        return resp.status, await resp.read()


async def test_json_access_lines_with_fields_and_no_secrets(op: OperatorServer, tmp_path: Path) -> None:
    env = subprocess_env(tmp_path)
    async with live_gateway(op.env()) as gw:
        await login(gw, env, "alice")
        async with local_service() as service, linkd_up(env, "--json-logs", "--upstream", service) as daemon:
            host = await online_host(daemon, json_mode=True)
            assert await fetch(
                gw, f"tunnel://{host}/hello?x=1", headers=[("Authorization", SECRET_HEADER)]
            ) == (200, b"hello")
            assert await fetch(gw, f"tunnel://{host}/echo", method="POST", body=SECRET_BODY) == (
                200,
                SECRET_BODY,
            )
            status, _ = await fetch(gw, f"tunnel://{host}/api/links/status")
            assert status == 200
            await wait_until(lambda: len(daemon.access()) >= 3, TIMEOUT, message=lambda: daemon.lines[-10:])
            async with await tunnel.websocket_connect(gw.nc, f"tunnel://{host}/ws") as ws:
                await ws.send_text("ws-message-1234")
                assert (await ws.receive()).data == "ws-message-1234"
            await wait_until(lambda: len(daemon.access()) >= 4, TIMEOUT, message=lambda: daemon.lines[-10:])

            hello, echo, probe, upgraded = daemon.access()[:4]
            assert hello["level"] == "info" and hello["event"] == "access"
            fields = ("method", "path", "status", "bytesIn", "bytesOut", "route", "error")
            assert {k: hello[k] for k in fields} == {
                "method": "GET",
                "path": "/hello?x=1",
                "status": 200,
                "bytesIn": 0,
                "bytesOut": 5,
                "route": "upstream",
                "error": None,
            }
            assert isinstance(hello["ms"], int | float) and hello["ms"] >= 0
            assert hello["message"].startswith("GET /hello?x=1 200 0B in 5B out ")
            assert (echo["method"], echo["status"], echo["bytesIn"], echo["bytesOut"]) == (
                "POST",
                200,
                len(SECRET_BODY),
                len(SECRET_BODY),
            )
            assert (probe["path"], probe["route"], probe["status"]) == ("/api/links/status", "status", 200)
            # The WebSocket's line comes at the stream's end, with the bytes of both ways (frames).
            assert (upgraded["path"], upgraded["status"], upgraded["error"]) == ("/ws", 101, None)
            assert min(upgraded["bytesIn"], upgraded["bytesOut"]) > len("ws-message-1234")
            assert upgraded["message"].endswith(" upgraded")
        secrets_seen = "\n".join(daemon.lines)
        # No service behind the upstream URL: the request fails, one warning names the upstream and why.
        dead = f"http://127.0.0.1:{free_port()}"
        async with linkd_up(env, "--json-logs", "--upstream", dead) as daemon:
            host = await online_host(daemon, json_mode=True)
            status, body = await fetch(gw, f"tunnel://{host}/gone")
            assert status == 502 and json.loads(body)["error"]["code"] == "upstream_unreachable"
            await wait_until(lambda: daemon.access(), TIMEOUT, message=lambda: daemon.lines[-10:])
            line = daemon.access()[0]
            assert (line["status"], line["error"]) == (502, "upstream_unreachable")
            assert line["message"].endswith("error=upstream_unreachable")
            warnings = [w for w in daemon.json_lines() if w.get("logger") == "linkd.upstream"]
            assert [w["level"] for w in warnings] == ["warning"]
            assert len(warnings) == 1 and dead in warnings[0]["message"]
            assert "refused" in warnings[0]["message"].lower(), warnings[0]["message"]
            # A WebSocket (a dev server's HMR socket) to the dead service: the same line and warning.
            with pytest.raises(WebSocketHandshakeError):
                await tunnel.websocket_connect(gw.nc, f"tunnel://{host}/hmr")
            await wait_until(lambda: len(daemon.access()) >= 2, TIMEOUT, message=lambda: daemon.lines[-10:])
            hmr = daemon.access()[1]
            assert (hmr["path"], hmr["error"]) == ("/hmr", "upstream_unreachable")
            warnings = [w["message"] for w in daemon.json_lines() if w.get("logger") == "linkd.upstream"]
            assert len(warnings) == 2 and dead in warnings[1] and "refused" in warnings[1].lower()
    assert "hdr-secret" not in secrets_seen and "body-secret" not in secrets_seen
    assert "secret" not in "\n".join(daemon.lines)


async def test_text_access_lines_and_the_switch_to_turn_them_off(op: OperatorServer, tmp_path: Path) -> None:
    env = subprocess_env(tmp_path)
    async with live_gateway(op.env()) as gw, local_service() as service:
        await login(gw, env, "bob")
        async with linkd_up(env, "--upstream", service) as daemon:
            host = await online_host(daemon, json_mode=False)
            assert await fetch(gw, f"tunnel://{host}/hello", headers=[("Cookie", "sid=hdr-secret")]) == (
                200,
                b"hello",
            )
            access = re.compile(r"^\d\d:\d\d:\d\d GET /hello 200 0B in 5B out \d+(\.\d)?ms$")
            await wait_until(
                lambda: any(access.match(line) for line in daemon.lines),
                TIMEOUT,
                message=lambda: daemon.lines[-10:],
            )
            assert not any("hdr-secret" in line for line in daemon.lines)

        async with linkd_up(env, "--json-logs", "--no-access-log", "--upstream", service) as quiet:
            host = await online_host(quiet, json_mode=True)
            assert await fetch(gw, f"tunnel://{host}/hello") == (200, b"hello")
            # The request's own end is logged by nobody; a later state line proves the log flowed.
        assert quiet.access() == []
        assert any(line.get("state") == "stopped" for line in quiet.json_lines()), quiet.lines[-5:]
