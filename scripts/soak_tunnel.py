#!/usr/bin/env python3
"""Soak the tunnel: the chaos mix of tests/faults, fault after fault, for minutes.

Starts a real nats-server on loopback (cli/nats_server.py), a tunnel daemon whose NATS
connection goes through a fault-injecting proxy (tests/faultproxy.py) and a caller, then
keeps a mixed load running (small GETs and echoed POSTs, multi-MiB downloads and uploads,
every body sha256-checked) while it injects, one after another in random order: pauses
longer and shorter than the idle timeout, a throttled link, a blackhole (half-open
partition), connection resets, kill -9 + restart of nats-server, and calm stretches.

After every fault it checks the invariants of tests/faults/chaos.py (every request ends with
success or a typed tunnel error within its timeouts, no corrupted or truncated body is ever
delivered as a success, cut-off requests fail within the promised time, requests after
recovery succeed, nothing is left in flight) and prints any violation at once. At the end it
prints totals: faults, requests by outcome and error code, bytes verified, recovery times,
peak memory of this process and of nats-server. Exit status 1 on any violation.

    python scripts/soak_tunnel.py --minutes 10
    python scripts/soak_tunnel.py --minutes 1 --faults reset,kill-9-nats-server --seed 7
"""

from __future__ import annotations

import argparse
import asyncio
import random
import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # the chaos machinery lives with the tests

from cli.nats_server import NatsServer, NatsServerConfig, NatsServerError  # noqa: E402
from tests.faults.chaos import (  # noqa: E402
    ALL_FAULTS,
    CALM,
    ChaosRig,
    ChaosSettings,
    Fault,
    FaultReport,
    parse_fault_names,
    run_fault,
)

MiB = 1024 * 1024
FAULTS_BY_NAME: dict[str, Fault] = {fault.name: fault for fault in (*ALL_FAULTS, CALM)}
# The fault schedule leans on the faults that find bugs (losses and partitions); calm
# stretches in between show the steady state is clean too.
DEFAULT_WEIGHTS: dict[str, int] = {name: 2 for name in FAULTS_BY_NAME} | {"calm": 1}


@dataclass
class Totals:
    """Everything the soak counts, across faults."""

    faults: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    requests: int = 0
    verified_bytes: int = 0
    violations: list[str] = field(default_factory=list)
    max_recovery: dict[str, float] = field(default_factory=dict)
    max_cutoff: dict[str, float] = field(default_factory=dict)
    nats_max_mem: int = 0
    nats_restarts: int = 0
    daemon_reconnects: int = 0
    caller_reconnects: int = 0

    def add(self, report: FaultReport) -> None:
        self.faults[report.fault] += 1
        self.requests += len(report.ledger.ops)
        self.outcomes.update(report.ledger.outcomes())
        self.verified_bytes += report.ledger.verified_bytes()
        self.violations += [f"[{report.fault}] {v}" for v in report.violations]
        if report.recovered_after is not None:
            best = self.max_recovery.get(report.fault, 0.0)
            self.max_recovery[report.fault] = max(best, report.recovered_after)
        cutoff = report.cutoff_latency()
        if cutoff is not None:
            self.max_cutoff[report.fault] = max(self.max_cutoff.get(report.fault, 0.0), cutoff)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Soak the tunnel: mixed load under repeated network and server faults, with "
        "invariant checks after each fault. Loopback only; exit status 1 on any violation.",
    )
    parser.add_argument(
        "--minutes", type=float, default=5.0, help="how long to keep injecting faults (default 5)"
    )
    parser.add_argument(
        "--faults",
        default=",".join(FAULTS_BY_NAME),
        help="comma-separated faults to draw from (default: all): " + ", ".join(FAULTS_BY_NAME),
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed for the fault order")
    parser.add_argument(
        "--max-faults", type=int, default=None, help="stop after this many faults (default: no limit)"
    )
    args = parser.parse_args(argv)
    args.fault_names = parse_fault_names(parser, args.faults, FAULTS_BY_NAME)
    if args.minutes < 0:
        parser.error("--minutes must be >= 0")
    return args


def say(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def nats_mem(server: NatsServer) -> int:
    """nats-server's resident memory in bytes (0 if it cannot be read right now)."""
    try:
        mem = server.varz().get("mem", 0)
    except (OSError, ValueError, NatsServerError):
        return 0
    return mem if isinstance(mem, int) else 0


async def soak(args: argparse.Namespace, server: NatsServer, totals: Totals) -> None:
    rng = random.Random(args.seed)
    faults = [FAULTS_BY_NAME[name] for name in args.fault_names]
    weights = [DEFAULT_WEIGHTS[fault.name] for fault in faults]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + args.minutes * 60.0
    settings = ChaosSettings()
    async with ChaosRig(server, settings) as rig:
        say(
            f"rig up: nats-server {server.url}, daemon via proxy {rig.proxy.url}; idle timeout "
            f"{settings.idle_timeout:g}s, stall timeout {settings.stall_timeout:g}s, "
            f"window {settings.window // 1024} KiB, bodies {[s // MiB for s in settings.big_sizes]} MiB"
        )
        done = 0
        while True:
            fault = rng.choices(faults, weights)[0]
            report = await run_fault(rig, fault)
            totals.add(report)
            totals.nats_max_mem = max(totals.nats_max_mem, nats_mem(server))
            if fault.name == "kill-9-nats-server":
                totals.nats_restarts += 1
            say(report.summary())
            for violation in report.violations:
                say(f"  VIOLATION: {violation}")
            done += 1
            if loop.time() >= deadline or (args.max_faults is not None and done >= args.max_faults):
                break
        totals.daemon_reconnects = rig.reconnects["chaos-daemon"]
        totals.caller_reconnects = rig.reconnects["chaos-caller"]


def print_summary(totals: Totals, elapsed: float, seed: int) -> None:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print()
    print(f"=== tunnel soak summary ({elapsed / 60:.1f} min, seed {seed}) ===")
    faults = ", ".join(f"{k}={v}" for k, v in sorted(totals.faults.items()))
    print(f"faults: {sum(totals.faults.values())} ({faults})")
    by_code: Counter[str] = Counter()
    for key, count in totals.outcomes.items():
        by_code[key.split(":", 1)[1]] += count
    ok = by_code.get("ok", 0)
    print(f"requests: {totals.requests} ({ok} ok, {totals.requests - ok} typed failures)")
    print("  by outcome: " + ", ".join(f"{k}={v}" for k, v in sorted(by_code.items())))
    print("  by kind:    " + ", ".join(f"{k}={v}" for k, v in sorted(totals.outcomes.items())))
    print(f"bytes verified (sha256 / exact compare): {totals.verified_bytes / MiB / 1024:.2f} GiB")
    if totals.max_recovery:
        print(
            "max time to reachable after healing: "
            + ", ".join(f"{k} {v:.2f}s" for k, v in sorted(totals.max_recovery.items()))
        )
    if totals.max_cutoff:
        print(
            "max time for cut-off requests to fail: "
            + ", ".join(f"{k} {v:.2f}s" for k, v in sorted(totals.max_cutoff.items()))
        )
    print(
        f"reconnects: daemon {totals.daemon_reconnects}, caller {totals.caller_reconnects}; "
        f"nats-server restarts: {totals.nats_restarts}"
    )
    print(
        f"peak memory: soak process (daemon + caller + proxy) {rss / MiB:.0f} MiB, "
        f"nats-server {totals.nats_max_mem / MiB:.0f} MiB"
    )
    if totals.violations:
        print(f"RESULT: FAIL, {len(totals.violations)} invariant violations:")
        for violation in totals.violations:
            print(f"  - {violation}")
    else:
        print("RESULT: PASS, no invariant violations")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1_000_000)
    totals = Totals()
    began = time.monotonic()
    server = NatsServer(NatsServerConfig())
    interrupted = False
    try:
        server.start()
        say(f"soak for {args.minutes:g} min, faults {', '.join(args.fault_names)}, seed {args.seed}")
        asyncio.run(soak(args, server, totals))
    except KeyboardInterrupt:
        interrupted = True
    except NatsServerError as exc:
        print(f"soak: nats-server failed: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    finally:
        server.close()
    print_summary(totals, time.monotonic() - began, args.seed)
    if interrupted:
        print("(interrupted)")
        return 130
    return 1 if totals.violations else 0


if __name__ == "__main__":
    sys.exit(main())
