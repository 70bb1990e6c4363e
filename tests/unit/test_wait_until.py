"""The one polling helper (tests/helpers.py): its result, its deadline and its failure message."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from tests.helpers import wait_until, wait_until_sync


async def test_returns_the_first_truthy_value_of_a_sync_or_async_predicate() -> None:
    counter = itertools.count()
    assert await wait_until(lambda: next(counter) >= 3 and "three", timeout=1.0) == "three"

    calls = itertools.count()

    async def eventually() -> list[int]:
        await asyncio.sleep(0)
        n = next(calls)
        return [n] if n >= 2 else []

    assert await wait_until(eventually, 1.0, interval=0.001) == [2]


def test_the_blocking_twin_returns_the_value_too() -> None:
    counter = itertools.count()
    assert wait_until_sync(lambda: next(counter) >= 2 and 42, 1.0, interval=0.001) == 42


async def test_a_timeout_names_what_was_awaited_and_the_last_value() -> None:
    calls: list[int] = []
    with pytest.raises(AssertionError) as failure:
        await wait_until(lambda: calls.append(1) or [], 0.05, message="queue empty")
    text = str(failure.value)
    assert text.startswith("queue empty (not true after 0.05 s: ")
    assert "`await wait_until(lambda: calls.append(1) or []" in text and "test_wait_until.py:" in text
    assert text.endswith("last value: [])")
    assert len(calls) >= 2, "checked more than once (and once more at the deadline)"


async def test_a_callable_message_is_asked_at_the_deadline() -> None:
    state = {"n": 0}

    def grow() -> bool:
        state["n"] += 1
        return False

    with pytest.raises(AssertionError, match=r"^n is [1-9]\d* \(not true after .*grow\(\) at test_wait"):
        await wait_until(grow, 0.03, message=lambda: f"n is {state['n']}")


def test_the_blocking_twin_fails_the_same_way_and_refuses_coroutines() -> None:
    with pytest.raises(AssertionError, match=r"^never \(not true after 0.02 s: .*last value: 0\)$"):
        wait_until_sync(lambda: 0, 0.02, message="never")

    async def coroutine() -> bool:
        return True

    with pytest.raises(TypeError, match="use wait_until"):
        wait_until_sync(coroutine, 0.02)  # type: ignore[arg-type]


async def test_interval_and_message_are_keywords_and_predicate_errors_propagate() -> None:
    with pytest.raises(TypeError):
        await wait_until(lambda: True, 1.0, 0.01)  # type: ignore[misc]

    def broken() -> bool:
        raise KeyError("boom")

    with pytest.raises(KeyError):
        await wait_until(broken, 5.0)
