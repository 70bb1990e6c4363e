#!/usr/bin/env python3
"""Soak the whole link: nats-server, two gateways and ``linkd up`` as real processes,
mixed load, faults one after another, invariants checked as it goes and at the end.

The stack (all on loopback, in a temporary directory):

- nats-server in operator/JWT mode with JetStream on a file store (survives its restarts);
- two ``studio-gateway serve`` processes sharing it (runs, projector, reaper);
- ``linkd up`` for one user, its NATS connection through a fault-injecting TCP proxy
  (the gateways hand out the proxy's URL), forwarding other paths to a local HTTP service
  of this script (``--upstream``), so bodies can be checked byte for byte.

Load, all the time: small tunnel requests to the desktop's ``/api/links/status``, streamed
multi-MiB downloads and uploads through its upstream proxy (every body sha256-checked),
presence probes (``/api/links/me``) and mock runs (``POST /api/runs``) on either gateway.

Faults, drawn at random: kill -9 and restart of nats-server, of linkd and of a gateway; the
daemon's network paused for less and for more than the idle and liveness timeouts, throttled,
blackholed, reset. After each: the desktop and both gateways must be back (bounded).

Invariants (any breach is printed at once and makes the exit status 1):

- every tunnel request ends, within its timeouts, with success or a typed ``TunnelError``;
  a success always carries the right bytes (no corrupted or truncated body);
- gateways never answer 500 and never hang;
- every accepted run (202) reaches a terminal state; a completed run has every event once,
  seq 1..N in order, one ``done``, and exactly the output the mock runner produced;
- after the last fault, a new run completes and a tunnel request succeeds.

Totals at the end: requests by kind and outcome (error codes), bytes verified, runs by
terminal status and failure kind, recovery time per fault, peak memory of every process.

    python scripts/soak.py --minutes 10
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
from linkd.runners.mock import mock_chunk  # noqa: E402
from tests.faultproxy import FaultProxy  # noqa: E402
from tests.faults.chaos import parse_fault_names  # noqa: E402
from tests.integration.runs_harness import (  # noqa: E402
    SECRET,
    GatewayProcess,
    JetStreamNats,
    LinkdProcess,
    RunsStack,
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
RUN_INPUT: Final = {"count": 20, "delayMs": 40}
EXPECTED_OUTPUT: Final = "".join(mock_chunk("chunk", i, None) for i in range(20))
DOWNLOAD_SIZES: Final = (256 * KiB, 1 * MiB, 4 * MiB)
UPLOAD_SIZES: Final = (64 * KiB, 1 * MiB, 2 * MiB)
TERMINAL: Final = frozenset({"completed", "failed", "cancelled"})
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
    faults: Counter[str] = field(default_factory=Counter)
    recovery: dict[str, float] = field(default_factory=dict)
    peak_kib: dict[str, int] = field(default_factory=dict)
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


@dataclass
class Stack:
    runs: RunsStack
    proxy: FaultProxy
    daemon: LinkdProcess
    upstream: Upstream
    caller: Any  # nats-py client, straight to nats-server (not through the proxy)
    client: tunnel.TunnelClient
    http: httpx.AsyncClient

    @property
    def gateways(self) -> list[GatewayProcess]:
        return self.runs.gateways

    @property
    def nats(self) -> JetStreamNats:
        return self.runs.nats


async def start_stack(workdir: Path) -> Stack:
    nats = JetStreamNats.start(workdir)
    proxy = FaultProxy(nats.server.port)
    await proxy.start()
    env = {
        "GATEWAY_JWT_SECRET": SECRET,  # RunsStack.token() signs with it
        "NATS_URL": nats.url,
        "NATS_CREDS": str(nats.gateway_creds),
        "NATS_PUBLIC_URL": proxy.url,
        "NATS_TUNNEL_SESSION_TTL_SECONDS": "3600",
        "RUNS_LIVENESS_TIMEOUT_SECONDS": f"{LIVENESS:g}",
        "RUNS_DISPATCH_TIMEOUT_SECONDS": f"{DISPATCH_TIMEOUT:g}",
        "RUNS_REAPER_INTERVAL_SECONDS": "0.5",
        **nats.setup.gateway_env(),
    }
    runs = RunsStack(workdir, nats, env)
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
        caller = await connect(
            nats.url, creds_text=nats.admin_creds("soak-caller"), name="soak-caller", reconnect_time_wait=0.2
        )
    except BaseException:
        await upstream.close()
        await proxy.close()
        runs.close()
        raise
    client = tunnel.TunnelClient(
        caller, first_frame_timeout=FIRST_FRAME_TIMEOUT, idle_timeout=IDLE_TIMEOUT, timeout=TOTAL_TIMEOUT
    )
    http = httpx.AsyncClient(trust_env=False, timeout=HTTP_TIMEOUT)
    return Stack(runs, proxy, daemon, upstream, caller, client, http)


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
# the soak then measures how long until everything works again.


async def _restart_nats(stack: Stack) -> None:
    stack.nats.kill()
    await asyncio.sleep(0.5)  # down for a moment
    await asyncio.to_thread(stack.nats.restart)


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


FAULTS: Final[dict[str, Callable[[Stack, random.Random], Awaitable[None]]]] = {
    "kill-9-nats-server": lambda s, _: _restart_nats(s),
    "kill-9-linkd": lambda s, _: _restart_linkd(s),
    "kill-9-gateway": _restart_gateway,
    "pause-short": lambda s, _: _hold(s, s.proxy.pause, IDLE_TIMEOUT / 3),
    "pause-long": lambda s, _: _hold(s, s.proxy.pause, LIVENESS + 1.0),
    "throttle": lambda s, _: _hold(s, lambda: s.proxy.throttle(512 * KiB), 3.0),
    "blackhole": lambda s, _: _hold(s, s.proxy.blackhole, IDLE_TIMEOUT + 0.5),
    "reset": lambda s, _: _hold(s, s.proxy.reset_all, 0.0),
}


async def recovered(stack: Stack, hostname: str) -> float:
    """Seconds until the desktop answers through the tunnel and both gateways serve runs."""
    began = time.monotonic()
    deadline = began + RECOVER_TIMEOUT
    while time.monotonic() < deadline:
        try:
            async with await stack.client.fetch(f"tunnel://{hostname}/api/links/status", timeout=2.0) as resp:
                ok = resp.status == 200
            for gateway in stack.gateways:
                health = (await stack.http.get(f"{gateway.url}/healthz", timeout=2.0)).json()
                ok = ok and health.get("runs") == "ready"
            if ok:
                return time.monotonic() - began
        except (tunnel.TunnelError, httpx.HTTPError, ValueError):
            pass
        await asyncio.sleep(0.1)
    raise TimeoutError(f"not recovered after {RECOVER_TIMEOUT:g} s")


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
        pids = {
            "nats-server": stack.nats.server.pid,
            "linkd": stack.daemon.pid,
            "soak (callers + upstream)": os.getpid(),
            **{gateway.name: gateway.pid for gateway in stack.gateways},
        }
        for role, pid in pids.items():
            totals.peak_kib[role] = max(totals.peak_kib.get(role, 0), peak_kib(pid))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)


# ---------------------------------------------------------------------------- runs


async def settle_runs(stack: Stack, accepted: list[str], totals: Totals) -> None:
    """Every accepted run reaches a terminal state with sound events (see :func:`event_problems`)."""
    headers = {"Authorization": f"Bearer {stack.runs.token(USER)}"}
    base = stack.gateways[0].url
    deadline = time.monotonic() + SETTLE_TIMEOUT
    for run_id in accepted:
        state: dict[str, Any] = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                resp = await stack.http.get(f"{base}/api/runs/{run_id}", headers=headers)
                if resp.status_code == 200:
                    state = resp.json()
                    if state.get("status") in TERMINAL:
                        break
            await asyncio.sleep(0.1)  # polling the run's state with a deadline
        status = state.get("status")
        if status not in TERMINAL:
            totals.violation(
                f"run {run_id} not terminal {SETTLE_TIMEOUT:g} s after the load stopped: {state}"
            )
            continue
        kind = state.get("failureKind")
        totals.runs[f"{status}/{kind}" if kind else str(status)] += 1
        try:
            events = await export(stack, base, run_id, headers)
        except (httpx.HTTPError, ValueError) as exc:
            totals.violation(f"run {run_id}: its export failed: {exc!r}")
            continue
        for problem in event_problems(state, events):
            totals.violation(f"{status} run {run_id}: {problem}")


async def export(stack: Stack, base: str, run_id: str, headers: dict[str, str]) -> list[dict[str, Any]]:
    resp = await stack.http.get(f"{base}/api/runs/{run_id}/export", headers=headers)
    resp.raise_for_status()
    return [json.loads(line) for line in resp.text.splitlines() if line.strip()]


def event_problems(state: dict[str, Any], events: list[dict[str, Any]]) -> list[str]:
    """What is wrong with a terminal run's events: any run has seq 1..k each once and a prefix
    of the mock output (no event lost inside, none applied twice); a completed one has all."""
    seqs = [e.get("seq") for e in events]
    output = "".join(e["data"] for e in events if e.get("type") == "output")
    problems = []
    if seqs != list(range(1, len(events) + 1)):
        problems.append(f"seqs not 1..N once each: {seqs[:40]}")
    if not EXPECTED_OUTPUT.startswith(output):
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
    if output != EXPECTED_OUTPUT:
        problems.append(f"output cut short ({len(output)} of {len(EXPECTED_OUTPUT)} characters)")
    if state.get("seq") != len(events) or state.get("finalSeq") != len(events):
        problems.append(f"state seq {state.get('seq')}/{state.get('finalSeq')} but {len(events)} events")
    return problems


# ---------------------------------------------------------------------------- main


async def soak(args: argparse.Namespace, totals: Totals) -> None:
    fault_rng = random.Random(args.seed)
    load_rng = random.Random(None if args.seed is None else args.seed + 1)
    with tempfile.TemporaryDirectory(prefix="natslink-soak-") as tmp:
        began = time.monotonic()
        stack = await start_stack(Path(tmp))
        say(
            f"stack up in {time.monotonic() - began:.1f} s: nats-server {stack.nats.url}, "
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
            await FAULTS[name](stack, rng)
            totals.faults[name] += 1
            try:
                took = await recovered(stack, load.hostname)
            except TimeoutError as exc:
                totals.violation(f"after {name}: {exc}")
                break
            totals.recovery[name] = max(totals.recovery.get(name, 0.0), took)
            say(f"  everything back {took:.2f} s after it was healed")
            await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))  # load between faults
    finally:
        load.stopping.set()
        await asyncio.gather(*workers, return_exceptions=True)


def enough_faults(args: argparse.Namespace, totals: Totals) -> bool:
    return args.max_faults is not None and sum(totals.faults.values()) >= args.max_faults


async def final_checks(stack: Stack, load: Load, totals: Totals) -> None:
    """After the last fault the system works: a tunnel request and a new run both succeed."""
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
        back = totals.recovery.get(name, 0.0)
        print(f"  fault {name:<20} x{count:<3} everything back within {back:.2f} s of healing")
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
    peaks = ", ".join(f"{role} {kib / 1024:.0f} MiB" for role, kib in sorted(totals.peak_kib.items()))
    print(f"  peak memory (VmHWM): {peaks}")
    print(f"  violations: {len(totals.violations)}")
    for violation in totals.violations:
        print(f"    {violation}")


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
        "--faults", default=",".join(FAULTS), help="comma-separated faults to draw from: " + ", ".join(FAULTS)
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed (fault order, sizes)")
    parser.add_argument("--max-faults", type=int, default=None, help="stop after this many faults")
    args = parser.parse_args(argv)
    args.fault_names = parse_fault_names(parser, args.faults, FAULTS)
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
