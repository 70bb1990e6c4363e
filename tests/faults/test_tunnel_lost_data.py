"""Lost data at the tail of a window: a whole window of body frames vanishes on a reconnect blip.

Sequence numbers catch a lost data frame as soon as a later one arrives (tests/integration/
test_tunnel_faults.py). But when *every* frame the sender was allowed to send is lost -- a
daemon's connection reset with a window's worth of frames in flight, as the reset scenario of
tests/faults/test_tunnel_chaos.py does -- no later frame ever comes: the sender has spent its
credit, the receiver got nothing, so it grants nothing new, and both wait. Heartbeats keep the
caller's idle timeout ("the peer is gone") from firing, so before the fix the stream sat:

- download: since grants are cumulative and re-sent on every heartbeat (ffce352), each re-sent,
  unchanged limit restarts the server's credit-stall clock (``ServerStream.receive`` on
  ``RequestCredit``), so the stall timeout never fires either: the request hangs until the
  caller's overall deadline, and forever without one (the default);
- upload: the server waits for body bytes until its stall timeout (60 s by default) while the
  caller waits for credit.

What a caller is promised (DESIGN.md: "no silent loss"; "liveness, not guesswork") is that a
loss is detected: the request ends with a typed error within its idle timeout plus a second.
The protocol does it with sequence numbers on the quiet path too: a server heartbeat carries
how many response chunks the server published, and a caller stuck on credit answers a heartbeat
with how many request chunks it published (``seq`` on ``request.credit``), so the receiver that
is behind fails the request with ``tunnel_protocol_error`` at once; and a re-sent credit limit
that grants nothing new no longer restarts the server's credit-stall clock.
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
from tests.helpers import wait_until
from tunnel._events import Publish
from tunnel._frames import BINARY_HEADER_SIZE

MiB: Final = 1024 * 1024
BODY: Final = bytes(range(256)) * (8 * MiB // 256)
IDLE: Final = 1.0
# A healthy 8 MiB transfer takes ~0.1 s on loopback; the promise is idle timeout + 1 s.
BOUND: Final = IDLE + 1.0 + 1.0
# Binary data frames: 0x00, then kind 1 (request.chunk) or 2 (response.chunk).
REQUEST_CHUNK: Final = b"\x00\x01"
RESPONSE_CHUNK: Final = b"\x00\x02"


class DropFirstWindow:
    """Wire tap: drops data frames of one kind until a whole flow-control window is gone."""

    def __init__(self, kind: bytes, window: int = tunnel.DEFAULT_WINDOW) -> None:
        self.kind = kind
        self.window = window
        self.dropped_bytes = 0

    def __call__(self, pub: Publish) -> Iterable[Publish]:
        if pub.payload[:2] == self.kind and self.dropped_bytes < self.window:
            self.dropped_bytes += len(pub.payload) - BINARY_HEADER_SIZE
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
async def test_a_lost_window_of_body_frames_ends_the_request_within_the_idle_timeout(
    nats_server: NatsServer, direction: str
) -> None:
    tap = DropFirstWindow(RESPONSE_CHUNK if direction == "download" else REQUEST_CHUNK)
    async with _connected(nats_server.url) as server_nc, _connected(nats_server.url) as client_nc:
        server = await tunnel.serve(
            server_nc, "lost-window.test", _handler, wire_tap=tap if direction == "download" else None
        )
        client = tunnel.TunnelClient(
            client_nc, timeouts=tunnel.Timeouts(idle=IDLE), wire_tap=tap if direction == "upload" else None
        )

        async def transfer() -> None:
            if direction == "download":
                async with await client.fetch("tunnel://lost-window.test/") as resp:
                    assert await resp.read() == BODY  # success must mean the right bytes
            else:
                async with await client.fetch("tunnel://lost-window.test/", method="POST", body=BODY) as resp:
                    assert await resp.text() == hashlib.sha256(BODY).hexdigest()

        try:
            with pytest.raises(tunnel.RemoteProtocolError, match="data lost") as caught:
                try:
                    await asyncio.wait_for(transfer(), BOUND)
                except TimeoutError:
                    pytest.fail(
                        f"the {direction} was still waiting {BOUND:g} s after losing a window of data"
                    )
            assert caught.value.code == "tunnel_protocol_error"
            assert tap.dropped_bytes >= tunnel.DEFAULT_WINDOW
            # The server side is gone too: nothing left in flight on either end.
            await wait_until(lambda: server.in_flight == 0 and client.in_flight == 0, timeout=5.0)
        finally:
            await client.aclose()
            await server.close(timeout=0.5)


class DropRequestEnd:
    """Wire tap: drops the caller's ``request.end`` frames (every chunk still goes through)."""

    def __init__(self) -> None:
        self.dropped = 0

    def __call__(self, pub: Publish) -> Iterable[Publish]:
        if b'"type":"request.end"' in pub.payload[:200]:
            self.dropped += 1
            return []
        return [pub]


@pytest.mark.parametrize("size", [10, 3 * MiB])
async def test_a_lost_request_end_alone_is_repaired_and_the_request_succeeds(
    nats_server: NatsServer, size: int
) -> None:
    """Every chunk arrived but the end did not: the caller's answer to a heartbeat says it
    published the end after ``seq`` chunks, so the server ends the body itself. Before, the
    handler waited for the end until the server's stall timeout (60 s) and the request failed."""
    tap = DropRequestEnd()
    body = BODY[:size]

    async def streamed() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 64 * 1024):
            yield body[i : i + 64 * 1024]

    async with _connected(nats_server.url) as server_nc, _connected(nats_server.url) as client_nc:
        server = await tunnel.serve(
            server_nc, "lost-end.test", _handler, config=tunnel.ServerConfig(stall_timeout=30.0)
        )
        client = tunnel.TunnelClient(client_nc, timeouts=tunnel.Timeouts(idle=IDLE), wire_tap=tap)
        try:

            async def upload() -> str:
                async with await client.fetch(
                    "tunnel://lost-end.test/", method="POST", body=streamed()
                ) as resp:
                    assert resp.status == 200
                    return await resp.text()

            try:
                digest = await asyncio.wait_for(upload(), BOUND)
            except TimeoutError:
                pytest.fail(f"the upload was still waiting {BOUND:g} s after losing its end frame")
            assert digest == hashlib.sha256(body).hexdigest()
            assert tap.dropped == 1
            await wait_until(lambda: server.in_flight == 0 and client.in_flight == 0, timeout=5.0)
        finally:
            await client.aclose()
            await server.close(timeout=0.5)


class DropResponseEnd:
    """Server wire tap: drops its first ``response.end`` (the body itself goes through)."""

    def __init__(self) -> None:
        self.dropped = 0

    def __call__(self, pub: Publish) -> Iterable[Publish]:
        if not self.dropped and b'"type":"response.end"' in pub.payload[:200]:
            self.dropped += 1
            return []
        return [pub]


async def test_a_lost_response_end_is_sent_again_when_the_caller_probes_the_silence(
    nats_server: NatsServer,
) -> None:
    """The whole body arrived, its end did not: after two heartbeat intervals of silence the
    caller probes, the server (which remembers the final frame of a finished request) sends
    the end again, and the download completes, instead of failing on the idle timeout."""
    tap = DropResponseEnd()
    async with _connected(nats_server.url) as server_nc, _connected(nats_server.url) as client_nc:
        server = await tunnel.serve(server_nc, "lost-response-end.test", _handler, wire_tap=tap)
        client = tunnel.TunnelClient(client_nc, timeouts=tunnel.Timeouts(idle=IDLE))
        try:

            async def download() -> tuple[bytes, float]:
                """The body, and how long the silence after its last chunk lasted."""
                loop = asyncio.get_running_loop()
                chunks: list[bytes] = []
                last_chunk_at = loop.time()
                async with await client.fetch("tunnel://lost-response-end.test/") as resp:
                    async for chunk in resp.aiter_bytes():
                        chunks.append(chunk)
                        last_chunk_at = loop.time()
                return b"".join(chunks), loop.time() - last_chunk_at

            try:
                body, silence = await asyncio.wait_for(download(), BOUND)
            except tunnel.IdleTimeout:
                pytest.fail("the caller gave up on the idle timeout instead of probing")
            assert body == BODY
            assert tap.dropped == 1 and server.stats.repeated_finals == 1
            # Repaired (probe after two heartbeat intervals, ~0.67 s) before the idle timeout would
            # have fired: timed from the last chunk, where the silence began, not from the fetch,
            # so a slow 8 MiB transfer on a loaded machine does not eat the 0.33 s to spare.
            assert silence < IDLE, f"the end came {silence:.2f} s after the last chunk"
            await wait_until(lambda: server.in_flight == 0 and client.in_flight == 0, timeout=5.0)
        finally:
            await client.aclose()
            await server.close(timeout=0.5)
