"""Body pieces ready at once travel together, and nothing waits for a later piece
(tunnel/_natsio/coalesce.py): no NATS, just asyncio and the iterator protocol."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from tunnel._natsio.coalesce import coalesced

TIMEOUT = 5.0


def same(piece: bytes) -> bytes:
    return piece


async def ready(*pieces: bytes) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece


async def collect(pieces: AsyncIterator[bytes]) -> list[bytes]:
    return [piece async for piece in pieces]


async def test_pieces_ready_at_once_are_joined_up_to_the_limit() -> None:
    pieces = [bytes([i]) * 10 for i in range(25)]
    out = await collect(coalesced(ready(*pieces), 100, same))
    assert [len(p) for p in out] == [100, 100, 50]
    assert b"".join(out) == b"".join(pieces)


async def test_a_piece_at_the_limit_passes_through_as_it_is() -> None:
    big = bytes(100)
    out = await collect(coalesced(ready(b"x", big, big), 100, same))
    assert out[0] == b"x" + big  # the small one takes the next one that was ready
    assert out[1] is big


async def test_no_piece_waits_for_a_later_one() -> None:
    """The iterator waits for an event that is only set once the first piece arrived: a
    coalescer that held it back for more would never see the event."""
    first_out = asyncio.Event()

    async def slow() -> AsyncIterator[bytes]:
        yield b"first"
        yield b"+ready"
        await first_out.wait()
        yield b"second"

    pieces = coalesced(slow(), 1000, same)
    assert await asyncio.wait_for(anext(pieces), TIMEOUT) == b"first+ready"
    first_out.set()
    assert await asyncio.wait_for(anext(pieces), TIMEOUT) == b"second"
    with pytest.raises(StopAsyncIteration):
        await anext(pieces)


async def test_an_iterator_failure_comes_after_the_bytes_before_it() -> None:
    async def failing() -> AsyncIterator[bytes]:
        yield b"a"
        yield b"b"
        raise ValueError("the body broke")

    pieces = coalesced(failing(), 1000, same)
    assert await anext(pieces) == b"ab"
    with pytest.raises(ValueError, match="the body broke"):
        await anext(pieces)


async def test_a_conversion_failure_is_the_iterators_failure_after_the_bytes_before_it() -> None:
    def strict(piece: object) -> bytes:
        if not isinstance(piece, bytes):
            raise TypeError(f"body yielded {type(piece).__name__}")
        return piece

    async def mixed() -> AsyncIterator[object]:
        yield b"ok"
        yield 42

    pieces = coalesced(mixed(), 1000, strict)
    assert await anext(pieces) == b"ok"
    with pytest.raises(TypeError, match="body yielded int"):
        await anext(pieces)


async def test_closing_with_a_read_pending_runs_the_iterators_cleanup() -> None:
    """The started read is cancelled where it waits; the iterator's cleanup (which itself
    awaits) runs to its end, and the iterator can then be closed like any other."""
    cleaned = asyncio.Event()
    never = asyncio.Event()

    async def waits_forever() -> AsyncIterator[bytes]:
        try:
            yield b"only"
            await never.wait()
            yield b"unreachable"
        finally:
            await asyncio.sleep(0)  # async cleanup (an upstream response's aclose, say)
            cleaned.set()

    iterator = waits_forever()
    pieces = coalesced(iterator, 1000, same)
    assert await anext(pieces) == b"only"  # the ask for the next piece is now started and waiting
    await pieces.aclose()
    assert cleaned.is_set()
    await iterator.aclose()  # finished: no "asynchronous generator is already running"


async def test_cancelling_the_reader_cancels_the_iterator_where_it_waits() -> None:
    seen: list[str] = []
    waiting = asyncio.Event()

    async def slow() -> AsyncIterator[bytes]:
        yield b"one"
        try:
            waiting.set()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise
        yield b"never"

    pieces = coalesced(slow(), 1000, same)

    async def read_all() -> list[bytes]:
        return await collect(pieces)

    task = asyncio.create_task(read_all())
    await asyncio.wait_for(waiting.wait(), TIMEOUT)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == ["cancelled"]
