"""Shared test helpers. Tests synchronise by polling a condition with a deadline, never by sleeping."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from cli.nats_cluster import NatsCluster
from cli.nats_server import NatsServer


class NatsServerFactory(Protocol):
    """Type of the ``nats_server_factory`` fixture: NatsServerConfig fields as keyword arguments."""

    def __call__(self, **config_kwargs: Any) -> NatsServer: ...


class NatsClusterFactory(Protocol):
    """Type of the ``nats_cluster_factory`` fixture: ``NatsCluster`` arguments as keyword arguments."""

    def __call__(self, **cluster_kwargs: Any) -> NatsCluster: ...


async def wait_until(
    predicate: Callable[[], bool | Awaitable[bool]],
    timeout: float = 5.0,
    interval: float = 0.01,
    message: str = "condition not met",
) -> None:
    """Poll a sync or async predicate until it is truthy; AssertionError with ``message`` on timeout.

    The predicate is checked once more at the deadline, so a slow machine only costs time, not
    a spurious failure, and exceptions raised by the predicate propagate immediately.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if loop.time() >= deadline:
            raise AssertionError(f"{message} (not true after {timeout:.2f}s)")
        await asyncio.sleep(interval)
