#!/usr/bin/env python3
"""What linkd's metrics observer costs a small GET: the access log alone vs the access log
plus :class:`linkd.metrics.LinkdMetrics` (what ``linkd up`` runs) on the same traffic record.

Same method as ``scripts/bench_traffic.py`` (whose helpers it uses): one nats-server, a
responder process serving one hostname per mode with the same 100-byte answer, the caller
alternating modes each round; 32 concurrent workers for requests per second, then sequential
requests for p50 latency; medians over the rounds.

    .venv/bin/python scripts/bench_metrics.py [--rounds 5] [--requests 2000] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nats

import tunnel
from cli.nats_server import NatsServer, NatsServerConfig
from linkd.access_log import ACCESS_LOGGER, AccessLog
from linkd.logs import HumanFormatter
from linkd.metrics import LinkdMetrics
from linkd.traffic import Traffic
from scripts.bench_traffic import answer, latency, throughput

MODES = ("access", "metrics")


def handlers() -> dict[str, tunnel.Handler]:
    logger = logging.getLogger(ACCESS_LOGGER)
    sink = logging.StreamHandler(open(os.devnull, "w"))  # noqa: SIM115  (lives as long as the process)
    sink.setFormatter(HumanFormatter())
    logger.addHandler(sink)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    access = Traffic(capture_bodies=False)
    access.subscribe(AccessLog(logger))
    metered = Traffic(capture_bodies=False)
    metered.subscribe(AccessLog(logger))
    LinkdMetrics(metered)  # subscribes itself
    return {"access": access.wrap(answer), "metrics": metered.wrap(answer)}


async def responder(url: str) -> None:
    nc = await nats.connect(url)
    servers = [await tunnel.serve(nc, f"bench-{mode}", handler) for mode, handler in handlers().items()]
    await nc.flush()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for server in servers:
        await server.close(timeout=1.0)
    await nc.close()


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
        for mode in MODES:
            await throughput(client, f"bench-{mode}", 300)
        for _ in range(rounds):
            for mode in MODES:
                rps[mode].append(await throughput(client, f"bench-{mode}", requests))
                p50[mode].append(await latency(client, f"bench-{mode}", requests // 6))
    finally:
        await nc.close()
        proc.stdin.close()
        await proc.wait()
    out: dict[str, Any] = {
        m: {"rps": statistics.median(rps[m]), "p50_ms": statistics.median(p50[m])} for m in MODES
    }
    out["metrics"]["rps_vs_access"] = out["metrics"]["rps"] / out["access"]["rps"]
    out["metrics"]["p50_vs_access"] = out["metrics"]["p50_ms"] / out["access"]["p50_ms"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=2000, help="requests per throughput measurement")
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
    for mode in MODES:
        r = result[mode]
        print(f"{mode:<8} {r['rps']:>8.0f} req/s (32 workers)  p50 {r['p50_ms']:.3f} ms")
    m = result["metrics"]
    print(f"metrics vs access: req/s x{m['rps_vs_access']:.3f}, p50 x{m['p50_vs_access']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
