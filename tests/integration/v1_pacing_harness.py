"""A plain v1 caller that reads a big response slowly, for the pacing tests.

A real reference v1 caller has no flow control: it can only read as fast as it reads. Here our
own caller in v1 mode (``fast_path=False``) plays it, throttled to a byte rate by the test.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from nats.aio.client import Client as NATS

import tunnel

PIECE = 1024 * 1024


def pattern(i: int) -> bytes:
    return i.to_bytes(4, "big") * (PIECE // 4)


@dataclass
class Transfer:
    received: int = 0
    generated: int = 0
    max_ahead: int = 0  # produced by the handler, not yet received by the caller
    digest_ok: bool = False


def big_body_handler(total: int, transfer: Transfer) -> tunnel.Handler:
    async def handler(request: tunnel.Request) -> tunnel.Response:
        async def body() -> AsyncIterator[bytes]:
            for i in range(total // PIECE):
                transfer.generated += PIECE
                transfer.max_ahead = max(transfer.max_ahead, transfer.generated - transfer.received)
                yield pattern(i)

        return tunnel.Response(200, [("content-type", "application/octet-stream")], body())

    return handler


async def read_slowly(nc: NATS, url: str, total: int, rate: float, transfer: Transfer) -> None:
    """Fetch as a plain v1 caller and read at ``rate`` bytes per second (the workload, not a wait)."""
    client = tunnel.TunnelClient(nc, fast_path=False, timeouts=tunnel.Timeouts(idle=5.0))
    expected, got = hashlib.sha256(), hashlib.sha256()
    for i in range(total // PIECE):
        expected.update(pattern(i))
    loop = asyncio.get_running_loop()
    began = loop.time()
    async with await client.fetch(url) as resp:
        async for chunk in resp.aiter_bytes():
            got.update(chunk)
            transfer.received += len(chunk)
            behind = began + transfer.received / rate - loop.time()
            if behind > 0:
                await asyncio.sleep(behind)  # this reader's speed limit
    transfer.digest_ok = got.digest() == expected.digest() and transfer.received == total
    await client.aclose()
