#!/usr/bin/env python3
"""How far the wire encoding alone keeps a small request from raw NATS request/reply.

Why this exists: ``bench_tunnel.py`` compares the whole tunnel with raw nats-py. This script
splits the gap. Every variant below is plain ``nc.request`` against a callback subscription
in another process (raw's exact structure), with none of the tunnel's machinery (streams,
flow control, timers, dispatch, tasks); only what goes on the wire changes:

- ``raw``: 100 bytes each way (the baseline, as in ``bench_tunnel.py``);
- ``json``: the tunnel's real codec. The caller encodes a ``request.start`` as our client
  sends it (JSON, the extension offer, reply and abort subjects) and the responder decodes
  and validates it, answers a ``response.whole`` (JSON head, CRC32C) that the caller decodes
  and checks;
- ``json_start``: the same JSON start, answered with a compact head (``binaryHead``), as our
  server answers a caller's first contact;
- ``compact``: a compact start and a compact head (docs/protocol.md section 2), as our client
  and server talk once the host said ``binaryStart``: the reply subject travels as the NATS
  reply, abort and body follow from the request id.

Sequential p50 and 32 concurrent callers' rate, interleaved rounds, medians; ratios against
``raw`` measured in the same run. If ``json`` alone is near a goal of ``bench_tunnel.py``, no
amount of work on the machinery meets that goal without a different encoding.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from cli.nats_server import NatsServer, NatsServerConfig
from tunnel import _codec as codec
from tunnel import _frames as frames
from tunnel._integrity import checksum
from tunnel._subjects import HostSubjects, new_request_id

BODY = bytes(100)
HEADERS = [("content-type", "application/octet-stream")]
# What our client offers in every start (tunnel._caller), as JSON text.
OFFER = (
    '{"binaryData":true,"window":2097152,"heartbeatMs":6666,"maxFrame":1048576,'
    '"wholeResponse":true,"integrity":"crc32c","binaryHead":true}'
)
SUBJECTS = HostSubjects.for_host("floor.example")
VARIANTS = ("raw", "json", "json_start", "compact")
CONCURRENCY = 32
REQUEST_TIMEOUT = 5.0


def json_start(request_id: str) -> bytes:
    base = f"{SUBJECTS.base}.req.{request_id}."
    deadline_ms = int((time.time() + 30) * 1000)
    return codec.encode_request_start(
        request_id, "GET", "/small", [], base + "reply.c1", base + "abort", None, deadline_ms, OFFER
    )


def compact_start(request_id: str) -> bytes:
    deadline_ms = int((time.time() + 30) * 1000)
    return codec.encode_compact_start(request_id, "GET", "/small", [], False, deadline_ms, OFFER)


def compact_whole(status: int, headers: list[tuple[str, str]], body: bytes) -> bytes:
    return codec.encode_compact_whole(status, headers, None, body, checksum("crc32c", body), True)


def read_whole(data: bytes, request_id: str) -> bytes:
    """The body of a response.whole (either head), its checksum checked as the caller does."""
    whole = codec.decode_frame(data, request_id)
    assert isinstance(whole, frames.ResponseWhole)
    if whole.checksum != checksum("crc32c", whole.data):
        raise RuntimeError("checksum mismatch")
    return whole.data


# --------------------------------------------------------------------------- responder


async def handler(method: str, url: str) -> tuple[int, list[tuple[str, str]], bytes]:
    return 200, HEADERS, BODY


async def responder(url: str) -> None:
    nc = await nats.connect(url)

    async def raw(msg: Msg) -> None:
        await nc.publish(msg.reply, msg.data)

    async def with_json(msg: Msg) -> None:
        start = codec.decode_frame(msg.data)
        assert isinstance(start, frames.RequestStart)
        status, headers, body = await handler(start.method, start.url)
        whole = codec.encode_whole(start.request_id, status, headers, None, body, checksum("crc32c", body))
        await nc.publish(msg.reply, whole)

    async def with_json_start(msg: Msg) -> None:
        start = codec.decode_frame(msg.data)
        assert isinstance(start, frames.RequestStart)
        status, headers, body = await handler(start.method, start.url)
        await nc.publish(msg.reply, compact_whole(status, headers, body))

    async def with_compact(msg: Msg) -> None:
        # The reply here is nc.request's inbox, so its subject check (ServerStream's, as for a
        # JSON start) is left out in both variants.
        start = codec.decode_compact_start(msg.data, msg.reply, SUBJECTS.base)
        status, headers, body = await handler(start.method, start.url)
        await nc.publish(msg.reply, compact_whole(status, headers, body))

    for name, callback in (
        ("raw", raw),
        ("json", with_json),
        ("json_start", with_json_start),
        ("compact", with_compact),
    ):
        await nc.subscribe(f"floor.{name}", cb=callback)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the requester is done
    await nc.close()


# --------------------------------------------------------------------------- requester


def operations(nc: NATS) -> dict[str, Callable[[], Awaitable[None]]]:
    async def raw() -> None:
        msg = await nc.request("floor.raw", BODY, timeout=REQUEST_TIMEOUT)
        if len(msg.data) != len(BODY):
            raise RuntimeError("raw echo answered the wrong size")

    def variant(name: str, encode_start: Callable[[str], bytes]) -> Callable[[], Awaitable[None]]:
        async def op() -> None:
            rid = new_request_id()
            # The reply inbox stands for our reply subject; a compact start's server reads it there.
            msg = await nc.request(f"floor.{name}", encode_start(rid), timeout=REQUEST_TIMEOUT)
            if read_whole(msg.data, rid) != BODY:
                raise RuntimeError(f"{name} variant answered the wrong body")

        return op

    return {
        "raw": raw,
        "json": variant("json", json_start),
        "json_start": variant("json_start", json_start),
        "compact": variant("compact", compact_start),
    }


async def p50_us(op: Callable[[], Awaitable[None]], count: int) -> float:
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        await op()
        latencies.append(time.perf_counter() - started)
    return statistics.median(latencies) * 1e6


async def rate(op: Callable[[], Awaitable[None]], seconds: float) -> float:
    done = 0
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await op()
            done += 1

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return done / seconds


async def requester(url: str, rounds: int, count: int, seconds: float) -> dict[str, object]:
    nc = await nats.connect(url)
    ops = operations(nc)
    for op in ops.values():  # warm up (and check each variant answers correctly)
        for _ in range(max(50, count // 10)):
            await op()
    samples: dict[str, list[float]] = {f"{v}_{m}": [] for v in VARIANTS for m in ("p50_us", "rps")}
    for number in range(rounds):
        print(f"round {number + 1}/{rounds}", file=sys.stderr, flush=True)
        for name, op in ops.items():
            samples[f"{name}_p50_us"].append(await p50_us(op, count))
            samples[f"{name}_rps"].append(await rate(op, seconds))
    await nc.close()
    result: dict[str, object] = {key: statistics.median(values) for key, values in samples.items()}
    for name in VARIANTS[1:]:
        result[f"{name}_p50_ratio"] = samples_ratio(result, f"{name}_p50_us", "raw_p50_us")
        result[f"{name}_rps_ratio"] = samples_ratio(result, f"{name}_rps", "raw_rps")
    result["rounds"] = rounds
    result["samples"] = samples
    return result


def samples_ratio(result: dict[str, object], key: str, base: str) -> float:
    value, baseline = result[key], result[base]
    assert isinstance(value, float) and isinstance(baseline, float)
    return value / baseline


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="few iterations (~10 s): a smoke check only")
    parser.add_argument("--json", action="store_true", help="print only one JSON object on stdout")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 5, quick 2)")
    parser.add_argument(
        "--role", choices=["requester", "responder"], default="requester", help=argparse.SUPPRESS
    )
    parser.add_argument("--url", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "responder":
        asyncio.run(responder(args.url))
        return 0
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    rounds = args.rounds or (2 if args.quick else 5)
    count, seconds = (200, 0.3) if args.quick else (3000, 2.0)
    server = NatsServer(NatsServerConfig(monitor_port=None))
    server.start()
    try:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--role", "responder", "--url", server.url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdin is not None and proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            proc.kill()
            print("the responder did not start", file=sys.stderr)
            return 1
        try:
            result = asyncio.run(requester(server.url, rounds, count, seconds))
        finally:
            proc.stdin.close()
            proc.wait(10)
    finally:
        server.stop()
    result["quick"] = args.quick
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{'variant':12s} {'p50 us':>8s} {'x raw':>6s} {'32-way req/s':>13s} {'x raw':>6s}")
    for name in VARIANTS:
        p50, rps = result[f"{name}_p50_us"], result[f"{name}_rps"]
        assert isinstance(p50, float) and isinstance(rps, float)
        p_ratio = result.get(f"{name}_p50_ratio", 1.0)
        r_ratio = result.get(f"{name}_rps_ratio", 1.0)
        print(f"{name:12s} {p50:8.0f} {p_ratio:6.2f} {rps:13,.0f} {r_ratio:6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
