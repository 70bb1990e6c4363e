"""Sends webhook deliveries, retries them with backoff, and survives gateway restarts.

Every gateway instance runs a :class:`DeliveryScheduler`. It follows the deliveries bucket with a
KV watcher (the pending ones, from the bucket's current content on, so a restarted instance picks
up what a dead one left), and for each delivery that is due:

1. *claims* it: compare-and-set of ``leaseUntil`` (now + timeout + a margin) on the revision it
   knows: of several instances only one wins, the others skip it;
2. POSTs the stored body, signed (:mod:`.signing`), no redirects followed, through the SSRF
   guard (:mod:`.urls`);
3. records the result with compare-and-set on its claim: ``succeeded`` (a 2xx), or
   ``pending`` with ``nextAttemptAt`` = now + backoff, or ``failed`` once ``WEBHOOKS_MAX_ATTEMPTS``
   attempts failed or the delivery is older than ``WEBHOOKS_MAX_AGE_SECONDS``.

Backoff: ``WEBHOOKS_RETRY_BASE_SECONDS`` doubling per attempt up to ``WEBHOOKS_RETRY_MAX_SECONDS``,
each delay drawn uniformly from its upper half (jitter, so retries of many deliveries spread).

At least once: an instance that dies after the POST and before step 3 leaves the claim; once it
expires another instance (or the same after a restart) sends again, with the same delivery id,
which the receiver deduplicates on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from typing import Any, Final

import aiohttp
import nats.js.errors

from ..tasks import stop_tasks
from .config import WebhooksConfig
from .metrics import WebhookMetrics
from .signing import DELIVERY_HEADER, SIGNATURE_HEADER, sign
from .store import WebhookStore
from .urls import GuardedResolver

__all__ = ["DeliveryScheduler", "retry_delay"]

log = logging.getLogger("studio_gateway.webhooks")

# A claim lasts the POST's timeout plus this.
LEASE_MARGIN: Final = 5.0
# Deliveries sent at once by one instance.
CONCURRENCY: Final = 16
TICK_MAX: Final = 1.0
ERROR_CHARS: Final = 300
USER_AGENT: Final = "natslink-webhooks/1"


def _now_ms() -> int:
    return int(time.time() * 1000)


def retry_delay(attempts: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Seconds before the next attempt after ``attempts`` failed ones (>= 1): exponential, jittered."""
    full = min(cap, base * 2 ** max(0, attempts - 1))
    draw: float = (rng or random).random()
    return float(full * (0.5 + 0.5 * draw))


class DeliveryScheduler:
    def __init__(
        self,
        store: WebhookStore,
        config: WebhooksConfig,
        instance: str,
        metrics: WebhookMetrics | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.instance = instance
        self.pending: dict[str, tuple[dict[str, Any], int]] = {}
        self.results: dict[str, int] = {"succeeded": 0, "retry": 0, "failed": 0}
        self.metrics = metrics
        self._wake = asyncio.Event()
        self._busy: set[str] = set()
        self._session: aiohttp.ClientSession | None = None

    async def run(self) -> None:
        connector = aiohttp.TCPConnector(resolver=GuardedResolver(allow_private=self.config.allow_private))
        self._session = aiohttp.ClientSession(connector=connector)
        loop = asyncio.get_running_loop()
        watch = loop.create_task(self._watch(), name="webhook-watch")
        slots = asyncio.Semaphore(CONCURRENCY)
        sending: set[asyncio.Task[None]] = set()
        try:
            while True:
                if watch.done():
                    watch.result()  # raises what stopped it
                now = _now_ms()
                soonest = now + int(TICK_MAX * 1000)
                for key, (record, revision) in list(self.pending.items()):
                    if key in self._busy:
                        continue
                    due = max(int(record.get("nextAttemptAt", 0)), int(record.get("leaseUntil", 0)))
                    if due > now:
                        soonest = min(soonest, due)
                        continue
                    if slots.locked():
                        break
                    await slots.acquire()
                    self._busy.add(key)
                    task = loop.create_task(self._attempt(key, record, revision, slots))
                    sending.add(task)
                    task.add_done_callback(sending.discard)
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), max(0.01, (soonest - _now_ms()) / 1000))
        finally:
            await stop_tasks([watch, *sending])
            await self._session.close()

    async def _watch(self) -> None:
        watcher = await self.store.deliveries.watchall()
        try:
            async for entry in watcher:
                if entry is None:
                    continue
                key = entry.key
                if entry.operation is not None or not entry.value:
                    self.pending.pop(key, None)
                    continue
                record = json.loads(entry.value)
                if record.get("status") == "pending":
                    self.pending[key] = (record, int(entry.revision or 0))
                    self._wake.set()
                else:
                    self.pending.pop(key, None)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]

    async def _attempt(
        self, key: str, record: dict[str, Any], revision: int, slots: asyncio.Semaphore
    ) -> None:
        try:
            await self._deliver(record, revision)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # NATS trouble: the watcher shows the record again, tried later
            log.warning("webhook delivery %s: %r", record.get("id"), exc)
        finally:
            self._busy.discard(key)
            slots.release()
            self._wake.set()

    async def _deliver(self, record: dict[str, Any], revision: int) -> None:
        config = self.config
        now = _now_ms()
        lease = int((config.timeout + LEASE_MARGIN) * 1000)
        claimed = dict(record, leaseUntil=now + lease, leaseOwner=self.instance, updatedAt=now)
        try:
            revision = await self.store.update_delivery(claimed, revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            return  # another instance claimed it (or moved it on): the watcher shows what it did
        hook = await self.store.webhook(str(record["userToken"]), str(record["webhookId"]))
        attempts = int(record.get("attempts", 0)) + 1
        status: int | None = None
        error: str | None = "webhook_deleted"
        if hook is not None:
            status, error = await self._post(hook, record)
        done = _now_ms()
        result: dict[str, Any] = dict(
            claimed, attempts=attempts, lastStatus=status, lastError=error, leaseUntil=0, updatedAt=done
        )
        result.pop("leaseOwner", None)
        if status is not None and 200 <= status < 300:
            result.update(status="succeeded", deliveredAt=done)
            outcome = "succeeded"
        elif (
            hook is None
            or attempts >= config.max_attempts
            or done - int(record.get("createdAt", done)) >= config.max_age * 1000
        ):
            result.update(status="failed", failedAt=done)
            outcome = "failed"
        else:
            delay = retry_delay(attempts, config.retry_base, config.retry_max)
            result.update(status="pending", nextAttemptAt=done + int(delay * 1000))
            outcome = "retry"
        self.results[outcome] += 1
        if self.metrics is not None:
            self.metrics.deliveries.inc(result=outcome)
        try:
            await self.store.update_delivery(result, revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            log.warning(
                "webhook delivery %s: taken over while it was sent (slower than its lease)", record["id"]
            )
        if outcome != "succeeded":
            log.info(
                "webhook delivery %s attempt %d: %s (%s)", record["id"], attempts, outcome, error or status
            )

    async def _post(self, hook: dict[str, Any], record: dict[str, Any]) -> tuple[int | None, str | None]:
        assert self._session is not None
        body = str(record["body"]).encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            DELIVERY_HEADER: str(record["id"]),
            SIGNATURE_HEADER: sign(str(hook["secret"]), body),
            "X-Natslink-Event": str(record.get("type")),
        }
        try:
            async with self._session.post(
                str(hook["url"]),
                data=body,
                headers=headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=self.config.timeout),
            ) as response:
                await response.content.read(64 * 1024)
                return response.status, None if 200 <= response.status < 300 else f"HTTP {response.status}"
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return None, f"{type(exc).__name__}: {exc}"[:ERROR_CHARS]
