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
- ``json_start``: the same JSON start, answered with the binary head sketched below;
- ``binary``: a start and a head in a length-prefixed binary layout (a *sketch*, not part of
  the protocol): method, URL and deadline in the start, the reply and abort subjects left to
  be derived from the request id; status, headers and CRC32C in the head. Method and URL get
  the same checks as in the codec.

Sequential p50 and 32 concurrent callers' rate, interleaved rounds, medians; ratios against
``raw`` measured in the same run. If ``json`` alone is near a goal of ``bench_tunnel.py``, no
amount of work on the machinery meets that goal without a different encoding.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import google_crc32c
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
    '"wholeResponse":true,"integrity":"crc32c"}'
)
SUBJECTS = HostSubjects.for_host("floor.example")
VARIANTS = ("raw", "json", "json_start", "binary")
CONCURRENCY = 32
REQUEST_TIMEOUT = 5.0

# The binary sketch. Start: magic, kind, request id (16 bytes), deadline (ms), window,
# heartbeat (ms), method length; then method, u16 URL length, URL, u16 header count (0 here).
_START = struct.Struct(">BB16sQIHB")
# Head: magic, kind, status, CRC32C of the body; then u16 header count, each header as
# u16-prefixed name and value; then the body.
_HEAD = struct.Struct(">BBHI")
_U16 = struct.Struct(">H")


def binary_start(request_id: str, method: str, url: str, deadline_ms: int) -> bytes:
    m, u = method.encode(), url.encode()
    fixed = _START.pack(0, 0x10, bytes.fromhex(request_id), deadline_ms, 2097152, 6666, len(m))
    return b"".join((fixed, m, _U16.pack(len(u)), u, _U16.pack(0)))


def read_binary_start(data: bytes) -> tuple[str, str, str, int]:
    _, _, rid, deadline_ms, _, _, method_length = _START.unpack_from(data)
    offset = _START.size
    method = data[offset : offset + method_length].decode()
    offset += method_length
    (url_length,) = _U16.unpack_from(data, offset)
    offset += 2
    url = data[offset : offset + url_length].decode()
    if not frames.METHOD_RE.fullmatch(method) or not url.startswith("/") or frames.URL_FORBIDDEN.search(url):
        raise ValueError("invalid method or URL")
    return rid.hex(), method, url, deadline_ms


def binary_whole(status: int, headers: list[tuple[str, str]], body: bytes) -> bytes:
    parts = [_HEAD.pack(0, 0x13, status, google_crc32c.value(body)), _U16.pack(len(headers))]
    for name, value in headers:
        n, v = name.encode(), value.encode()
        parts += [_U16.pack(len(n)), n, _U16.pack(len(v)), v]
    parts.append(body)
    return b"".join(parts)


def read_binary_whole(data: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
    _, _, status, crc = _HEAD.unpack_from(data)
    offset = _HEAD.size
    (count,) = _U16.unpack_from(data, offset)
    offset += 2
    headers = []
    for _ in range(count):
        (n,) = _U16.unpack_from(data, offset)
        name = data[offset + 2 : offset + 2 + n].decode()
        offset += 2 + n
        (v,) = _U16.unpack_from(data, offset)
        headers.append((name, data[offset + 2 : offset + 2 + v].decode()))
        offset += 2 + v
    body = data[offset:]
    if google_crc32c.value(body) != crc:
        raise ValueError("checksum mismatch")
    return status, headers, body


def json_start(request_id: str) -> bytes:
    base = f"{SUBJECTS.base}.req.{request_id}."
    deadline_ms = int((time.time() + 30) * 1000)
    return codec.encode_request_start(
        request_id, "GET", "/small", [], base + "reply.c1", base + "abort", None, deadline_ms, OFFER
    )


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
        await nc.publish(msg.reply, binary_whole(status, headers, body))

    async def with_binary(msg: Msg) -> None:
        _, method, target, _ = read_binary_start(msg.data)
        status, headers, body = await handler(method, target)
        await nc.publish(msg.reply, binary_whole(status, headers, body))

    for name, callback in (
        ("raw", raw),
        ("json", with_json),
        ("json_start", with_json_start),
        ("binary", with_binary),
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

    async def with_json() -> None:
        rid = new_request_id()
        msg = await nc.request("floor.json", json_start(rid), timeout=REQUEST_TIMEOUT)
        whole = codec.decode_frame(msg.data, rid)
        assert isinstance(whole, frames.ResponseWhole)
        if whole.data != BODY or checksum("crc32c", whole.data) != whole.checksum:
            raise RuntimeError("json variant answered the wrong body")

    async def with_json_start() -> None:
        msg = await nc.request("floor.json_start", json_start(new_request_id()), timeout=REQUEST_TIMEOUT)
        if read_binary_whole(msg.data)[2] != BODY:
            raise RuntimeError("json_start variant answered the wrong body")

    async def with_binary() -> None:
        start = binary_start(new_request_id(), "GET", "/small", int((time.time() + 30) * 1000))
        msg = await nc.request("floor.binary", start, timeout=REQUEST_TIMEOUT)
        if read_binary_whole(msg.data)[2] != BODY:
            raise RuntimeError("binary variant answered the wrong body")

    return {"raw": raw, "json": with_json, "json_start": with_json_start, "binary": with_binary}


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
