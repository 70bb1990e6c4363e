"""Run a coroutine's first step at once, as a task of its own: Python 3.12's eager tasks, on 3.11.

Why: most handlers answer a small request without waiting for anything. As an ordinary
task, each would wait a loop pass to start, and every request would pay for a task. Here
the first step runs where the start frame was read, and a handler that finishes in it
needs no task of its own.

Why it is safe (``asyncio.timeout``, ``TaskGroup``, anyio's cancel scopes): they remember
``asyncio.current_task()`` and cancel it later. While the first step runs, the current task
is a real task, made ahead (a *stand-in*), and it is the one that runs the rest of the
coroutine if the step suspends. A coroutine that finishes in its first step has left every
such scope it entered, so the next one may use the same stand-in: one task serves a whole
batch of quick requests, until a coroutine suspends and claims it. An unclaimed stand-in
ends at its first step. Each coroutine runs in a context of its own, as in a task.

The one private detail is asyncio's ``_enter_task``/``_leave_task``: what the event loop
calls around every task step (3.12's eager start uses the same). Without them, or on 3.12
and later (where ``Task(eager_start=True)`` is the real thing), :class:`EagerStarter`
makes ordinary tasks.
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
from collections.abc import Callable, Coroutine, Generator
from typing import Any, Final

__all__ = ["EagerStarter"]

_enter_task: Callable[[asyncio.AbstractEventLoop, asyncio.Task[Any]], None] | None = getattr(
    asyncio.tasks, "_enter_task", None
)
_leave_task: Callable[[asyncio.AbstractEventLoop, asyncio.Task[Any]], None] | None = getattr(
    asyncio.tasks, "_leave_task", None
)
_NATIVE: Final = sys.version_info >= (3, 12)
_NOTHING: Final = object()


class _Rest(Coroutine[Any, Any, None]):
    """What a stand-in task runs: nothing (it ends at once), or the rest of the coroutine that
    claimed it. Its first step hands the task what the coroutine's first step waits on, so the
    task waits on that exactly as if it had run the step itself."""

    __slots__ = ("_context", "_coro", "_pending")

    def __init__(self) -> None:
        self._coro: Coroutine[Any, Any, Any] | None = None
        self._context: contextvars.Context | None = None
        self._pending: Any = _NOTHING

    def claim(self, coro: Coroutine[Any, Any, Any], context: contextvars.Context, pending: Any) -> None:
        self._coro = coro
        self._context = context
        self._pending = pending

    def send(self, value: Any) -> Any:
        coro = self._coro
        if coro is None:
            raise StopIteration(None)
        pending = self._pending
        if pending is not _NOTHING:
            self._pending = _NOTHING
            return pending
        assert self._context is not None
        return self._context.run(coro.send, value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        coro = self._coro
        error = typ if val is None else val
        if coro is None:
            raise error if isinstance(error, BaseException) else typ(error)
        pending = self._pending
        if pending is not _NOTHING:
            # Thrown in before the task's first step (a cancel right after the claim): what the
            # coroutine waits on goes the way a task's awaited future goes when it is cancelled.
            self._pending = _NOTHING
            if isinstance(error, asyncio.CancelledError) and isinstance(pending, asyncio.Future):
                pending.cancel()
        assert self._context is not None
        return self._context.run(coro.throw, error)

    def close(self) -> None:
        if self._coro is not None:
            self._coro.close()

    def __await__(self) -> Generator[Any, None, None]:
        raise TypeError("a stand-in's coroutine is run by its task only")


class EagerStarter:
    """Starts coroutines eagerly on one event loop (see the module's docstring)."""

    __slots__ = ("_loop", "_rest", "_stand_in")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._stand_in: asyncio.Task[None] | None = None
        self._rest: _Rest | None = None

    def start(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
        """Run ``coro`` until it first suspends; the task that runs the rest, or None if it is
        done. An exception its first step raises is raised here."""
        loop = self._loop
        if _NATIVE:
            task = asyncio.Task(coro, loop=loop, eager_start=True)  # type: ignore[call-arg]
            if task.done():
                task.result()  # raise what it raised, as below
                return None
            return task
        if _enter_task is None or _leave_task is None:
            return loop.create_task(coro)
        stand_in, rest = self._stand_in, self._rest
        if stand_in is None or rest is None or stand_in.done():
            rest = _Rest()
            stand_in = loop.create_task(rest)
            self._stand_in, self._rest = stand_in, rest
        context = contextvars.copy_context()
        outer = asyncio.current_task(loop)
        if outer is not None:
            _leave_task(loop, outer)
        _enter_task(loop, stand_in)
        try:
            pending = context.run(coro.send, None)
        except StopIteration:
            return None
        finally:
            _leave_task(loop, stand_in)
            if outer is not None:
                _enter_task(loop, outer)
        rest.claim(coro, context, pending)
        self._stand_in = self._rest = None
        return stand_in
