"""Shared test helpers. Tests synchronise by polling a condition with a deadline, never by sleeping.

:func:`wait_until` is the one polling helper (``await`` it); :func:`wait_until_sync` is its
blocking twin for synchronous set-up code (process harnesses, sync tests). Both return the
predicate's first truthy value and share one deadline and failure message (:class:`_Poll`).
"""

from __future__ import annotations

import asyncio
import inspect
import linecache
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from cli.nats_cluster import NatsCluster
from cli.nats_server import NatsServer

__all__ = ["NatsClusterFactory", "NatsServerFactory", "settled_value", "wait_until", "wait_until_sync"]

# What a failure message shows of the last value the predicate returned.
_LAST_VALUE_CHARS = 300


class NatsServerFactory(Protocol):
    """Type of the ``nats_server_factory`` fixture: NatsServerConfig fields as keyword arguments."""

    def __call__(self, **config_kwargs: Any) -> NatsServer: ...


class NatsClusterFactory(Protocol):
    """Type of the ``nats_cluster_factory`` fixture: ``NatsCluster`` arguments as keyword arguments."""

    def __call__(self, **cluster_kwargs: Any) -> NatsCluster: ...


Message = str | Callable[[], str] | None


async def wait_until(
    predicate: Callable[[], Any | Awaitable[Any]],
    timeout: float = 5.0,
    *,
    interval: float = 0.01,
    message: Message = None,
) -> Any:
    """Poll a sync or async predicate until it returns something truthy, and return that.

    On timeout: AssertionError with ``message`` (a string, or a callable asked only then, so it
    can show state at the deadline), what was awaited and the last value seen. The predicate
    is checked once more at the deadline, so a slow machine only costs time, not a spurious
    failure; exceptions raised by the predicate propagate at once. ``interval`` and ``message``
    are keywords only (a positional message once landed in ``interval``).
    """
    poll = _Poll(predicate, timeout, message)
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if poll.done(value):
            return value
        await asyncio.sleep(interval)


async def settled_value(
    read: Callable[[], Awaitable[float]], at_least: float, timeout: float, *, what: str
) -> float:
    """``read()`` once it reaches ``at_least``, read again and returned, so the caller can check
    it went no further (a counter that must move by exactly one, say).

    For values updated a step after what a test observes: a run's new state is visible to
    readers before its KV write's acknowledgement reaches the gateway that counts it.
    """

    async def reached() -> bool:
        return await read() >= at_least

    await wait_until(reached, timeout, message=f"{what} never reached {at_least}")
    return await read()


def wait_until_sync(
    predicate: Callable[[], Any],
    timeout: float = 5.0,
    *,
    interval: float = 0.01,
    message: Message = None,
) -> Any:
    """Blocking :func:`wait_until` for synchronous code (it blocks the thread: never in a coroutine)."""
    poll = _Poll(predicate, timeout, message)
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            if inspect.iscoroutine(value):
                value.close()  # never awaited: no warning about it
            raise TypeError(f"wait_until_sync got an awaitable from {_describe(predicate)}: use wait_until")
        if poll.done(value):
            return value
        time.sleep(interval)


class _Poll:
    """One wait's deadline and failure message, shared by :func:`wait_until` and :func:`wait_until_sync`."""

    def __init__(self, predicate: Callable[[], Any], timeout: float, message: Message) -> None:
        self.predicate = predicate
        self.timeout = timeout
        self.message = message
        self.deadline = time.monotonic() + timeout

    def done(self, value: Any) -> bool:
        """True for a truthy ``value``; AssertionError once the deadline has passed; else False."""
        if value:
            return True
        if time.monotonic() >= self.deadline:
            raise AssertionError(self.failure(value))
        return False

    def failure(self, last: Any) -> str:
        message = self.message() if callable(self.message) else self.message
        shown = repr(last)
        if len(shown) > _LAST_VALUE_CHARS:
            shown = shown[:_LAST_VALUE_CHARS] + "..."
        return (
            f"{message or 'condition not met'} (not true after {self.timeout:g} s: "
            f"{_describe(self.predicate)}; last value: {shown})"
        )


def _describe(predicate: Callable[[], Any]) -> str:
    """What is awaited: a lambda's source line, else the callable's name, with file:line."""
    name = getattr(predicate, "__qualname__", None) or repr(predicate)
    code = getattr(predicate, "__code__", None)
    if code is None:
        return name
    where = f"{Path(code.co_filename).name}:{code.co_firstlineno}"
    if name.endswith("<lambda>"):
        source = linecache.getline(code.co_filename, code.co_firstlineno).strip()
        return f"`{source}` at {where}" if source else f"a lambda at {where}"
    return f"{name}() at {where}"


def process_stopped(pid: int) -> bool:
    """Whether every thread of ``pid`` is stopped (SIGSTOP): ``kill`` returns before they are,
    and meanwhile a thread of a multi-threaded server (nats-server) may still answer."""
    states = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
        except FileNotFoundError:
            continue  # a thread that just exited
    return bool(states) and all(state in ("T", "t") for state in states)
