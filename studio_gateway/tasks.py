"""Stopping background tasks reliably.

Why a helper: before Python 3.12, ``asyncio.wait_for`` can swallow a cancellation
that races its own timeout (nats-py waits on messages that way), so one
``task.cancel()`` may leave a loop running, and ``await task`` then hangs. Cancelling
again until the task is done fixes that.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

__all__ = ["stop_tasks"]

log = logging.getLogger("studio_gateway.tasks")


async def stop_tasks(tasks: Iterable[asyncio.Task[Any]], timeout: float = 10.0) -> None:
    """Cancel ``tasks`` and wait for them, cancelling again while they run.

    Again, because a cancellation can be swallowed by a library racing a timeout
    (``asyncio.wait_for`` before Python 3.12), which would leave a loop running forever.
    """
    tasks = list(tasks)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pending = {t for t in tasks if not t.done()}
    while pending and loop.time() < deadline:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.2)
    for task in pending:
        log.error("task %s did not stop", task.get_name())
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: no "exception was never retrieved" noise
