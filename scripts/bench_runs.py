#!/usr/bin/env python3
"""Benchmark runs end to end, each figure next to raw JetStream measured in the same run.

Topology, as in production, every piece its own OS process: an operator-mode
nats-server with JetStream on a file store, ``studio-gateway serve``, and ``linkd up``
(logged in with a gateway token, the mock runner). The load and the SSE clients are
this process. Figures (median over ``--rounds``):

- runs/s at 1 and 16 concurrent clients: ``POST /api/runs`` (mock runner, 3 chunks)
  until the client has seen the run's ``done`` on its event stream (SSE).
  Baseline: the same number of raw JetStream "runs" at the same concurrency, each
  publishing as many messages as a mock run has events (with ``Nats-Msg-Id``,
  waiting for the acks) and waiting until a push consumer received the last one.
- event throughput from the daemon to an attached SSE client: one mock run of N
  chunks with no delay, from POST to the client's receipt of ``done``.
  Baseline: N messages published with msg ids (pipelined, acks awaited) to a stream
  and consumed by an ordered push consumer, first publish to last receipt.
- latency p50/p99 from daemon emit (the event's ``ts``) to client receipt, for a
  paced run (one chunk every few ms, so nothing queues). Baseline: paced raw
  publish -> ordered push consumer receipt. Event ``ts`` has millisecond
  resolution, so end-to-end latencies carry up to 1 ms of rounding (upwards).

- the cost of linkd's durable outbox (``linkd.journal``): the throughput run again, in the
  same round, on a second daemon started with ``journal = false`` (events kept in memory
  only). Reported: events/s and the daemon's emit rate with and without the journal, and
  their ratio (with / without: 1.0 means the journal costs nothing).

Ratios are end-to-end / raw (throughput: lower than 1 is the cost of the product;
latency: above 1 is the added delay). Nothing here asserts speed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

REPO: Final = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # the harness lives in the test tree; run from anywhere
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import nats  # noqa: E402
from nats.aio.client import Client, RawCredentials  # noqa: E402
from nats.aio.msg import Msg  # noqa: E402

from tests.integration.runs_harness import RunsApi, RunsStack  # noqa: E402

USER: Final = "bench-runs@example.com"
# The A/B daemon: the same settings without the on-disk journal.
USER_NO_JOURNAL: Final = "bench-runs-no-journal@example.com"
RAW_STREAM: Final = "BENCH_RAW"
RAW_SUBJECT: Final = "bench.raw"
MOCK_CHUNKS: Final = 3
# A mock run's events: starting-run, preparing, running, the chunks, done.
EVENTS_PER_MOCK_RUN: Final = MOCK_CHUNKS + 4
# A realistic event body for the raw baseline (an output event of the mock runner is about this big).
RAW_PAYLOAD_BYTES: Final = 120
RUN_TIMEOUT: Final = 120.0
LINKD_TOML: Final = "drain_timeout = 3\n[runners]\nheartbeat_interval = 5\nmax_concurrent = 64\n"
LINKD_TOML_NO_JOURNAL: Final = "journal = false\n" + LINKD_TOML


class BenchError(RuntimeError):
    """A measurement could not be made (a run failed, a process died); the message says which."""


@dataclass(frozen=True)
class Settings:
    rounds: int
    serial_runs: int
    parallel_runs: int
    concurrency: int
    throughput_events: int
    latency_events: int
    latency_delay_ms: int


FULL: Final = Settings(
    rounds=3,
    serial_runs=40,
    parallel_runs=160,
    concurrency=16,
    throughput_events=5000,
    latency_events=300,
    latency_delay_ms=5,
)
QUICK: Final = Settings(
    rounds=1,
    serial_runs=8,
    parallel_runs=32,
    concurrency=16,
    throughput_events=1000,
    latency_events=80,
    latency_delay_ms=5,
)


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


async def in_workers(total: int, workers: int, one: Callable[[], Awaitable[None]]) -> float:
    """Run ``one`` ``total`` times from ``workers`` concurrent workers; the elapsed seconds."""
    remaining = total

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await one()

    started = time.perf_counter()
    async with asyncio.timeout(RUN_TIMEOUT):
        await asyncio.gather(*(worker() for _ in range(workers)))
    return time.perf_counter() - started


# ------------------------------------------------------------------------------ raw JetStream


class RawJetStream:
    """A publisher and a consumer connection (like daemon and gateway) on a stream of our own."""

    def __init__(self, publisher: Client, consumer: Client) -> None:
        self.publisher = publisher
        self.consumer = consumer
        self.js_pub = publisher.jetstream()
        self.waiters: dict[str, tuple[int, asyncio.Future[None]]] = {}
        self.counts: dict[str, int] = {}
        self.on_receive: Callable[[Msg], None] | None = None

    @classmethod
    async def open(cls, url: str, creds: str) -> RawJetStream:
        auth = {"user_credentials": RawCredentials(creds), "connect_timeout": 10}
        publisher = await nats.connect(url, name="bench-raw-publisher", **auth)
        consumer = await nats.connect(url, name="bench-raw-consumer", **auth)
        raw = cls(publisher, consumer)
        js = consumer.jetstream()
        with contextlib.suppress(Exception):
            await js.delete_stream(RAW_STREAM)
        await js.add_stream(name=RAW_STREAM, subjects=[f"{RAW_SUBJECT}.>"], duplicate_window=120.0)
        await js.subscribe(f"{RAW_SUBJECT}.>", cb=raw._received, ordered_consumer=True)
        return raw

    async def _received(self, msg: Msg) -> None:
        if self.on_receive is not None:
            self.on_receive(msg)
        key = msg.subject.rsplit(".", 1)[-1]
        count = self.counts.get(key, 0) + 1
        self.counts[key] = count
        waiter = self.waiters.get(key)
        if waiter is not None and count >= waiter[0] and not waiter[1].done():
            waiter[1].set_result(None)

    def expect(self, key: str, count: int) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters[key] = (count, future)
        return future

    async def publish_batch(self, key: str, count: int, payload: bytes) -> None:
        """``count`` messages with msg ids, pipelined; returns when every ack is in."""
        acks = [
            await self.js_pub.publish_async(
                f"{RAW_SUBJECT}.{key}", payload, headers={"Nats-Msg-Id": f"{key}:1:{seq}"}
            )
            for seq in range(1, count + 1)
        ]
        await asyncio.gather(*acks)

    async def round_trips(self, runs: int, concurrency: int) -> float:
        """Raw "runs"/s: each publishes EVENTS_PER_MOCK_RUN messages and waits for the last receipt."""
        payload = b"x" * RAW_PAYLOAD_BYTES

        async def one() -> None:
            key = uuid.uuid4().hex
            received = self.expect(key, EVENTS_PER_MOCK_RUN)
            await self.publish_batch(key, EVENTS_PER_MOCK_RUN, payload)
            await received
            self.waiters.pop(key, None)
            self.counts.pop(key, None)

        return runs / await in_workers(runs, concurrency, one)

    async def throughput(self, count: int) -> float:
        key = uuid.uuid4().hex
        received = self.expect(key, count)
        started = time.perf_counter()
        await self.publish_batch(key, count, b"x" * RAW_PAYLOAD_BYTES)
        async with asyncio.timeout(RUN_TIMEOUT):
            await received
        return count / (time.perf_counter() - started)

    async def latencies(self, count: int, delay_ms: int) -> list[float]:
        key = uuid.uuid4().hex
        samples: list[float] = []

        def record(msg: Msg) -> None:
            if msg.subject.endswith(key):
                samples.append((time.time() - json.loads(msg.data)["t"]) * 1000)

        self.on_receive = record
        received = self.expect(key, count)
        try:
            for seq in range(1, count + 1):
                body = json.dumps({"t": time.time(), "pad": "x" * RAW_PAYLOAD_BYTES}).encode()
                await self.js_pub.publish(
                    f"{RAW_SUBJECT}.{key}", body, headers={"Nats-Msg-Id": f"{key}:1:{seq}"}
                )
                await asyncio.sleep(delay_ms / 1000)
            async with asyncio.timeout(RUN_TIMEOUT):
                await received
        finally:
            self.on_receive = None
        return samples

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.consumer.jetstream().delete_stream(RAW_STREAM)
        for nc in (self.publisher, self.consumer):
            with contextlib.suppress(Exception):
                await nc.close()


# ------------------------------------------------------------------------------ end to end


# End messages whose state was not terminal yet although the stream carried ``done`` (the
# projector behind the stream): the client did see the run end, so it counts, but it is reported.
ANOMALIES: dict[str, int] = {"end_before_state_terminal": 0}


async def follow_to_end(
    api: RunsApi, run_id: str, on_event: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Read the run's SSE stream until ``end``; the ``done`` event (a BenchError unless completed)."""
    done: dict[str, Any] | None = None
    async with asyncio.timeout(RUN_TIMEOUT), api.sse(run_id) as stream:
        async for message in stream:
            if message.event == "end":
                state: dict[str, Any] = message.data
                if done is None or done.get("status") != "completed":
                    raise BenchError(
                        f"run {run_id} ended {state.get('status')} ({state.get('failureReason')}), "
                        f"done event: {done}"
                    )
                if state.get("status") != "completed":
                    ANOMALIES["end_before_state_terminal"] += 1
                return done
            if isinstance(message.data, dict):
                if message.data.get("type") == "done":
                    done = message.data
                if on_event is not None:
                    on_event(message.data)
    raise BenchError(f"the event stream of run {run_id} closed without an end message")


async def e2e_runs_per_second(api: RunsApi, runs: int, concurrency: int) -> float:
    async def one() -> None:
        created = await api.create("mock", {"count": MOCK_CHUNKS})
        await follow_to_end(api, created["runId"])

    return runs / await in_workers(runs, concurrency, one)


async def e2e_throughput(api: RunsApi, count: int) -> tuple[float, float]:
    """(events/s the client received, POST to done; events/s the daemon emitted, by event ``ts``)."""
    stamps: list[int] = []
    started = time.perf_counter()
    created = await api.create("mock", {"count": count})
    state = await follow_to_end(api, created["runId"], lambda event: stamps.append(int(event["ts"])))
    elapsed = time.perf_counter() - started
    events = int(state["finalSeq"])  # the done event's
    emit_ms = max(1, stamps[-1] - stamps[0]) if stamps else 1
    return events / elapsed, events / (emit_ms / 1000)


async def e2e_latencies(api: RunsApi, count: int, delay_ms: int) -> list[float]:
    samples: list[float] = []
    attached_ms: list[float] = []

    def record(event: dict[str, Any]) -> None:
        now_ms = time.time() * 1000
        if not attached_ms:
            attached_ms.append(now_ms)
        # Events emitted before the stream was attached are a replay, not a live delivery.
        if event["ts"] >= attached_ms[0] and event["type"] in ("output", "done"):
            samples.append(now_ms - event["ts"])

    created = await api.create("mock", {"count": count, "delayMs": delay_ms})
    await follow_to_end(api, created["runId"], record)
    return samples


# ------------------------------------------------------------------------------ the benchmark


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    unit: str
    higher_is_better: bool


FIGURES: Final = (
    Figure("runs_per_s_c1", "runs/s, 1 client (POST -> done seen)", "/s", True),
    Figure("runs_per_s_c16", "runs/s, 16 concurrent clients", "/s", True),
    Figure("events_per_s", "events/s, daemon -> attached SSE client", "/s", True),
    Figure("latency_p50_ms", "latency p50, daemon emit -> client", "ms", False),
    Figure("latency_p99_ms", "latency p99, daemon emit -> client", "ms", False),
)


# The journal's cost: (with the journal, without it), the same throughput run on two daemons.
JOURNAL_FIGURES: Final = (
    ("journal_events_per_s", "events/s, daemon -> attached SSE client"),
    ("journal_emit_per_s", "daemon emit rate (by event ts)"),
)


async def one_round(
    settings: Settings, api: RunsApi, raw: RawJetStream, api_no_journal: RunsApi
) -> dict[str, tuple[float, float]]:
    """Every figure once, as (end to end, raw baseline), measured back to back."""
    result: dict[str, tuple[float, float]] = {}
    result["runs_per_s_c1"] = (
        await e2e_runs_per_second(api, settings.serial_runs, 1),
        await raw.round_trips(settings.serial_runs, 1),
    )
    result["runs_per_s_c16"] = (
        await e2e_runs_per_second(api, settings.parallel_runs, settings.concurrency),
        await raw.round_trips(settings.parallel_runs, settings.concurrency),
    )
    received, emitted = await e2e_throughput(api, settings.throughput_events)
    result["events_per_s"] = (received, await raw.throughput(settings.throughput_events))
    result["daemon_emit_per_s"] = (emitted, emitted)  # context: how fast linkd produced them
    received_nj, emitted_nj = await e2e_throughput(api_no_journal, settings.throughput_events)
    result["journal_events_per_s"] = (received, received_nj)
    result["journal_emit_per_s"] = (emitted, emitted_nj)
    e2e = await e2e_latencies(api, settings.latency_events, settings.latency_delay_ms)
    base = await raw.latencies(settings.latency_events, settings.latency_delay_ms)
    if not e2e or not base:
        raise BenchError("no latency samples (the stream attached after the run ended?)")
    result["latency_p50_ms"] = (percentile(e2e, 0.5), percentile(base, 0.5))
    result["latency_p99_ms"] = (percentile(e2e, 0.99), percentile(base, 0.99))
    return result


async def run_bench(settings: Settings, workdir: Path) -> dict[str, Any]:
    stack = await asyncio.to_thread(RunsStack.start, workdir, gateways=1)
    try:
        # No --events-file: it is the tests' desktop-side record, a file write per event, not the product.
        daemon = await asyncio.to_thread(stack.daemon, USER, config_toml=LINKD_TOML, events_file=False)
        plain = await asyncio.to_thread(
            stack.daemon, USER_NO_JOURNAL, config_toml=LINKD_TOML_NO_JOURNAL, events_file=False
        )
        limits = httpx.Limits(max_connections=settings.concurrency * 2 + 8)
        async with httpx.AsyncClient(timeout=30.0, limits=limits) as http:
            api = stack.api(USER, http)
            api_no_journal = stack.api(USER_NO_JOURNAL, http)
            raw = await RawJetStream.open(stack.nats.url, stack.nats.admin_creds("bench-raw"))
            try:
                # Warm-up: connections, the stream consumer, Python's first-call costs.
                await e2e_runs_per_second(api, 2, 1)
                await e2e_runs_per_second(api_no_journal, 2, 1)
                await raw.round_trips(2, 1)
                rounds = []
                for _ in range(settings.rounds):
                    rounds.append(await one_round(settings, api, raw, api_no_journal))
            finally:
                await raw.close()
        for process in (daemon, plain):
            if not process.running:
                raise BenchError(f"linkd died during the benchmark:\n{process.log_tail()}")
    except Exception:
        print(stack.diagnostics(), file=sys.stderr)  # which process said what, for the failure
        raise
    finally:
        await asyncio.to_thread(stack.close)
    result: dict[str, Any] = {
        "anomalies": dict(ANOMALIES),
        "rounds": settings.rounds,
        "settings": settings.__dict__,
        "python": platform.python_version(),
        "samples": {},
    }
    result["daemon_emit_per_s"] = statistics.median(r["daemon_emit_per_s"][0] for r in rounds)
    for figure in FIGURES:
        e2e = [r[figure.key][0] for r in rounds]
        base = [r[figure.key][1] for r in rounds]
        ratios = [a / b if b else float("nan") for a, b in zip(e2e, base, strict=True)]
        result[figure.key] = statistics.median(e2e)
        result[f"raw_{figure.key}"] = statistics.median(base)
        result[f"ratio_{figure.key}"] = statistics.median(ratios)
        result["samples"][figure.key] = {"e2e": e2e, "raw": base, "ratio": ratios}
    for key, _ in JOURNAL_FIGURES:
        with_journal = [r[key][0] for r in rounds]
        without = [r[key][1] for r in rounds]
        ratios = [a / b if b else float("nan") for a, b in zip(with_journal, without, strict=True)]
        result[key] = statistics.median(with_journal)
        result[f"{key}_no_journal"] = statistics.median(without)
        result[f"ratio_{key}"] = statistics.median(ratios)
        result["samples"][key] = {"journal": with_journal, "no_journal": without, "ratio": ratios}
    return result


def print_human(result: dict[str, Any]) -> None:
    print(
        f"runs benchmark: median of {result['rounds']} round(s); nats-server (JetStream, file store), "
        "studio-gateway and linkd as separate processes"
    )
    print(f"  {'figure':<42} {'end to end':>12} {'raw JetStream':>14} {'ratio':>7}")
    for figure in FIGURES:
        e2e, raw, ratio = result[figure.key], result[f"raw_{figure.key}"], result[f"ratio_{figure.key}"]
        unit = figure.unit
        print(f"  {figure.label:<42} {e2e:>9.1f} {unit:<2} {raw:>11.1f} {unit:<2} {ratio:>6.2f}x")
    label = "(daemon emit rate during the throughput run, by event ts)"
    print(f"  {label:<58} {result['daemon_emit_per_s']:>9.1f} /s")
    print("  journal cost (the throughput run, same round, a daemon with `journal = false`):")
    print(f"  {'figure':<42} {'journal':>12} {'no journal':>14} {'ratio':>7}")
    for key, label in JOURNAL_FIGURES:
        on, off, ratio = result[key], result[f"{key}_no_journal"], result[f"ratio_{key}"]
        print(f"  {label:<42} {on:>9.1f} /s {off:>11.1f} /s {ratio:>6.2f}x")
    if any(result["anomalies"].values()):
        print(f"  anomalies: {result['anomalies']} (SSE end before the run state was terminal)")
    print(
        "  (ratio = end to end / raw; raw runs/s = the same number of messages per run, published with "
        "msg ids and consumed;\n   e2e latency uses the event's millisecond ts: up to +1 ms rounding)"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark runs end to end (runs/s, event throughput, emit->client latency), "
        "each next to raw JetStream publish->consume measured in the same run.",
        epilog="Example: python scripts/bench_runs.py --quick",
    )
    parser.add_argument("--quick", action="store_true", help="small counts, one round: a smoke check (~30 s)")
    parser.add_argument("--json", action="store_true", help="print only one JSON object on stdout")
    parser.add_argument("--rounds", type=int, help="repeat every measurement this often (default 3, quick 1)")
    parser.add_argument("--events", type=int, help="chunks of the throughput run (default 5000, quick 1000)")
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.events is not None and not 1 <= args.events <= 1_000_000:
        parser.error("--events must be in 1..1000000")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = QUICK if args.quick else FULL
    if args.rounds is not None:
        settings = replace(settings, rounds=args.rounds)
    if args.events is not None:
        settings = replace(settings, throughput_events=args.events)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-runs-") as workdir:
            result = asyncio.run(run_bench(settings, Path(workdir)))
    except (BenchError, AssertionError) as exc:
        print(f"bench_runs: {exc}", file=sys.stderr)
        return 1
    except (httpx.HTTPError, TimeoutError) as exc:  # the process logs were printed above
        print(f"bench_runs: the gateway did not answer in time: {type(exc).__name__} {exc}", file=sys.stderr)
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
