"""Webhooks and their deliveries in JetStream KV (both survive gateway restarts).

- bucket ``LINK_WEBHOOKS``: one key per webhook, ``<user token>.<webhook id>`` (user token as
  in ``LINK_RUN_BY_USER``), ``{id, userId, url, runId, eventTypes, secret, createdAt}``: the
  secret is kept (deliveries are signed with it) but shown only when the webhook is created;
- bucket ``LINK_WEBHOOK_DELIVERIES``: one key per delivery, ``<webhook id>.<delivery id>``,
  created once per (webhook, event) with ``kv.create`` (the webhook processor's anchor), then
  updated with compare-and-set only: ``{id, webhookId, userToken, runId, type, eventKey, status,
  attempts, nextAttemptAt, leaseUntil, lastStatus, lastError, createdAt, updatedAt, body}``.

Both buckets keep entries for ``RUNS_RETENTION_SECONDS`` (deliveries) or for ever (webhooks).
"""

from __future__ import annotations

import json
from typing import Any, Final

import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from ..runs.store import bucket_keys, ensure_stream, kv_stream_config, user_index_token

__all__ = ["DELIVERY_BUCKET", "WEBHOOK_BUCKET", "WebhookStore"]

WEBHOOK_BUCKET: Final = "LINK_WEBHOOKS"
DELIVERY_BUCKET: Final = "LINK_WEBHOOK_DELIVERIES"
JS_TIMEOUT: Final = 5.0


def _dump(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode()


class WebhookStore:
    def __init__(self, nc: NATS, js: JetStreamContext, webhooks: KeyValue, deliveries: KeyValue) -> None:
        self.nc = nc
        self.js = js
        self.webhooks = webhooks
        self.deliveries = deliveries

    @classmethod
    async def open(cls, nc: NATS, js: JetStreamContext, *, replicas: int, retention: float) -> WebhookStore:
        await ensure_stream(js, kv_stream_config(WEBHOOK_BUCKET, max_age=None, replicas=replicas))
        await ensure_stream(js, kv_stream_config(DELIVERY_BUCKET, max_age=retention, replicas=replicas))
        return cls(nc, js, await js.key_value(WEBHOOK_BUCKET), await js.key_value(DELIVERY_BUCKET))

    # ------------------------------------------------------------------ webhooks

    async def add_webhook(self, record: dict[str, Any]) -> None:
        await self.webhooks.create(f"{user_index_token(record['userId'])}.{record['id']}", _dump(record))

    async def user_webhooks(self, user_id: str) -> list[dict[str, Any]]:
        token = user_index_token(user_id)
        out = []
        for key in await self._keys(WEBHOOK_BUCKET, f"{token}.*"):
            record = await self._get(self.webhooks, key)
            if record is not None and record.get("userId") == user_id:
                out.append(record)
        out.sort(key=lambda r: int(r.get("createdAt", 0)))
        return out

    async def webhook(self, user_token: str, webhook_id: str) -> dict[str, Any] | None:
        return await self._get(self.webhooks, f"{user_token}.{webhook_id}")

    async def remove_webhook(self, user_id: str, webhook_id: str) -> bool:
        key = f"{user_index_token(user_id)}.{webhook_id}"
        if await self._get(self.webhooks, key) is None:
            return False
        await self.webhooks.purge(key)  # a purge marker: every instance's watch sees it
        return True

    # ------------------------------------------------------------------ deliveries

    async def create_delivery(self, record: dict[str, Any]) -> bool:
        """Store a new delivery; False when it exists already (the event was handled before)."""
        try:
            await self.deliveries.create(f"{record['webhookId']}.{record['id']}", _dump(record))
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        return True

    async def update_delivery(self, record: dict[str, Any], revision: int) -> int:
        """Compare-and-set; ``KeyWrongLastSequenceError`` when another instance wrote it first."""
        return await self.deliveries.update(
            f"{record['webhookId']}.{record['id']}", _dump(record), last=revision
        )

    async def delivery(self, webhook_id: str, delivery_id: str) -> tuple[dict[str, Any], int] | None:
        try:
            entry = await self.deliveries.get(f"{webhook_id}.{delivery_id}")
        except nats.js.errors.NotFoundError:  # missing, deleted or purged
            return None
        if not entry.value:
            return None
        return json.loads(entry.value), int(entry.revision or 0)

    async def deliveries_of(self, webhook_id: str) -> list[dict[str, Any]]:
        out = []
        for key in await self._keys(DELIVERY_BUCKET, f"{webhook_id}.*"):
            record = await self._get(self.deliveries, key)
            if record is not None:
                out.append(record)
        out.sort(key=lambda r: (int(r.get("createdAt", 0)), str(r.get("id"))))
        return out

    # ------------------------------------------------------------------ helpers

    async def _get(self, kv: KeyValue, key: str) -> dict[str, Any] | None:
        try:
            entry = await kv.get(key)
        except nats.js.errors.NotFoundError:  # missing, deleted or purged
            return None
        if not entry.value:
            return None
        value = json.loads(entry.value)
        return value if isinstance(value, dict) else None

    async def _keys(self, bucket: str, pattern: str) -> list[str]:
        """Keys matching ``pattern``, filtered by the server (stream info subjects, paged)."""
        return await bucket_keys(self.nc, bucket, pattern)
