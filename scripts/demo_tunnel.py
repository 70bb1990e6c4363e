#!/usr/bin/env python3
"""A guided tour of the tunnel library alone on a local nats-server (`linkctl demo` is the whole stack).

Why this exists: one command that shows on a fresh machine that the pieces work
together, a real nats-server, a handler serving a hostname on one NATS connection
and a caller fetching ``tunnel://`` URLs over another, and what each step costs.
Each step prints one human-readable line. Any failure prints one line (no stack
trace for the expected ones, such as a missing nats-server binary) and exits
non-zero, so the command is also a quick health check.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import nats
from nats.aio.client import Client as NATS

import tunnel
from cli.nats_server import NatsServer, NatsServerConfig, NatsServerError, NatsServerNotFound

DEMO_HOST = "demo.local"
# Nobody serves this one: the caller must learn that in milliseconds, not after a timeout.
OFFLINE_HOST = "offline.local"
STREAM_CHUNKS = 5
# Pause between streamed chunks, so the output shows them arriving one by one.
STREAM_INTERVAL = 0.02
ECHO_BYTES = 1024 * 1024
# Every fetch is bounded so a broken setup fails with a message instead of hanging.
FETCH_TIMEOUT = 10.0


class DemoError(Exception):
    """A step did not do what it should; the message is the one line the user sees."""


def say(message: str) -> None:
    print(message, flush=True)


def human_size(n: int) -> str:
    """1048576 -> '1.0 MiB': the demo talks to people, not to scripts."""
    if n < 1024:
        return f"{n} bytes"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n / (1024 * 1024):.1f} MiB"


def elapsed_ms(since: float) -> float:
    return (time.perf_counter() - since) * 1000


# --------------------------------------------------------------------------- the served side


async def _numbered_chunks() -> AsyncIterator[bytes]:
    """A body produced over time (think: log lines, a long computation's progress)."""
    for i in range(1, STREAM_CHUNKS + 1):
        yield f"chunk {i} of {STREAM_CHUNKS}\n".encode()
        if i < STREAM_CHUNKS:
            await asyncio.sleep(STREAM_INTERVAL)


async def demo_handler(req: tunnel.Request) -> tunnel.Response:
    """What a desktop would serve: a JSON greeting, a streamed body and a streaming echo."""
    if req.method == "GET" and req.path == "/hello":
        greeting = {"greeting": f"hello from {req.hostname}", "method": req.method, "path": req.path}
        return tunnel.Response(200, [("content-type", "application/json")], json.dumps(greeting))
    if req.method == "GET" and req.path == "/stream":
        return tunnel.Response(200, [("content-type", "text/plain")], _numbered_chunks())
    if req.method == "POST" and req.path == "/echo":
        # The request body streams straight back: nothing is buffered whole on this side.
        content_type = req.header("content-type", "application/octet-stream") or "application/octet-stream"
        return tunnel.Response(200, [("content-type", content_type)], req.stream())
    return tunnel.Response(404, [("content-type", "text/plain")], f"no route for {req.method} {req.path}")


# --------------------------------------------------------------------------- the calling side


async def step_hello(client: tunnel.TunnelClient) -> None:
    started = time.perf_counter()
    async with await client.fetch(f"tunnel://{DEMO_HOST}/hello", timeout=FETCH_TIMEOUT) as resp:
        body = await resp.json()
    took = elapsed_ms(started)
    if resp.status != 200 or body.get("greeting") != f"hello from {DEMO_HOST}":
        raise DemoError(f"GET /hello answered {resp.status} {body!r}")
    say(f"GET /hello -> {resp.status} {resp.reason or 'OK'} in {took:.1f} ms: {json.dumps(body)}")


async def step_stream(client: tunnel.TunnelClient) -> None:
    started = time.perf_counter()
    chunks: list[bytes] = []
    first_ms = 0.0
    async with await client.fetch(f"tunnel://{DEMO_HOST}/stream", timeout=FETCH_TIMEOUT) as resp:
        async for chunk in resp.aiter_bytes():
            if not chunks:
                first_ms = elapsed_ms(started)
            chunks.append(chunk)
    took = elapsed_ms(started)
    text = b"".join(chunks).decode()
    expected = "".join(f"chunk {i} of {STREAM_CHUNKS}\n" for i in range(1, STREAM_CHUNKS + 1))
    if resp.status != 200 or text != expected:
        raise DemoError(f"GET /stream answered {resp.status} with {text!r}")
    say(
        f"GET /stream -> {resp.status}, streamed {len(chunks)} chunks ({len(text)} bytes) as the handler "
        f"produced them: first after {first_ms:.1f} ms, last after {took:.1f} ms"
    )


async def step_echo(client: tunnel.TunnelClient) -> None:
    payload = os.urandom(ECHO_BYTES)
    digest = hashlib.sha256(payload).hexdigest()
    started = time.perf_counter()
    received = hashlib.sha256()
    size = 0
    async with await client.fetch(
        f"tunnel://{DEMO_HOST}/echo",
        method="POST",
        headers=[("content-type", "application/octet-stream")],
        body=payload,
        timeout=FETCH_TIMEOUT,
    ) as resp:
        async for chunk in resp.aiter_bytes():
            received.update(chunk)
            size += len(chunk)
    took = elapsed_ms(started)
    if resp.status != 200 or received.hexdigest() != digest:
        raise DemoError(
            f"POST /echo answered {resp.status} with {size} bytes that do not match what was sent"
        )
    say(
        f"POST /echo of {human_size(ECHO_BYTES)} -> {resp.status}, echoed back and verified by sha256 "
        f"({digest[:12]}...) in {took:.1f} ms"
    )


async def step_offline(client: tunnel.TunnelClient) -> None:
    started = time.perf_counter()
    try:
        resp = await client.fetch(f"tunnel://{OFFLINE_HOST}/", timeout=FETCH_TIMEOUT)
    except tunnel.TunnelUnreachable as exc:
        say(f"GET tunnel://{OFFLINE_HOST}/ -> {exc.code} in {elapsed_ms(started):.0f} ms (nobody serves it)")
        return
    except tunnel.TunnelError as exc:
        raise DemoError(
            f"fetch to an offline host failed with {exc.code}, expected tunnel_unreachable"
        ) from exc
    await resp.aclose()
    raise DemoError(f"fetch to an offline host answered {resp.status}; something is serving {OFFLINE_HOST}")


# --------------------------------------------------------------------------- orchestration


async def _connect(url: str, name: str) -> NATS:
    async def quiet(exc: Exception) -> None:  # nats-py would log a traceback; we report ourselves
        pass

    return await nats.connect(url, name=name, allow_reconnect=False, error_cb=quiet)


async def run_demo(url: str) -> None:
    """Serve on one connection and call on another, as a desktop and a gateway would."""
    server_nc = await _connect(url, "demo-desktop")
    caller_nc: NATS | None = None
    server: tunnel.TunnelServer | None = None
    try:
        server = await tunnel.serve(server_nc, DEMO_HOST, demo_handler)
        subjects = server.subjects.all_subjects
        say(f"serving tunnel://{DEMO_HOST} on its own NATS connection (subjects {subjects})")
        caller_nc = await _connect(url, "demo-caller")
        async with tunnel.TunnelClient(caller_nc) as client:
            await step_hello(client)
            await step_stream(client)
            await step_echo(client)
            await step_offline(client)
        stats = server.stats
        await server.close(timeout=2.0)
        server = None
        say(
            f"tunnel server stopped: {stats.requests} requests, {stats.completed} completed, "
            f"{stats.handler_errors} handler errors, {human_size(stats.bytes_in)} in, "
            f"{human_size(stats.bytes_out)} out (with framing)"
        )
    finally:
        if server is not None:
            await server.close(timeout=1.0)
        if caller_nc is not None:
            await caller_nc.close()
        await server_nc.close()


def start_nats_server(binary: str | None) -> NatsServer:
    """A private nats-server on a free loopback port (monitoring off: the demo does not need it)."""
    if binary is not None and not (Path(binary).is_file() and os.access(binary, os.X_OK)):
        raise NatsServerNotFound(f"nats-server binary not found or not executable: {binary}")
    server = NatsServer(NatsServerConfig(monitor_port=None), binary=binary)
    server.start()
    return server


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=f"Demo of the tunnel: start a nats-server, serve tunnel://{DEMO_HOST}, fetch "
        "through it (JSON, a streamed body, a 1 MiB echo, an offline host) and tear everything down.",
        epilog="Exit status 0 when every step worked; otherwise one line on stderr and status 1.",
    )
    parser.add_argument(
        "--nats-server",
        metavar="PATH",
        help="nats-server binary to run (default: the one installed next to this Python, then PATH)",
    )
    return parser.parse_args(argv)


def fail(message: str) -> int:
    print(f"demo failed: {message}", file=sys.stderr, flush=True)
    return 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    say("natslink tunnel demo")
    nats_server: NatsServer | None = None
    try:
        nats_server = start_nats_server(args.nats_server)
        say(f"nats-server started on {nats_server.url} (pid {nats_server.pid})")
        asyncio.run(run_demo(nats_server.url))
    except KeyboardInterrupt:
        return fail("interrupted")
    except NatsServerError as exc:
        return fail(str(exc).splitlines()[0])
    except tunnel.TunnelError as exc:
        return fail(f"{exc.code}: {exc.message}")
    except (DemoError, nats.errors.Error, OSError) as exc:
        return fail(str(exc) or type(exc).__name__)
    finally:
        if nats_server is not None:
            nats_server.close()
    say("nats-server stopped; demo finished: every step worked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
