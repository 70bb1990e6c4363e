"""WebhookIndex says "ready" only once it holds every webhook the bucket had when it started.

The webhook processor builds its consumer's subject filters from the index the moment it is
ready, and drops the events of hosts the index does not know: an index that called itself
ready early would lose those hosts' deliveries for good. nats-py's watcher can send its
"nothing more" marker before entries it has already received (its consumer info shows nothing
pending once all were delivered), so the index must not trust that marker. Real JetStream.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client
from nats.js.kv import KeyValue

from cli.nats_server import NatsServer
from studio_gateway.webhooks.index import WebhookIndex, host_token_of
from studio_gateway.webhooks.store import WEBHOOK_BUCKET, WebhookStore
from tests.helpers import NatsServerFactory

pytestmark = pytest.mark.timeout(60)

USERS = 40
HOOKS_PER_USER = 5


@pytest.fixture
async def bucket(nats_server_factory: NatsServerFactory) -> AsyncIterator[tuple[Client, KeyValue]]:
    server: NatsServer = nats_server_factory(jetstream=True)
    nc = await nats.connect(server.url)
    try:
        store = await WebhookStore.open(nc, nc.jetstream(), replicas=1, retention=3600)
        yield nc, store.webhooks
    finally:
        await nc.close()


def user_of(u: int) -> str:
    return f"user-{u}"


def hook_id_of(u: int, h: int) -> str:
    return f"wh_{u}_{h}"


def hook_key(u: int, h: int) -> str:
    """The webhook's key in the bucket (``<user token>.<webhook id>``; any token serves here)."""
    return f"u{u}.{hook_id_of(u, h)}"


async def put_hooks(kv: KeyValue) -> dict[str, set[str]]:
    """USERS x HOOKS_PER_USER webhooks; returns webhook ids by host token."""
    by_host: dict[str, set[str]] = {}
    for u in range(USERS):
        for h in range(HOOKS_PER_USER):
            record = {"id": hook_id_of(u, h), "userId": user_of(u)}
            await kv.put(hook_key(u, h), json.dumps(record).encode())
            by_host.setdefault(host_token_of(user_of(u)), set()).add(hook_id_of(u, h))
    return by_host


def snapshot(index: WebhookIndex) -> dict[str, set[str]]:
    return {host: {h["id"] for h in index.for_host(host)} for host in index.hosts()}


async def ready_snapshot(kv: KeyValue) -> dict[str, set[str]]:
    """What the index holds at the instant it says ready (taken inside ready.set)."""
    index = WebhookIndex()
    seen: list[dict[str, set[str]]] = []
    set_ready = index.ready.set

    def record_then_set() -> None:
        seen.append(snapshot(index))
        set_ready()

    index.ready.set = record_then_set  # type: ignore[method-assign]
    task = asyncio.create_task(index.run(kv))
    try:
        await asyncio.wait_for(index.ready.wait(), 10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return seen[0]


async def test_ready_means_every_stored_webhook_is_indexed(bucket: tuple[Client, KeyValue]) -> None:
    _, kv = bucket
    expected = await put_hooks(kv)
    for _ in range(5):  # a fresh watch each time: the early marker is a race
        assert await ready_snapshot(kv) == expected


async def test_deleted_webhooks_are_gone_when_ready(bucket: tuple[Client, KeyValue]) -> None:
    _, kv = bucket
    expected = await put_hooks(kv)
    # Every webhook of the last three users: the bucket's last message is a delete marker,
    # and ready must still come.
    gone = {host_token_of(user_of(u)) for u in range(USERS - 3, USERS)}
    for u in range(USERS - 3, USERS):
        for h in range(HOOKS_PER_USER):
            await kv.delete(hook_key(u, h))
    assert await ready_snapshot(kv) == {h: ids for h, ids in expected.items() if h not in gone}


async def test_an_empty_or_purged_bucket_is_ready_at_once(bucket: tuple[Client, KeyValue]) -> None:
    nc, kv = bucket
    assert await ready_snapshot(kv) == {}
    await put_hooks(kv)
    await nc.jetstream().purge_stream(f"KV_{WEBHOOK_BUCKET}")  # messages 0, last sequence > 0
    assert await ready_snapshot(kv) == {}


async def test_ready_comes_when_the_last_message_was_purged_by_an_operator(
    bucket: tuple[Client, KeyValue],
) -> None:
    nc, kv = bucket
    expected = await put_hooks(kv)
    u, h = USERS - 1, HOOKS_PER_USER - 1  # the last one put
    # The bucket's last sequence is gone, other keys remain: that sequence never arrives.
    await nc.jetstream().purge_stream(
        f"KV_{WEBHOOK_BUCKET}", subject=f"$KV.{WEBHOOK_BUCKET}.{hook_key(u, h)}"
    )
    expected[host_token_of(user_of(u))].discard(hook_id_of(u, h))
    assert await ready_snapshot(kv) == expected
