#!/usr/bin/env python3
"""What linkd's traffic record costs a small GET: the handler bare, wrapped, logged, captured.

Why: :class:`linkd.traffic.Traffic` wraps every tunnelled request the daemon serves, and
the access log and the inspector hang off it; the inspector must cost under 5% of
small-GET throughput. One nats-server; the responder (a separate process, as a desktop
is) serves four hostnames, each with the same 100-byte answer behind a different wrapper:

- ``bare``: the handler alone;
- ``idle``: ``Traffic(capture_bodies=False)`` with no observer (``--no-access-log``, no inspector);
- ``access``: plus the access log (``linkd.access`` at INFO, human format, to /dev/null);
- ``inspect``: plus body capture and a ring of the last 200 exchanges (what an inspector keeps).

The caller (this process) runs rounds, each mode once per round in turn (so drift hits
all alike): 32 concurrent workers for requests per second, then sequential requests for
p50 latency. Medians over the rounds, and each mode against ``bare``.

    .venv/bin/python scripts/bench_traffic.py [--rounds 7] [--requests 3000] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nats

import tunnel
from cli.nats_server import NatsServer, NatsServerConfig
from linkd.access_log import ACCESS_LOGGER, AccessLog
from linkd.logs import HumanFormatter
from linkd.traffic import Exchange, ExchangeEvent, Traffic

MODES = ("bare", "idle", "access", "inspect")
BODY = b"x" * 100
WORKERS = 32


async def answer(request: tunnel.Request) -> tunnel.Response:
    return tunnel.Response(200, [("content-type", "text/plain")], BODY)


def handlers() -> dict[str, tunnel.Handler]:
    logger = logging.getLogger(ACCESS_LOGGER)
    sink = logging.StreamHandler(open(os.devnull, "w"))  # noqa: SIM115  (lives as long as the process)
    sink.setFormatter(HumanFormatter())
    logger.addHandler(sink)
    logger.setLevel(logging.INFO)
    logger.propagate = False

    idle = Traffic(capture_bodies=False)
    access = Traffic(capture_bodies=False)
    access.subscribe(AccessLog(logger))
    inspect = Traffic(capture_bodies=True)
    inspect.subscribe(AccessLog(logger))
    ring: deque[Exchange] = deque(maxlen=200)

    def keep(event: ExchangeEvent, exchange: Exchange) -> None:
        if event == "started":
            ring.append(exchange)

    inspect.subscribe(keep)
    return {
        "bare": answer,
        "idle": idle.wrap(answer),
        "access": access.wrap(answer),
        "inspect": inspect.wrap(answer),
    }


async def responder(url: str) -> None:
    nc = await nats.connect(url)
    servers = [await tunnel.serve(nc, f"bench-{mode}", handler) for mode, handler in handlers().items()]
    await nc.flush()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the caller closes stdin
    for server in servers:
        await server.close(timeout=1.0)
    await nc.close()


async def throughput(client: tunnel.TunnelClient, host: str, requests: int) -> float:
    left = requests

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            async with await client.fetch(f"tunnel://{host}/small") as resp:
                await resp.read()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(WORKERS)))
    return requests / (time.perf_counter() - started)


async def latency(client: tunnel.TunnelClient, host: str, requests: int) -> float:
    times = []
    for _ in range(requests):
        started = time.perf_counter()
        async with await client.fetch(f"tunnel://{host}/small") as resp:
            await resp.read()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


async def caller(url: str, rounds: int, requests: int) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--role", "responder", "--url", url,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdin is not None
    assert (await asyncio.wait_for(proc.stdout.readline(), 30)).strip() == b"ready"
    nc = await nats.connect(url)
    client = tunnel.client_for(nc)
    rps: dict[str, list[float]] = {mode: [] for mode in MODES}
    p50: dict[str, list[float]] = {mode: [] for mode in MODES}
    try:
        for mode in MODES:  # warm-up
            await throughput(client, f"bench-{mode}", 300)
        for _ in range(rounds):
            for mode in MODES:
                rps[mode].append(await throughput(client, f"bench-{mode}", requests))
                p50[mode].append(await latency(client, f"bench-{mode}", requests // 6))
    finally:
        await nc.close()
        proc.stdin.close()
        await proc.wait()
    out: dict[str, Any] = {}
    for mode in MODES:
        out[mode] = {"rps": statistics.median(rps[mode]), "p50_ms": statistics.median(p50[mode])}
    for mode in MODES:
        out[mode]["rps_vs_bare"] = out[mode]["rps"] / out["bare"]["rps"]
        out[mode]["p50_vs_bare"] = out[mode]["p50_ms"] / out["bare"]["p50_ms"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--requests", type=int, default=3000, help="requests per throughput measurement")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--role", choices=("main", "responder"), default="main", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "responder":
        asyncio.run(responder(args.url))
        return 0
    with NatsServer(NatsServerConfig(monitor_port=None)) as server:
        result = asyncio.run(caller(server.url, args.rounds, args.requests))
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{'mode':<8} {'req/s (32 workers)':>19} {'vs bare':>8} {'p50 ms':>8} {'vs bare':>8}")
    for mode in MODES:
        r = result[mode]
        rps, p50 = (
            f"{r['rps']:>19.0f} {r['rps_vs_bare']:>8.3f}",
            f"{r['p50_ms']:>8.3f} {r['p50_vs_bare']:>8.3f}",
        )
        print(f"{mode:<8} {rps} {p50}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
