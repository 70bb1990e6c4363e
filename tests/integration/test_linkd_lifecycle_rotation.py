"""Credential rotation in ``linkd up`` is make-before-break: no caller ever notices it.

Real operator-mode nats-server, the real gateway on a port, the daemon in-process with a
real local service behind it (``--upstream``). Each refresh opens a new connection and
server, switches, and lets the old connection finish what it has; these tests hold
requests across switches, break the new connection on purpose, and move the hostname.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web
from nats.aio.client import Client

import tunnel
from cli.nats_server import free_port
from linkd.daemon import State
from studio_gateway.config import GatewayConfig
from studio_gateway.hostnames import tunnel_hostname
from tests.helpers import NatsServerFactory, wait_until
from tests.integration.gateway_harness import OperatorServer, start_operator_server
from tests.integration.linkd_harness import (
    EVENT_TIMEOUT,
    RunningDaemon,
    daemon_settings,
    live_gateway,
    probe,
    running_daemon,
)

pytestmark = pytest.mark.timeout(90)

CHUNK = b"x" * 32 * 1024
UPLOAD_PART = 64 * 1024


@pytest.fixture
def op(nats_server_factory: NatsServerFactory, tmp_path: Path) -> OperatorServer:
    return start_operator_server(nats_server_factory, tmp_path)


class LocalService:
    """The desktop's local HTTP service: slow downloads, hashed uploads, a response held on an event."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.port = free_port()
        app = web.Application()
        app.router.add_get("/slow", self.slow)
        app.router.add_post("/upload", self.upload)
        app.router.add_get("/held", self.held)
        self.runner = web.AppRunner(app, handle_signals=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def slow(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(int(request.query["chunks"])):
            await response.write(CHUNK)
            await asyncio.sleep(0.1)
        return response

    async def upload(self, request: web.Request) -> web.Response:
        digest, size = hashlib.sha256(), 0
        async for part in request.content.iter_chunked(UPLOAD_PART):
            digest.update(part)
            size += len(part)
        return web.json_response({"size": size, "sha256": digest.hexdigest()})

    async def held(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(CHUNK)
        await self.release.wait()
        for _ in range(3):
            await response.write(CHUNK)
        return response


@asynccontextmanager
async def local_service() -> AsyncIterator[LocalService]:
    service = LocalService()
    await service.runner.setup()
    await web.TCPSite(service.runner, "127.0.0.1", service.port).start()
    try:
        yield service
    finally:
        service.release.set()
        await service.runner.cleanup()


def upload_parts(n: int) -> list[bytes]:
    return [bytes([i % 251]) * UPLOAD_PART for i in range(n)]


async def paced(parts: list[bytes], pause: float, gate: asyncio.Event | None = None) -> AsyncIterator[bytes]:
    """A request body sent part by part; after the first part, waits for ``gate`` (if any)."""
    for i, part in enumerate(parts):
        yield part
        if i == 0 and gate is not None:
            await gate.wait()
        await asyncio.sleep(pause)


async def upload(nc: Client, host: str, parts: list[bytes], gate: asyncio.Event | None = None) -> None:
    """POST the parts through the tunnel; the service must have received exactly them."""
    async with await tunnel.fetch(
        nc,
        f"tunnel://{host}/upload",
        method="POST",
        body=paced(parts, 0.05, gate),
        first_frame_timeout=EVENT_TIMEOUT,
    ) as resp:
        assert resp.status == 200, resp.status
        got = json.loads(await resp.read())
    whole = b"".join(parts)
    assert got == {"size": len(whole), "sha256": hashlib.sha256(whole).hexdigest()}


def draining_requests(d: RunningDaemon) -> int:
    """Requests in flight on replaced connections (all in flight minus the current server's)."""
    current = d.daemon.server.in_flight if d.daemon.server is not None else 0
    return int(d.daemon.status_document()["inFlightRequests"]) - current


async def test_short_ttl_credentials_rotate_for_30s_with_zero_failed_requests(
    op: OperatorServer, tmp_path: Path
) -> None:
    ttl = 5
    duration = 30.0
    stream_chunks = 20  # 2-second downloads: every one spans a refresh (about one a second here)
    connections: list[object] = []
    async with (
        local_service() as service,
        live_gateway(op.env(NATS_TUNNEL_SESSION_TTL_SECONDS=str(ttl))) as gw,
        running_daemon(
            tmp_path,
            gw.url,
            gw.token("carol"),
            settings=daemon_settings(tmp_path, upstream_url=service.url),
            on_connection=connections.append,
        ) as d,
    ):
        nc = gw.nc
        ok = 0
        failures: list[str] = []
        loop = asyncio.get_running_loop()
        end = loop.time() + duration
        spanning = {"download": 0, "upload": 0}  # in flight while the credentials were refreshed
        probe_times: list[float] = []

        async def keep_probing() -> None:
            nonlocal ok
            while loop.time() < end:
                try:
                    started = loop.time()
                    doc = await probe(nc, d.hostname)
                    probe_times.append(loop.time() - started)
                    assert doc["tunnelHostname"] == d.hostname
                    ok += 1
                except tunnel.TunnelError as exc:
                    failures.append(f"{loop.time() - end + duration:.2f}s: probe: {exc!r}")
                await asyncio.sleep(0.02)

        async def keep_working() -> None:
            nonlocal ok
            n = 0
            while loop.time() < end:
                n += 1
                async with await tunnel.fetch(
                    nc,
                    f"tunnel://{d.hostname}/api/links/work",
                    method="POST",
                    body=(
                        b'{"runId":"rot-%d","threadId":"t","userId":"u","runFenceToken":1,'
                        b'"runner":"mock","input":{"count":3}}' % n
                    ),
                    first_frame_timeout=EVENT_TIMEOUT,
                ) as resp:
                    if resp.status == 202:
                        ok += 1
                    else:
                        failures.append(f"work answered {resp.status}")
                await asyncio.sleep(0.05)

        async def keep_streaming() -> None:
            nonlocal ok
            while loop.time() < end:
                before = d.daemon.refreshes
                async with await tunnel.fetch(
                    nc,
                    f"tunnel://{d.hostname}/slow?chunks={stream_chunks}",
                    first_frame_timeout=EVENT_TIMEOUT,
                ) as resp:
                    body = await resp.read()
                if resp.status == 200 and body == CHUNK * stream_chunks:
                    ok += 1
                    spanning["download"] += d.daemon.refreshes > before
                else:
                    failures.append(f"slow stream: {resp.status}, {len(body)} bytes")

        async def keep_uploading() -> None:
            nonlocal ok
            parts = upload_parts(16)  # 1 MiB in 64 KiB parts over about a second
            while loop.time() < end:
                before = d.daemon.refreshes
                await upload(nc, d.hostname, parts)
                ok += 1
                spanning["upload"] += d.daemon.refreshes > before

        names = ("probing", "probing", "working", "streaming", "uploading")
        results = await asyncio.gather(
            keep_probing(),
            keep_probing(),
            keep_working(),
            keep_streaming(),
            keep_uploading(),
            return_exceptions=True,
        )
        for name, result in zip(names, results, strict=True):
            if isinstance(result, BaseException):
                # Which loop, when, and how the refreshes went: a failure here is rare and needs all three.
                at = loop.time() - end + duration
                failures.append(f"{at:.2f}s: {name}: {result!r}; daemon: {d.messages()[-6:]}")
        refreshes = d.daemon.refreshes
        print(
            f"\n{ok} requests OK ({spanning} across a refresh), {len(failures)} failed, "
            f"{refreshes} credential refreshes in {duration:.0f}s; probe p50 "
            f"{sorted(probe_times)[len(probe_times) // 2] * 1000:.1f} ms, "
            f"max {max(probe_times) * 1000:.0f} ms, {sum(t > 0.5 for t in probe_times)} over 500 ms"
        )
        assert failures == []
        assert spanning["download"] >= 3 and spanning["upload"] >= 3, spanning
        assert refreshes >= duration / ttl, d.messages()
        # Never offline; each refresh is one line and one new connection; replaced ones get closed.
        assert State.OFFLINE not in [c.state for c in d.changes]
        assert sum(c.event == "credentials_refreshed" for c in d.changes) == refreshes
        assert len(connections) == refreshes + 1 and connections[-1] is d.daemon.nc
        old = [c for c in connections[:-1] if isinstance(c, Client)]
        await wait_until(
            lambda: all(c.is_closed for c in old), EVENT_TIMEOUT, message="a replaced connection stayed open"
        )


async def test_requests_in_flight_on_the_replaced_connection_complete(
    op: OperatorServer, tmp_path: Path
) -> None:
    async with (
        local_service() as service,
        live_gateway(op.env(NATS_TUNNEL_SESSION_TTL_SECONDS="5")) as gw,
        running_daemon(
            tmp_path, gw.url, gw.token("heidi"), settings=daemon_settings(tmp_path, upstream_url=service.url)
        ) as d,
    ):
        nc, host = gw.nc, d.hostname
        parts = upload_parts(8)
        download = await tunnel.fetch(nc, f"tunnel://{host}/held", first_frame_timeout=EVENT_TIMEOUT)
        async with download:
            body = download.aiter_bytes()
            first = await anext(body)  # the response started: the request is in flight
            uploading = asyncio.ensure_future(upload(nc, host, parts, gate=service.release))
            await wait_until(
                lambda: d.daemon.status_document()["inFlightRequests"] == 2, EVENT_TIMEOUT, interval=0.01
            )
            # Both requests stay on the connection they started on, which a refresh then replaces.
            await wait_until(
                lambda: draining_requests(d) == 2,
                EVENT_TIMEOUT,
                interval=0.01,
                message=f"no refresh replaced the requests' connection: {d.messages()}",
            )
            service.release.set()
            rest = b"".join([part async for part in body])
            assert download.status == 200
            assert first + rest == CHUNK * 4
            await asyncio.wait_for(uploading, EVENT_TIMEOUT)
        await wait_until(lambda: draining_requests(d) == 0, EVENT_TIMEOUT)
        assert State.OFFLINE not in [c.state for c in d.changes]
        assert (await probe(nc, host))["tunnelHostname"] == host


async def test_a_new_connection_that_fails_leaves_the_old_one_serving(
    op: OperatorServer, tmp_path: Path
) -> None:
    ttl = 10  # refreshed after about 2 s; the first credential is good for 9 s, the test needs ~4
    env = op.env(NATS_TUNNEL_SESSION_TTL_SECONDS=str(ttl))
    connections: list[object] = []
    async with (
        live_gateway(env) as gw,
        running_daemon(tmp_path, gw.url, gw.token("ivan"), on_connection=connections.append) as d,
    ):
        nc, host, first = gw.nc, d.hostname, d.daemon.nc
        dead = f"nats://127.0.0.1:{free_port()}"  # nothing listens there
        # The gateway now hands out a NATS URL that refuses connections.
        await gw.stop()
        gw.config = GatewayConfig.from_env({**env, "NATS_PUBLIC_URL": dead})
        await gw.start()
        nc = gw.nc
        await wait_until(
            lambda: any("cannot connect with the new credentials" in m for m in d.messages()),
            ttl,
            message=f"no failed refresh: {d.messages()}",
        )
        # Still online on the first connection, serving.
        assert d.daemon.nc is first and d.daemon.state is State.ONLINE
        assert (await probe(nc, host))["tunnelHostname"] == host
        failed = [m for m in d.messages() if m.startswith("credentials refresh failed")]
        assert "still online until" in failed[0], failed
        # The gateway hands out the real URL again: the next retry switches, still never offline.
        await gw.stop()
        gw.config = GatewayConfig.from_env(env)
        await gw.start()
        nc = gw.nc
        await wait_until(lambda: d.daemon.refreshes >= 1, ttl, message=f"never refreshed: {d.messages()}")
        assert d.daemon.nc is not first and d.daemon.nc is connections[-1]
        assert (await probe(nc, host))["tunnelHostname"] == host
        assert State.OFFLINE not in [c.state for c in d.changes], d.messages()
        await wait_until(lambda: first is not None and first.is_closed, EVENT_TIMEOUT)


async def test_a_refresh_with_another_hostname_serves_the_new_host_and_drains_the_old(
    op: OperatorServer, tmp_path: Path
) -> None:
    async with (
        local_service() as service,
        live_gateway(op.env(NATS_TUNNEL_SESSION_TTL_SECONDS="5")) as gw,
        running_daemon(
            tmp_path, gw.url, gw.token("judy"), settings=daemon_settings(tmp_path, upstream_url=service.url)
        ) as d,
    ):
        nc, old_host = gw.nc, d.hostname
        held = await tunnel.fetch(nc, f"tunnel://{old_host}/held", first_frame_timeout=EVENT_TIMEOUT)
        async with held:
            body = held.aiter_bytes()
            first = await anext(body)
            # From the next refresh on, the gateway's answer is for another hostname.
            d.daemon.gateway.token_provider = lambda: gw.token("mallory")
            new_host = tunnel_hostname("mallory")
            await wait_until(lambda: d.hostname == new_host, EVENT_TIMEOUT, message=str(d.messages()))
            assert (await probe(nc, new_host))["tunnelHostname"] == new_host
            assert any(f"now serving {new_host} (was {old_host})" in m for m in d.messages()), d.messages()
            assert f"online as {new_host}" in d.messages()
            # The request on the old host finishes there.
            service.release.set()
            assert first + b"".join([part async for part in body]) == CHUNK * 4

        # Then the old host is gone (its connection closed after the drain).
        async def old_host_gone() -> bool:
            try:
                await probe(nc, old_host, timeout=1.0)
            except tunnel.TunnelUnreachable:
                return True
            return False

        await wait_until(old_host_gone, EVENT_TIMEOUT, message=f"{old_host} still answers")
        assert State.OFFLINE not in [c.state for c in d.changes]
