"""EagerStarter: a coroutine's first step runs at once, as a task of its own.

What must hold: the first step runs before ``start`` returns; whatever the coroutine does
with ``asyncio.current_task()`` (``asyncio.timeout``, ``TaskGroup``) reaches the task that
runs the rest of it, never the task that called ``start``; each coroutine has a context of
its own; a cancel right after the start reaches the coroutine where it waits.
"""

from __future__ import annotations

import asyncio
import contextvars

import pytest

from tunnel._natsio.eager import EagerStarter

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("VAR", default="unset")


def starter() -> EagerStarter:
    return EagerStarter(asyncio.get_running_loop())


async def test_a_coroutine_that_does_not_wait_finishes_inside_start() -> None:
    seen: list[asyncio.Task[object] | None] = []

    async def quick() -> None:
        seen.append(asyncio.current_task())

    outer = asyncio.current_task()
    assert starter().start(quick()) is None
    assert len(seen) == 1
    assert seen[0] is not None and seen[0] is not outer  # a task of its own, not the caller's
    assert asyncio.current_task() is outer  # and the caller's is current again


async def test_a_coroutine_that_waits_is_finished_by_the_task_it_started_in() -> None:
    gate = asyncio.get_running_loop().create_future()
    steps: list[tuple[str, asyncio.Task[object] | None]] = []

    async def waits() -> None:
        steps.append(("first", asyncio.current_task()))
        value = await gate
        steps.append((value, asyncio.current_task()))

    task = starter().start(waits())
    assert task is not None and not task.done()
    assert steps == [("first", task)]
    gate.set_result("resumed")
    await task
    assert steps == [("first", task), ("resumed", task)]


async def test_quick_coroutines_share_a_task_until_one_waits() -> None:
    eager = starter()
    current: list[asyncio.Task[object] | None] = []

    async def quick() -> None:
        current.append(asyncio.current_task())

    async def waits(gate: asyncio.Future[None]) -> None:
        current.append(asyncio.current_task())
        await gate

    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    assert eager.start(quick()) is None
    assert eager.start(quick()) is None
    claimed = eager.start(waits(gate))
    assert eager.start(quick()) is None
    assert current[0] is current[1] is current[2] is claimed
    assert current[3] is not claimed  # the waiting one kept its task; a new one stands in
    gate.set_result(None)
    await claimed
    assert current[3] is not None
    await current[3]  # an unclaimed stand-in ends at its first step


async def test_asyncio_timeout_in_the_first_step_cancels_the_coroutines_task_not_the_callers() -> None:
    outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def slow() -> None:
        try:
            async with asyncio.timeout(0.01):
                await asyncio.get_running_loop().create_future()  # never done
        except TimeoutError:
            outcome.set_result("timed out")

    task = starter().start(slow())
    assert task is not None
    assert await outcome == "timed out"  # the caller (this test's task) was not cancelled
    await task
    outer = asyncio.current_task()
    assert outer is not None and outer.cancelling() == 0
    assert not task.cancelled()  # the timeout uncancelled it when it turned into TimeoutError


async def test_a_task_group_in_the_first_step_belongs_to_the_coroutines_task() -> None:
    async def fails() -> None:
        await asyncio.sleep(0)
        raise ValueError("child failed")

    caught: list[BaseException] = []
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def group() -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(fails())
                await asyncio.get_running_loop().create_future()  # cancelled by the group
        except* ValueError as exc:
            caught.append(exc)
        done.set_result(None)

    task = starter().start(group())
    assert task is not None
    await done  # were the group's parent this test's task, this await would be cancelled
    await task
    assert len(caught) == 1
    outer = asyncio.current_task()
    assert outer is not None and outer.cancelling() == 0


async def test_each_coroutine_has_a_context_of_its_own() -> None:
    eager = starter()
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    seen: list[str] = []

    async def sets(value: str, wait: bool) -> None:
        seen.append(VAR.get())
        VAR.set(value)
        if wait:
            await gate
            seen.append(VAR.get())

    assert eager.start(sets("a", wait=False)) is None
    task = eager.start(sets("b", wait=True))  # on the same stand-in task as "a"
    assert task is not None
    gate.set_result(None)
    await task
    assert seen == ["unset", "unset", "b"]
    assert VAR.get() == "unset"  # nothing leaked into the caller's context either


async def test_a_cancel_before_the_task_first_runs_reaches_the_coroutine_where_it_waits() -> None:
    waited_on: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    cleanup: list[str] = []

    async def waits() -> None:
        try:
            await waited_on
        finally:
            cleanup.append("ran")

    task = starter().start(waits())
    assert task is not None
    task.cancel()  # before the event loop ever ran the task
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleanup == ["ran"]
    assert waited_on.cancelled()  # as a task's awaited future is when the task is cancelled


async def test_an_exception_in_the_first_step_is_raised_by_start() -> None:
    async def broken() -> None:
        raise ValueError("at once")

    outer = asyncio.current_task()
    with pytest.raises(ValueError, match="at once"):
        starter().start(broken())
    assert asyncio.current_task() is outer
