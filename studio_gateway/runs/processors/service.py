"""The processors of one gateway instance: registration, start-up, lag, and their lifetime.

:class:`ProcessorsService` (``app[PROCESSORS]``) holds the registered processors (the webhooks,
and any named by ``RUNS_PROCESSORS``: ``module:attribute`` of a :class:`~.base.Processor`
subclass), waits until the run machinery is set up (the stream exists), creates the anchor
bucket, and runs a :class:`~.runner.ProcessorRunner` per processor until the NATS connection
changes (then again on the new one). The projector is listed too (:mod:`.projector`), though
the run service runs it.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Final

import nats.js.errors
from aiohttp import web
from nats.js import JetStreamContext

from ...config import GatewayConfig
from ...tasks import stop_tasks
from ..service import RUNS, RunsService
from ..store import RunStore, ensure_stream, kv_stream_config
from .anchors import ANCHOR_BUCKET, Anchors
from .base import Processor, check_name
from .context import ProcessorContext
from .feed import consumer_name
from .metrics import LAG_INTERVAL, ProcessorMetrics
from .projector import CHECKPOINT, PROJECTOR_NAME, projector_lag
from .runner import ProcessorRunner

__all__ = ["PROCESSORS", "ProcessorLag", "ProcessorsService", "attach", "load_processor"]

log = logging.getLogger("studio_gateway.processors")

POLL: Final = 0.05
RESTART_DELAY: Final = 1.0


def load_processor(spec: str) -> Processor:
    """``module:attribute`` -> a processor (the attribute is a Processor subclass or instance)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"{spec!r}: expected module:attribute")
    target = getattr(importlib.import_module(module_name), attribute)
    processor = target() if isinstance(target, type) else target
    if not isinstance(processor, Processor):
        raise ValueError(f"{spec!r} is not a Processor")
    return processor


@dataclass(frozen=True)
class ProcessorLag:
    name: str
    pending: int  # events its checkpoint has not passed yet
    age: float  # seconds: how far behind the stream it is (0 without a backlog)


class ProcessorsService:
    def __init__(self, config: GatewayConfig, runs: RunsService) -> None:
        self.config = config
        self.runs = runs
        self.instance = f"gw_{uuid.uuid4().hex[:12]}"
        self.processors: list[Processor] = []
        self.runners: dict[str, ProcessorRunner] = {}
        self._js: JetStreamContext | None = None
        self._task: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()
        self.on_ready: list[Callable[[RunStore], Any]] = []
        self.metrics = ProcessorMetrics(runs.metrics.registry)
        for spec in config.processors.extra:
            self.register(load_processor(spec))

    def register(self, processor: Processor) -> None:
        check_name(processor.name)
        if processor.name == PROJECTOR_NAME or any(p.name == processor.name for p in self.processors):
            raise ValueError(f"a processor named {processor.name!r} is registered already")
        self.processors.append(processor)

    # ------------------------------------------------------------------ lag and description

    async def lags(self) -> list[ProcessorLag]:
        """Every processor's lag, the projector's first (JetStream's view: the same on every instance)."""
        js = self._js
        if js is None:
            return []
        out = [ProcessorLag(PROJECTOR_NAME, *await projector_lag(js))]
        for name, runner in list(self.runners.items()):
            try:
                out.append(ProcessorLag(name, *await runner.lag()))
            except nats.js.errors.NotFoundError:
                continue  # its consumer is not created yet (the processor is starting)
        return out

    def describe(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = [
            {"name": PROJECTOR_NAME, "eventTypes": None, "checkpoint": CHECKPOINT, "runsHere": True}
        ]
        for processor in self.processors:
            runner = self.runners.get(processor.name)
            rows.append(
                {
                    "name": processor.name,
                    "eventTypes": sorted(processor.event_types)
                    if processor.event_types is not None
                    else None,
                    "checkpoint": f"durable consumer {consumer_name(processor.name)} on the run stream",
                    "runsHere": runner is not None,
                    "handledHere": runner.handled if runner else 0,
                    "errorsHere": dict(runner.errors) if runner else {},
                }
            )
        return rows

    async def reconcile(self, name: str) -> None:
        """Bring the processor's consumer filters in step now (its subject_filters changed)."""
        runner = self.runners.get(name)
        if runner is not None:
            await runner.reconcile_filters(now=True)

    # ------------------------------------------------------------------ lifetime

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._supervise(), name="runs-processors")

    async def close(self) -> None:
        if self._task is not None:
            await stop_tasks([self._task])
            self._task = None

    async def _supervise(self) -> None:
        while True:
            store = self.runs.store
            if store is None:
                await asyncio.sleep(POLL)
                continue
            try:
                await self._run_on(store)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("processors stopped: %r; restarting", exc)
            self.ready.clear()
            self.runners.clear()
            self._js = None
            await asyncio.sleep(RESTART_DELAY)

    async def _run_on(self, store: RunStore) -> None:
        js = store.js
        replicas = self.config.runs.replicas
        await ensure_stream(
            js, kv_stream_config(ANCHOR_BUCKET, max_age=self.config.runs.retention, replicas=replicas)
        )
        anchors_kv = await js.key_value(ANCHOR_BUCKET)
        for hook in self.on_ready:
            await hook(store)
        loop = asyncio.get_running_loop()
        tasks: list[asyncio.Task[None]] = []
        for processor in self.processors:
            ctx = ProcessorContext(
                processor=processor.name,
                instance=self.instance,
                store=store,
                nc=store.nc,
                js=js,
                anchors=Anchors(
                    anchors_kv, processor.name, owner=self.instance, lease=self.config.processors.lease
                ),
            )
            runner = ProcessorRunner(
                processor, ctx, prefix=store.prefix, replicas=replicas, metrics=self.metrics
            )
            self.runners[processor.name] = runner
            tasks.append(loop.create_task(runner.run(), name=f"processor-{processor.name}"))
        self._js = js
        tasks.append(loop.create_task(self._measure(), name="processor-lag"))
        self.ready.set()
        log.info("processors running: %s", ", ".join(p.name for p in self.processors) or "(none)")
        started = time.monotonic()
        try:
            while self.runs.store is store:
                done, _ = await asyncio.wait(tasks, timeout=0.5)
                for task in done:
                    if not task.cancelled() and task.exception() is not None:
                        raise RuntimeError(
                            f"{task.get_name()} stopped after {time.monotonic() - started:.0f} s"
                        ) from task.exception()
        finally:
            await stop_tasks(tasks)

    async def _measure(self) -> None:
        """Refresh the lag gauges (JetStream's view of each checkpoint) every ``LAG_INTERVAL``."""
        while True:
            try:
                for lag in await self.lags():
                    self.metrics.pending.set(lag.pending, processor=lag.name)
                    self.metrics.lag_seconds.set(round(lag.age, 3), processor=lag.name)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # JetStream busy or away: the next round tells
                log.debug("processor lag: %r", exc)
            await asyncio.sleep(LAG_INTERVAL)


PROCESSORS: Final = web.AppKey("studio_gateway.processors", ProcessorsService)


async def processors_lifetime(app: web.Application) -> AsyncIterator[None]:
    service = app[PROCESSORS]
    if service.runs.runs.enabled:
        service.start()
    yield
    await service.close()


def attach(app: web.Application, config: GatewayConfig) -> ProcessorsService:
    """Create the service (after the run service), start it with the application, list it for operators."""
    from .admin import add_routes

    service = ProcessorsService(config, app[RUNS])
    app[PROCESSORS] = service
    app.cleanup_ctx.append(processors_lifetime)
    add_routes(app)
    return service
