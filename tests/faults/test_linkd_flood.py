"""A flood of requests at one real linkd daemon is bounded by the per-host concurrency limit.

The daemon is the real ``LinkDaemon`` (gateway session, operator-mode nats-server, routes and
``--upstream`` proxy); its upstream holds every request until released, so the flood piles
up in flight. Past ``max_concurrent`` the daemon answers at once with ``503`` +
``Retry-After`` (its handler never runs), every accepted request completes once the upstream
lets go, nothing hangs, and afterwards the status probe answers and the daemon is online.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final

import pytest
from aiohttp import web

import tunnel
from cli.nats_server import free_port
from linkd.daemon import State
from tests.helpers import NatsServerFactory, wait_until
from tests.integration.gateway_harness import start_operator_server
from tests.integration.linkd_harness import daemon_settings, live_gateway, probe, running_daemon

pytestmark = pytest.mark.timeout(90)

EXTRA: Final = 40  # requests beyond the limit
HARD_LIMIT: Final = 30.0  # no request of the flood may take longer than this


class Gate:
    """A local service whose ``/slow`` answers only once released."""

    def __init__(self) -> None:
        self.arrived = 0
        self.release = asyncio.Event()
        app = web.Application()
        app.router.add_get("/slow", self.slow)
        self.runner = web.AppRunner(app, handle_signals=False)
        self.port = free_port()

    async def slow(self, request: web.Request) -> web.Response:
        self.arrived += 1
        await self.release.wait()
        return web.Response(text="done")


@asynccontextmanager
async def gate() -> AsyncIterator[Gate]:
    g = Gate()
    await g.runner.setup()
    await web.TCPSite(g.runner, "127.0.0.1", g.port).start()
    try:
        yield g
    finally:
        g.release.set()
        await g.runner.cleanup()


async def test_a_flood_gets_503_with_retry_after_past_the_limit_and_the_daemon_stays_healthy(
    nats_server_factory: NatsServerFactory, tmp_path: Path
) -> None:
    op = start_operator_server(nats_server_factory, tmp_path)
    async with (
        gate() as upstream,
        live_gateway(op.env(NATS_TUNNEL_SESSION_TTL_SECONDS="600")) as gw,
        running_daemon(
            tmp_path,
            gw.url,
            gw.token("flood"),
            settings=daemon_settings(tmp_path, upstream_url=f"http://127.0.0.1:{upstream.port}"),
        ) as d,
    ):
        server = d.daemon.server
        assert server is not None
        limit = server.max_concurrent
        client = tunnel.TunnelClient(gw.nc, timeouts=tunnel.Timeouts(first_frame=20.0, idle=20.0, total=25.0))

        async def one(i: int) -> tuple[int, str | None, str]:
            async with await client.fetch(f"tunnel://{d.hostname}/slow?i={i}") as resp:
                return resp.status, resp.header("retry-after"), (await resp.read()).decode()

        tasks = [asyncio.ensure_future(asyncio.wait_for(one(i), HARD_LIMIT)) for i in range(limit + EXTRA)]
        try:
            await wait_until(
                lambda: server.stats.overloaded >= EXTRA,
                20.0,
                interval=0.05,
                message=f"only {server.stats.overloaded} requests refused as busy",
            )
            # The busy answers reach the caller while the accepted requests are still held.
            await wait_until(
                lambda: sum(t.done() for t in tasks) >= EXTRA, 10.0, message="busy answers never arrived"
            )
            assert not upstream.release.is_set()
            assert server.in_flight == limit
            upstream.release.set()
            results = await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            upstream.release.set()
            for task in tasks:
                task.cancel()
        errors = [r for r in results if isinstance(r, BaseException)]
        assert all(isinstance(e, tunnel.TunnelError) for e in errors), errors[:3]
        outcomes = [r for r in results if not isinstance(r, BaseException)]
        busy = [r for r in outcomes if r[0] == 503]
        assert len(busy) == EXTRA == server.stats.overloaded
        for _, retry_after, body in busy:
            assert retry_after is not None and int(retry_after) >= 1
            assert json.loads(body)["error"]["code"]
        # Accepted requests: the upstream's answer, or a typed upstream timeout (the pool queue).
        assert {status for status, _, _ in outcomes if status != 503} <= {200, 504}
        assert sum(1 for status, _, _ in outcomes if status == 200) >= limit // 2
        assert upstream.arrived <= limit
        # Healthy afterwards: nothing left in flight, the probe answers, still online.
        await wait_until(lambda: server.in_flight == 0, 10.0, message="requests left in flight")
        doc = await probe(gw.nc, d.hostname)
        assert doc["tunnelHostname"] == d.hostname
        assert d.daemon.state is State.ONLINE
        await client.aclose()
