#!/usr/bin/env python3
"""Soak the whole link: nats-server, two gateways and ``linkd up`` as real processes,
mixed load, faults one after another, invariants checked as it goes and at the end.

The stack (all on loopback, in a temporary directory):

- nats-server in operator/JWT mode with JetStream on a file store (survives its restarts),
  or with ``--cluster N`` an N-node cluster of them (routes, clustered JetStream; the run
  stream, buckets and consumers replicated min(N, 3) times; every node restartable on its
  ports with its store);
- two ``studio-gateway serve`` processes sharing it (runs, projector, reaper), given every
  node's URL;
- ``linkd up`` for one user, its NATS connection through a fault-injecting TCP proxy (one per
  node; the gateways hand out the proxies' URLs), forwarding other paths to a local HTTP
  service of this script (``--upstream``), so bodies can be checked byte for byte.

Load, all the time: small tunnel requests to the desktop's ``/api/links/status``, streamed
multi-MiB downloads and uploads through its upstream proxy (every body sha256-checked),
presence probes (``/api/links/me``) and mock runs (``POST /api/runs``) on either gateway.

Faults, drawn at random (each once per round): kill -9 and restart of linkd and of a gateway;
the daemon's network paused for less and for more than the idle and liveness timeouts,
throttled, blackholed, reset; on one server, kill -9 and restart of nats-server; on a
cluster, kill -9 of a node instead: a random one, the one linkd is connected to, the leader
of the run stream ``LINK_RUNS``, or the leader of the daemon host's consumer (what the
projectors pull); the log says what else the node held. The killed node stays down until
everything works without it ("failover", timed from the kill), then is restarted and waited
for until every replica caught up. After each fault: the desktop answers through the tunnel,
both gateways say runs are ready and a new run completes (bounded; timed from the healing).

Invariants (any breach is printed at once and makes the exit status 1):

- every tunnel request ends, within its timeouts, with success or a typed ``TunnelError``;
  a success always carries the right bytes (no corrupted or truncated body);
- gateways never answer 500 and never hang;
- every accepted run (202), the load's and the recovery checks' alike, reaches a terminal state
  within ``SETTLE_TIMEOUT`` of the load's end; any run's events are seq 1..k once each and a
  prefix of the mock runner's output; a completed run has them all, one ``done``;
- after each fault everything works again within ``RECOVER_TIMEOUT`` (for a node kill also
  before the node is restarted: a cluster carries on while a majority runs);
- after the last fault, a new run completes and a tunnel request succeeds.

Totals at the end: requests by kind and outcome (error codes), bytes verified, runs by
terminal status and failure kind, recovery times per fault (after healing; for node kills
also after the kill with the node down), peak memory of every process.

    python scripts/soak.py --minutes 10
    python scripts/soak.py --cluster 3 --minutes 10
    python scripts/soak.py --seconds 60 --seed 7 --faults kill-9-linkd,pause-long
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hashlib
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # the process harness lives with the tests

import httpx  # noqa: E402
from aiohttp import web  # noqa: E402

import tunnel  # noqa: E402
from contract.run_protocol import RUN_STREAM  # noqa: E402
from linkd.runners.mock import mock_chunk  # noqa: E402
from studio_gateway.runs.store import (  # noqa: E402
    ACTIVE_BUCKET,
    OUTPUT_BUCKET,
    STATE_BUCKET,
    host_consumer_name,
)
from tests.faultproxy import FaultProxy  # noqa: E402
from tests.faults.chaos import parse_fault_names  # noqa: E402
from tests.integration.runs_harness import (  # noqa: E402
    GatewayProcess,
    JetStreamCluster,
    JetStreamNats,
    LinkdProcess,
    RunsStack,
    stack_env,
)
from tunnel.connect import connect  # noqa: E402

KiB: Final = 1024
MiB: Final = 1024 * KiB
USER: Final = "soak@example.com"
# Scaled-down production timeouts (60 s liveness, 10 s dispatch, 20 s idle), same proportions.
LIVENESS: Final = 4.0
DISPATCH_TIMEOUT: Final = 3.0
IDLE_TIMEOUT: Final = 3.0
FIRST_FRAME_TIMEOUT: Final = 5.0
TOTAL_TIMEOUT: Final = 20.0
# A tunnel request still running this long after it started broke its timeouts.
REQUEST_BOUND: Final = TOTAL_TIMEOUT + 5.0
HTTP_TIMEOUT: Final = 10.0
RECOVER_TIMEOUT: Final = 40.0
# Every accepted run must be terminal this long after the load stopped.
SETTLE_TIMEOUT: Final = DISPATCH_TIMEOUT + LIVENESS + 20.0
# Runs looked at at once while settling (a 10-minute soak accepts ~1500).
SETTLE_CONCURRENCY: Final = 8
SHOWN_VIOLATIONS: Final = 50  # in the summary
UPLINK_RESULT: Final = re.compile(
    r'^studio_runs_uplink_events_total\{result="([a-z_]+)"\} (\S+)$', re.MULTILINE
)
RUN_INPUT: Final = {"count": 20, "delayMs": 40}
# What recovered() runs to see runs work end to end.
PROBE_RUN: Final = {"runner": "mock", "input": {"count": 2, "delayMs": 10}}
PROBE_OUTPUT: Final = "".join(mock_chunk("chunk", i, None) for i in range(2))
# One probe run may take this long; a stuck one is left to the settling checks, and another tried.
PROBE_TIMEOUT: Final = DISPATCH_TIMEOUT + LIVENESS + 5.0
EXPECTED_OUTPUT: Final = "".join(mock_chunk("chunk", i, None) for i in range(20))
DOWNLOAD_SIZES: Final = (256 * KiB, 1 * MiB, 4 * MiB)
UPLOAD_SIZES: Final = (64 * KiB, 1 * MiB, 2 * MiB)
TERMINAL: Final = frozenset({"completed", "failed", "cancelled"})
# The run stream and the buckets' streams: whole again (every replica current) after a node restart.
RUN_STREAMS: Final = (RUN_STREAM, f"KV_{STATE_BUCKET}", f"KV_{OUTPUT_BUCKET}", f"KV_{ACTIVE_BUCKET}")
LINKD_TOML: Final = (
    'upstream = "{upstream}"\ndrain_timeout = 3\n[runners]\nheartbeat_interval = 0.5\nmax_concurrent = 32\n'
)


def say(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


@functools.lru_cache(maxsize=len(DOWNLOAD_SIZES))
def blob(size: int) -> bytes:
    """The upstream's body for ``/blob/<size>``: every 8-byte word is its own offset."""
    return b"".join((i * 8).to_bytes(8, "big") for i in range(size // 8 + 1))[:size]


@functools.lru_cache(maxsize=len(DOWNLOAD_SIZES))
def blob_sha256(size: int) -> bytes:
    return hashlib.sha256(blob(size)).digest()


@dataclass
class Totals:
    outcomes: Counter[str] = field(default_factory=Counter)
    verified_bytes: int = 0
    runs: Counter[str] = field(default_factory=Counter)
    probes: Counter[str] = field(default_factory=Counter)  # the runs recovered() started
    faults: Counter[str] = field(default_factory=Counter)
    # Seconds until everything worked again, per fault: after it was healed (the process or node
    # restarted, the link restored), and for node kills also after the kill, the node still down.
    recovery: dict[str, list[float]] = field(default_factory=dict)
    failover: dict[str, list[float]] = field(default_factory=dict)
    peak_kib: dict[str, int] = field(default_factory=dict)
    # The projectors' verdicts on uplink events (studio_runs_uplink_events_total by result),
    # summed over the gateways as they are at the end (a gateway restart starts from zero).
    projector: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)

    def violation(self, text: str) -> None:
        self.violations.append(text)
        say(f"VIOLATION: {text}")


# ---------------------------------------------------------------------------- the stack


class Upstream:
    """The desktop's local HTTP service: ``GET /blob/<n>`` and ``POST /sha256``."""

    def __init__(self) -> None:
        app = web.Application(client_max_size=64 * MiB)
        app.router.add_get("/blob/{size}", self._blob)
        app.router.add_post("/sha256", self._sha256)
        self.runner = web.AppRunner(app, access_log=None)
        self.port = 0

    async def start(self) -> None:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]

    async def close(self) -> None:
        await self.runner.cleanup()

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        body = blob(int(request.match_info["size"]))
        response = web.StreamResponse(headers={"Content-Length": str(len(body))})
        await response.prepare(request)
        for i in range(0, len(body), 256 * KiB):
            await response.write(body[i : i + 256 * KiB])
        await response.write_eof()
        return response

    async def _sha256(self, request: web.Request) -> web.StreamResponse:
        digest = hashlib.sha256()
        try:
            async for piece in request.content.iter_any():
                digest.update(piece)
        except ConnectionResetError:  # the tunnel request was cut off (a fault): nobody to answer
            return web.Response(status=400)
        return web.Response(text=digest.hexdigest())


class LinkProxies:
    """The daemon's network path: one :class:`FaultProxy` per nats-server node (the gateways hand
    out their URLs), each fault applied to all of them, whichever node the daemon is on."""

    def __init__(self, ports: list[int]) -> None:
        self.proxies = [FaultProxy(port) for port in ports]

    async def start(self) -> None:
        for proxy in self.proxies:
            await proxy.start()

    async def close(self) -> None:
        for proxy in self.proxies:
            await proxy.close()

    @property
    def url(self) -> str:
        return ",".join(proxy.url for proxy in self.proxies)

    def pause(self) -> None:
        for proxy in self.proxies:
            proxy.pause()

    def throttle(self, bytes_per_second: int | None) -> None:
        for proxy in self.proxies:
            proxy.throttle(bytes_per_second)

    def blackhole(self) -> None:
        for proxy in self.proxies:
            proxy.blackhole()

    def reset_all(self) -> None:
        for proxy in self.proxies:
            proxy.reset_all()

    def pass_through(self) -> None:
        for proxy in self.proxies:
            proxy.pass_through()


@dataclass
class Stack:
    runs: RunsStack[JetStreamNats] | RunsStack[JetStreamCluster]
    proxy: LinkProxies
    daemon: LinkdProcess
    upstream: Upstream
    caller: Any  # nats-py client, straight to nats-server (not through the proxy)
    client: tunnel.TunnelClient
    http: httpx.AsyncClient
    hostname: str  # the daemon's tunnel host (kept across its restarts)
    probe_runs: list[str] = field(default_factory=list)  # accepted by recovered(), checked at the end

    @property
    def gateways(self) -> list[GatewayProcess]:
        return self.runs.gateways

    @property
    def nats(self) -> JetStreamNats | JetStreamCluster:
        return self.runs.nats

    @property
    def single(self) -> JetStreamNats:
        nats = self.runs.nats
        if not isinstance(nats, JetStreamNats):
            raise TypeError("this soak runs on a cluster")
        return nats

    @property
    def cluster(self) -> JetStreamCluster:
        nats = self.runs.nats
        if not isinstance(nats, JetStreamCluster):
            raise TypeError("this soak runs on one nats-server")
        return nats

    def pids(self) -> dict[str, int | None]:
        """Process ids by role (a node that is down: None)."""
        nats = self.runs.nats
        servers = (
            {f"nats-{name}": pid for name, pid in nats.pids().items()}
            if isinstance(nats, JetStreamCluster)
            else {"nats-server": nats.server.pid}
        )
        return {
            **servers,
            "linkd": self.daemon.pid,
            "soak (callers + upstream)": os.getpid(),
            **{gateway.name: gateway.pid for gateway in self.gateways},
        }


async def start_stack(workdir: Path, cluster: int | None) -> Stack:
    """nats-server (or a ``cluster``-node cluster), two gateways, the upstream and linkd behind
    the proxies; the daemon gets the proxies' URLs, the gateways and the caller the servers'."""
    nats: JetStreamNats | JetStreamCluster
    if cluster is None:
        nats = JetStreamNats.start(workdir)
        proxy = LinkProxies([nats.server.port])
    else:
        nats = JetStreamCluster.start(workdir, size=cluster)
        proxy = LinkProxies([node.port for node in nats.nodes])
    await proxy.start()
    extra = {
        "NATS_PUBLIC_URL": proxy.url,
        "RUNS_LIVENESS_TIMEOUT_SECONDS": f"{LIVENESS:g}",
        "RUNS_DISPATCH_TIMEOUT_SECONDS": f"{DISPATCH_TIMEOUT:g}",
        "RUNS_REAPER_INTERVAL_SECONDS": "0.5",
        **({"RUNS_REPLICAS": str(min(cluster, 3))} if cluster is not None else {}),
    }
    runs: RunsStack[JetStreamNats] | RunsStack[JetStreamCluster]
    if isinstance(nats, JetStreamCluster):
        runs = RunsStack(workdir, nats, stack_env(nats, extra))
    else:
        runs = RunsStack(workdir, nats, stack_env(nats, extra))
    upstream = Upstream()
    try:
        for _ in range(2):
            runs.add_gateway(start=False)
        for gateway in runs.gateways:
            gateway.spawn()
        for gateway in runs.gateways:
            await gateway.wait_ready()
        await upstream.start()
        toml = LINKD_TOML.format(upstream=f"http://127.0.0.1:{upstream.port}")
        daemon = runs.daemon(USER, config_toml=toml, start=False)
        await daemon.astart()
        urls = nats.urls if isinstance(nats, JetStreamCluster) else [nats.url]
        caller = await connect(
            urls, creds_text=nats.admin_creds("soak-caller"), name="soak-caller", reconnect_time_wait=0.2
        )
    except BaseException:
        await upstream.close()
        await proxy.close()
        runs.close()
        raise
    timeouts = tunnel.Timeouts(first_frame=FIRST_FRAME_TIMEOUT, idle=IDLE_TIMEOUT, total=TOTAL_TIMEOUT)
    client = tunnel.TunnelClient(caller, timeouts=timeouts)
    http = httpx.AsyncClient(trust_env=False, timeout=HTTP_TIMEOUT)
    return Stack(runs, proxy, daemon, upstream, caller, client, http, daemon.hostname)


async def stop_stack(stack: Stack) -> None:
    await stack.http.aclose()
    await stack.client.aclose()
    with contextlib.suppress(Exception):
        await stack.caller.close()
    for proc in [stack.daemon, *stack.gateways]:
        proc.kill()  # a soak does not test graceful stops (other tests do); nothing may outlive it
    await stack.upstream.close()
    await stack.proxy.close()
    stack.runs.close()


# ---------------------------------------------------------------------------- the load


@dataclass
class Load:
    stack: Stack
    totals: Totals
    rng: random.Random
    hostname: str
    accepted_runs: list[str] = field(default_factory=list)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"tunnel://{self.hostname}"

    def token_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.stack.runs.token(USER)}"}

    async def tunnel_op(self, kind: str, call: Callable[[], Awaitable[int]]) -> None:
        """One tunnel request: success (verified bytes) or a typed error, within its bound."""
        began = time.monotonic()
        try:
            verified = await asyncio.wait_for(call(), REQUEST_BOUND)
        except TimeoutError:
            self.totals.violation(f"{kind} still running {REQUEST_BOUND:g} s after it started")
            self.totals.outcomes[f"{kind}:hung"] += 1
            return
        except tunnel.TunnelError as exc:
            self.totals.outcomes[f"{kind}:{exc.code}"] += 1
            return
        except AssertionError as exc:
            self.totals.violation(f"{kind} succeeded with wrong content: {exc}")
            return
        except Exception as exc:
            self.totals.violation(f"{kind} ended with an untyped {type(exc).__name__}: {exc}")
            return
        self.totals.outcomes[f"{kind}:ok"] += 1
        self.totals.verified_bytes += verified
        if time.monotonic() - began > REQUEST_BOUND:
            self.totals.violation(f"{kind} took {time.monotonic() - began:.1f} s")

    async def small(self) -> int:
        async with await self.stack.client.fetch(f"{self.url}/api/links/status") as resp:
            assert resp.status == 200, f"status {resp.status}"
            doc = json.loads(await resp.read())
            assert doc.get("hostname"), f"status without hostname: {doc}"
        return 0

    async def download(self) -> int:
        size = self.rng.choice(DOWNLOAD_SIZES)
        digest = hashlib.sha256()
        got = 0
        async with await self.stack.client.fetch(f"{self.url}/blob/{size}") as resp:
            assert resp.status == 200, f"status {resp.status}"
            async for piece in resp.aiter_bytes():
                digest.update(piece)
                got += len(piece)
        assert got == size, f"{got} bytes of {size}"
        assert digest.digest() == blob_sha256(size), "download bytes differ"
        return size

    async def upload(self) -> int:
        size = self.rng.choice(UPLOAD_SIZES)
        body = self.rng.randbytes(size)

        async def pieces() -> AsyncIterator[bytes]:
            for i in range(0, size, 64 * KiB):
                yield body[i : i + 64 * KiB]

        async with await self.stack.client.fetch(f"{self.url}/sha256", method="POST", body=pieces()) as resp:
            assert resp.status == 200, f"status {resp.status}"
            answer = (await resp.read()).decode()
        assert answer == hashlib.sha256(body).hexdigest(), "the desktop saw other upload bytes"
        return size

    async def http_op(
        self,
        kind: str,
        call: Callable[[str], Awaitable[httpx.Response]],
        outcome: Callable[[httpx.Response], str] = lambda resp: str(resp.status_code),
    ) -> httpx.Response | None:
        """One gateway request: any answer but a 500; a refused connection is a gateway down."""
        gateway = self.rng.choice(self.stack.gateways)
        try:
            resp = await call(gateway.url)
        except httpx.TimeoutException:
            self.totals.violation(f"{kind} on {gateway.name}: no answer within {HTTP_TIMEOUT:g} s")
            return None
        except httpx.TransportError:
            self.totals.outcomes[f"{kind}:gateway_down"] += 1
            return None
        if resp.status_code >= 500 and resp.status_code != 503:
            self.totals.violation(f"{kind} on {gateway.name}: HTTP {resp.status_code}: {resp.text[:200]}")
        self.totals.outcomes[f"{kind}:{outcome(resp)}"] += 1
        return resp

    async def presence(self) -> None:
        def online_or_not(resp: httpx.Response) -> str:
            if resp.status_code != 200:
                return str(resp.status_code)
            return "online" if resp.json().get("online") is True else "offline"

        await self.http_op(
            "presence",
            lambda base: self.stack.http.get(f"{base}/api/links/me", headers=self.token_headers()),
            online_or_not,
        )

    async def post_run(self) -> None:
        async def post(base: str) -> httpx.Response:
            return await self.stack.http.post(
                f"{base}/api/runs", json={"runner": "mock", "input": RUN_INPUT}, headers=self.token_headers()
            )

        resp = await self.http_op("run_post", post)
        if resp is not None and resp.status_code == 202:
            self.accepted_runs.append(resp.json()["runId"])

    async def worker(self, step: Callable[[], Awaitable[None]], pause: float) -> None:
        while not self.stopping.is_set():
            await step()
            if pause:
                await asyncio.sleep(pause)  # pacing the load, not synchronisation

    def start(self) -> list[asyncio.Task[None]]:
        def tunnel_step(kind: str, call: Callable[[], Awaitable[int]]) -> Callable[[], Awaitable[None]]:
            return lambda: self.tunnel_op(kind, call)

        plan: list[tuple[Callable[[], Awaitable[None]], float]] = [
            (tunnel_step("small", self.small), 0.02),
            (tunnel_step("small", self.small), 0.02),
            (tunnel_step("download", self.download), 0.0),
            (tunnel_step("upload", self.upload), 0.0),
            (self.presence, 0.2),
            (self.post_run, 0.3),
        ]
        return [asyncio.ensure_future(self.worker(step, pause)) for step, pause in plan]


# ---------------------------------------------------------------------------- faults


# Each fault returns once it is healed (the killed process started again, the link restored);
# the soak then measures how long until everything works again. A node kill also measures, while
# the node is still down, how long until everything works without it (the cluster failing
# over), and returns that.

Fault = Callable[[Stack, random.Random], Awaitable[float | None]]


async def _restart_nats(stack: Stack) -> None:
    stack.single.kill()
    await asyncio.sleep(0.5)  # down for a moment
    await asyncio.to_thread(stack.single.restart)


async def _restart_linkd(stack: Stack) -> None:
    stack.daemon.kill()
    stack.daemon.spawn()


async def _restart_gateway(stack: Stack, rng: random.Random) -> None:
    gateway = rng.choice(stack.gateways)
    gateway.kill()
    gateway.spawn()


async def _hold(stack: Stack, apply: Callable[[], None], seconds: float) -> None:
    apply()
    try:
        await asyncio.sleep(seconds)  # the fault's duration
    finally:
        stack.proxy.pass_through()


def healed(fault: Callable[[Stack, random.Random], Awaitable[None]]) -> Fault:
    """A fault with nothing to measure before it is healed."""

    async def run(stack: Stack, rng: random.Random) -> float | None:
        await fault(stack, rng)
        return None

    return run


def node_roles(stack: Stack) -> dict[str, int | None]:
    """Which node holds what: the daemon's connection, the leaders of the run stream, the
    daemon host's consumer (what the projectors pull) and the buckets' streams."""
    cluster = stack.cluster
    consumer = host_consumer_name(tunnel.host_token(stack.hostname))
    roles: dict[str, int | None] = {
        "linkd": cluster.client_node("linkd "),
        "stream": cluster.stream_leader(RUN_STREAM),
        "consumer": cluster.consumer_leader(RUN_STREAM, consumer),
    }
    for name in RUN_STREAMS[1:]:
        roles[name] = cluster.stream_leader(name)
    return roles


async def _kill_node(stack: Stack, rng: random.Random, role: str | None) -> float | None:
    """SIGKILL the node holding ``role`` (None or nobody holds it now: a random one); wait until
    everything works with the node down; restart it and wait until it caught up."""
    cluster = stack.cluster
    roles = await asyncio.to_thread(node_roles, stack)
    node = roles.get(role) if role is not None else None
    if node is None:
        node = rng.choice(cluster.cluster.running())
    held = ", ".join(name for name, holder in roles.items() if holder == node) or "nothing"
    say(f"  node {cluster.cluster.node_name(node)} holds: {held}")
    killed = time.monotonic()
    cluster.kill(node)
    try:
        await recovered(stack, stack.hostname)
        failover: float | None = time.monotonic() - killed
        say(f"  everything back {failover:.2f} s after the kill, the node still down")
    except TimeoutError:
        failover = None
        say(f"  not back {RECOVER_TIMEOUT:g} s after the kill with the node down")
    await asyncio.to_thread(cluster.restart, node)
    await asyncio.to_thread(cluster.wait_in_sync, RUN_STREAMS, RECOVER_TIMEOUT)
    if failover is None:
        raise NodeFailoverFailed(f"not back {RECOVER_TIMEOUT:g} s after node {node} was killed")
    return failover


class NodeFailoverFailed(Exception):
    """Nothing worked while one node of the cluster was down."""


SINGLE_FAULTS: Final[dict[str, Fault]] = {
    "kill-9-nats-server": healed(lambda s, _: _restart_nats(s)),
}
CLUSTER_FAULTS: Final[dict[str, Fault]] = {
    "kill-9-node-random": lambda s, rng: _kill_node(s, rng, None),
    "kill-9-node-linkd": lambda s, rng: _kill_node(s, rng, "linkd"),
    "kill-9-stream-leader": lambda s, rng: _kill_node(s, rng, "stream"),
    "kill-9-consumer-leader": lambda s, rng: _kill_node(s, rng, "consumer"),
}
COMMON_FAULTS: Final[dict[str, Fault]] = {
    "kill-9-linkd": healed(lambda s, _: _restart_linkd(s)),
    "kill-9-gateway": healed(_restart_gateway),
    "pause-short": healed(lambda s, _: _hold(s, s.proxy.pause, IDLE_TIMEOUT / 3)),
    "pause-long": healed(lambda s, _: _hold(s, s.proxy.pause, LIVENESS + 1.0)),
    "throttle": healed(lambda s, _: _hold(s, lambda: s.proxy.throttle(512 * KiB), 3.0)),
    "blackhole": healed(lambda s, _: _hold(s, s.proxy.blackhole, IDLE_TIMEOUT + 0.5)),
    "reset": healed(lambda s, _: _hold(s, s.proxy.reset_all, 0.0)),
}
FAULTS: Final[dict[str, Fault]] = {**SINGLE_FAULTS, **COMMON_FAULTS}
FAULTS_ON_CLUSTER: Final[dict[str, Fault]] = {**CLUSTER_FAULTS, **COMMON_FAULTS}


async def recovered(stack: Stack, hostname: str) -> float:
    """Seconds until the desktop answers through the tunnel, both gateways say runs are ready, and
    a new run completes (``/healthz`` alone can say ready while runs cannot progress)."""
    began = time.monotonic()
    deadline = began + RECOVER_TIMEOUT
    turn = 0
    while time.monotonic() < deadline:
        try:
            async with await stack.client.fetch(f"tunnel://{hostname}/api/links/status", timeout=2.0) as resp:
                ok = resp.status == 200
            for gateway in stack.gateways:
                health = (await stack.http.get(f"{gateway.url}/healthz", timeout=2.0)).json()
                ok = ok and health.get("runs") == "ready"
            turn += 1
            if ok and await probe_run(stack, stack.gateways[turn % len(stack.gateways)], deadline):
                return time.monotonic() - began
        except (tunnel.TunnelError, httpx.HTTPError, ValueError):
            pass
        await asyncio.sleep(0.1)  # polling with a deadline
    raise TimeoutError(f"not recovered after {RECOVER_TIMEOUT:g} s")


async def probe_run(stack: Stack, gateway: GatewayProcess, deadline: float) -> bool:
    """A short run through ``gateway`` completes within ``PROBE_TIMEOUT`` (and ``deadline``);
    every accepted probe is checked with the others at the end (:func:`settle_runs`)."""
    headers = {"Authorization": f"Bearer {stack.runs.token(USER)}"}
    resp = await stack.http.post(f"{gateway.url}/api/runs", json=PROBE_RUN, headers=headers)
    if resp.status_code != 202:
        return False
    run_id = resp.json()["runId"]
    stack.probe_runs.append(run_id)
    url = f"{gateway.url}/api/runs/{run_id}"
    until = min(deadline, time.monotonic() + PROBE_TIMEOUT)
    while time.monotonic() < until:
        resp = await stack.http.get(url, headers=headers)
        status = resp.json().get("status") if resp.status_code == 200 else None
        if status in TERMINAL:
            return bool(status == "completed")
        await asyncio.sleep(0.05)  # polling with a deadline
    return False


# ---------------------------------------------------------------------------- memory


def peak_kib(pid: int | None) -> int:
    """The process's peak resident set (VmHWM) in KiB, 0 when it cannot be read."""
    if pid is None:
        return 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


async def watch_memory(stack: Stack, totals: Totals, stop: asyncio.Event) -> None:
    while not stop.is_set():
        for role, pid in stack.pids().items():
            totals.peak_kib[role] = max(totals.peak_kib.get(role, 0), peak_kib(pid))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)


# ---------------------------------------------------------------------------- runs


async def settle_runs(
    stack: Stack,
    accepted: list[str],
    totals: Totals,
    expected: str = EXPECTED_OUTPUT,
    *,
    probes: bool = False,
) -> None:
    """Every accepted run reaches a terminal state within ``SETTLE_TIMEOUT`` of now (the load
    stopped), with sound events (see :func:`event_problems`). Runs are looked at a few at a
    time; each one at least once, also when looking at all of them takes longer than that."""
    headers = {"Authorization": f"Bearer {stack.runs.token(USER)}"}
    base = stack.gateways[0].url
    deadline = time.monotonic() + SETTLE_TIMEOUT
    deadline_ms = (time.time() + SETTLE_TIMEOUT) * 1000
    slots = asyncio.Semaphore(SETTLE_CONCURRENCY)

    async def settle(run_id: str) -> None:
        async with slots:
            state = await final_state(stack, f"{base}/api/runs/{run_id}", headers, deadline)
            status = state.get("status")
            if status not in TERMINAL:
                totals.violation(
                    f"run {run_id} not terminal {SETTLE_TIMEOUT:g} s after the load stopped: {state}"
                )
                return
            finished = state.get("finishedAt")
            if isinstance(finished, int) and finished > deadline_ms + 1000:
                totals.violation(
                    f"run {run_id} ended {(finished - deadline_ms) / 1000:.1f} s after the settle deadline"
                )
            kind = state.get("failureKind")
            (totals.probes if probes else totals.runs)[f"{status}/{kind}" if kind else str(status)] += 1
            try:
                events = await export(stack, base, run_id, headers)
            except (httpx.HTTPError, ValueError) as exc:
                totals.violation(f"run {run_id}: its export failed: {exc!r}")
                return
            for problem in event_problems(state, events, expected):
                totals.violation(f"{status} run {run_id}: {problem}")

    await asyncio.gather(*(settle(run_id) for run_id in accepted))


async def final_state(stack: Stack, url: str, headers: dict[str, str], deadline: float) -> dict[str, Any]:
    """The run's state once terminal, or as it is at ``deadline`` (asked at least once)."""
    state: dict[str, Any] = {}
    while True:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            resp = await stack.http.get(url, headers=headers)
            if resp.status_code == 200:
                state = resp.json()
                if state.get("status") in TERMINAL:
                    return state
        if time.monotonic() >= deadline:
            return state
        await asyncio.sleep(0.1)  # polling the run's state with a deadline


async def export(stack: Stack, base: str, run_id: str, headers: dict[str, str]) -> list[dict[str, Any]]:
    resp = await stack.http.get(f"{base}/api/runs/{run_id}/export", headers=headers)
    resp.raise_for_status()
    return [json.loads(line) for line in resp.text.splitlines() if line.strip()]


def event_problems(
    state: dict[str, Any], events: list[dict[str, Any]], expected: str = EXPECTED_OUTPUT
) -> list[str]:
    """What is wrong with a terminal run's events: any run has seq 1..k each once and a prefix
    of the mock output (no event lost inside, none applied twice); a completed one has all."""
    seqs = [e.get("seq") for e in events]
    output = "".join(e["data"] for e in events if e.get("type") == "output")
    problems = []
    if seqs != list(range(1, len(events) + 1)):
        problems.append(f"seqs not 1..N once each: {seqs[:40]}")
    if not expected.startswith(output):
        problems.append(f"output is not the runner's ({len(output)} characters)")
    # The export is read in seq order without repeats, so it cannot show an event applied twice
    # or lost in the middle; the state's byte count, summed by the projector as it applied, can.
    if state.get("outputBytes") != len(output.encode()):
        problems.append(f"state says {state.get('outputBytes')} output bytes, the events hold {len(output)}")
    if state.get("status") != "completed":
        return problems
    dones = [e for e in events if e.get("type") == "done"]
    if len(dones) != 1 or events[-1].get("type") != "done" or dones[0].get("status") != "completed":
        problems.append(
            f"{len(dones)} done events, the last event a {events[-1].get('type') if events else None}"
        )
    if output != expected:
        problems.append(f"output cut short ({len(output)} of {len(expected)} characters)")
    if state.get("seq") != len(events) or state.get("finalSeq") != len(events):
        problems.append(f"state seq {state.get('seq')}/{state.get('finalSeq')} but {len(events)} events")
    return problems


# ---------------------------------------------------------------------------- main


async def soak(args: argparse.Namespace, totals: Totals) -> None:
    fault_rng = random.Random(args.seed)
    load_rng = random.Random(None if args.seed is None else args.seed + 1)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    place = (
        contextlib.nullcontext(str(args.workdir))
        if args.workdir is not None
        else tempfile.TemporaryDirectory(prefix="natslink-soak-")
    )
    with place as tmp:
        began = time.monotonic()
        stack = await start_stack(Path(tmp), args.cluster)
        servers = f"{args.cluster}-node cluster" if args.cluster else "nats-server"
        say(
            f"stack up in {time.monotonic() - began:.1f} s: {servers} {stack.nats.url}, "
            f"{len(stack.gateways)} gateways, linkd online as {stack.daemon.hostname} "
            f"via proxy {stack.proxy.url}"
        )
        stop_memory = asyncio.Event()
        memory = asyncio.ensure_future(watch_memory(stack, totals, stop_memory))
        load = Load(stack, totals, load_rng, stack.daemon.hostname)
        try:
            await inject_faults(args, stack, load, fault_rng, totals)
            say(f"load stopped; settling {len(load.accepted_runs)} accepted runs")
            await settle_runs(stack, load.accepted_runs, totals)
            say(f"settling {len(stack.probe_runs)} probe runs")
            await settle_runs(stack, stack.probe_runs, totals, PROBE_OUTPUT, probes=True)
            await final_checks(stack, load, totals)
        finally:
            stop_memory.set()
            await memory
            await stop_stack(stack)


def fault_schedule(names: list[str], rng: random.Random) -> Iterator[str]:
    """Every fault once per round, in a new random order each round: each one gets its turn."""
    while True:
        round_ = list(names)
        rng.shuffle(round_)
        yield from round_


async def inject_faults(
    args: argparse.Namespace, stack: Stack, load: Load, rng: random.Random, totals: Totals
) -> None:
    """Faults one after another under steady load until the time is up; the load then stops."""
    workers = load.start()
    schedule = fault_schedule(args.fault_names, rng)
    try:
        deadline = time.monotonic() + args.seconds
        await asyncio.sleep(1.0)  # steady load first
        while time.monotonic() < deadline and not enough_faults(args, totals):
            name = next(schedule)
            say(f"fault {sum(totals.faults.values()) + 1}: {name}")
            try:
                failover = await args.faults_table[name](stack, rng)
            except NodeFailoverFailed as exc:
                totals.violation(f"{name}: {exc}")
                failover = None
            totals.faults[name] += 1
            if failover is not None:
                totals.failover.setdefault(name, []).append(failover)
            try:
                took = await recovered(stack, load.hostname)
            except TimeoutError as exc:
                totals.violation(f"after {name}: {exc}")
                break
            totals.recovery.setdefault(name, []).append(took)
            say(f"  everything back {took:.2f} s after it was healed")
            await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))  # load between faults
    finally:
        load.stopping.set()
        await asyncio.gather(*workers, return_exceptions=True)


def enough_faults(args: argparse.Namespace, totals: Totals) -> bool:
    return args.max_faults is not None and sum(totals.faults.values()) >= args.max_faults


async def projector_results(stack: Stack) -> Counter[str]:
    """``studio_runs_uplink_events_total`` by result, summed over the gateways."""
    found: Counter[str] = Counter()
    for gateway in stack.gateways:
        with contextlib.suppress(httpx.HTTPError):
            text = (await stack.http.get(f"{gateway.url}/metrics")).text
            for match in UPLINK_RESULT.finditer(text):
                found[match.group(1)] += int(float(match.group(2)))
    return found


async def final_checks(stack: Stack, load: Load, totals: Totals) -> None:
    """After the last fault the system works: a tunnel request and a new run both succeed."""
    totals.projector = await projector_results(stack)
    before = totals.outcomes["small:ok"]
    await load.tunnel_op("small", load.small)
    if totals.outcomes["small:ok"] == before:
        totals.violation("a tunnel request after the soak did not succeed")
    headers = load.token_headers()
    base = stack.gateways[1].url
    resp = await stack.http.post(
        f"{base}/api/runs", json={"runner": "mock", "input": RUN_INPUT}, headers=headers
    )
    if resp.status_code != 202:
        totals.violation(f"a run after the soak was refused: HTTP {resp.status_code} {resp.text[:200]}")
        return
    final = [resp.json()["runId"]]
    extra = Totals()
    await settle_runs(stack, final, extra)
    if extra.runs != Counter({"completed": 1}) or extra.violations:
        totals.violation(
            f"a run after the soak did not complete cleanly: {dict(extra.runs)} {extra.violations}"
        )


def report(totals: Totals, seconds: float) -> None:
    print(f"soak: {seconds:.0f} s, {sum(totals.faults.values())} faults")
    for name, count in sorted(totals.faults.items()):
        back = totals.recovery.get(name, [])
        line = (
            f"  fault {name:<22} x{count:<3} everything back within {max(back, default=0.0):.2f} s of healing"
        )
        if len(back) > 1:
            line += f" (median {statistics.median(back):.2f})"
        failover = totals.failover.get(name)
        if failover:
            each = ", ".join(f"{t:.1f}" for t in failover)
            line += (
                f"; with the node down, back within {max(failover):.2f} s of the kill"
                f" (median {statistics.median(failover):.2f}; each: {each})"
            )
        print(line)
    by_kind: dict[str, Counter[str]] = {}
    for key, count in totals.outcomes.items():
        kind, _, outcome = key.partition(":")
        by_kind.setdefault(kind, Counter())[outcome] += count
    for kind, outcomes in sorted(by_kind.items()):
        parts = ", ".join(f"{outcome}={n}" for outcome, n in outcomes.most_common())
        print(f"  {kind:<10} {sum(outcomes.values()):>6}: {parts}")
    print(f"  bytes verified: {totals.verified_bytes / MiB:.1f} MiB")
    runs = ", ".join(f"{status}={n}" for status, n in totals.runs.most_common()) or "none"
    print(f"  runs by terminal state ({sum(totals.runs.values())}): {runs}")
    probes = ", ".join(f"{status}={n}" for status, n in totals.probes.most_common()) or "none"
    print(f"  probe runs (recovery checks) by terminal state ({sum(totals.probes.values())}): {probes}")
    verdicts = ", ".join(f"{result}={n}" for result, n in totals.projector.most_common()) or "none"
    print(f"  projector verdicts (since each gateway's last start): {verdicts}")
    peaks = ", ".join(f"{role} {kib / 1024:.0f} MiB" for role, kib in sorted(totals.peak_kib.items()))
    print(f"  peak memory (VmHWM): {peaks}")
    print(f"  violations: {len(totals.violations)}")
    for violation in totals.violations[:SHOWN_VIOLATIONS]:
        print(f"    {violation}")
    if len(totals.violations) > SHOWN_VIOLATIONS:
        print(
            f"    ... and {len(totals.violations) - SHOWN_VIOLATIONS} more (each was printed as it happened)"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Soak the whole link (nats-server, two gateways, linkd; real processes) under "
        "mixed load and repeated faults, checking invariants. Exit status 1 on any violation.",
        epilog="Example: python scripts/soak.py --minutes 10",
    )
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, help="how long to keep injecting faults (default 5)")
    length.add_argument("--seconds", type=float, help="the same, in seconds")
    parser.add_argument(
        "--faults",
        default=None,
        help="comma-separated faults to draw from (default: all of the mode's). One server: "
        + ", ".join(FAULTS)
        + ". A cluster: "
        + ", ".join(FAULTS_ON_CLUSTER),
    )
    parser.add_argument(
        "--cluster",
        type=int,
        default=None,
        metavar="N",
        help="an N-node nats-server cluster (N >= 3, runs replicated min(N, 3) times) instead of "
        "one server; node kills join the faults",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="run in this directory and keep it (every process's log) instead of a temporary one",
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed (fault order, sizes)")
    parser.add_argument("--max-faults", type=int, default=None, help="stop after this many faults")
    args = parser.parse_args(argv)
    if args.cluster is not None and args.cluster < 3:
        parser.error("--cluster needs at least 3 nodes (a majority must survive a node's death)")
    args.faults_table = FAULTS_ON_CLUSTER if args.cluster is not None else FAULTS
    args.fault_names = parse_fault_names(
        parser, args.faults or ",".join(args.faults_table), args.faults_table
    )
    if args.seconds is None:
        args.seconds = 60.0 * (args.minutes if args.minutes is not None else 5.0)
    if args.seconds < 0:
        parser.error("the soak length must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    totals = Totals()
    began = time.monotonic()
    try:
        asyncio.run(soak(args, totals))
    except KeyboardInterrupt:
        say("interrupted")
    report(totals, time.monotonic() - began)
    return 1 if totals.violations else 0


if __name__ == "__main__":
    sys.exit(main())
