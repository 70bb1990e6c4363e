#!/usr/bin/env python3
"""Ten thousand linked desktops, measured (issue #21): what the system costs as N grows.

Every piece is a real process on loopback: an operator/JWT-mode nats-server with JetStream
(or ``--cluster N`` nodes, runs replicated), one ``studio-gateway serve`` with short link
session lifetimes (``--session-ttl``, so credential refreshes happen during the run), and
``ceil(N / --per-process)`` desktop processes (``scripts/scale_worker.py``), each running
its share of real :class:`linkd.daemon.LinkDaemon`s: own nkey, own gateway-minted session,
own NATS connection, own host served with the daemon's routes and the mock runner.

This process is the caller side. At each step of N (``--steps``) it brings the desktops
online (timed), then for ``--duration-per-step`` seconds keeps a steady open-loop mix on
random desktops:

- presence probes: ``GET /api/links/me`` on the gateway with that desktop's user token
  (gateway HTTP + the gateway's tunnel probe); answered = 200 and ``online: true``;
- small tunnel requests: ``GET tunnel://<host>/api/links/status`` straight over NATS (an
  account user's connection, :class:`tunnel.TunnelClient`); answered = 200, else a typed
  tunnel error (counted by code);
- mock runs: ``POST /api/runs`` (``mock``, 3 chunks); each must reach a terminal status.

and reports per step: probe and request p50/p99, runs/s and the gateway's dispatch p99
(``studio_runs_dispatch_seconds``), credential refreshes per second, RSS of every process
(and per desktop), CPU of every process, open fds, NATS connections and subscriptions
(``/varz``, ``/subsz``), JetStream storage (``/jsz``), and the load average.

Bounded: ``--online-timeout`` per step, ``--timeout`` overall; whatever happens (Ctrl-C
included) every process is killed and the temp dir removed. A step whose desktops do not
all come online ends the run there, with the figures of what did.

    scripts/scale.py --desktops 10000 --cluster 3 --json > docs/scaling-run.json
    scripts/scale.py --desktops 200 --steps 100,200 --duration-per-step 10 --plot /tmp/s.png
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

REPO: Final = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # the harness lives in the test tree; run from anywhere
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import nats  # noqa: E402
from nats.aio.client import RawCredentials  # noqa: E402

import tunnel  # noqa: E402
from cli.nats_server import NatsServer  # noqa: E402
from contract.routes import ME_PATH, STATUS_PATH  # noqa: E402
from scripts.scale_worker import raise_nofile, user_id  # noqa: E402
from studio_gateway.auth import issue_token  # noqa: E402
from studio_gateway.config import AuthConfig  # noqa: E402
from studio_gateway.hostnames import tunnel_hostname  # noqa: E402
from tests.integration.runs_harness import SECRET, JetStreamCluster, JetStreamNats, RunsStack  # noqa: E402

WORKER: Final = REPO / "scripts" / "scale_worker.py"
DEFAULT_STEPS: Final = (100, 1000, 5000, 10000)
TERMINAL: Final = frozenset({"completed", "failed", "cancelled"})
CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")
MOCK_INPUT: Final = {"count": 3}
RUN_DRAIN_TIMEOUT: Final = 90.0
RUN_POLL_INTERVAL: Final = 0.1
CALL_DRAIN_TIMEOUT: Final = 30.0
WORKER_REPLY_TIMEOUT: Final = 60.0
HTTP_TIMEOUT: Final = 30.0
# Goals of issue #21, judged at the largest step that completed.
GOAL_PROBE_P99_MS: Final = 10.0
GOAL_REQUEST_P99_MS: Final = 20.0
GOAL_GATEWAY_BYTES_PER_DESKTOP: Final = 2048


class ScaleError(RuntimeError):
    """The run cannot go on (a process died, a reply never came); the message says which."""


def progress(message: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ /proc readings


def rss_bytes(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def cpu_seconds(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    except (OSError, ValueError, IndexError):
        return None


def open_fds(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return round(ordered[index], 3)


_BUCKET: Final = re.compile(r"^studio_runs_dispatch_seconds_bucket\{(?P<labels>[^}]*)\} (?P<value>\S+)$")


def dispatch_buckets(metrics_text: str) -> dict[float, float]:
    """Cumulative ``studio_runs_dispatch_seconds`` buckets (upper bound -> count), all outcomes."""
    buckets: dict[float, float] = {}
    for line in metrics_text.splitlines():
        match = _BUCKET.match(line)
        if match is None:
            continue
        le = re.search(r'le="([^"]+)"', match["labels"])
        if le is None:
            continue
        bound = math.inf if le[1] == "+Inf" else float(le[1])
        buckets[bound] = buckets.get(bound, 0.0) + float(match["value"])
    return buckets


def histogram_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float | None:
    """The q-quantile's bucket upper bound (seconds) of what was observed between two scrapes."""
    delta = {bound: after.get(bound, 0.0) - before.get(bound, 0.0) for bound in after}
    total = delta.get(math.inf, 0.0)
    if total <= 0:
        return None
    for bound in sorted(delta):
        if delta[bound] >= q * total:
            return bound
    return math.inf


# ------------------------------------------------------------------------------ processes


@dataclass
class Worker:
    """One desktop process (scripts/scale_worker.py) and its command channel."""

    index: int
    proc: asyncio.subprocess.Process
    baseline_rss: int | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def call(self, command: dict[str, Any], timeout: float) -> dict[str, Any]:
        async with self.lock:
            stdin, stdout = self.proc.stdin, self.proc.stdout
            assert stdin is not None and stdout is not None
            if self.proc.returncode is not None:
                raise ScaleError(f"desktop process {self.index} exited with status {self.proc.returncode}")
            stdin.write((json.dumps(command) + "\n").encode())
            await stdin.drain()
            try:
                line = await asyncio.wait_for(stdout.readline(), timeout)
            except TimeoutError:
                raise ScaleError(f"desktop process {self.index} did not answer {command['cmd']!r}") from None
            if not line:
                raise ScaleError(f"desktop process {self.index} exited (status {self.proc.returncode})")
            answer: dict[str, Any] = json.loads(line)
            return answer

    def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()


async def start_worker(index: int, workdir: Path, gateway_url: str, args: argparse.Namespace) -> Worker:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "SCALE_WORKER": str(index),
        "SCALE_GATEWAY": gateway_url,
        "SCALE_JWT_SECRET": SECRET,
        "SCALE_TOKEN_TTL": str(int(args.timeout) + 3600),
        "SCALE_CONNECT_WINDOW": str(args.connect_window),
        "SCALE_STATE_DIR": str(workdir / f"desktops-{index}"),
    }
    log = (workdir / f"desktops-{index}.log").open("ab")
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(WORKER),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
            env=env,
            cwd=str(REPO),
            start_new_session=True,  # Ctrl-C reaches us once; we kill it
            limit=1 << 20,
        )
    finally:
        log.close()
    return Worker(index, proc)


def node_servers(stack: RunsStack[Any]) -> list[NatsServer]:
    nats_side = stack.nats
    if isinstance(nats_side, JetStreamCluster):
        return list(nats_side.nodes)
    assert isinstance(nats_side, JetStreamNats)
    return [nats_side.server]


# ------------------------------------------------------------------------------ the caller side


@dataclass
class CallStats:
    """One kind of call during one step."""

    latencies_ms: list[float] = field(default_factory=list)
    ok: int = 0
    failures: Counter[str] = field(default_factory=Counter)

    @property
    def count(self) -> int:
        return self.ok + sum(self.failures.values())

    def summary(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "ok": self.ok,
            "failures": dict(self.failures),
            "p50_ms": percentile(self.latencies_ms, 0.50),
            "p99_ms": percentile(self.latencies_ms, 0.99),
            "max_ms": percentile(self.latencies_ms, 1.0),
        }


@dataclass
class RunRecord:
    run_id: str
    user: str
    posted: float
    status: str | None = None
    failure_kind: str | None = None
    ended: float | None = None


class Caller:
    """Presence probes, tunnel requests and runs on random desktops of the fleet."""

    def __init__(self, gateway_url: str, http: httpx.AsyncClient, client: tunnel.TunnelClient, workers: int):
        self.gateway_url = gateway_url
        self.http = http
        self.client = client
        self.workers = workers
        self.auth = AuthConfig.from_env({"GATEWAY_JWT_SECRET": SECRET})
        self._tokens: dict[str, str] = {}
        self.desktops = 0

    def random_user(self) -> str:
        k = random.randrange(self.desktops)
        return user_id(k % self.workers, k // self.workers)

    def token(self, user: str) -> str:
        token = self._tokens.get(user)
        if token is None:
            token = self._tokens[user] = issue_token(self.auth, user, 4 * 3600)
        return token

    def headers(self, user: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(user)}"}

    async def probe(self, stats: CallStats, gateway_ms: list[float]) -> None:
        user = self.random_user()
        started = time.perf_counter()
        try:
            response = await self.http.get(self.gateway_url + ME_PATH, headers=self.headers(user))
            doc = response.json() if response.status_code == 200 else {}
        except (httpx.HTTPError, ValueError) as exc:
            stats.failures[f"http:{type(exc).__name__}"] += 1
            return
        elapsed = (time.perf_counter() - started) * 1000
        if response.status_code != 200:
            stats.failures[f"status:{response.status_code}"] += 1
        elif doc.get("online") is not True:
            stats.failures[f"offline:{doc.get('reason')}"] += 1
        else:
            stats.ok += 1
            stats.latencies_ms.append(elapsed)
            if isinstance(doc.get("latencyMs"), int | float):
                gateway_ms.append(float(doc["latencyMs"]))

    async def request(self, stats: CallStats) -> None:
        host = tunnel_hostname(self.random_user())
        started = time.perf_counter()
        try:
            async with await self.client.fetch(f"tunnel://{host}{STATUS_PATH}") as response:
                body = await response.read()
                status = response.status
        except tunnel.TunnelError as exc:
            stats.failures[f"tunnel:{exc.code}"] += 1
            return
        except Exception as exc:  # not a typed tunnel error: an invariant violation, counted apart
            stats.failures[f"untyped:{type(exc).__name__}"] += 1
            return
        elapsed = (time.perf_counter() - started) * 1000
        if status == 200 and body:
            stats.ok += 1
            stats.latencies_ms.append(elapsed)
        else:
            stats.failures[f"status:{status}"] += 1

    async def post_run(self, runs: list[RunRecord], failures: Counter[str]) -> None:
        user = self.random_user()
        started = time.monotonic()
        try:
            response = await self.http.post(
                f"{self.gateway_url}/api/runs",
                json={"runner": "mock", "input": MOCK_INPUT},
                headers=self.headers(user),
            )
        except httpx.HTTPError as exc:
            failures[f"http:{type(exc).__name__}"] += 1
            return
        if response.status_code != 202:
            failures[f"status:{response.status_code}"] += 1
            return
        record = RunRecord(response.json()["runId"], user, started)
        runs.append(record)
        # Follow it to its end (polling: the end-to-end time is good to RUN_POLL_INTERVAL).
        deadline = time.monotonic() + RUN_DRAIN_TIMEOUT
        while record.status not in TERMINAL and time.monotonic() < deadline:
            await asyncio.sleep(RUN_POLL_INTERVAL)
            await self._check_run(record)

    async def settle_runs(self, runs: list[RunRecord], timeout: float) -> None:
        """Poll every run until it is terminal (or ``timeout``)."""
        deadline = time.monotonic() + timeout
        open_runs = [r for r in runs if r.status not in TERMINAL]
        while open_runs and time.monotonic() < deadline:
            await asyncio.gather(*(self._check_run(r) for r in open_runs))
            open_runs = [r for r in open_runs if r.status not in TERMINAL]
            if open_runs:
                await asyncio.sleep(0.25)

    async def _check_run(self, record: RunRecord) -> None:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            response = await self.http.get(
                f"{self.gateway_url}/api/runs/{record.run_id}", headers=self.headers(record.user)
            )
            if response.status_code == 200:
                doc = response.json()
                record.status = doc.get("status")
                if record.status in TERMINAL:
                    record.ended = time.monotonic()
                    record.failure_kind = doc.get("failureKind")


async def open_loop(
    rate: float, duration: float, make: Callable[[], Awaitable[None]]
) -> list[asyncio.Task[None]]:
    """Start ``make()`` ``rate`` times a second for ``duration`` seconds, not waiting for any."""
    tasks: list[asyncio.Task[None]] = []
    if rate <= 0:
        return tasks
    interval = 1.0 / rate
    start = time.monotonic()
    n = 0
    while True:
        due = start + n * interval
        if due - start >= duration:
            return tasks
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(make()))
        n += 1


# ------------------------------------------------------------------------------ the run


@dataclass
class Processes:
    stack: RunsStack[Any]
    workers: list[Worker]

    @property
    def gateway_pid(self) -> int | None:
        return self.stack.gateways[0].pid

    def nats_pids(self) -> list[int | None]:
        return [node.pid for node in node_servers(self.stack)]

    def cpu_times(self) -> dict[str, Any]:
        return {
            "nats": [cpu_seconds(pid) for pid in self.nats_pids()],
            "gateway": cpu_seconds(self.gateway_pid),
            "desktops": [cpu_seconds(w.pid) for w in self.workers],
            "caller": cpu_seconds(os.getpid()),
        }


def cpu_percent(before: dict[str, Any], after: dict[str, Any], seconds: float) -> dict[str, Any]:
    def pct(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or seconds <= 0 else round(100 * (b - a) / seconds, 1)

    return {
        "nats": [pct(a, b) for a, b in zip(before["nats"], after["nats"], strict=True)],
        "gateway": pct(before["gateway"], after["gateway"]),
        "desktops": [pct(a, b) for a, b in zip(before["desktops"], after["desktops"], strict=True)],
        "caller": pct(before["caller"], after["caller"]),
    }


def nats_figures(servers: list[NatsServer]) -> dict[str, Any]:
    per_node = []
    for server in servers:
        node: dict[str, Any] = {}
        with contextlib.suppress(Exception):
            varz = server.monitor_json("varz")
            node.update(
                connections=varz.get("connections"),
                subscriptions=varz.get("subscriptions"),
                slow_consumers=varz.get("slow_consumers"),
                mem_bytes=varz.get("mem"),
                max_connections=varz.get("max_connections"),
            )
        with contextlib.suppress(Exception):
            node["subsz_subscriptions"] = server.monitor_json("subsz").get("num_subscriptions")
        with contextlib.suppress(Exception):
            jsz = server.monitor_json("jsz")
            node["jetstream"] = {
                k: jsz.get(k) for k in ("memory", "storage", "streams", "consumers", "messages", "bytes")
            }
        per_node.append(node)

    def total(key: str) -> int:
        return sum(int(n.get(key) or 0) for n in per_node)

    storage = sum(int((n.get("jetstream") or {}).get("storage") or 0) for n in per_node)
    first_js: dict[str, Any] = next((n["jetstream"] for n in per_node if n.get("jetstream")), {})
    return {
        "connections": total("connections"),
        # Every node knows the whole cluster's interest: the largest node's count is the cluster's.
        "subscriptions": max((int(n.get("subscriptions") or 0) for n in per_node), default=0),
        "slow_consumers": total("slow_consumers"),
        "jetstream_storage_bytes": storage,
        "jetstream_memory_bytes": sum(int((n.get("jetstream") or {}).get("memory") or 0) for n in per_node),
        "jetstream_streams": first_js.get("streams"),
        "jetstream_consumers": first_js.get("consumers"),
        "jetstream_messages": first_js.get("messages"),
        "per_node": per_node,
    }


def share(n: int, workers: int, index: int) -> int:
    """How many of the first ``n`` desktops worker ``index`` runs (desktop k runs on k % workers)."""
    return len(range(index, n, workers))


async def worker_stats(workers: list[Worker], *, reset_lag: bool = False) -> list[dict[str, Any]]:
    command = {"cmd": "stats", "reset_lag": reset_lag}
    return list(await asyncio.gather(*(w.call(command, WORKER_REPLY_TIMEOUT) for w in workers)))


async def measure_step(
    n: int,
    args: argparse.Namespace,
    procs: Processes,
    caller: Caller,
    gateway_baseline: int | None,
    previous: int,
) -> dict[str, Any]:
    step: dict[str, Any] = {"desktops": n}
    workers = procs.workers
    progress(f"step N={n}: bringing desktops online")
    began = time.monotonic()
    cpu_began = procs.cpu_times()
    grown = await asyncio.gather(
        *(
            w.call(
                {"cmd": "grow", "to": share(n, len(workers), w.index), "deadline": args.online_timeout},
                args.online_timeout + WORKER_REPLY_TIMEOUT,
            )
            for w in workers
        )
    )
    online_seconds = time.monotonic() - began
    # Who paid for bringing them online (minting, JWT checks, connects, subscriptions).
    step["online_cpu_percent"] = cpu_percent(cpu_began, procs.cpu_times(), online_seconds)
    online = sum(g["online"] for g in grown)
    step["online"] = online
    step["online_seconds"] = round(online_seconds, 2)
    step["new_desktops_per_s"] = round((n - previous) / max(online_seconds, 1e-9), 1)
    not_online: Counter[str] = Counter()
    for g in grown:
        not_online.update(g.get("not_online") or {})
    step["not_online"] = dict(not_online.most_common(5))
    progress(f"step N={n}: {online}/{n} online after {online_seconds:.1f}s")
    if online < n:
        stats = await worker_stats(workers)
        step["desktop_states"] = _merge_states(stats)
        step["desktop_reconnects"] = sum(s["reconnects"] for s in stats)
        step["desktop_loop_lag_p99_ms"] = [s.get("loop_lag_p99_ms") for s in stats]
        step["desktop_loop_lag_max_ms"] = [s.get("loop_lag_max_ms") for s in stats]
        step["load_average"] = [round(x, 2) for x in os.getloadavg()]
        step["resources"] = await resources(procs, gateway_baseline)
        return step

    caller.desktops = n
    stats_before = await worker_stats(workers, reset_lag=True)  # the lag of this window only
    cpu_before = procs.cpu_times()
    metrics_before = dispatch_buckets(await gateway_metrics(caller))
    probes, requests = CallStats(), CallStats()
    gateway_ms: list[float] = []
    runs: list[RunRecord] = []
    run_failures: Counter[str] = Counter()
    window_start = time.monotonic()
    loads = await asyncio.gather(
        open_loop(args.probe_rate, args.duration_per_step, lambda: caller.probe(probes, gateway_ms)),
        open_loop(args.request_rate, args.duration_per_step, lambda: caller.request(requests)),
        open_loop(args.run_rate, args.duration_per_step, lambda: caller.post_run(runs, run_failures)),
    )
    calls = [*loads[0], *loads[1]]
    if calls:
        _, pending = await asyncio.wait(calls, timeout=CALL_DRAIN_TIMEOUT)
        for task in pending:
            task.cancel()
        unfinished_probes = sum(1 for t in pending if t in loads[0])
        unfinished_requests = len(pending) - unfinished_probes
        if unfinished_probes:
            probes.failures["unfinished"] += unfinished_probes
        if unfinished_requests:
            requests.failures["unfinished"] += unfinished_requests
    window = time.monotonic() - window_start
    cpu_after = procs.cpu_times()
    stats_after = await worker_stats(workers)
    refreshes = sum(s["refreshes"] for s in stats_after) - sum(s["refreshes"] for s in stats_before)
    refresh_failed = sum(s["refresh_failed"] for s in stats_after) - sum(
        s["refresh_failed"] for s in stats_before
    )
    if loads[2]:
        _, pending = await asyncio.wait(loads[2], timeout=RUN_DRAIN_TIMEOUT)
        for task in pending:
            task.cancel()
    await caller.settle_runs(runs, 5.0)
    metrics_after = dispatch_buckets(await gateway_metrics(caller))
    statuses = Counter(r.status if r.status in TERMINAL else "not_terminal" for r in runs)
    kinds = Counter(r.failure_kind or "?" for r in runs if r.status == "failed")
    durations = [1000 * (r.ended - r.posted) for r in runs if r.ended is not None]
    completed = statuses.get("completed", 0)
    dispatch_p50 = histogram_quantile(metrics_before, metrics_after, 0.50)
    dispatch_p99 = histogram_quantile(metrics_before, metrics_after, 0.99)
    step.update(
        window_seconds=round(window, 2),
        probe={
            **probes.summary(),
            "gateway_probe_p50_ms": percentile(gateway_ms, 0.5),
            "gateway_probe_p99_ms": percentile(gateway_ms, 0.99),
        },
        request=requests.summary(),
        runs={
            "created": len(runs),
            "post_failures": dict(run_failures),
            "statuses": dict(statuses),
            "failure_kinds": dict(kinds),
            "completed": completed,
            "per_s": round(completed / window, 2) if window > 0 else None,
            "end_to_end_p50_ms": percentile(durations, 0.5),
            "end_to_end_p99_ms": percentile(durations, 0.99),
            "dispatch_p50_ms": None if dispatch_p50 is None else round(dispatch_p50 * 1000, 1),
            "dispatch_p99_ms": None if dispatch_p99 is None else round(dispatch_p99 * 1000, 1),
            "dispatch_note": "histogram bucket upper bounds (studio_runs_dispatch_seconds)",
        },
        refreshes={
            "count": refreshes,
            "per_s": round(refreshes / window, 2) if window > 0 else None,
            "failed": refresh_failed,
            "total_so_far": sum(s["refreshes"] for s in stats_after),
        },
        desktop_states=_merge_states(stats_after),
        desktop_reconnects=sum(s["reconnects"] for s in stats_after),
        desktop_loop_lag_p99_ms=[s.get("loop_lag_p99_ms") for s in stats_after],
        desktop_loop_lag_max_ms=[s.get("loop_lag_max_ms") for s in stats_after],
        cpu_percent=cpu_percent(cpu_before, cpu_after, window),
        load_average=[round(x, 2) for x in os.getloadavg()],
    )
    step["resources"] = await resources(procs, gateway_baseline)
    step["invariants"] = {
        "every_probe_answered": probes.ok == probes.count and probes.count > 0,
        "every_request_answered_or_typed": not any(
            k.startswith(("untyped", "unfinished")) for k in requests.failures
        )
        and requests.count > 0,
        "every_run_terminal": statuses.get("not_terminal", 0) == 0 and not run_failures and bool(runs),
    }
    return step


def _merge_states(stats: list[dict[str, Any]]) -> dict[str, int]:
    merged: Counter[str] = Counter()
    for s in stats:
        merged.update(s["states"])
    return dict(merged)


async def gateway_metrics(caller: Caller) -> str:
    try:
        return (await caller.http.get(caller.gateway_url + "/metrics")).text
    except httpx.HTTPError:
        return ""


async def resources(procs: Processes, gateway_baseline: int | None) -> dict[str, Any]:
    counts = [s["desktops"] for s in await worker_stats(procs.workers)]
    desktops = sum(counts)
    gateway_rss = rss_bytes(procs.gateway_pid)
    worker_rss = [rss_bytes(w.pid) for w in procs.workers]
    per_desktop = [
        round((rss - w.baseline_rss) / c)
        for w, rss, c in zip(procs.workers, worker_rss, counts, strict=True)
        if rss is not None and w.baseline_rss is not None and c
    ]
    nats_rss = [rss_bytes(pid) for pid in procs.nats_pids()]
    figures = await asyncio.to_thread(nats_figures, node_servers(procs.stack))
    return {
        "nats_rss_bytes": nats_rss,
        "nats_bytes_per_desktop": round(sum(r or 0 for r in nats_rss) / desktops) if desktops else None,
        "gateway_rss_bytes": gateway_rss,
        "gateway_bytes_per_desktop": round((gateway_rss - gateway_baseline) / desktops)
        if desktops and gateway_rss is not None and gateway_baseline is not None
        else None,
        "desktop_process_rss_bytes": worker_rss,
        "desktop_bytes_per_desktop": round(statistics.mean(per_desktop)) if per_desktop else None,
        "fds": {
            "nats": [open_fds(pid) for pid in procs.nats_pids()],
            "gateway": open_fds(procs.gateway_pid),
            "desktops": [open_fds(w.pid) for w in procs.workers],
        },
        "nats": figures,
    }


def machine() -> dict[str, Any]:
    import resource

    mem_total = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_total = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1]) * 1024
    return {
        "cpus": os.cpu_count(),
        "mem_total_bytes": mem_total,
        "nofile_limit": resource.getrlimit(resource.RLIMIT_NOFILE),
        "python": platform.python_version(),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
    }


async def run(args: argparse.Namespace, workdir: Path, result: dict[str, Any]) -> None:
    steps = sorted({s for s in args.steps if s <= args.desktops} | {args.desktops})
    workers_needed = max(1, math.ceil(max(steps) / args.per_process))
    result["config"] = {
        "desktops": args.desktops,
        "steps": steps,
        "per_process": args.per_process,
        "desktop_processes": workers_needed,
        "cluster": args.cluster,
        "duration_per_step": args.duration_per_step,
        "session_ttl": args.session_ttl,
        "probe_rate": args.probe_rate,
        "request_rate": args.request_rate,
        "run_rate": args.run_rate,
        "connect_window": args.connect_window,
        "hold": args.hold,
        "mock_input": MOCK_INPUT,
    }
    progress(f"starting nats-server{f' cluster of {args.cluster}' if args.cluster else ''} and the gateway")
    env = {"NATS_TUNNEL_SESSION_TTL_SECONDS": str(args.session_ttl)}
    stack: RunsStack[Any] = await asyncio.to_thread(
        RunsStack.start, workdir / "stack", gateways=1, gateway_env=env, cluster=args.cluster or None
    )
    procs = Processes(stack, [])
    result["_cleanup"].append(stack.close)
    gateway_url = stack.gateways[0].url
    nc = await nats.connect(
        stack.nats.url.split(","),
        name="scale-caller",
        user_credentials=RawCredentials(stack.nats.admin_creds("scale-caller")),
        connect_timeout=10,
    )
    try:
        progress(f"starting {workers_needed} desktop process(es)")
        procs.workers = list(
            await asyncio.gather(
                *(start_worker(i, workdir, gateway_url, args) for i in range(workers_needed))
            )
        )
        result["_pids"].extend(w.pid for w in procs.workers)
        await worker_stats(procs.workers)  # every process is up and idle
        for worker in procs.workers:
            worker.baseline_rss = rss_bytes(worker.pid)
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT, limits=limits) as http:
            caller = Caller(gateway_url, http, tunnel.TunnelClient(nc), workers_needed)
            gateway_baseline = rss_bytes(procs.gateway_pid)
            result["baseline"] = {
                "gateway_rss_bytes": gateway_baseline,
                "desktop_process_rss_bytes": [w.baseline_rss for w in procs.workers],
                "nats_rss_bytes": [rss_bytes(pid) for pid in procs.nats_pids()],
            }
            previous = 0
            for n in steps:
                step = await measure_step(n, args, procs, caller, gateway_baseline, previous)
                previous = n
                result["steps"].append(step)
                if step["online"] < n:
                    result["stopped_reason"] = (
                        f"only {step['online']} of {n} desktops came online within {args.online_timeout:g}s "
                        f"(not online: {step['not_online']})"
                    )
                    progress(result["stopped_reason"])
                    return
                progress(step_line(step))
            if args.hold > 0:
                # The same N again after a while: the credentials of the first steps' desktops are
                # being refreshed by then (at ~60-75% of --session-ttl), which the fleet lives with.
                n = steps[-1]
                progress(f"holding {n} desktops for {args.hold:g}s, then measuring again")
                await asyncio.sleep(args.hold)
                step = await measure_step(n, args, procs, caller, gateway_baseline, n)
                step["held_seconds"] = args.hold
                result["steps"].append(step)
                if step["online"] < n:
                    result["stopped_reason"] = f"only {step['online']} of {n} desktops stayed online"
                    progress(result["stopped_reason"])
                    return
                progress(step_line(step))
        result["completed"] = True
    finally:
        for worker in procs.workers:
            worker.kill()
        for worker in procs.workers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(worker.proc.wait(), 10)
        with contextlib.suppress(Exception):
            await nc.close()


def step_line(step: dict[str, Any]) -> str:
    res, probe, req, runs = step["resources"], step["probe"], step["request"], step["runs"]
    return (
        f"N={step['desktops']}: online in {step['online_seconds']}s; "
        f"probe p50/p99 {probe['p50_ms']}/{probe['p99_ms']} ms ({probe['ok']}/{probe['count']}); "
        f"request p50/p99 {req['p50_ms']}/{req['p99_ms']} ms; "
        f"runs {runs['completed']}/{runs['created']} ({runs['per_s']}/s, "
        f"dispatch p99 {runs['dispatch_p99_ms']} ms); refreshes {step['refreshes']['per_s']}/s; "
        f"gateway {res['gateway_bytes_per_desktop']} B/desktop; "
        f"desktop {res['desktop_bytes_per_desktop']} B/desktop; "
        f"nats conns {res['nats']['connections']} subs {res['nats']['subscriptions']}; "
        f"load {step['load_average']}"
    )


def goals(result: dict[str, Any]) -> dict[str, Any]:
    done = [s for s in result["steps"] if "probe" in s and "held_seconds" not in s]
    if not done:
        return {}
    last = done[-1]
    held = [s for s in result["steps"] if "probe" in s and "held_seconds" in s]
    gateway_per = [s["resources"]["gateway_bytes_per_desktop"] for s in done]
    return {
        "at_desktops": last["desktops"],
        "probe_p99_ms": last["probe"]["p99_ms"],
        "probe_p99_under_10ms": last["probe"]["p99_ms"] is not None
        and last["probe"]["p99_ms"] < GOAL_PROBE_P99_MS,
        "request_p99_ms": last["request"]["p99_ms"],
        "request_p99_under_20ms": last["request"]["p99_ms"] is not None
        and last["request"]["p99_ms"] < GOAL_REQUEST_P99_MS,
        "gateway_bytes_per_desktop": last["resources"]["gateway_bytes_per_desktop"],
        "gateway_under_2KiB_per_desktop": last["resources"]["gateway_bytes_per_desktop"] is not None
        and last["resources"]["gateway_bytes_per_desktop"] < GOAL_GATEWAY_BYTES_PER_DESKTOP,
        "gateway_bytes_per_desktop_curve": dict(zip([s["desktops"] for s in done], gateway_per, strict=True)),
        "probe_p99_curve": {s["desktops"]: s["probe"]["p99_ms"] for s in done},
        "request_p99_curve": {s["desktops"]: s["request"]["p99_ms"] for s in done},
        "invariants_held": all(all(s["invariants"].values()) for s in [*done, *held]),
        "after_hold": {
            "desktops": held[-1]["desktops"],
            "held_seconds": held[-1]["held_seconds"],
            "probe_p99_ms": held[-1]["probe"]["p99_ms"],
            "request_p99_ms": held[-1]["request"]["p99_ms"],
            "refreshes_per_s": held[-1]["refreshes"]["per_s"],
            "gateway_bytes_per_desktop": held[-1]["resources"]["gateway_bytes_per_desktop"],
        }
        if held
        else None,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    """docs/scaling.png: probe/request p99 and memory per desktop against N (matplotlib, lazily)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [s for s in result["steps"] if "probe" in s and "held_seconds" not in s]
    xs = [s["desktops"] for s in done]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot(xs, [s["probe"]["p99_ms"] for s in done], "o-", label="presence probe p99 (gateway HTTP)")
    left.plot(xs, [s["probe"]["p50_ms"] for s in done], "o--", label="presence probe p50")
    left.plot(xs, [s["request"]["p99_ms"] for s in done], "s-", label="tunnel request p99")
    left.plot(xs, [s["request"]["p50_ms"] for s in done], "s--", label="tunnel request p50")
    lags = [
        max((v for v in s.get("desktop_loop_lag_p99_ms") or [] if v is not None), default=None) for s in done
    ]
    if any(v is not None for v in lags):
        left.plot(xs, lags, "x:", color="grey", label="desktop processes' event-loop lag p99")
    left.axhline(GOAL_PROBE_P99_MS, color="grey", lw=0.8, ls=":")
    left.axhline(GOAL_REQUEST_P99_MS, color="grey", lw=0.8, ls=":")
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("connected desktops (N)")
    left.set_ylabel("ms")
    left.set_title("latency")
    left.legend(fontsize=8)

    def kib(values: list[Any]) -> list[float | None]:
        return [None if v is None else v / 1024 for v in values]

    right.plot(xs, kib([s["resources"]["gateway_bytes_per_desktop"] for s in done]), "o-", label="gateway")
    right.plot(
        xs, kib([s["resources"]["desktop_bytes_per_desktop"] for s in done]), "s-", label="desktop process"
    )
    right.plot(
        xs, kib([s["resources"]["nats_bytes_per_desktop"] for s in done]), "^-", label="nats-server(s)"
    )
    right.axhline(GOAL_GATEWAY_BYTES_PER_DESKTOP / 1024, color="grey", lw=0.8, ls=":")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("connected desktops (N)")
    right.set_ylabel("KiB RSS per desktop")
    right.set_title("memory per connected desktop")
    right.legend(fontsize=8)
    topology = (
        f"{result['config']['cluster']}-node cluster"
        if result["config"].get("cluster")
        else "one nats-server"
    )
    fig.suptitle(f"scripts/scale.py, {topology}, 2 cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _kib(value: Any) -> str:
    return "-" if value is None else f"{value / 1024:.1f}"


def _mib(value: Any) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}"


def _online_cpu(cpu: dict[str, Any]) -> str:
    nats_side = sum(v or 0 for v in cpu["nats"])
    desktops = sum(v or 0 for v in cpu["desktops"])
    return f"{nats_side:.0f} / {cpu['gateway']} / {desktops:.0f}"


def _fds(fds: dict[str, Any]) -> str:
    return f"{' / '.join(str(v) for v in fds['nats'])} / {fds['gateway']}"


def markdown_table(result: dict[str, Any]) -> str:
    """Every figure per step as a Markdown table (docs/scaling.md)."""
    done = [s for s in result["steps"] if "probe" in s]
    rows: list[tuple[str, Callable[[dict[str, Any]], Any]]] = [
        (
            "desktops online / time to bring the step online (s)",
            lambda s: f"{s['online']} / {s['online_seconds']}",
        ),
        ("new desktops online per second", lambda s: s["new_desktops_per_s"]),
        ("presence probe p50 / p99 (ms)", lambda s: f"{s['probe']['p50_ms']} / {s['probe']['p99_ms']}"),
        (
            "  gateway's own probe p50 / p99 (ms)",
            lambda s: f"{s['probe']['gateway_probe_p50_ms']} / {s['probe']['gateway_probe_p99_ms']}",
        ),
        ("probes answered", lambda s: f"{s['probe']['ok']}/{s['probe']['count']}"),
        ("tunnel request p50 / p99 (ms)", lambda s: f"{s['request']['p50_ms']} / {s['request']['p99_ms']}"),
        ("requests answered", lambda s: f"{s['request']['ok']}/{s['request']['count']}"),
        ("runs completed / created", lambda s: f"{s['runs']['completed']}/{s['runs']['created']}"),
        ("runs/s", lambda s: s["runs"]["per_s"]),
        ("run dispatch p99 (ms, bucket bound)", lambda s: s["runs"]["dispatch_p99_ms"]),
        (
            "run POST-to-terminal p50 / p99 (ms)",
            lambda s: f"{s['runs']['end_to_end_p50_ms']} / {s['runs']['end_to_end_p99_ms']}",
        ),
        (
            "credential refreshes/s (failed)",
            lambda s: f"{s['refreshes']['per_s']} ({s['refreshes']['failed']})",
        ),
        (
            "nats-server RSS (MiB, per node)",
            lambda s: " / ".join(_mib(v) for v in s["resources"]["nats_rss_bytes"]),
        ),
        (
            "nats-server RSS per desktop (KiB, all nodes)",
            lambda s: _kib(s["resources"]["nats_bytes_per_desktop"]),
        ),
        ("gateway RSS (MiB)", lambda s: _mib(s["resources"]["gateway_rss_bytes"])),
        ("gateway RSS growth per desktop (KiB)", lambda s: _kib(s["resources"]["gateway_bytes_per_desktop"])),
        (
            "desktop processes RSS (MiB each)",
            lambda s: " / ".join(_mib(v) for v in s["resources"]["desktop_process_rss_bytes"]),
        ),
        (
            "desktop process RSS per desktop (KiB)",
            lambda s: _kib(s["resources"]["desktop_bytes_per_desktop"]),
        ),
        ("CPU % nats-server (per node)", lambda s: " / ".join(str(v) for v in s["cpu_percent"]["nats"])),
        ("CPU % gateway", lambda s: s["cpu_percent"]["gateway"]),
        ("CPU % desktop processes", lambda s: " / ".join(str(v) for v in s["cpu_percent"]["desktops"])),
        ("CPU % caller", lambda s: s["cpu_percent"]["caller"]),
        (
            "desktop processes' event-loop lag p99 (ms each)",
            lambda s: " / ".join(str(v) for v in s["desktop_loop_lag_p99_ms"]),
        ),
        ("desktop reconnects + new connections so far", lambda s: s["desktop_reconnects"]),
        (
            "CPU % while bringing online: nats / gateway / desktops",
            lambda s: _online_cpu(s["online_cpu_percent"]),
        ),
        ("NATS client connections", lambda s: s["resources"]["nats"]["connections"]),
        ("NATS subscriptions", lambda s: s["resources"]["nats"]["subscriptions"]),
        ("NATS slow consumers", lambda s: s["resources"]["nats"]["slow_consumers"]),
        (
            "open fds: nats (per node) / gateway",
            lambda s: _fds(s["resources"]["fds"]),
        ),
        (
            "JetStream storage (KiB, all nodes)",
            lambda s: _kib(s["resources"]["nats"]["jetstream_storage_bytes"]),
        ),
        ("JetStream consumers", lambda s: s["resources"]["nats"]["jetstream_consumers"]),
        ("load average (1 min)", lambda s: s["load_average"][0]),
    ]
    heads = [
        f"{s['desktops']} after {s['held_seconds']:g} s" if "held_seconds" in s else str(s["desktops"])
        for s in done
    ]
    lines = ["| N | " + " | ".join(heads) + " |"]
    lines.append("|---|" + "---|" * len(done))
    for label, get in rows:
        cells = []
        for step in done:
            try:
                cells.append(str(get(step)))
            except (KeyError, TypeError, IndexError):
                cells.append("-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_steps(text: str) -> list[int]:
    try:
        steps = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--steps takes comma-separated counts, not {text!r}") from None
    if not steps or steps[0] < 1:
        raise argparse.ArgumentTypeError("--steps needs positive counts")
    return steps


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--desktops", type=int, default=10000, help="the largest N (default 10000)")
    parser.add_argument("--steps", type=parse_steps, default=list(DEFAULT_STEPS), help="N at each step")
    parser.add_argument("--per-process", type=int, default=2500, help="desktops per desktop process")
    parser.add_argument("--cluster", type=int, default=0, help="nats-server cluster nodes (0: one server)")
    parser.add_argument("--duration-per-step", type=float, default=45.0, help="seconds of load per step")
    parser.add_argument("--timeout", type=float, default=3600.0, help="the whole run ends by then (seconds)")
    parser.add_argument("--online-timeout", type=float, default=900.0, help="bringing one step online (s)")
    parser.add_argument("--session-ttl", type=int, default=300, help="link session lifetime (s)")
    parser.add_argument(
        "--hold", type=float, default=0.0, help="then keep the largest N this long and measure it again (s)"
    )
    parser.add_argument("--probe-rate", type=float, default=20.0, help="presence probes per second")
    parser.add_argument("--request-rate", type=float, default=20.0, help="tunnel requests per second")
    parser.add_argument("--run-rate", type=float, default=2.0, help="mock runs per second")
    parser.add_argument(
        "--connect-window", type=int, default=100, help="desktops connecting at once per process"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object with everything on stdout")
    parser.add_argument("--plot", type=Path, help="write the curves as PNG here (needs matplotlib)")
    parser.add_argument("--markdown", action="store_true", help="print the table of every figure (Markdown)")
    parser.add_argument("--from-json", type=Path, help="no run: plot/tabulate a saved --json output")
    args = parser.parse_args(argv)
    if args.desktops < 1 or args.per_process < 1:
        parser.error("--desktops and --per-process must be positive")
    if args.cluster == 1 or args.cluster < 0:
        parser.error("--cluster takes 0 (one server) or at least 2 nodes")
    return args


async def main_async(args: argparse.Namespace, workdir: Path, result: dict[str, Any]) -> None:
    try:
        await asyncio.wait_for(run(args, workdir, result), args.timeout)
    except TimeoutError:
        result["stopped_reason"] = f"the global --timeout of {args.timeout:g}s ran out"
        progress(result["stopped_reason"])
    except ScaleError as exc:
        result["stopped_reason"] = str(exc)
        progress(f"stopped: {exc}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("scale: --plot needs matplotlib (pip install -e '.[dev]')", file=sys.stderr)
            return 2
    if args.from_json is not None:
        saved = json.loads(args.from_json.read_text())
        if args.plot is not None:
            plot(saved, args.plot)
        if args.markdown:
            print(markdown_table(saved))
        return 0
    raise_nofile()  # children inherit it: nats-server, the gateway, the desktop processes
    workdir = Path(tempfile.mkdtemp(prefix="scale-"))
    result: dict[str, Any] = {
        "machine": machine(),
        "steps": [],
        "completed": False,
        "stopped_reason": None,
        "_cleanup": [],
        "_pids": [],
    }

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    interrupted = False
    started = time.monotonic()
    try:
        asyncio.run(main_async(args, workdir, result))
    except KeyboardInterrupt:
        interrupted = True
        result["stopped_reason"] = "interrupted"
        progress("interrupted: cleaning up")
    finally:
        for pid in result.pop("_pids"):  # already killed unless the loop itself was interrupted
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        for cleanup in result.pop("_cleanup"):
            with contextlib.suppress(Exception):
                cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    result["seconds"] = round(time.monotonic() - started, 1)
    result["goals"] = goals(result)
    result["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    if args.plot is not None and any("probe" in s for s in result["steps"]):
        plot(result, args.plot)
        progress(f"plot written to {args.plot}")
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.markdown:
        print(markdown_table(result))
    else:
        for step in result["steps"]:
            if "probe" in step:
                print(step_line(step))
        print(json.dumps(result["goals"], indent=2))
    if interrupted:
        return 130
    return 0 if result["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
