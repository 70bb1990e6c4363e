"""``Request.stream()``: the request body as a handler reads it, cancel-safe (no NATS needed)."""

from __future__ import annotations

import asyncio

import pytest

from tunnel import RemoteProtocolError, Request


class Consumed:
    """Records what the request reported as consumed (what the server would grant credit for)."""

    def __init__(self, block: asyncio.Event | None = None) -> None:
        self.total = 0
        self.block = block

    async def __call__(self, n: int) -> None:
        self.total += n
        if self.block is not None:
            await self.block.wait()  # a credit publish that takes a while


def make_request(on_consumed: Consumed) -> Request:
    return Request(
        request_id="r1",
        hostname="desk.example",
        method="POST",
        url="/upload",
        headers=[],
        has_body=True,
        deadline=None,
        on_consumed=on_consumed,
    )


async def test_a_read_cancelled_while_waiting_loses_nothing() -> None:
    consumed = Consumed()
    request = make_request(consumed)
    reader = request.stream()
    request._feed(b"one ")
    assert await anext(reader) == b"one "
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(anext(reader), 0.01)  # nothing there yet: the read times out
    request._feed(b"two ")
    request._feed(b"three")
    request._end()
    assert b"".join([chunk async for chunk in reader]) == b"two three"
    assert consumed.total == len(b"one two three")


async def test_a_read_cancelled_while_its_credit_goes_out_keeps_its_chunk() -> None:
    release = asyncio.Event()
    consumed = Consumed(block=release)
    request = make_request(consumed)
    reader = request.stream()
    request._feed(b"first")
    request._feed(b"second")
    request._end()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(anext(reader), 0.01)  # cancelled inside the credit publish
    release.set()
    assert [chunk async for chunk in reader] == [b"first", b"second"]
    assert consumed.total == len(b"firstsecond")  # "first" was counted once, not twice


async def test_many_timed_out_reads_still_deliver_the_whole_body_in_order() -> None:
    request = make_request(Consumed())
    reader = request.stream()
    expected = [bytes([i]) * 10 for i in range(20)]

    async def trickle() -> None:
        for piece in expected:
            await asyncio.sleep(0.002)
            request._feed(piece)
        request._end()

    feeder = asyncio.create_task(trickle())
    got: list[bytes] = []
    while True:
        try:
            got.append(await asyncio.wait_for(anext(reader), 0.001))
        except TimeoutError:
            continue
        except StopAsyncIteration:
            break
    await feeder
    assert got == expected


async def test_errors_and_the_end_still_surface_after_cancelled_reads() -> None:
    request = make_request(Consumed())
    reader = request.stream()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(anext(reader), 0.01)
    request._feed(b"partial")
    request._fail(RemoteProtocolError("caller broke the protocol"))
    assert await anext(reader) == b"partial"
    with pytest.raises(RemoteProtocolError):
        await anext(reader)


async def test_stream_is_single_use_and_aclose_stops_it() -> None:
    request = make_request(Consumed())
    reader = request.stream()
    with pytest.raises(RuntimeError, match="already consumed"):
        request.stream()
    request._feed(b"unread")
    await reader.aclose()  # type: ignore[attr-defined]
    assert [chunk async for chunk in reader] == []
