"""The webhook processor: turns run events into delivery records (sending is :mod:`.scheduler`'s).

For each event of a type some webhook wants: the event's host (its subject) is looked up in the
in-memory :class:`~.index.WebhookIndex` (no webhook of that host's user: done, no I/O); else the
run's owner is read from the run state (once per run, cached: a run's owner never changes) and
the event is dropped unless the subject's host is that owner's (a desktop publishes only under
its own host, so only its own runs' events reach its users' webhooks). Each of the owner's
webhooks that matches (its ``runId``, if any, and ``eventTypes``) and existed when JetStream
stored the event gets one delivery record, created with ``kv.create`` under an id derived from
(webhook, event): the record is the anchor, so a replay, a redelivery, a re-published copy of
the event or a second instance never makes a second delivery.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from typing import Any, Final

from ..runs.processors.anchors import RetryLater
from ..runs.processors.base import Processor, RunEvent
from ..runs.processors.context import ProcessorContext
from ..runs.store import user_index_token
from .index import WebhookIndex
from .store import WebhookStore

__all__ = ["EVENT_TYPES", "WebhookProcessor", "delivery_id"]

# The run event types a webhook may subscribe to (heartbeats are not worth a POST).
EVENT_TYPES: Final = frozenset({"stage", "output", "done"})
DEFAULT_EVENT_TYPES: Final = ("done",)
CACHE_RUNS: Final = 10_000


def delivery_id(webhook_id: str, event_key: str) -> str:
    """Stable across retries, replays and instances: derived from the webhook and the event."""
    return "whd_" + hashlib.sha256(f"{webhook_id}:{event_key}".encode()).hexdigest()[:32]


class WebhookProcessor(Processor):
    name = "webhooks"
    event_types = EVENT_TYPES

    def __init__(self) -> None:
        self.store: WebhookStore | None = None
        self.index = WebhookIndex()
        self._owners: OrderedDict[str, tuple[str, str]] = OrderedDict()  # run id -> (user, host token)
        self.created = 0

    async def start(self, ctx: ProcessorContext) -> None:
        await self.index.ready.wait()  # the consumer's filters come from it

    def subject_filters(self, prefix: str) -> list[str] | None:
        """Only the hosts whose users have webhooks: JetStream does not deliver the others' events."""
        if not self.index.ready.is_set():
            return None
        return [f"{prefix}.host.{host}.runs.*" for host in self.index.hosts()]

    def wants_host(self, host_token: str) -> bool:
        # Until the index is loaded every host may matter (handle() then asks to retry later).
        return not self.index.ready.is_set() or self.index.has_host(host_token)

    async def _owner(self, event: RunEvent, ctx: ProcessorContext) -> tuple[str, str] | None:
        owner = self._owners.get(event.run_id)
        if owner is None:
            loaded = await ctx.store.load(event.run_id)
            if loaded is None:
                return None
            state = loaded[0]
            owner = (state.user_id, state.host_token)
            self._owners[event.run_id] = owner
            while len(self._owners) > CACHE_RUNS:
                self._owners.popitem(last=False)
        return owner

    async def handle(self, event: RunEvent, ctx: ProcessorContext) -> None:
        store = self.store
        if store is None or not self.index.ready.is_set():
            raise RetryLater("the webhooks are not loaded yet", 1.0)
        hooks = self.index.for_host(event.host_token)
        if not hooks:
            return  # nobody on this host has a webhook
        owner = await self._owner(event, ctx)
        if owner is None or owner[1] != event.host_token:
            return  # an unknown run, or another host's: never a webhook
        user_id = owner[0]
        stored_ms = int((event.stored_at or time.time()) * 1000)
        for hook in hooks:
            if hook.get("userId") != user_id or hook.get("runId") not in (None, event.run_id):
                continue
            if event.type not in hook.get("eventTypes", DEFAULT_EVENT_TYPES):
                continue
            if int(hook.get("createdAt", 0)) > stored_ms:
                continue  # registered after the event
            ident = delivery_id(hook["id"], event.key)
            body = {
                "id": ident,
                "type": event.type,
                "runId": event.run_id,
                "createdAt": stored_ms,
                "data": event.data,
            }
            now = int(time.time() * 1000)
            record: dict[str, Any] = {
                "id": ident,
                "webhookId": hook["id"],
                "userToken": user_index_token(user_id),
                "runId": event.run_id,
                "type": event.type,
                "eventKey": event.key,
                "status": "pending",
                "attempts": 0,
                "nextAttemptAt": now,
                "leaseUntil": 0,
                "lastStatus": None,
                "lastError": None,
                "createdAt": now,
                "updatedAt": now,
                "body": json.dumps(body, separators=(",", ":")),
            }
            if await store.create_delivery(record):
                self.created += 1
