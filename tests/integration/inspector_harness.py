"""A linked desktop with its inspector on, for the inspector tests.

Real pieces only: an operator-mode nats-server, the gateway app, a :class:`linkd.daemon.LinkDaemon`
with ``--upstream`` (a small aiohttp service that records what reached it) and its inspector
on a free loopback port, and a NATS connection allowed to call the desktop (the gateway's
credentials) to send requests through the tunnel.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
from aiohttp import web
from nats.aio.client import Client, RawCredentials

import tunnel
from cli.nats_server import free_port
from linkd.daemon import LinkDaemon
from tests.helpers import NatsServerFactory
from tests.integration.gateway_harness import OperatorServer, start_operator_server
from tests.integration.linkd_harness import EVENT_TIMEOUT, daemon_settings, live_gateway, running_daemon

USER = "dev@example.com"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(64))
LOGIN_TOKEN = "upstream-issued-s3cr3t-token-0f9e"
LOGIN_COOKIE = "upstream-session-s3cr3t-7a7a"


@dataclass
class Seen:
    method: str
    path_qs: str
    headers: dict[str, str]
    body: bytes


@dataclass
class EchoUpstream:
    """Answers every path with what it got (JSON); ``/png`` binary, ``/fail`` a 503."""

    seen: list[Seen] = field(default_factory=list)
    port: int = field(default_factory=free_port)
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append(Seen(request.method, request.path_qs, dict(request.headers), body))
        if request.path == "/png":
            return web.Response(body=PNG, content_type="image/png")
        if request.path == "/fail":
            return web.json_response({"error": "down for maintenance"}, status=503)
        if request.path == "/login":  # answers with credentials of its own
            return web.json_response(
                {"access_token": LOGIN_TOKEN, "user": "ann"},
                headers={"Set-Cookie": f"sid={LOGIN_COOKIE}; HttpOnly", "X-Refresh-Token": LOGIN_TOKEN},
            )
        answer = {
            "method": request.method,
            "path": request.path_qs,
            "bodyBytes": len(body),
            "n": len(self.seen),
        }
        return web.json_response(answer, headers={"X-Upstream": "echo"})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@dataclass
class InspectedLink:
    daemon: LinkDaemon
    hostname: str
    upstream: EchoUpstream
    nc: Client
    op: OperatorServer

    @property
    def inspector_url(self) -> str:
        assert self.daemon.inspector is not None and self.daemon.inspector.url is not None
        return self.daemon.inspector.url.rstrip("/")

    async def fetch(
        self,
        path: str,
        *,
        method: str = "GET",
        headers: list[tuple[str, str]] | None = None,
        body: bytes | None = None,
    ) -> tuple[int, bytes]:
        """One request through the tunnel, as the gateway would send it."""
        async with await tunnel.fetch(
            self.nc,
            f"tunnel://{self.hostname}{path}",
            method=method,
            headers=headers or [],
            body=body,
            timeout=EVENT_TIMEOUT,
        ) as resp:
            return resp.status, await resp.read()


def as_json(data: bytes) -> Any:
    return json.loads(data)


@asynccontextmanager
async def inspected_link(
    factory: NatsServerFactory, tmp_path: Path, **settings: Any
) -> AsyncIterator[InspectedLink]:
    op = start_operator_server(factory, tmp_path)
    upstream = EchoUpstream()
    await upstream.start()
    try:
        options = {"inspect": True, "inspect_port": 0, **settings}
        async with (
            live_gateway(op.env()) as gw,
            running_daemon(
                tmp_path,
                gw.url,
                gw.token(USER),
                settings=daemon_settings(tmp_path, upstream_url=upstream.url, **options),
            ) as desk,
        ):
            nc = await nats.connect(
                op.server.url,
                user_credentials=RawCredentials(op.gateway_creds.read_text()),
                connect_timeout=EVENT_TIMEOUT,
            )
            try:
                yield InspectedLink(desk.daemon, desk.hostname, upstream, nc, op)
            finally:
                await nc.close()
    finally:
        await upstream.stop()
