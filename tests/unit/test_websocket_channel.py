"""``tunnel.websocket.WebSocketChannel`` over in-memory byte streams (no NATS, no sockets).

Back-pressure both ways (a sender waits while its frames are not taken, the reader stops
pulling while messages wait), close timing out to 1006, several receivers, a failed stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from wsproto.connection import SERVER, Connection
from wsproto.events import Ping

from tests.helpers import wait_until
from tunnel.websocket import BATCH_BYTES, WebSocketChannel, WebSocketClosed, WebSocketMessage


class Pipe:
    """Bytes one end writes and the other reads, counting what the reader pulled."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()
        self.pulled = 0

    async def reader(self) -> AsyncIterator[bytes]:
        while True:
            item = await self.queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            self.pulled += 1
            yield item


async def pump(source: AsyncIterator[bytes], pipe: Pipe) -> None:
    async for data in source:
        pipe.queue.put_nowait(data)
    pipe.queue.put_nowait(None)


def connected() -> tuple[WebSocketChannel, WebSocketChannel, list[asyncio.Task[None]]]:
    client, server = WebSocketChannel(client=True), WebSocketChannel(client=False)
    up, down = Pipe(), Pipe()
    client.start(down.reader())
    server.start(up.reader())
    loop = asyncio.get_running_loop()
    tasks = [
        loop.create_task(pump(client.outbound.chunks(), up)),
        loop.create_task(pump(server.outbound.chunks(), down)),
    ]
    return client, server, tasks


async def test_messages_both_ways_and_the_close_handshake() -> None:
    client, server, tasks = connected()
    await client.send_text("hi")
    assert await server.receive() == WebSocketMessage("text", "hi")
    await server.send_bytes(b"\x01")
    assert await client.receive() == WebSocketMessage("binary", b"\x01")
    await client.close(4000, "done", timeout=5)
    assert (client.close_code, client.close_reason) == (4000, "done")
    with pytest.raises(WebSocketClosed) as info:
        await server.receive()
    assert (info.value.code, info.value.reason) == (4000, "done")
    await asyncio.gather(*tasks)
    assert client.reader_done.is_set()


async def test_several_receivers_all_hear_the_close() -> None:
    client, server, tasks = connected()
    receivers = [asyncio.create_task(client.receive()) for _ in range(3)]
    await server.send_text("one")
    await server.close(1001, timeout=5)
    results = await asyncio.gather(*receivers, return_exceptions=True)
    assert [r for r in results if isinstance(r, WebSocketMessage)] == [WebSocketMessage("text", "one")]
    closed = [r for r in results if isinstance(r, WebSocketClosed)]
    assert len(closed) == 2 and all(c.code == 1001 for c in closed)
    await asyncio.gather(*tasks)


async def test_a_sender_waits_while_its_frames_are_not_taken() -> None:
    channel = WebSocketChannel(client=True, send_high_water=1000)
    channel.start(Pipe().reader())
    await channel.send_bytes(b"x" * 1500)  # admitted: the queue was below its mark
    blocked = asyncio.create_task(channel.send_bytes(b"y"))
    await wait_until(lambda: channel._send_lock.locked())
    assert not blocked.done()
    chunks = channel.outbound.chunks()
    assert len(await anext(chunks)) > 1500  # taking the frame frees the queue
    await asyncio.wait_for(blocked, 5)
    assert await anext(chunks)
    await channel.abort()


async def test_the_reader_stops_pulling_while_messages_wait() -> None:
    server = WebSocketChannel(client=False)
    client = WebSocketChannel(client=True, receive_high_water=10_000)
    pipe = Pipe()
    client.start(pipe.reader())
    for _ in range(100):
        await server.send_bytes(b"z" * 1000)
    chunks = server.outbound.chunks()
    wire = b""
    while len(wire) < 100 * 1004:  # 100 frames of 1000 bytes (4-byte header each); batched on the way
        wire += await anext(chunks)
    assert len(wire) == 100 * 1004
    for i in range(100):  # fed to the reader one frame per piece
        pipe.queue.put_nowait(wire[i * 1004 : (i + 1) * 1004])
    await wait_until(lambda: pipe.pulled == 10)
    assert client.buffered == 10_000
    assert pipe.queue.qsize() == 90, "the reader waits for receive() before pulling more"
    for _ in range(100):
        assert await client.receive() == WebSocketMessage("binary", b"z" * 1000)
    assert pipe.pulled == 100
    await client.abort()


async def test_close_without_an_answer_is_1006_after_the_timeout() -> None:
    channel = WebSocketChannel(client=True)
    channel.start(Pipe().reader())  # the peer never says anything
    await channel.close(1000, timeout=0.05)
    assert channel.close_code == 1006
    with pytest.raises(WebSocketClosed) as info:
        await channel.receive()
    assert info.value.code == 1006
    await channel.abort()


async def test_a_failed_stream_is_1006_with_the_failure_as_cause() -> None:
    channel = WebSocketChannel(client=True)
    pipe = Pipe()
    channel.start(pipe.reader())
    failure = ConnectionResetError("gone")
    pipe.queue.put_nowait(failure)
    with pytest.raises(WebSocketClosed) as info:
        await channel.receive()
    assert info.value.code == 1006
    assert info.value.__cause__ is failure
    with pytest.raises(WebSocketClosed):
        await channel.send_text("late")


async def test_pings_from_a_peer_that_does_not_read_do_not_grow_the_queue() -> None:
    channel = WebSocketChannel(client=True, send_high_water=1000)
    pipe = Pipe()
    channel.start(pipe.reader())
    peer = Connection(SERVER)
    for _ in range(1000):  # nobody takes our frames: the pongs pile up to the limit only
        pipe.queue.put_nowait(peer.send(Ping(payload=b"p" * 100)))
    await wait_until(lambda: pipe.pulled == 1000)
    assert channel.outbound.buffered < 2 * 1000 + 200
    assert channel.outbound.buffered > 1000, "pings were answered while there was room"
    await channel.abort()


async def test_a_burst_of_small_messages_leaves_as_one_piece() -> None:
    """Queued frames are handed to the tunnel together: one data frame (one NATS message) for a
    burst, not one per WebSocket message; a batch never exceeds BATCH_BYTES."""
    server = WebSocketChannel(client=False)
    for _ in range(100):
        await server.send_text("hi")
    chunks = server.outbound.chunks()
    first = await anext(chunks)
    assert len(first) == 100 * 4  # 100 frames: 2-byte header + "hi"
    for _ in range(40):
        await server.send_bytes(b"x" * 4000)
    sizes = [len(await anext(chunks)) for _ in range(3)]
    assert all(size <= BATCH_BYTES for size in sizes) and sum(sizes) == 40 * 4004
    await server.abort()
