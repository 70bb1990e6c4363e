"""Finished requests are freed at once, not left to the cyclic garbage collector.

A reference cycle per request (the server's request object and the handler's ``Request``
holding each other through a callback; a stream timer and its owner) made every request's
dozen objects wait for a collection: ~10% of a small request's CPU went to collecting them,
and the collections that promoted them grew into millisecond pauses. ``gc.collect()``
returns how many unreachable objects it found: after requests of every shape it must find
(almost) none.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Iterator

import pytest

import tunnel
from cli.nats_server import NatsServer
from tests.integration.tunnel_harness import KiB, connect_peers, serving

HOST = "garbage.example"
REQUESTS = 60


async def handler(req: tunnel.Request) -> tunnel.Response:
    if req.path == "/stream":

        async def pieces() -> AsyncIterator[bytes]:
            for _ in range(8):
                yield bytes(16 * KiB)

        return tunnel.Response(200, [], pieces())
    if req.path == "/upload":
        return tunnel.Response(200, [], str(len(await req.read())).encode())
    return tunnel.Response(200, [("content-type", "text/plain")], b"small")


@pytest.fixture
def collector_paused() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.mark.parametrize("shape", ["small", "stream", "upload"])
async def test_requests_leave_no_reference_cycles(
    nats_server: NatsServer, collector_paused: None, shape: str
) -> None:
    async with connect_peers(nats_server) as p, serving(p.server_nc, HOST, handler):
        client = tunnel.TunnelClient(p.caller_nc)

        async def one() -> bytes:
            if shape == "upload":
                resp = await client.fetch(f"tunnel://{HOST}/upload", method="POST", body=bytes(100 * KiB))
            else:
                resp = await client.fetch(f"tunnel://{HOST}/{shape}")
            return await resp.read()

        for _ in range(5):  # warm: caches, lazily built objects
            await one()
        await asyncio.sleep(0)
        gc.collect()
        for _ in range(REQUESTS):
            body = await one()
            assert body == {"small": b"small", "stream": bytes(128 * KiB), "upload": b"102400"}[shape]
        unreachable = gc.collect()
        await client.aclose()
    # Before the fix: ~13 per request. A few stray ones (asyncio's own) are not per request.
    assert unreachable < REQUESTS // 4, unreachable
    assert p.errors == []
