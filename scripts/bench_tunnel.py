#!/usr/bin/env python3
"""Benchmark the tunnel against raw nats-py on one local nats-server.

Why this exists: the tunnel adds framing, flow control and a per-request state
machine on top of core NATS. The only honest way to say what that costs is to
measure the same traffic shapes both ways, on the same server, with the same
process topology, and report the ratio. Each baseline is the fastest plain way to
move the same bytes, so a ratio never flatters the tunnel:

- small request/reply: raw ``nc.request`` vs a tunnel ``GET`` (sequential p50/p99
  latency, then 32 concurrent workers for requests per second);
- bulk bytes, each direction against raw pub/sub in *that* direction, in 64 KiB
  messages (the piece size the tunnel's handler and uploader yield): a tunnel
  download (the handler streams the body: responder -> requester) against the
  responder publishing to a subscription here, and a tunnel upload (the handler
  consumes the body: requester -> responder) against this side publishing to a
  subscription in the responder. The two directions differ (who publishes, who
  reads), so one raw figure for both would mislead one of them;
- direct HTTP: the same 100-byte answer from an aiohttp web server on loopback,
  called with one keep-alive aiohttp ``ClientSession``. That is the fastest
  HTTP/1.1 pair Python offers (httpx's own stack, httpcore, costs ~0.5 ms a request
  and uvicorn more: a baseline built on them made the tunnel look 8x faster than
  HTTP). The tunnel's small GET is compared with it, and so is the application's
  view: a small ASGI app answered through the tunnel (``serve_asgi``) and called
  with ``httpx`` over ``TunnelTransport``;
- offline detection: how long ``fetch()`` takes to raise ``TunnelUnreachable`` for
  a host nobody serves, on first contact (a fresh ``TunnelClient`` each try), plain
  and while a monitoring subscriber on ``<prefix>.>`` (another connection) hides
  NATS's no-responders; against raw ``nc.request`` to a subject nobody subscribes
  (``NoRespondersError``). Each try's client then calls a served host once, on first
  contact too: any ``TunnelUnreachable`` there is a false "offline" and is counted;
- WebSockets (a dev server's HMR socket): an aiohttp WebSocket echo server, reached
  directly with aiohttp's WebSocket client (the loopback baseline) and through the tunnel
  with ``tunnel.websocket.websocket_connect`` -> tunnel -> linkd's ``UpstreamProxy`` -> the
  same echo server: small-message round trip p50/p99, messages per second one way in each
  direction (server push, client send), and a pipelined echo (send all, read all at once).

The requester runs here; the responder (raw subscriptions, the tunnel servers and
the aiohttp servers) runs in a separate process started from this same file with
``--role responder``, so each side gets its own core and its own event loop,
exactly as a desktop and a gateway would. Every measurement is repeated over
several rounds (baseline and tunnel interleaved, so drift hits both alike) and the
median is reported. MB/s means 10**6 bytes per second. A missed target is
reported (MISSED), not an error: the exit status says only whether the run worked.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import functools
import json
import math
import os
import platform
import signal
import statistics
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import httpx
import nats
from aiohttp import WSMsgType, web
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

import tunnel
from cli.nats_server import NatsServer, NatsServerConfig, NatsServerError
from linkd.upstream import UpstreamProxy
from tunnel.asgi import Receive, Scope, Send, serve_asgi
from tunnel.httpx_transport import TunnelTransport
from tunnel.websocket import TunnelWebSocket, websocket_connect

# --------------------------------------------------------------------------- shapes and settings

# "Small" request/response body: a typical JSON status answer.
SMALL_BYTES = 100
# Bulk message size for raw pub/sub, and the piece size the tunnel handler/uploader
# yields, so both sides move the same-sized messages through nats-server.
BULK_MESSAGE_BYTES = 64 * 1024
TUNNEL_HOST = "bench.local"
# The same handler, served with our extensions switched off: plain v1 JSON frames (base64 bodies,
# no credit, no heartbeats, no one-message responses), to show what the fast path gains.
# A v1 caller has no credit, so the server sends it 16 MiB at full speed and then paces at
# 8 MiB/s (tunnel._config DEFAULT_V1_BURST/PACE): past 16 MiB the v1 download measures that pace.
V1_HOST = "bench-v1.local"
# The ASGI app's host: httpx -> TunnelTransport -> tunnel -> serve_asgi -> app.
ASGI_HOST = "bench-asgi.local"
# The WebSocket host: websocket_connect -> tunnel -> linkd's UpstreamProxy -> the echo server.
WS_HOST = "bench-ws.local"
WS_PATH = "/echo"
# A small WebSocket message (text: what an HMR socket sends); the echo server's commands.
WS_MESSAGE = "x" * SMALL_BYTES
WS_PUSH = "push:"  # push:N -> N messages server->client, then "pushed:N"
WS_SINK = "sink:"  # sink:N -> read N messages, then "sunk:N"
# Untimed messages per one-way/pipelined WebSocket shape before round 1.
WS_WARMUP_MESSAGES = 500
# A host nobody serves (offline detection), and the raw subject nobody subscribes.
OFFLINE_HOST = "bench-offline.local"
SUBJECT_NOBODY = "bench.raw.nobody"
SUBJECT_ECHO = "bench.raw.echo"
# Raw upload: the requester publishes to the responder's sink, which reports when it has all.
SUBJECT_SINK = "bench.raw.sink.data"
SUBJECT_SINK_RESET = "bench.raw.sink.reset"
SUBJECT_SINK_DONE = "bench.raw.sink.done"
# Raw download: asked on SUBJECT_SOURCE, the responder publishes N bytes to SUBJECT_SOURCE_DATA.
SUBJECT_SOURCE = "bench.raw.source"
SUBJECT_SOURCE_DATA = "bench.raw.source.data"
HTTP_PATH = "/small"
READY_LINE = b"READY"
# Generous: a loaded 2-core machine may stall a few seconds, but never this long.
REQUEST_TIMEOUT = 10.0
TRANSFER_TIMEOUT = 120.0
RESPONDER_READY_TIMEOUT = 20.0
RESPONDER_EXIT_TIMEOUT = 5.0
MB = 1_000_000
# A subscription's pending-bytes limit for bulk data (nats-py's default, 64 MiB, is one transfer).
PENDING_BYTES_LIMIT = 512 * 1024 * 1024
# Untimed transfer per bulk shape before round 1 (socket buffers, allocator, code paths).
WARMUP_TRANSFER_BYTES = 8 * 1024 * 1024
SCRIPT = Path(__file__).resolve()


@dataclass(frozen=True)
class Settings:
    """How much work one run does; ``--quick`` trades precision for a ~10 s smoke run."""

    rounds: int
    warmup: int
    latency_requests: int
    concurrency: int
    concurrent_seconds: float
    transfer_bytes: int
    ws_messages: int  # per one-way or pipelined WebSocket measurement
    offline_tries: int  # first contacts per offline-detection measurement


FULL = Settings(
    rounds=5,
    warmup=300,
    latency_requests=2000,
    concurrency=32,
    concurrent_seconds=2.0,
    transfer_bytes=64 * 1024 * 1024,
    ws_messages=10_000,
    offline_tries=50,
)
QUICK = Settings(
    rounds=3,
    warmup=100,
    latency_requests=500,
    concurrency=32,
    concurrent_seconds=0.5,
    transfer_bytes=16 * 1024 * 1024,
    ws_messages=2_000,
    offline_tries=20,
)


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    unit: str
    # "raw", "tunnel", "v1" (the tunnel forced to plain v1 frames), "http" (aiohttp direct),
    # "httpx" (httpx over the tunnel), "offline", "ws"
    side: str
    # How the rounds combine: the median, or (counts of events that must not happen) the sum.
    summed: bool = False


FIGURES: tuple[Figure, ...] = (
    Figure("raw_req_p50_ms", "raw request p50", "ms", "raw"),
    Figure("raw_req_p99_ms", "raw request p99", "ms", "raw"),
    Figure("raw_req_concurrent_rps", "raw request, concurrent", "req/s", "raw"),
    Figure("raw_download_mbps", "raw download (pub there->sub here)", "MB/s", "raw"),
    Figure("raw_upload_mbps", "raw upload (pub here->sub there)", "MB/s", "raw"),
    Figure("tunnel_get_p50_ms", "tunnel GET p50", "ms", "tunnel"),
    Figure("tunnel_get_p99_ms", "tunnel GET p99", "ms", "tunnel"),
    Figure("tunnel_get_concurrent_rps", "tunnel GET, concurrent", "req/s", "tunnel"),
    Figure("tunnel_download_mbps", "tunnel download", "MB/s", "tunnel"),
    Figure("tunnel_upload_mbps", "tunnel upload", "MB/s", "tunnel"),
    Figure("v1_get_p50_ms", "tunnel v1-mode GET p50", "ms", "v1"),
    Figure("v1_get_p99_ms", "tunnel v1-mode GET p99", "ms", "v1"),
    Figure("v1_get_concurrent_rps", "tunnel v1-mode GET, concurrent", "req/s", "v1"),
    Figure("v1_download_mbps", "tunnel v1-mode download", "MB/s", "v1"),
    Figure("v1_upload_mbps", "tunnel v1-mode upload", "MB/s", "v1"),
    Figure("http_get_p50_ms", "direct HTTP (aiohttp) p50", "ms", "http"),
    Figure("http_get_p99_ms", "direct HTTP (aiohttp) p99", "ms", "http"),
    Figure("http_get_concurrent_rps", "direct HTTP (aiohttp), concurrent", "req/s", "http"),
    Figure("httpx_tunnel_get_p50_ms", "httpx over tunnel (ASGI) p50", "ms", "httpx"),
    Figure("httpx_tunnel_get_p99_ms", "httpx over tunnel (ASGI) p99", "ms", "httpx"),
    Figure("httpx_tunnel_get_concurrent_rps", "httpx over tunnel, concurrent", "req/s", "httpx"),
    Figure("raw_offline_ms", "raw no-responders p50", "ms", "offline"),
    Figure("tunnel_offline_ms", "tunnel offline host p50", "ms", "offline"),
    Figure("tunnel_offline_max_ms", "tunnel offline host max", "ms", "offline"),
    Figure("tunnel_offline_tapped_ms", "tunnel offline host, tap p50", "ms", "offline"),
    Figure("tunnel_offline_tapped_max_ms", "tunnel offline host, tap max", "ms", "offline"),
    Figure("tunnel_false_offline", "false offline (all rounds)", "times", "offline", summed=True),
    Figure("tunnel_false_offline_tapped", "false offline, tap (all rounds)", "times", "offline", summed=True),
    Figure("ws_direct_rtt_p50_ms", "WS direct echo p50", "ms", "ws"),
    Figure("ws_direct_rtt_p99_ms", "WS direct echo p99", "ms", "ws"),
    Figure("ws_tunnel_rtt_p50_ms", "WS tunnel echo p50", "ms", "ws"),
    Figure("ws_tunnel_rtt_p99_ms", "WS tunnel echo p99", "ms", "ws"),
    Figure("ws_direct_push_mps", "WS direct server push", "msg/s", "ws"),
    Figure("ws_tunnel_push_mps", "WS tunnel server push", "msg/s", "ws"),
    Figure("ws_direct_send_mps", "WS direct client send", "msg/s", "ws"),
    Figure("ws_tunnel_send_mps", "WS tunnel client send", "msg/s", "ws"),
    Figure("ws_direct_pipelined_mps", "WS direct pipelined echo", "msg/s", "ws"),
    Figure("ws_tunnel_pipelined_mps", "WS tunnel pipelined echo", "msg/s", "ws"),
)


@dataclass(frozen=True)
class Comparison:
    """One ratio (tunnel/baseline, or fast path/v1 mode) and its target (``None``: reported, no target)."""

    key: str
    label: str
    tunnel: str
    raw: str
    target: float | None
    higher_is_better: bool

    def met(self, ratio: float) -> bool | None:
        if self.target is None:
            return None
        return ratio >= self.target if self.higher_is_better else ratio <= self.target


# Targets: issue #16's goals (tunnel vs raw nats-py, measured in one run).
COMPARISONS: tuple[Comparison, ...] = (
    Comparison(
        "ratio_get_p50",
        "tunnel/raw small request p50 latency",
        "tunnel_get_p50_ms",
        "raw_req_p50_ms",
        1.25,
        False,
    ),
    Comparison(
        "ratio_get_p99",
        "tunnel/raw small request p99 latency",
        "tunnel_get_p99_ms",
        "raw_req_p99_ms",
        None,
        False,
    ),
    Comparison(
        "ratio_concurrent_rps",
        "tunnel/raw concurrent small requests",
        "tunnel_get_concurrent_rps",
        "raw_req_concurrent_rps",
        0.60,
        True,
    ),
    Comparison(
        "ratio_download", "tunnel/raw download", "tunnel_download_mbps", "raw_download_mbps", 0.90, True
    ),
    Comparison("ratio_upload", "tunnel/raw upload", "tunnel_upload_mbps", "raw_upload_mbps", 0.90, True),
    # Fast path against plain v1 frames: > 1 means the extensions pay (latency: < 1).
    Comparison("gain_get_p50", "fast/v1 GET p50 latency", "tunnel_get_p50_ms", "v1_get_p50_ms", None, False),
    Comparison(
        "gain_concurrent_rps",
        "fast/v1 concurrent GET",
        "tunnel_get_concurrent_rps",
        "v1_get_concurrent_rps",
        None,
        True,
    ),
    Comparison("gain_download", "fast/v1 download", "tunnel_download_mbps", "v1_download_mbps", None, True),
    Comparison("gain_upload", "fast/v1 upload", "tunnel_upload_mbps", "v1_upload_mbps", None, True),
    # Against direct HTTP on loopback (aiohttp client and server, the same 100-byte answer).
    Comparison(
        "tunnel_vs_http_p50",
        "tunnel GET/direct HTTP p50 latency",
        "tunnel_get_p50_ms",
        "http_get_p50_ms",
        None,
        False,
    ),
    Comparison(
        "tunnel_vs_http_p99",
        "tunnel GET/direct HTTP p99 latency",
        "tunnel_get_p99_ms",
        "http_get_p99_ms",
        None,
        False,
    ),
    Comparison(
        "tunnel_vs_http_concurrent",
        "tunnel GET/direct HTTP concurrent",
        "tunnel_get_concurrent_rps",
        "http_get_concurrent_rps",
        None,
        True,
    ),
    # The application's view: httpx over TunnelTransport to an ASGI app, against direct HTTP.
    Comparison(
        "httpx_vs_http_p50",
        "httpx tunnel/direct HTTP p50 latency",
        "httpx_tunnel_get_p50_ms",
        "http_get_p50_ms",
        None,
        False,
    ),
    Comparison(
        "httpx_vs_http_p99",
        "httpx tunnel/direct HTTP p99 latency",
        "httpx_tunnel_get_p99_ms",
        "http_get_p99_ms",
        None,
        False,
    ),
    Comparison(
        "httpx_vs_http_concurrent",
        "httpx tunnel/direct HTTP concurrent",
        "httpx_tunnel_get_concurrent_rps",
        "http_get_concurrent_rps",
        None,
        True,
    ),
    # Offline detection against NATS's own no-responders answer.
    Comparison(
        "ratio_offline",
        "tunnel/raw offline detection",
        "tunnel_offline_ms",
        "raw_offline_ms",
        None,
        False,
    ),
    # The same echo server, the same small text messages: tunnel + UpstreamProxy vs loopback TCP.
    Comparison(
        "ws_ratio_rtt_p50",
        "WS tunnel/direct echo p50 latency",
        "ws_tunnel_rtt_p50_ms",
        "ws_direct_rtt_p50_ms",
        None,
        False,
    ),
    Comparison(
        "ws_ratio_rtt_p99",
        "WS tunnel/direct echo p99 latency",
        "ws_tunnel_rtt_p99_ms",
        "ws_direct_rtt_p99_ms",
        None,
        False,
    ),
    Comparison(
        "ws_ratio_push",
        "WS tunnel/direct server push",
        "ws_tunnel_push_mps",
        "ws_direct_push_mps",
        None,
        True,
    ),
    Comparison(
        "ws_ratio_send",
        "WS tunnel/direct client send",
        "ws_tunnel_send_mps",
        "ws_direct_send_mps",
        None,
        True,
    ),
    Comparison(
        "ws_ratio_pipelined",
        "WS tunnel/direct pipelined echo",
        "ws_tunnel_pipelined_mps",
        "ws_direct_pipelined_mps",
        None,
        True,
    ),
)


@dataclass(frozen=True)
class Ceiling:
    """An absolute target for one figure (no baseline gives it meaning: a user waits this long)."""

    key: str
    label: str
    figure: str
    limit: float
    inclusive: bool  # ``<=`` (counts: "none") rather than ``<``

    def met(self, value: float) -> bool:
        return value <= self.limit if self.inclusive else value < self.limit

    @property
    def sign(self) -> str:
        return "<=" if self.inclusive else "<"


CEILINGS: tuple[Ceiling, ...] = (
    Ceiling("offline_ms", "offline host -> TunnelUnreachable", "tunnel_offline_ms", 5.0, False),
    # Under a tap NATS's no-responders is hidden; the host's readiness subject (outside the
    # prefix) tells after Timeouts.presence (30 ms) whether a server is there (docs/protocol.md §3).
    Ceiling(
        "offline_tapped_ms", "the same under a tap on <prefix>.>", "tunnel_offline_tapped_ms", 50.0, False
    ),
    Ceiling("false_offline", "served host reported offline", "tunnel_false_offline", 0, True),
    Ceiling("false_offline_tapped", "the same, a tap on <prefix>.>", "tunnel_false_offline_tapped", 0, True),
)


class BenchError(RuntimeError):
    """Something in the setup or a sanity check failed: the figures would be meaningless."""


#: Set on Ctrl-C / SIGTERM. A terminal's Ctrl-C also kills nats-server (same process group),
#: so errors that follow it are the interruption, not a benchmark failure.
INTERRUPTED = threading.Event()


async def _quiet_error(exc: Exception) -> None:
    """nats-py logs every connection error with a traceback; the benchmark reports its own."""


async def _ignore_message(msg: Msg) -> None:
    """The monitoring tap reads and drops (what it logs is not what we measure)."""


async def connect(url: str, name: str) -> NATS:
    """One connection per process; no reconnects: a lost server ends the run, it must not skew it."""
    return await nats.connect(url, name=name, allow_reconnect=False, error_cb=_quiet_error)


def _cancel_on_signals() -> None:
    """Ctrl-C / SIGTERM cancel the benchmark task, so every ``finally`` tears down in order."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None

    def interrupt() -> None:
        INTERRUPTED.set()
        task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, interrupt)


def log(message: str) -> None:
    """Progress goes to stderr so ``--json`` keeps stdout to the one JSON object."""
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- responder process


class RawSink:
    """Counts pub/sub bytes and announces when the expected total arrived (the completion ack)."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self.expected = 0
        self.received = 0

    async def on_reset(self, msg: Msg) -> None:
        self.expected = int(msg.data)
        self.received = 0
        await msg.respond(b"ok")

    async def on_data(self, msg: Msg) -> None:
        self.received += len(msg.data)
        if self.expected and self.received >= self.expected:
            self.expected = 0
            await self.nc.publish(SUBJECT_SINK_DONE, str(self.received).encode())


class RawSource:
    """Publishes the asked number of bytes in bulk messages to the requester (raw download)."""

    def __init__(self, nc: NATS, bulk: bytes) -> None:
        self.nc = nc
        self.bulk = bulk
        self.tasks: set[asyncio.Task[None]] = set()

    async def on_request(self, msg: Msg) -> None:
        # In a task: this subscription's callbacks run one at a time, and the burst is long.
        task = asyncio.create_task(self._send(int(msg.data)))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _send(self, total: int) -> None:
        for _ in range(total // BULK_MESSAGE_BYTES):
            await self.nc.publish(SUBJECT_SOURCE_DATA, self.bulk)
        await self.nc.flush()


async def _stream_bytes(total: int) -> AsyncIterator[bytes]:
    """The download body: ``total`` bytes in bulk-message-sized pieces, no copies."""
    piece = bytes(BULK_MESSAGE_BYTES)
    full, rest = divmod(total, BULK_MESSAGE_BYTES)
    for _ in range(full):
        yield piece
    if rest:
        yield piece[:rest]


async def tunnel_handler(req: tunnel.Request) -> tunnel.Response:
    """/small answers 100 bytes, /download?bytes=N streams N bytes, /upload counts the body."""
    if req.path == "/small":
        return tunnel.Response(200, [("content-type", "application/octet-stream")], bytes(SMALL_BYTES))
    if req.path == "/download":
        total = int(dict(req.query).get("bytes", "0"))
        return tunnel.Response(200, [("content-type", "application/octet-stream")], _stream_bytes(total))
    if req.path == "/upload":
        received = 0
        async for chunk in req.stream():
            received += len(chunk)
        return tunnel.Response(200, [("content-type", "text/plain")], str(received))
    return tunnel.Response(404, body="not found")


async def small_asgi_app(scope: Scope, receive: Receive, send: Send) -> None:
    """A plain ASGI 3 app (no framework cost to blur the comparison): /small answers 100 bytes."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    found = scope["path"] == "/small"
    body = bytes(SMALL_BYTES) if found else b"not found"
    headers = [(b"content-type", b"application/octet-stream"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200 if found else 404, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def ws_echo(request: web.Request) -> web.WebSocketResponse:
    """Echo each text message; ``push:N`` sends N messages, ``sink:N`` reads N (see WS_PUSH/WS_SINK)."""
    ws = web.WebSocketResponse(heartbeat=None, max_msg_size=0)
    await ws.prepare(request)
    sinking = sink_total = 0
    async for message in ws:
        if message.type is not WSMsgType.TEXT:
            break
        text: str = message.data
        if sinking:
            sinking -= 1
            if not sinking:
                await ws.send_str(f"sunk:{sink_total}")
        elif text.startswith(WS_PUSH):
            count = int(text.removeprefix(WS_PUSH))
            for _ in range(count):
                await ws.send_str(WS_MESSAGE)
            await ws.send_str(f"pushed:{count}")
        elif text.startswith(WS_SINK):
            sinking = sink_total = int(text.removeprefix(WS_SINK))
        else:
            await ws.send_str(text)
    return ws


async def http_small(request: web.Request) -> web.Response:
    """The direct-HTTP baseline's answer: the same 100 bytes as the tunnel's /small."""
    return web.Response(body=bytes(SMALL_BYTES), content_type="application/octet-stream")


async def start_aiohttp_server(
    path: str, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> tuple[web.AppRunner, int]:
    """One aiohttp server on loopback with one GET route, on a free port."""
    app = web.Application()
    app.router.add_get(path, handler)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port: int = runner.addresses[0][1]
    return runner, port


def _stop_on_stdin_eof(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """The parent closes our stdin to stop us; EOF also means the parent died, so we never linger."""

    def watch() -> None:
        # os.read on the raw fd: a thread blocked in the buffered reader aborts interpreter shutdown.
        with contextlib.suppress(OSError):
            while os.read(sys.stdin.fileno(), 4096):
                pass
        with contextlib.suppress(RuntimeError):  # the loop may already be closed
            loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=watch, name="stdin-eof-watch", daemon=True).start()


async def run_responder(url: str) -> None:
    """Serve the raw subjects and the tunnel host on one connection until told to stop."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)  # Ctrl-C reaches the whole process group
    _stop_on_stdin_eof(loop, stop)
    nc = await connect(url, "bench-responder")
    small = bytes(SMALL_BYTES)

    async def on_echo(msg: Msg) -> None:
        await msg.respond(small)

    sink = RawSink(nc)
    source = RawSource(nc, bytes(BULK_MESSAGE_BYTES))
    await nc.subscribe(SUBJECT_ECHO, cb=on_echo)
    # Room for a whole transfer: a callback that falls behind must not drop (slow consumer).
    await nc.subscribe(SUBJECT_SINK, cb=sink.on_data, pending_bytes_limit=PENDING_BYTES_LIMIT)
    await nc.subscribe(SUBJECT_SINK_RESET, cb=sink.on_reset)
    await nc.subscribe(SUBJECT_SOURCE, cb=source.on_request)
    server = await tunnel.serve(nc, TUNNEL_HOST, tunnel_handler)
    v1_server = await tunnel.serve(nc, V1_HOST, tunnel_handler, config=tunnel.ServerConfig(fast_path=False))
    asgi_server = await serve_asgi(nc, ASGI_HOST, small_asgi_app, lifespan="off")
    http_runner, http_port = await start_aiohttp_server(HTTP_PATH, http_small)
    ws_runner, ws_port = await start_aiohttp_server(WS_PATH, ws_echo)
    # What `linkd up --upstream http://127.0.0.1:<port>` serves: the upstream proxy as the handler.
    ws_proxy = UpstreamProxy(f"http://127.0.0.1:{ws_port}/")
    ws_tunnel_server = await tunnel.serve(nc, WS_HOST, ws_proxy)
    await nc.flush()
    sys.stdout.buffer.write(b" ".join([READY_LINE, str(http_port).encode(), str(ws_port).encode()]) + b"\n")
    sys.stdout.flush()
    try:
        await stop.wait()
    finally:
        await ws_tunnel_server.close(timeout=1.0)
        await ws_proxy.aclose()
        await ws_runner.cleanup()
        await http_runner.cleanup()
        await asgi_server.close(timeout=1.0)
        await server.close(timeout=1.0)
        await v1_server.close(timeout=1.0)
        await nc.close()


@contextlib.asynccontextmanager
async def responder_process(url: str, profile_dir: Path | None) -> AsyncIterator[tuple[int, int]]:
    """Start ``--role responder`` in its own process, wait for READY; yields its HTTP and WebSocket ports."""
    cmd = [sys.executable, str(SCRIPT), "--role", "responder", "--url", url]
    if profile_dir is not None:
        cmd += ["--profile", str(profile_dir)]
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), RESPONDER_READY_TIMEOUT)
        except TimeoutError:
            raise BenchError(f"responder not ready after {RESPONDER_READY_TIMEOUT:g} s") from None
        ready, *ports = line.split()
        if ready != READY_LINE or len(ports) != 2 or not all(port.isdigit() for port in ports):
            raise BenchError(f"responder failed to start (exit code {await proc.wait()})")
        yield int(ports[0]), int(ports[1])
    finally:
        proc.stdin.close()  # EOF: the responder closes its tunnel server and connection
        try:
            await asyncio.wait_for(proc.wait(), RESPONDER_EXIT_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()


# --------------------------------------------------------------------------- requester measurements


def percentile(sorted_samples: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: p99 of 2000 samples is a real sample)."""
    rank = max(1, math.ceil(q / 100 * len(sorted_samples)))
    return sorted_samples[rank - 1]


class WsEnd(Protocol):
    """The calling end of one WebSocket, whichever client opened it: text messages only."""

    async def send(self, text: str) -> None: ...

    async def receive(self) -> str: ...

    async def close(self) -> None: ...


class DirectWs:
    """aiohttp's WebSocket client straight to the echo server (the loopback baseline)."""

    def __init__(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.session = session
        self.ws = ws

    @classmethod
    async def open(cls, url: str) -> DirectWs:
        session = aiohttp.ClientSession()
        try:
            return cls(session, await session.ws_connect(url, heartbeat=None, max_msg_size=0))
        except BaseException:
            await session.close()
            raise

    async def send(self, text: str) -> None:
        await self.ws.send_str(text)

    async def receive(self) -> str:
        message = await self.ws.receive(timeout=REQUEST_TIMEOUT)
        if message.type is not aiohttp.WSMsgType.TEXT:
            raise BenchError(f"direct WebSocket: {message.type.name} instead of a text message")
        text: str = message.data
        return text

    async def close(self) -> None:
        await self.ws.close()
        await self.session.close()


class TunnelWs:
    """``tunnel.websocket`` over the tunnel to linkd's upstream proxy, then the same echo server."""

    def __init__(self, ws: TunnelWebSocket) -> None:
        self.ws = ws

    @classmethod
    async def open(cls, nc: NATS) -> TunnelWs:
        return cls(await websocket_connect(nc, f"tunnel://{WS_HOST}{WS_PATH}"))

    async def send(self, text: str) -> None:
        await self.ws.send_text(text)

    async def receive(self) -> str:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            message = await self.ws.receive()
        if not isinstance(message.data, str):
            raise BenchError(f"tunnel WebSocket: {message.kind} instead of a text message")
        return message.data

    async def close(self) -> None:
        await self.ws.close()


Measure = Callable[[], Awaitable[dict[str, float]]]


class Requester:
    """The calling side: one connection, one tunnel client, one method per traffic shape."""

    def __init__(self, nc: NATS, url: str, settings: Settings, http_port: int, ws_port: int) -> None:
        self.nc = nc
        self.url = url  # for the monitoring tap's own connection
        self.settings = settings
        self.client = tunnel.TunnelClient(nc)
        self.httpx_tunnel = httpx.AsyncClient(transport=TunnelTransport(nc), timeout=REQUEST_TIMEOUT)
        self.httpx_tunnel_url = f"tunnel://{ASGI_HOST}/small"
        self.http_url = f"http://127.0.0.1:{http_port}{HTTP_PATH}"
        self.http_direct: aiohttp.ClientSession | None = None  # needs a running loop: made lazily
        self.v1_client = tunnel.TunnelClient(nc, fast_path=False)
        self.small = bytes(SMALL_BYTES)
        self.bulk = bytes(BULK_MESSAGE_BYTES)
        self.small_url = f"tunnel://{TUNNEL_HOST}/small"
        self.offline_url = f"tunnel://{OFFLINE_HOST}/small"
        self.v1_small_url = f"tunnel://{V1_HOST}/small"
        self.ws_url = f"http://127.0.0.1:{ws_port}{WS_PATH}"
        self.ws_ends: dict[str, WsEnd] = {}  # "direct" / "tunnel": one socket each, opened lazily

    # -- one operation of each shape ----------------------------------------------------

    async def raw_request(self) -> None:
        msg = await self.nc.request(SUBJECT_ECHO, self.small, timeout=REQUEST_TIMEOUT)
        if len(msg.data) != SMALL_BYTES:
            raise BenchError(f"raw echo answered {len(msg.data)} bytes")

    async def tunnel_get(self) -> None:
        resp = await self.client.fetch(self.small_url, timeout=REQUEST_TIMEOUT)
        body = await resp.read()
        if resp.status != 200 or len(body) != SMALL_BYTES:
            raise BenchError(f"tunnel GET answered {resp.status} with {len(body)} bytes")

    async def v1_get(self) -> None:
        resp = await self.v1_client.fetch(self.v1_small_url, timeout=REQUEST_TIMEOUT)
        body = await resp.read()
        if resp.status != 200 or len(body) != SMALL_BYTES:
            raise BenchError(f"v1-mode GET answered {resp.status} with {len(body)} bytes")

    async def httpx_tunnel_get(self) -> None:
        resp = await self.httpx_tunnel.get(self.httpx_tunnel_url)
        if resp.status_code != 200 or len(resp.content) != SMALL_BYTES:
            raise BenchError(
                f"httpx over the tunnel answered {resp.status_code} with {len(resp.content)} bytes"
            )

    async def http_get(self) -> None:
        """Direct HTTP: one keep-alive aiohttp session, its pool sized for the concurrent shape."""
        if self.http_direct is None:
            connector = aiohttp.TCPConnector(limit=self.settings.concurrency)
            self.http_direct = aiohttp.ClientSession(connector=connector)
        async with self.http_direct.get(self.http_url) as resp:
            body = await resp.read()
        if resp.status != 200 or len(body) != SMALL_BYTES:
            raise BenchError(f"direct HTTP (aiohttp) answered {resp.status} with {len(body)} bytes")

    async def ws_end(self, side: str) -> WsEnd:
        """The side's one WebSocket (``direct`` or ``tunnel``), opened on first use and kept."""
        end = self.ws_ends.get(side)
        if end is None:
            end = await DirectWs.open(self.ws_url) if side == "direct" else await TunnelWs.open(self.nc)
            self.ws_ends[side] = end
        return end

    async def aclose(self) -> None:
        for end in self.ws_ends.values():
            with contextlib.suppress(Exception):  # closing is best effort: the figures are in
                await end.close()
        if self.http_direct is not None:
            await self.http_direct.close()
        await self.httpx_tunnel.aclose()
        await self.client.aclose()
        await self.v1_client.aclose()

    # -- shapes ----------------------------------------------------------------------

    async def latency(self, op: Callable[[], Awaitable[None]], prefix: str) -> dict[str, float]:
        """Sequential round trips after a warm-up: p50 and p99 in milliseconds."""
        for _ in range(self.settings.warmup):
            await op()
        samples: list[float] = []
        clock = time.perf_counter
        for _ in range(self.settings.latency_requests):
            t0 = clock()
            await op()
            samples.append(clock() - t0)
        samples.sort()
        return {
            f"{prefix}_p50_ms": percentile(samples, 50) * 1000,
            f"{prefix}_p99_ms": percentile(samples, 99) * 1000,
        }

    async def concurrent_rate(self, op: Callable[[], Awaitable[None]], key: str) -> dict[str, float]:
        """N workers loop over ``op`` for a fixed duration: completed requests per second."""
        workers = self.settings.concurrency
        await asyncio.gather(*(op() for _ in range(workers)))  # warm: every worker's first call
        done = 0
        clock = time.perf_counter
        stop_at = clock() + self.settings.concurrent_seconds

        async def worker() -> None:
            nonlocal done
            while clock() < stop_at:
                await op()
                done += 1

        t0 = clock()
        await asyncio.gather(*(worker() for _ in range(workers)))
        return {key: done / (clock() - t0)}

    async def ws_round_trip(self, side: str) -> dict[str, float]:
        """Sequential small-message echoes on one socket: p50 and p99 in milliseconds."""
        ws = await self.ws_end(side)

        async def echo() -> None:
            await ws.send(WS_MESSAGE)
            if await ws.receive() != WS_MESSAGE:
                raise BenchError(f"{side} WebSocket echo answered something else")

        return await self.latency(echo, f"ws_{side}_rtt")

    async def ws_push(self, side: str, count: int | None = None) -> dict[str, float]:
        """The server sends ``count`` messages (one way, server -> client): messages per second."""
        count = count or self.settings.ws_messages
        ws = await self.ws_end(side)
        t0 = time.perf_counter()
        await ws.send(f"{WS_PUSH}{count}")
        for _ in range(count):
            if await ws.receive() != WS_MESSAGE:
                raise BenchError(f"{side} WebSocket push delivered something else")
        if (last := await ws.receive()) != f"pushed:{count}":
            raise BenchError(f"{side} WebSocket push ended with {last[:40]!r}")
        return {f"ws_{side}_push_mps": count / (time.perf_counter() - t0)}

    async def ws_send(self, side: str, count: int | None = None) -> dict[str, float]:
        """The client sends ``count`` messages (one way); the clock stops at the server's count."""
        count = count or self.settings.ws_messages
        ws = await self.ws_end(side)
        t0 = time.perf_counter()
        await ws.send(f"{WS_SINK}{count}")
        for _ in range(count):
            await ws.send(WS_MESSAGE)
        if (last := await ws.receive()) != f"sunk:{count}":
            raise BenchError(f"{side} WebSocket send ended with {last[:40]!r}")
        return {f"ws_{side}_send_mps": count / (time.perf_counter() - t0)}

    async def ws_pipelined(self, side: str, count: int | None = None) -> dict[str, float]:
        """Send ``count`` echoes without waiting while reading them back: messages per second."""
        count = count or self.settings.ws_messages
        ws = await self.ws_end(side)

        async def send_all() -> None:
            for _ in range(count):
                await ws.send(WS_MESSAGE)

        async def read_all() -> None:
            for _ in range(count):
                if await ws.receive() != WS_MESSAGE:
                    raise BenchError(f"{side} WebSocket pipelined echo answered something else")

        t0 = time.perf_counter()
        await asyncio.gather(send_all(), read_all())
        return {f"ws_{side}_pipelined_mps": count / (time.perf_counter() - t0)}

    async def warm_up_ws(self) -> None:
        """A few untimed messages per one-way and pipelined shape on each socket."""
        for side in ("direct", "tunnel"):
            await self.ws_push(side, WS_WARMUP_MESSAGES)
            await self.ws_send(side, WS_WARMUP_MESSAGES)
            await self.ws_pipelined(side, WS_WARMUP_MESSAGES)

    async def raw_upload(self, total: int | None = None) -> dict[str, float]:
        """Publish the transfer in 64 KiB messages; stop the clock when the subscriber there has all."""
        total = total or self.settings.transfer_bytes
        count, rest = divmod(total, BULK_MESSAGE_BYTES)
        if rest:
            raise BenchError("transfer size must be a multiple of the bulk message size")
        done_sub = await self.nc.subscribe(SUBJECT_SINK_DONE)
        try:
            await self.nc.request(SUBJECT_SINK_RESET, str(total).encode(), timeout=REQUEST_TIMEOUT)
            t0 = time.perf_counter()
            for _ in range(count):
                await self.nc.publish(SUBJECT_SINK, self.bulk)
            done = await done_sub.next_msg(timeout=TRANSFER_TIMEOUT)
            elapsed = time.perf_counter() - t0
        finally:
            await done_sub.unsubscribe()
        if int(done.data) != total:
            raise BenchError(f"subscriber counted {int(done.data)} of {total} bytes")
        return {"raw_upload_mbps": total / MB / elapsed}

    async def raw_download(self, total: int | None = None) -> dict[str, float]:
        """Ask the responder for the transfer; stop the clock when the last 64 KiB message is here.

        Like the tunnel download, the clock includes the ask: one small message there.
        """
        total = total or self.settings.transfer_bytes
        if total % BULK_MESSAGE_BYTES:
            raise BenchError("transfer size must be a multiple of the bulk message size")
        received = 0
        complete = asyncio.get_running_loop().create_future()

        async def on_data(msg: Msg) -> None:
            nonlocal received
            received += len(msg.data)
            if received >= total and not complete.done():
                complete.set_result(None)

        sub = await self.nc.subscribe(
            SUBJECT_SOURCE_DATA, cb=on_data, pending_bytes_limit=PENDING_BYTES_LIMIT
        )
        try:
            await self.nc.flush()  # our interest reached the server before the responder publishes
            t0 = time.perf_counter()
            await self.nc.publish(SUBJECT_SOURCE, str(total).encode())
            await asyncio.wait_for(complete, TRANSFER_TIMEOUT)
            elapsed = time.perf_counter() - t0
        finally:
            await sub.unsubscribe()
        if received != total:
            raise BenchError(f"raw download received {received} of {total} bytes")
        return {"raw_download_mbps": total / MB / elapsed}

    async def tunnel_download(self, total: int | None = None, v1: bool = False) -> dict[str, float]:
        """The handler streams the transfer; stop the clock when the last byte was read."""
        total = total or self.settings.transfer_bytes
        client, host = (self.v1_client, V1_HOST) if v1 else (self.client, TUNNEL_HOST)
        t0 = time.perf_counter()
        resp = await client.fetch(f"tunnel://{host}/download?bytes={total}", timeout=TRANSFER_TIMEOUT)
        received = 0
        async for chunk in resp.aiter_bytes():
            received += len(chunk)
        elapsed = time.perf_counter() - t0
        if resp.status != 200 or received != total:
            raise BenchError(f"tunnel download answered {resp.status} with {received} of {total} bytes")
        return {("v1" if v1 else "tunnel") + "_download_mbps": total / MB / elapsed}

    async def tunnel_upload(self, total: int | None = None, v1: bool = False) -> dict[str, float]:
        """Stream the transfer up; stop the clock when the handler's byte count came back."""
        total = total or self.settings.transfer_bytes
        client, host = (self.v1_client, V1_HOST) if v1 else (self.client, TUNNEL_HOST)
        piece = self.bulk

        async def body() -> AsyncIterator[bytes]:
            for _ in range(total // BULK_MESSAGE_BYTES):
                yield piece

        t0 = time.perf_counter()
        resp = await client.fetch(
            f"tunnel://{host}/upload", method="POST", body=body(), timeout=TRANSFER_TIMEOUT
        )
        counted = await resp.read()
        elapsed = time.perf_counter() - t0
        if resp.status != 200 or int(counted) != total:
            raise BenchError(f"tunnel upload answered {resp.status}, handler counted {counted!r} of {total}")
        return {("v1" if v1 else "tunnel") + "_upload_mbps": total / MB / elapsed}

    async def raw_offline(self) -> dict[str, float]:
        """``nc.request`` to a subject nobody subscribes: NATS's no-responders, the floor for offline."""
        clock = time.perf_counter
        samples: list[float] = []
        for attempt in range(self.settings.offline_tries + 1):  # the first is untimed
            t0 = clock()
            try:
                await self.nc.request(SUBJECT_NOBODY, b"", timeout=REQUEST_TIMEOUT)
            except nats.errors.NoRespondersError:
                if attempt:
                    samples.append(clock() - t0)
            else:
                raise BenchError("a raw request to a subject nobody subscribes was answered")
        return {"raw_offline_ms": statistics.median(samples) * 1000}

    async def tunnel_offline(self) -> dict[str, float]:
        """First contacts with a host nobody serves, plain then under a monitoring tap.

        Each try uses a fresh ``TunnelClient`` (nothing seen, nothing cached): the clock runs
        from ``fetch()`` to ``TunnelUnreachable``. The same client then calls the served host,
        a first contact too: ``TunnelUnreachable`` there is a false "offline", counted.
        """
        result: dict[str, float] = {}
        for tapped in (False, True):
            tap = await connect(self.url, "bench-tap") if tapped else None
            try:
                if tap is not None:
                    # What a monitoring tool does: watch every tunnel subject, on its own connection.
                    await tap.subscribe(f"{tunnel.DEFAULT_PREFIX}.>", cb=_ignore_message)
                    await tap.flush()
                samples: list[float] = []
                false_offline = 0
                for attempt in range(self.settings.offline_tries + 1):  # the first is untimed
                    elapsed, false = await self._first_contacts()
                    false_offline += false
                    if attempt:
                        samples.append(elapsed)
            finally:
                if tap is not None:
                    await tap.close()
            name = "tunnel_offline_tapped" if tapped else "tunnel_offline"
            result[f"{name}_ms"] = statistics.median(samples) * 1000
            result[f"{name}_max_ms"] = max(samples) * 1000
            result["tunnel_false_offline" + ("_tapped" if tapped else "")] = false_offline
        return result

    async def _first_contacts(self) -> tuple[float, int]:
        """One fresh client: seconds to learn the offline host is offline; 1 if the served one looked so."""
        client = tunnel.TunnelClient(self.nc)
        try:
            t0 = time.perf_counter()
            try:
                await client.fetch(self.offline_url, timeout=REQUEST_TIMEOUT)
            except tunnel.TunnelUnreachable:
                elapsed = time.perf_counter() - t0
            else:
                raise BenchError(f"{OFFLINE_HOST}, which nobody serves, answered")
            try:
                resp = await client.fetch(self.small_url, timeout=REQUEST_TIMEOUT)
            except tunnel.TunnelUnreachable:
                return elapsed, 1
            body = await resp.read()
            if resp.status != 200 or len(body) != SMALL_BYTES:
                raise BenchError(f"tunnel GET (first contact) answered {resp.status} with {len(body)} bytes")
            return elapsed, 0
        finally:
            await client.aclose()

    async def warm_up_bulk(self, only: str) -> None:
        """One small untimed transfer per bulk shape: the first MiBs on a fresh connection are slow."""
        if only in ("http", "ws", "offline"):
            return
        if only != "tunnel":
            await self.raw_download(WARMUP_TRANSFER_BYTES)
            await self.raw_upload(WARMUP_TRANSFER_BYTES)
        if only != "raw":
            await self.tunnel_download(WARMUP_TRANSFER_BYTES)
            await self.tunnel_upload(WARMUP_TRANSFER_BYTES)
            await self.tunnel_download(WARMUP_TRANSFER_BYTES, v1=True)
            await self.tunnel_upload(WARMUP_TRANSFER_BYTES, v1=True)

    def round_plan(self, only: str) -> list[Measure]:
        """One round: baseline and tunnel alternate per shape so machine drift hits both alike."""
        measure = functools.partial
        raw_latency = measure(self.latency, self.raw_request, "raw_req")
        raw_rate = measure(self.concurrent_rate, self.raw_request, "raw_req_concurrent_rps")
        tun_latency = measure(self.latency, self.tunnel_get, "tunnel_get")
        tun_rate = measure(self.concurrent_rate, self.tunnel_get, "tunnel_get_concurrent_rps")
        v1_latency = measure(self.latency, self.v1_get, "v1_get")
        v1_rate = measure(self.concurrent_rate, self.v1_get, "v1_get_concurrent_rps")
        v1_download = measure(self.tunnel_download, v1=True)
        v1_upload = measure(self.tunnel_upload, v1=True)
        http_latency = measure(self.latency, self.http_get, "http_get")
        http_rate = measure(self.concurrent_rate, self.http_get, "http_get_concurrent_rps")
        # The application's view: httpx over TunnelTransport to the ASGI app.
        httpx_latency = measure(self.latency, self.httpx_tunnel_get, "httpx_tunnel_get")
        httpx_rate = measure(self.concurrent_rate, self.httpx_tunnel_get, "httpx_tunnel_get_concurrent_rps")
        raw: list[Measure] = [raw_latency, raw_rate, self.raw_download, self.raw_upload, self.raw_offline]
        tun: list[Measure] = [
            *(tun_latency, tun_rate, self.tunnel_download, self.tunnel_upload, self.tunnel_offline),
            *(v1_latency, v1_rate, v1_download, v1_upload),
        ]
        http: list[Measure] = [http_latency, httpx_latency, http_rate, httpx_rate]
        offline: list[Measure] = [self.raw_offline, self.tunnel_offline]
        # WebSockets: the same echo server, direct then through the tunnel, shape by shape.
        ws: list[Measure] = [
            measure(shape, side)
            for shape in (self.ws_round_trip, self.ws_push, self.ws_send, self.ws_pipelined)
            for side in ("direct", "tunnel")
        ]
        groups = {"raw": raw, "tunnel": tun, "http": http, "offline": offline, "ws": ws}
        if only in groups:
            return groups[only]
        return [
            *(raw_latency, tun_latency, v1_latency, http_latency, httpx_latency),
            *(raw_rate, tun_rate, v1_rate, http_rate, httpx_rate),
            *(self.raw_download, self.tunnel_download, v1_download),
            *(self.raw_upload, self.tunnel_upload, v1_upload),
            *offline,
            *ws,
        ]


async def run_benchmark(
    url: str, settings: Settings, only: str, profile_dir: Path | None
) -> tuple[dict[str, list[float]], str]:
    """All rounds against a fresh responder; returns per-figure samples and the server version."""
    samples: dict[str, list[float]] = {}
    _cancel_on_signals()
    async with responder_process(url, profile_dir) as (http_port, ws_port):
        nc = await connect(url, "bench-requester")
        requester = Requester(nc, url, settings, http_port, ws_port)
        profiler = cProfile.Profile() if profile_dir is not None else None
        try:
            if profiler is not None:
                profiler.enable()
            await requester.warm_up_bulk(only)
            if only in ("all", "ws"):
                await requester.warm_up_ws()
            for round_no in range(1, settings.rounds + 1):
                started = time.perf_counter()
                for measure in requester.round_plan(only):
                    for key, value in (await measure()).items():
                        samples.setdefault(key, []).append(value)
                log(f"round {round_no}/{settings.rounds} done in {time.perf_counter() - started:.1f} s")
        finally:
            if profiler is not None and profile_dir is not None:
                profiler.disable()
                profiler.dump_stats(profile_dir / "requester.prof")
            await requester.aclose()
            v = nc.connected_server_version
            version = f"{v.major}.{v.minor}.{v.patch}"
            await nc.close()
    return samples, version


# --------------------------------------------------------------------------- results


def summarize(samples: dict[str, list[float]]) -> dict[str, Any]:
    """Medians per figure (sums for counts), then ratios (of medians) and whether each target is met."""
    summed = {fig.key for fig in FIGURES if fig.summed}
    result: dict[str, Any] = {
        key: sum(values) if key in summed else statistics.median(values) for key, values in samples.items()
    }
    for cmp in COMPARISONS:
        if cmp.tunnel in result and cmp.raw in result:
            ratio = result[cmp.tunnel] / result[cmp.raw]
            result[cmp.key] = ratio
            met = cmp.met(ratio)
            if met is not None:
                result[f"{cmp.key}_target_met"] = met
    for ceiling in CEILINGS:
        if ceiling.figure in result:
            result[f"{ceiling.key}_target_met"] = ceiling.met(result[ceiling.figure])
    return result


def format_value(value: float, unit: str) -> str:
    digits = 3 if unit == "ms" else (0 if unit in ("req/s", "msg/s", "times") else 1)
    return f"{value:,.{digits}f} {unit}"


def print_report(result: dict[str, Any], samples: dict[str, list[float]], header: str) -> None:
    """Human-readable table: every figure with units, then each ratio against its target."""
    print(header)
    print()
    for fig in FIGURES:
        if fig.key not in result:
            continue
        spread = ", ".join(format_value(v, fig.unit).removesuffix(" " + fig.unit) for v in samples[fig.key])
        print(f"  {fig.label:<34} {format_value(result[fig.key], fig.unit):>16}   (rounds: {spread})")
    print()
    for cmp in COMPARISONS:
        if cmp.key not in result:
            continue
        ratio = result[cmp.key]
        if cmp.target is None:
            verdict = "(no target)"
        else:
            sign = ">=" if cmp.higher_is_better else "<="
            ok = "met" if result[f"{cmp.key}_target_met"] else "MISSED"
            verdict = f"target {sign} {cmp.target:.2f}: {ok}"
        print(f"  {cmp.label:<39} {ratio:6.2f}   {verdict}")
    figures = {fig.key: fig for fig in FIGURES}
    printed = False
    for ceiling in CEILINGS:
        if ceiling.figure not in result:
            continue
        if not printed:
            print()
            printed = True
        fig = figures[ceiling.figure]
        ok = "met" if result[f"{ceiling.key}_target_met"] else "MISSED"
        value = format_value(result[ceiling.figure], fig.unit)
        print(f"  {ceiling.label:<39} {value:>12}   target {ceiling.sign} {ceiling.limit:g} {fig.unit}: {ok}")


# --------------------------------------------------------------------------- entry points


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark the tunnel against raw nats-py request/reply and pub/sub "
        "on a nats-server it starts itself (loopback, free port).",
        epilog="MB/s = 10**6 bytes/s. Figures are medians over the rounds (counts: sums); "
        "progress goes to stderr.",
    )
    parser.add_argument("--quick", action="store_true", help="few iterations (~10 s): a smoke check only")
    parser.add_argument("--json", action="store_true", help="print only one JSON object on stdout")
    parser.add_argument("--rounds", type=int, help="repeat every measurement this often (default 5, quick 3)")
    parser.add_argument(
        "--only",
        choices=("all", "raw", "tunnel", "http", "offline", "ws"),
        default="all",
        help="measure one group only: raw NATS, tunnel (fast and v1 mode), http (direct aiohttp vs httpx "
        "over the tunnel), offline (time to TunnelUnreachable vs raw no-responders) or ws (WebSocket "
        "direct vs through the tunnel and linkd's upstream proxy)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="write cProfile stats of both processes to DIR/requester.prof and DIR/responder.prof",
    )
    parser.add_argument("--role", choices=("main", "responder"), default="main", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.role == "responder" and not args.url:
        parser.error("--role responder needs --url")
    return args


def responder_main(url: str, profile_dir: Path | None) -> int:
    profiler = cProfile.Profile() if profile_dir is not None else None
    if profiler is not None:
        profiler.enable()
    try:
        asyncio.run(run_responder(url))
    finally:
        if profiler is not None and profile_dir is not None:
            profiler.disable()
            profiler.dump_stats(profile_dir / "responder.prof")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    if args.role == "responder":
        return responder_main(args.url, args.profile)
    settings = QUICK if args.quick else FULL
    if args.rounds is not None:
        settings = Settings(**{**settings.__dict__, "rounds": args.rounds})
    server: NatsServer | None = None
    try:
        server = NatsServer(NatsServerConfig(monitor_port=None))
        server.start()
        log(f"nats-server on {server.url}; {settings.rounds} rounds; responder in a separate process")
        samples, version = asyncio.run(run_benchmark(server.url, settings, args.only, args.profile))
    except (KeyboardInterrupt, asyncio.CancelledError):
        log("bench_tunnel: interrupted")
        return 130
    except (NatsServerError, BenchError, tunnel.TunnelError, nats.errors.Error, OSError) as exc:
        if INTERRUPTED.is_set():  # the server died of the same Ctrl-C: not a failure
            log("bench_tunnel: interrupted")
            return 130
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log(f"bench_tunnel: failed: {first_line}")
        return 1
    finally:
        if server is not None:
            server.close()
    result = summarize(samples)
    if args.json:
        meta = {
            "nats_server_version": version,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "rounds": settings.rounds,
            "quick": args.quick,
            "transfer_bytes": settings.transfer_bytes,
            "bulk_message_bytes": BULK_MESSAGE_BYTES,
            "small_bytes": SMALL_BYTES,
            "concurrency": settings.concurrency,
            "latency_requests": settings.latency_requests,
            "ws_messages": settings.ws_messages,
            "ws_message_bytes": len(WS_MESSAGE),
            "offline_tries": settings.offline_tries,
            "samples": samples,
        }
        print(json.dumps({**result, **meta}))
    else:
        mib = settings.transfer_bytes // (1024 * 1024)
        print_report(
            result,
            samples,
            f"tunnel vs raw nats-py - nats-server {version}, Python {platform.python_version()}, "
            f"{os.cpu_count()} CPUs, median of {settings.rounds} rounds; {settings.latency_requests} "
            f"sequential requests, {settings.concurrency} workers x {settings.concurrent_seconds:g} s, "
            f"{mib} MiB transfers, {settings.ws_messages} WebSocket messages per one-way/pipelined shape, "
            f"{settings.offline_tries} first contacts per offline figure",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
