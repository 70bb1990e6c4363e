"""Small body pieces that are ready at once travel together, through a real nats-server, in
both directions; pieces that come with waits between them are never held back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import tunnel
from cli.nats_server import NatsServer
from tests.integration.tunnel_harness import EVENT_TIMEOUT, WireLog, connect_peers, serving
from tunnel import _frames as frames

HOST = "chatty.example"
PIECE = bytes(range(256)) * 4  # 1 KiB
PIECES = 4096  # 4 MiB in 1 KiB pieces


async def chatty() -> AsyncIterator[bytes]:
    for i in range(PIECES):
        yield PIECE[i % 256 :] + PIECE[: i % 256]  # every piece different, same size


EXPECTED = b"".join([PIECE[i % 256 :] + PIECE[: i % 256] for i in range(PIECES)])


async def answer(request: tunnel.Request) -> tunnel.Response:
    if request.path == "/chatty":
        return tunnel.Response(200, [], chatty())
    received = bytearray()
    async for chunk in request.stream():
        received += chunk
    return tunnel.Response(200, [], b"same" if bytes(received) == EXPECTED else b"different")


def data_frames(wire: WireLog) -> list[frames.ResponseChunk | frames.RequestChunk]:
    return [fr for fr in wire.frames() if isinstance(fr, frames.ResponseChunk | frames.RequestChunk)]


async def test_a_chatty_response_goes_in_frames_of_up_to_64_kib(nats_server: NatsServer) -> None:
    wire = WireLog()
    async with connect_peers(nats_server) as peers, serving(peers.server_nc, HOST, answer, wire_tap=wire):
        client = tunnel.TunnelClient(peers.caller_nc)
        async with await client.fetch(f"tunnel://{HOST}/chatty") as resp:
            assert await resp.read() == EXPECTED
        await client.aclose()
    sizes = [len(fr.data) for fr in data_frames(wire)]
    assert len(sizes) <= PIECES // 32, f"{len(sizes)} frames for {PIECES} pieces"  # 64 with 64 KiB
    assert max(sizes) <= 64 * 1024 and sum(sizes) == len(EXPECTED)


async def test_a_chatty_upload_goes_in_frames_of_up_to_64_kib(nats_server: NatsServer) -> None:
    wire = WireLog()
    async with connect_peers(nats_server) as peers, serving(peers.server_nc, HOST, answer):
        client = tunnel.TunnelClient(peers.caller_nc, wire_tap=wire)
        async with await client.fetch(f"tunnel://{HOST}/upload", method="PUT", body=chatty()) as resp:
            assert await resp.read() == b"same"
        await client.aclose()
    sizes = [len(fr.data) for fr in data_frames(wire)]
    assert len(sizes) <= PIECES // 32, f"{len(sizes)} frames for {PIECES} pieces"
    assert max(sizes) <= 64 * 1024 and sum(sizes) == len(EXPECTED)


async def test_events_with_waits_between_them_are_each_delivered_before_the_next_exists(
    nats_server: NatsServer,
) -> None:
    """Server-sent-events shape: the handler makes event n+1 only after the caller read event n."""
    read: list[asyncio.Event] = [asyncio.Event() for _ in range(5)]

    async def events() -> AsyncIterator[bytes]:
        for n in range(5):
            yield f"data: {n}\n\n".encode()
            await read[n].wait()

    async def sse(request: tunnel.Request) -> tunnel.Response:
        return tunnel.Response(200, [("content-type", "text/event-stream")], events())

    async with connect_peers(nats_server) as peers, serving(peers.server_nc, HOST, sse):
        client = tunnel.TunnelClient(peers.caller_nc)
        async with await client.fetch(f"tunnel://{HOST}/events") as resp:
            chunks = resp.aiter_bytes()
            for n in range(5):
                chunk = await asyncio.wait_for(anext(chunks), EVENT_TIMEOUT)
                assert chunk == f"data: {n}\n\n".encode()
                read[n].set()
        await client.aclose()
