"""Lost flow-control credit: core NATS drops what a reconnecting peer misses, credit included.

A daemon whose connection blips (reset, reconnect in 100 ms) loses every frame the caller
sent meanwhile. Lost *data* frames are caught by sequence numbers (tests/integration/
test_tunnel_faults.py). Lost *credit* frames were not: credit used to be incremental, so each
lost grant shrank the sender's window for good, and once the lost grants add up to the window
the sender waited for credit the receiver believed it gave, while the receiver waited for data.
Heartbeats kept flowing, so the caller's idle timeout ("the peer is gone") never fired,
and the request sat until the server's stall timeout (60 s by default).

Found by the reset scenario of tests/faults/test_tunnel_chaos.py (which runs the daemon with
a 2 s stall timeout to stay short), and fixed by making grants cumulative limits that are
repeated while the receiver is idle. These tests drop exactly two grants with a wire tap and
assert what a caller is promised: the request ends -- completes with the right bytes, or
fails with a typed error -- within its idle timeout plus a second, not after a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Iterable
from typing import Final

import nats
import pytest
from nats.aio.client import Client

import tunnel
from cli.nats_server import NatsServer
from tunnel import _codec as codec
from tunnel._events import Publish
from tunnel._subjects import parse_request_subject

MiB: Final = 1024 * 1024
BODY: Final = bytes(range(256)) * (8 * MiB // 256)
IDLE: Final = 1.0
# A healthy 8 MiB transfer takes ~0.1 s on loopback; the promise is idle timeout + 1 s.
BOUND: Final = IDLE + 1.0 + 1.0


class DropCredits:
    """Wire tap: drops the first ``count`` credit frames of one type, passes everything else."""

    def __init__(self, frame_type: str, count: int) -> None:
        self.frame_type = frame_type
        self.count = count
        self.dropped = 0

    def __call__(self, pub: Publish) -> Iterable[Publish]:
        parsed = parse_request_subject(pub.subject, tunnel.DEFAULT_PREFIX)
        if parsed is None or pub.payload[:1] != b"{":
            return [pub]
        frame = codec.decode_frame(pub.payload, parsed[1])
        if frame.type == self.frame_type and self.dropped < self.count:
            self.dropped += 1
            return []
        return [pub]


async def _pieces() -> AsyncIterator[bytes]:
    for i in range(0, len(BODY), 64 * 1024):
        yield BODY[i : i + 64 * 1024]


async def _handler(req: tunnel.Request) -> tunnel.Response:
    if req.method == "POST":
        return tunnel.Response(200, [], hashlib.sha256(await req.read()).hexdigest())
    return tunnel.Response(200, [], _pieces())


@contextlib.asynccontextmanager
async def _connected(url: str) -> AsyncIterator[Client]:
    nc = await nats.connect(url)
    try:
        yield nc
    finally:
        await nc.close()


@pytest.mark.parametrize("direction", ["download", "upload"])
async def test_lost_credit_frames_do_not_stall_a_transfer_past_the_idle_timeout(
    nats_server: NatsServer, direction: str
) -> None:
    # Download: the caller's request.credit grants are lost; upload: the server's response.credit.
    tap = DropCredits("request.credit" if direction == "download" else "response.credit", count=2)
    async with _connected(nats_server.url) as server_nc, _connected(nats_server.url) as client_nc:
        server = await tunnel.serve(
            server_nc, "lost-credit.test", _handler, wire_tap=tap if direction == "upload" else None
        )
        client = tunnel.TunnelClient(
            client_nc, timeouts=tunnel.Timeouts(idle=IDLE), wire_tap=tap if direction == "download" else None
        )

        async def transfer() -> None:
            if direction == "download":
                async with await client.fetch("tunnel://lost-credit.test/") as resp:
                    assert await resp.read() == BODY  # success must mean the right bytes
            else:
                async with await client.fetch("tunnel://lost-credit.test/", method="POST", body=BODY) as resp:
                    assert await resp.text() == hashlib.sha256(BODY).hexdigest()

        try:
            try:
                await asyncio.wait_for(transfer(), BOUND)
            except tunnel.TunnelError:
                pass  # a typed failure within the bound keeps the promise too
            except TimeoutError:
                pytest.fail(f"the {direction} was still waiting {BOUND:g} s later, with heartbeats flowing")
            assert tap.dropped == 2
        finally:
            await client.aclose()
            await server.close(timeout=0.5)
