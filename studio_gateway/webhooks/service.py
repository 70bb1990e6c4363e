"""Webhooks on one gateway instance: the processor (registered with the processors), the
delivery scheduler, and the store the HTTP handlers use (``app[WEBHOOKS]``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any, Final

from aiohttp import web

from ..config import GatewayConfig
from ..runs.processors.service import PROCESSORS, ProcessorsService
from ..runs.store import RunStore
from ..tasks import stop_tasks
from .metrics import WebhookMetrics
from .processor import WebhookProcessor
from .scheduler import DeliveryScheduler
from .signing import new_secret
from .store import WebhookStore

__all__ = ["WEBHOOKS", "WebhooksService", "attach"]

log = logging.getLogger("studio_gateway.webhooks")


class WebhooksService:
    def __init__(self, config: GatewayConfig, processors: ProcessorsService) -> None:
        self.config = config.webhooks
        self.gateway = config
        self.processors = processors
        self.processor = WebhookProcessor()
        processors.register(self.processor)
        processors.on_ready.append(self._open)
        self._store: WebhookStore | None = None
        self._nc_store: RunStore | None = None
        self.scheduler: DeliveryScheduler | None = None
        self._task: asyncio.Task[None] | None = None
        self._index_task: asyncio.Task[None] | None = None
        self.metrics = WebhookMetrics(processors.runs.metrics.registry)

    @property
    def store(self) -> WebhookStore | None:
        """The store while runs work on the current connection (None: answer 503)."""
        if self._store is None or self._nc_store is None or self.processors.runs.store is not self._nc_store:
            return None
        return self._store

    def new_secret(self) -> str:
        return new_secret()

    async def _open(self, run_store: RunStore) -> None:
        """Processors start on a (new) connection: open the buckets, (re)start the scheduler."""
        store = await WebhookStore.open(
            run_store.nc,
            run_store.js,
            replicas=self.gateway.runs.replicas,
            retention=self.gateway.runs.retention,
        )
        self.processor.store = store
        self._store = store
        self._nc_store = run_store
        await stop_tasks([t for t in (self._task, self._index_task) if t is not None])
        self.scheduler = DeliveryScheduler(store, self.config, self.processors.instance, self.metrics)
        self._index_task = asyncio.get_running_loop().create_task(self._follow(store), name="webhook-index")
        self._task = asyncio.get_running_loop().create_task(
            self._schedule(self.scheduler), name="webhook-scheduler"
        )

    async def _schedule(self, scheduler: DeliveryScheduler) -> None:
        while scheduler.store is self._store:  # a new connection brings a new scheduler
            try:
                await scheduler.run()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("webhook scheduler stopped: %r; restarting", exc)
            await asyncio.sleep(1.0)

    async def _follow(self, store: WebhookStore) -> None:
        while store is self._store:
            try:
                await self.processor.index.run(store.webhooks)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("webhook index watch stopped: %r; restarting", exc)
            await asyncio.sleep(1.0)

    def registered(self, record: dict[str, Any]) -> None:
        """A webhook was stored here: index it now (the watch brings it to the other instances)."""
        self.processor.index.add(record)

    async def close(self) -> None:
        await stop_tasks([t for t in (self._task, self._index_task) if t is not None])
        self._task = self._index_task = None


WEBHOOKS: Final = web.AppKey("studio_gateway.webhooks", WebhooksService)


async def webhooks_lifetime(app: web.Application) -> AsyncIterator[None]:
    yield
    await app[WEBHOOKS].close()


def attach(app: web.Application, config: GatewayConfig) -> WebhooksService:
    """Register the webhook processor and routes (after :func:`..runs.processors.service.attach`)."""
    from ..bodies import expect_within
    from .api import MAX_BODY, add_routes

    service = WebhooksService(config, app[PROCESSORS])
    app[WEBHOOKS] = service
    app.cleanup_ctx.append(webhooks_lifetime)
    add_routes(app, expect_handler=expect_within(MAX_BODY))
    return service
