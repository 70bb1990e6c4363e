#!/usr/bin/env python3
"""Benchmark the gateway's link endpoints over HTTP on a real local port.

What it measures, in operator mode against a local operator-mode nats-server:

- link sessions minted per second (``POST /api/links/session`` from several
  concurrent clients), both with a server-generated key pair (creds file) and with
  a daemon-supplied public key (JWT only);
- ``GET /api/links/me`` latency p50/p99 when the user's desktop is online (a
  daemon serving ``/api/links/status`` through the tunnel) and when it is offline
  (nobody serves the host: NATS no-responders, then the tunnel's short grace
  retry for a daemon that is just starting).

Process topology, as in production: the gateway runs as ``studio-gateway serve``
in its own process, the daemon is a separate process started from this file with
``--role daemon``, and the HTTP load comes from this process. Every figure is the
median over several rounds; latencies are the HTTP round trip seen by the client.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

import tunnel
from cli.nats_server import NatsServer, NatsServerConfig, NatsServerError, free_port
from studio_gateway.auth import issue_token
from studio_gateway.config import AuthConfig
from studio_gateway.hostnames import tunnel_hostname
from studio_gateway.nats_jwt import KeyKind, OperatorSetup, new_key
from tunnel.connect import connect

SCRIPT = Path(__file__).resolve()
REPO = SCRIPT.parent.parent
SECRET = "bench-gateway-secret-0123456789abcdef0123456789abcdef"
ONLINE_USER = "bench-online@example.com"
OFFLINE_USER = "bench-offline@example.com"
STATUS = {"hostname": "bench-desk", "capabilities": ["runs"], "cliVersion": "bench"}
READY_LINE = "READY"
# Local everything: these only catch a hang.
START_TIMEOUT = 20.0
REQUEST_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


@dataclass(frozen=True)
class Settings:
    """How much work one run does; ``--quick`` trades precision for a few-second smoke run."""

    rounds: int
    sessions: int
    concurrency: int
    online_probes: int
    offline_probes: int
    offline_concurrency: int


FULL = Settings(
    rounds=5, sessions=400, concurrency=8, online_probes=300, offline_probes=80, offline_concurrency=8
)
QUICK = Settings(
    rounds=2, sessions=40, concurrency=4, online_probes=40, offline_probes=16, offline_concurrency=8
)

FIGURES: tuple[tuple[str, str, str], ...] = (
    ("sessions_per_s", "sessions minted (gateway generates the key)", "1/s"),
    ("sessions_daemon_key_per_s", "sessions minted (daemon's public key)", "1/s"),
    ("me_online_p50_ms", "/api/links/me online p50", "ms"),
    ("me_online_p99_ms", "/api/links/me online p99", "ms"),
    ("me_offline_p50_ms", "/api/links/me offline p50", "ms"),
    ("me_offline_p99_ms", "/api/links/me offline p99", "ms"),
)


class BenchError(RuntimeError):
    """The setup or a sanity check failed: the figures would be meaningless."""


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


# --------------------------------------------------------------------------- processes


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "GATEWAY_", "TUNNEL_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


@contextlib.contextmanager
def gateway_process(setup: OperatorSetup, nats_url: str, workdir: Path) -> Any:
    creds = workdir / "gateway.creds"
    creds.write_text(setup.user_creds("bench-gateway"), encoding="utf-8")
    port = free_port()
    env = _clean_env()
    env.update(setup.gateway_env())
    env.update(
        {
            "GATEWAY_JWT_SECRET": SECRET,
            "NATS_URL": nats_url,
            "NATS_CREDS": str(creds),
            "NATS_PUBLIC_URL": nats_url,
        }
    )
    cmd = [sys.executable, "-m", "studio_gateway.cli", "serve", "--port", str(port), "--log-level", "warning"]
    log = (workdir / "gateway.log").open("wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        yield f"http://127.0.0.1:{port}", proc, workdir / "gateway.log"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


@contextlib.contextmanager
def daemon_process(nats_url: str, creds: str, hostname: str) -> Any:
    env = _clean_env()
    env["BENCH_DAEMON_CREDS"] = creds
    cmd = [sys.executable, str(SCRIPT), "--role", "daemon", "--url", nats_url, "--hostname", hostname]
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if line != READY_LINE:
            raise BenchError(f"daemon did not start (said {line!r}, exit {proc.poll()})")
        yield proc
    finally:
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()  # the daemon exits when its stdin closes
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def run_daemon(url: str, hostname: str) -> None:
    """``--role daemon``: serve the host with the minted credential until stdin closes."""
    nc = await connect(url, creds_text=os.environ["BENCH_DAEMON_CREDS"], name="bench-daemon")
    body = json.dumps(STATUS).encode()

    async def handler(request: tunnel.Request) -> tunnel.Response:
        return tunnel.Response(200, [("content-type", "application/json")], body)

    server = await tunnel.serve(nc, hostname, handler)
    print(READY_LINE, flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    await server.close()
    await nc.close()


# --------------------------------------------------------------------------- measurements


async def wait_ready(
    http: aiohttp.ClientSession, base: str, proc: subprocess.Popen[bytes], log: Path
) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        with contextlib.suppress(aiohttp.ClientError):
            async with http.get(f"{base}/healthz") as resp:
                if (await resp.json()).get("nats") == "connected":
                    return
        if proc.poll() is not None:
            output = await asyncio.to_thread(log.read_text, errors="replace")
            raise BenchError(f"gateway exited ({proc.returncode}):\n{output}")
        if time.monotonic() > deadline:
            raise BenchError("gateway did not become ready")
        await asyncio.sleep(0.05)


async def timed_workers(count: int, workers: int, one: Callable[[], Awaitable[None]]) -> float:
    """Run ``one`` ``count`` times on ``workers`` concurrent tasks; returns the wall time."""
    remaining = count

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await one()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    return time.perf_counter() - started


async def measure_round(
    http: aiohttp.ClientSession, base: str, headers: dict[str, dict[str, str]], settings: Settings
) -> dict[str, float]:
    figures: dict[str, float] = {}
    own_key = new_key(KeyKind.USER).public_key

    async def mint(body: dict[str, str] | None) -> None:
        async with http.post(f"{base}/api/links/session", headers=headers["minter"], json=body) as resp:
            payload = await resp.json()
            if resp.status != 200 or "credentials" not in payload:
                raise BenchError(f"session failed: {resp.status} {payload}")

    elapsed = await timed_workers(settings.sessions, settings.concurrency, lambda: mint(None))
    figures["sessions_per_s"] = settings.sessions / elapsed
    elapsed = await timed_workers(
        settings.sessions, settings.concurrency, lambda: mint({"publicKey": own_key})
    )
    figures["sessions_daemon_key_per_s"] = settings.sessions / elapsed

    async def probe(user: str, expect_online: bool, samples: list[float]) -> None:
        started = time.perf_counter()
        async with http.get(f"{base}/api/links/me", headers=headers[user]) as resp:
            payload = await resp.json()
        samples.append((time.perf_counter() - started) * 1000)
        if resp.status != 200 or payload.get("online") is not expect_online:
            raise BenchError(f"unexpected presence for {user}: {resp.status} {payload}")

    online: list[float] = []
    await timed_workers(settings.online_probes, 1, lambda: probe(ONLINE_USER, True, online))
    offline: list[float] = []
    await timed_workers(
        settings.offline_probes, settings.offline_concurrency, lambda: probe(OFFLINE_USER, False, offline)
    )
    figures["me_online_p50_ms"] = percentile(online, 0.50)
    figures["me_online_p99_ms"] = percentile(online, 0.99)
    figures["me_offline_p50_ms"] = percentile(offline, 0.50)
    figures["me_offline_p99_ms"] = percentile(offline, 0.99)
    return figures


async def run_bench(settings: Settings) -> dict[str, Any]:
    setup = OperatorSetup.generate()
    auth = AuthConfig(secret=SECRET)
    headers = {
        user: {"Authorization": f"Bearer {issue_token(auth, user, 3600)}"}
        for user in ("minter", ONLINE_USER, OFFLINE_USER)
    }
    with (
        tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp,
        NatsServer(NatsServerConfig(extra_conf=setup.server_conf())) as server,
        gateway_process(setup, server.url, Path(tmp)) as (base, proc, log),
    ):
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
        connector = aiohttp.TCPConnector(limit=64)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector, trust_env=False) as http:
            await wait_ready(http, base, proc, log)
            async with http.post(f"{base}/api/links/session", headers=headers[ONLINE_USER]) as resp:
                session = await resp.json()
            if resp.status != 200 or session["tunnelHostname"] != tunnel_hostname(ONLINE_USER):
                raise BenchError(f"could not mint the daemon's session: {session}")
            with daemon_process(server.url, session["credentials"]["creds"], session["tunnelHostname"]):
                # Warm-up: connection pool, code paths, the gateway's tunnel subscription.
                await measure_round(http, base, headers, QUICK if settings is not QUICK else settings)
                rounds = [await measure_round(http, base, headers, settings) for _ in range(settings.rounds)]
    samples = {key: [r[key] for r in rounds] for key, _, _ in FIGURES}
    result: dict[str, Any] = {key: statistics.median(values) for key, values in samples.items()}
    result.update(
        rounds=settings.rounds,
        samples=samples,
        settings=settings.__dict__,
        python=platform.python_version(),
        cpus=os.cpu_count(),
    )
    return result


def print_human(result: dict[str, Any]) -> None:
    print(f"studio_gateway benchmark: median of {result['rounds']} rounds (operator mode, HTTP on loopback)")
    for key, label, unit in FIGURES:
        spread = ", ".join(f"{v:.1f}" for v in result["samples"][key])
        print(f"  {label:<46} {result[key]:>9.1f} {unit:<4}  [{spread}]")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark studio_gateway: link sessions per second and /api/links/me latency.",
        epilog="Example: python scripts/bench_gateway.py --quick --json",
    )
    parser.add_argument("--quick", action="store_true", help="few iterations (a few seconds): a smoke check")
    parser.add_argument("--json", action="store_true", help="print only one JSON object on stdout")
    parser.add_argument("--rounds", type=int, help="repeat every measurement this often (default 5, quick 2)")
    parser.add_argument("--role", choices=("main", "daemon"), default="main", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--hostname", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role == "daemon":
        asyncio.run(run_daemon(args.url, args.hostname))
        return 0
    settings = QUICK if args.quick else FULL
    if args.rounds is not None:
        settings = Settings(**{**settings.__dict__, "rounds": args.rounds})
    try:
        result = asyncio.run(run_bench(settings))
    except (BenchError, NatsServerError) as exc:
        print(f"bench_gateway: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    result["quick"] = args.quick
    if args.json:
        print(json.dumps(result))
    else:
        print_human(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
