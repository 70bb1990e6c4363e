"""Chaos around linkd: kill -9 and restart; its network paused (shorter/longer than idle), throttled.

Real pieces: an operator-mode nats-server, the gateway app on a port, the daemon as a process
(for kill -9) or in-process (for network faults: its NATS connection goes through
``tests.faultproxy.FaultProxy`` because the gateway hands out the proxy's URL as the public
NATS URL, while the gateway itself connects directly, as in a data centre).

Invariants under the network faults, for every request of a steady load (status probes and
streamed 1 MiB downloads through the daemon's upstream proxy, each body hash-checked):
it ends with success or a ``tunnel.TunnelError`` within its timeouts (never a hang, never
another exception), success means the exact bytes, a pause shorter than the idle timeout
costs no request at all, and after a longer one new requests succeed again.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest
from aiohttp import web

import tunnel
from cli.nats_server import free_port
from linkd.daemon import State
from tests.faultproxy import FaultProxy
from tests.faults.killable_processes import LinkdProcess, presence, wait_presence
from tests.helpers import NatsServerFactory, wait_until
from tests.integration.gateway_harness import start_operator_server
from tests.integration.linkd_harness import daemon_settings, live_gateway, running_daemon

pytestmark = pytest.mark.timeout(120)

IDLE: Final = 2.0  # the caller's idle and first-frame timeouts
TOTAL: Final = 8.0  # the caller's overall deadline
HANG_LIMIT: Final = TOTAL + 3.0  # a request still running after this has hung
SHORT_PAUSE: Final = 0.4
THROTTLE: Final = 400_000  # bytes per second per direction
LONG_PAUSE: Final = 3.5
BODY: Final = hashlib.shake_256(b"h9 linkd chaos").digest(1024 * 1024)
BODY_SHA: Final = hashlib.sha256(BODY).hexdigest()
PIECE: Final = 64 * 1024


# ------------------------------------------------------------------ kill -9


async def test_linkd_kill_9_presence_goes_offline_then_online_after_restart(
    nats_server_factory: NatsServerFactory, tmp_path: Path
) -> None:
    op = start_operator_server(nats_server_factory, tmp_path)
    async with live_gateway(op.env(NATS_TUNNEL_SESSION_TTL_SECONDS="600")) as gw:
        token = gw.token("max")
        linkd = LinkdProcess(tmp_path, gw.url, token)
        try:
            await linkd.start()
            await linkd.wait_message("online as")
            await wait_presence(gw.url, token, True, 10.0)
            await linkd.kill()  # SIGKILL: no drain, no unsubscribe; the TCP connection just drops
            # nats-server drops its subscriptions with the connection: no responders, fast.
            took = await wait_presence(gw.url, token, False, 5.0)
            assert (await presence(gw.url, token))["reason"] == "not_connected"
            print(f"offline {took:.2f}s after kill -9")
            # Restart (same keyring: same NATS key, same host): online again.
            await linkd.start()
            took = await wait_presence(gw.url, token, True, 20.0)
            print(f"online {took:.2f}s after restart")
        finally:
            await linkd.kill()


# ------------------------------------------------------------------ network pauses


@dataclass
class Op:
    kind: str
    started: float
    ended: float
    outcome: str


class Load:
    """Status probes and downloads through the daemon; every request ends up in ``ops``."""

    def __init__(self, client: tunnel.TunnelClient, hostname: str) -> None:
        self.client = client
        self.hostname = hostname
        self.ops: list[Op] = []
        self.violations: list[str] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.ensure_future(self._worker("status")) for _ in range(2)]
        self._tasks.append(asyncio.ensure_future(self._worker("download")))

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def between(self, start: float, end: float) -> list[Op]:
        """Requests in flight at some moment of [start, end]."""
        return [op for op in self.ops if op.started <= end and op.ended >= start]

    def ok_after(self, moment: float, kind: str) -> int:
        return sum(1 for op in self.ops if op.started >= moment and op.kind == kind and op.outcome == "ok")

    async def _worker(self, kind: str) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                outcome = await asyncio.wait_for(self._one(kind), HANG_LIMIT)
            except tunnel.TunnelError as exc:
                outcome = exc.code
            except TimeoutError:
                outcome = "hang"
                self.violations.append(f"{kind} hung past {HANG_LIMIT}s")
            except Exception as exc:  # anything untyped is a violation
                outcome = type(exc).__name__
                self.violations.append(f"{kind}: untyped {exc!r}")
            self.ops.append(Op(kind, started, time.monotonic(), outcome))
            await asyncio.sleep(0.01)  # let the other workers run (not synchronisation)

    async def _one(self, kind: str) -> str:
        path = "/api/links/status" if kind == "status" else "/download"
        async with await self.client.fetch(f"tunnel://{self.hostname}{path}") as resp:
            body = await resp.read()
            if resp.status != 200:
                return f"http{resp.status}"
        if kind == "download" and hashlib.sha256(body).hexdigest() != BODY_SHA:
            self.violations.append(f"download delivered {len(body)} wrong bytes as success")
        return "ok"


def summary(ops: list[Op]) -> dict[str, int]:
    return dict(Counter(f"{op.kind}:{op.outcome}" for op in ops))


@asynccontextmanager
async def download_service() -> AsyncIterator[str]:
    async def download(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = len(BODY)
        await response.prepare(request)
        for i in range(0, len(BODY), PIECE):
            await response.write(BODY[i : i + PIECE])
            await asyncio.sleep(0.01)  # ~0.2 s per body: often in flight when a fault hits
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/download", download)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_daemon_network_pauses_shorter_and_longer_than_the_idle_timeout(
    nats_server_factory: NatsServerFactory, tmp_path: Path
) -> None:
    op = start_operator_server(nats_server_factory, tmp_path)
    async with FaultProxy(op.server.port) as proxy, download_service() as upstream:
        env = op.env(NATS_TUNNEL_SESSION_TTL_SECONDS="600", NATS_PUBLIC_URL=proxy.url)
        settings = daemon_settings(tmp_path, upstream_url=upstream)
        async with (
            live_gateway(env) as gw,
            running_daemon(tmp_path, gw.url, gw.token("pat"), settings=settings) as d,
        ):
            assert len(proxy.connections) == 1, "the daemon does not connect through the proxy"
            client = tunnel.TunnelClient(
                gw.nc, timeouts=tunnel.Timeouts(first_frame=IDLE, idle=IDLE, total=TOTAL)
            )
            load = Load(client, d.hostname)
            load.start()
            try:
                await wait_until(lambda: load.ok_after(0, "download") >= 2, 10.0, message="no baseline")
                # Shorter than the idle timeout: slower for a moment, nothing fails.
                short_at = time.monotonic()
                proxy.pause()
                await asyncio.sleep(SHORT_PAUSE)  # the fault's duration, not a synchronisation
                proxy.resume()
                short_healed = time.monotonic()
                await wait_until(lambda: load.ok_after(short_healed, "download") >= 2, 10.0)
                # A slow link (about a third of a body per second each way): slower, still correct.
                throttled_at = time.monotonic()
                proxy.throttle(THROTTLE)
                await wait_until(lambda: load.ok_after(throttled_at, "download") >= 1, TOTAL + 5.0)
                proxy.throttle(None)
                unthrottled = time.monotonic()
                # Longer than the idle timeout: requests in flight fail typed, within their timeouts.
                paused_at = time.monotonic()
                proxy.pause()
                await asyncio.sleep(LONG_PAUSE)
                proxy.resume()
                healed_at = time.monotonic()
                await wait_until(
                    lambda: (
                        load.ok_after(healed_at, "status") >= 3 and load.ok_after(healed_at, "download") >= 1
                    ),
                    15.0,
                    interval=0.05,
                    message="no recovery after the long pause",
                )
                recovered_in = time.monotonic() - healed_at
            finally:
                await load.stop()
                await client.aclose()
            assert load.violations == []
            assert max(op.ended - op.started for op in load.ops) < HANG_LIMIT
            before_throttle = [op for op in load.ops if op.ended < throttled_at]
            short = load.between(short_at, short_healed)
            throttled = load.between(throttled_at, unthrottled)
            print(f"throttled: {summary(throttled)}")
            long = load.between(paused_at, healed_at)
            print(f"short pause: {summary(short)}; long pause: {summary(long)}")
            print(f"recovered {recovered_in:.2f}s after the long pause")
            # Everything before the throttle succeeded, across the short pause too.
            assert short and all(op.outcome == "ok" for op in before_throttle), summary(before_throttle)
            # On the slow link bulk data delays small answers (one connection, head-of-line): a
            # probe may miss its first-frame timeout, typed; bodies still arrive whole.
            assert {op.outcome for op in throttled} <= {"ok", "tunnel_no_first_frame", "tunnel_idle_timeout"}
            assert any(op.kind == "download" and op.outcome == "ok" for op in throttled)
            # The long pause cost something (it outlasted the idle timeout), and only typed errors.
            assert any(op.outcome != "ok" for op in long), summary(long)
            assert {op.outcome for op in long} <= {
                "ok",
                "tunnel_idle_timeout",
                "tunnel_no_first_frame",
                "tunnel_timeout",
                "tunnel_unreachable",
                "tunnel_aborted",
                "tunnel_stalled",
                "tunnel_protocol_error",
            }, summary(long)
            # A request cut off by the pause fails within its timeouts (idle + slack), not later.
            for cut in long:
                if cut.outcome in ("tunnel_idle_timeout", "tunnel_no_first_frame"):
                    assert cut.ended - max(cut.started, paused_at) < IDLE + 2.0, cut
            await wait_until(lambda: d.daemon.server is not None and d.daemon.server.in_flight == 0, 10.0)
            await d.wait_state(State.ONLINE, 10.0)
