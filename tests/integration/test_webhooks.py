"""Webhooks against a real local HTTP receiver, a real JetStream nats-server, the gateway in-process.

Signed deliveries (HMAC over ``<t>.<body>``) with a stable id; retried while the receiver is down
(a closed port for 10 s, then a listening one); a URL that always answers 500 ends ``failed``
with its last status; the SSRF guard refuses loopback URLs by default; the API is per user.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import pytest
from nats.js.errors import NotFoundError

import tunnel
from cli.nats_server import NatsServer, free_port
from contract.run_protocol import RUN_STREAM
from studio_gateway.hostnames import tunnel_hostname
from studio_gateway.runs.processors.service import PROCESSORS
from studio_gateway.webhooks.service import WEBHOOKS
from tests.helpers import NatsServerFactory, wait_until
from tests.integration.gateway_runs_harness import (
    TIMEOUT,
    Desktop,
    RunsGateway,
    accepting_desktop,
    publish_event,
    runs_gateway,
)
from tests.integration.webhook_receiver import WebhookReceiver

pytestmark = pytest.mark.timeout(90)

TEST_ENV = {
    "WEBHOOKS_ALLOW_HTTP": "true",
    "WEBHOOKS_ALLOW_PRIVATE": "true",
    "WEBHOOKS_RETRY_BASE_SECONDS": "0.2",
    "WEBHOOKS_RETRY_MAX_SECONDS": "1",
    "WEBHOOKS_TIMEOUT_SECONDS": "2",
}


@pytest.fixture
def js_server(nats_server_factory: NatsServerFactory) -> NatsServer:
    return nats_server_factory(jetstream=True)


@asynccontextmanager
async def webhook_gateway(url: str, env: Mapping[str, str]) -> AsyncIterator[RunsGateway]:
    async with runs_gateway(url, env) as gw:
        await asyncio.wait_for(gw.app[PROCESSORS].ready.wait(), TIMEOUT)
        await wait_until(lambda: gw.app[WEBHOOKS].store is not None, TIMEOUT)
        yield gw


@asynccontextmanager
async def receiver_on(port: int, **options: Any) -> AsyncIterator[WebhookReceiver]:
    receiver = WebhookReceiver(port, **options)
    await receiver.start()
    try:
        yield receiver
    finally:
        await receiver.stop()


async def register(gw: RunsGateway, user: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    resp = await gw.client.post("/api/webhooks", json=body, headers=gw.headers(user))
    return resp.status, await resp.json()


async def deliveries(gw: RunsGateway, user: str, webhook_id: str) -> list[dict[str, Any]]:
    resp = await gw.client.get(f"/api/webhooks/{webhook_id}/deliveries", headers=gw.headers(user))
    assert resp.status == 200, await resp.text()
    result: list[dict[str, Any]] = (await resp.json())["deliveries"]
    return result


async def started_run(gw: RunsGateway, desktop: Desktop, user: str) -> str:
    run_id = await gw.start_run(user, {"runner": "mock"})
    await wait_until(lambda: len(desktop.work) >= 1, TIMEOUT)
    return run_id


async def test_deliveries_are_signed_and_listed(js_server: NatsServer) -> None:
    async with (
        webhook_gateway(js_server.url, TEST_ENV) as gw,
        receiver_on(free_port()) as receiver,
    ):
        desktop = await accepting_desktop(js_server.url, "alice")
        try:
            run_id = await started_run(gw, desktop, "alice")

            # The processor's consumer exists and its index is loaded: from here a registration
            # brings the consumer's filters in step before it answers (checked at once below).
            async def processor_up() -> bool:
                runner = gw.app[PROCESSORS].runners.get("webhooks")
                if runner is None or not gw.app[WEBHOOKS].processor.index.ready.is_set():
                    return False
                try:
                    await runner.ctx.js.consumer_info(RUN_STREAM, "LINK_PROC_webhooks")
                except NotFoundError:
                    return False
                return True

            await wait_until(processor_up, TIMEOUT, message="the webhook processor never came up")
            status, hook = await register(gw, "alice", {"url": receiver.url, "eventTypes": ["stage", "done"]})
            assert status == 201, hook
            assert hook["secret"].startswith("whsec_") and hook["eventTypes"] == ["done", "stage"]
            receiver.secrets.append(hook["secret"])
            # Another user's webhook never sees alice's runs; a run-scoped one of alice's another run none.
            _, bob = await register(gw, "bob", {"url": receiver.url, "eventTypes": ["stage", "done"]})
            _, other = await register(gw, "alice", {"url": receiver.url, "runId": "run_other"})
            # JetStream delivers the webhook processor the events of those two users' hosts only.
            js = gw.app[PROCESSORS].runners["webhooks"].ctx.js
            info = await js.consumer_info(RUN_STREAM, "LINK_PROC_webhooks")
            hosts = {s.split(".host.")[1].split(".")[0] for s in info.config.filter_subjects or []}
            assert hosts == {tunnel.host_token(tunnel_hostname(u)) for u in ("alice", "bob")}, info.config
            await publish_event(desktop.nc, desktop.hostname, run_id, 1, "stage", stage="working")
            await publish_event(
                desktop.nc, desktop.hostname, run_id, 2, "done", finalSeq=2, status="completed"
            )
            await wait_until(lambda: len(receiver.unique) >= 2, TIMEOUT)
            receipts = sorted(receiver.unique.values(), key=lambda r: r.json["data"]["seq"])
            assert all(r.valid for r in receiver.raw)
            assert [r.json["type"] for r in receipts] == ["stage", "done"]
            first = receipts[0].json
            assert first["id"] == receipts[0].delivery and first["runId"] == run_id
            assert first["data"]["stage"] == "working" and isinstance(first["createdAt"], int)

            async def listed() -> list[dict[str, Any]] | None:
                rows = await deliveries(gw, "alice", hook["id"])
                return rows if [r["status"] for r in rows] == ["succeeded", "succeeded"] else None

            rows = await wait_until(listed, TIMEOUT)
            assert {r["id"] for r in rows} == set(receiver.unique)
            assert all(r["attempts"] == 1 and r["lastStatus"] == 200 for r in rows)
            assert await deliveries(gw, "bob", bob["id"]) == []
            assert await deliveries(gw, "alice", other["id"]) == []
            # The API is per user: bob cannot see or delete alice's webhook.
            resp = await gw.client.get(f"/api/webhooks/{hook['id']}/deliveries", headers=gw.headers("bob"))
            assert resp.status == 404
            listing = await (await gw.client.get("/api/webhooks", headers=gw.headers("alice"))).json()
            assert {h["id"] for h in listing["webhooks"]} == {hook["id"], other["id"]}
            assert all("secret" not in h for h in listing["webhooks"])
            scoped = await gw.client.get("/api/webhooks?runId=run_other", headers=gw.headers("alice"))
            assert [h["id"] for h in (await scoped.json())["webhooks"]] == [other["id"]]
            resp = await gw.client.delete(f"/api/webhooks/{hook['id']}", headers=gw.headers("bob"))
            assert resp.status == 404
            resp = await gw.client.delete(f"/api/webhooks/{hook['id']}", headers=gw.headers("alice"))
            assert resp.status == 200 and (await resp.json()) == {"id": hook["id"], "removed": True}
            assert len(receiver.raw) == 2
            # A removed webhook gets nothing more: a later event reaches only a webhook added since.
            _, later = await register(gw, "alice", {"url": receiver.url + "?later", "eventTypes": ["stage"]})
            receiver.secrets.append(later["secret"])
            await publish_event(desktop.nc, desktop.hostname, run_id, 3, "stage", stage="late")
            await wait_until(lambda: len(receiver.unique) >= 3, TIMEOUT)
            assert len(await deliveries(gw, "alice", later["id"])) == 1
            assert len(receiver.raw) == 3
            # Counted when the scheduler has the receiver's answer, after the receiver saw the request.
            assert await gw.settled_metric('studio_webhook_deliveries_total{result="succeeded"}', 3) == 3
        finally:
            await desktop.close()


async def test_retried_while_the_receiver_is_down_for_10_s(js_server: NatsServer) -> None:
    port = free_port()  # nothing listens there yet: connections are refused
    env = {**TEST_ENV, "WEBHOOKS_MAX_ATTEMPTS": "100"}
    async with webhook_gateway(js_server.url, env) as gw:
        desktop = await accepting_desktop(js_server.url, "carol")
        try:
            run_id = await started_run(gw, desktop, "carol")
            receiver = WebhookReceiver(port)
            _, hook = await register(gw, "carol", {"url": receiver.url})
            receiver.secrets.append(hook["secret"])
            down_since = time.monotonic()
            await publish_event(
                desktop.nc, desktop.hostname, run_id, 1, "done", finalSeq=1, status="completed"
            )

            async def retrying() -> dict[str, Any] | None:
                rows = await deliveries(gw, "carol", hook["id"])
                return rows[0] if rows and rows[0]["attempts"] >= 2 else None

            row = await wait_until(retrying, TIMEOUT)
            assert row["status"] == "pending" and row["lastStatus"] is None
            assert "Connect" in (row["lastError"] or ""), row
            await wait_until(lambda: time.monotonic() - down_since >= 10.0, 15.0, interval=0.1)
            before = (await deliveries(gw, "carol", hook["id"]))[0]
            await receiver.start()
            try:

                async def delivered() -> dict[str, Any] | None:
                    rows = await deliveries(gw, "carol", hook["id"])
                    return rows[0] if rows[0]["status"] == "succeeded" else None

                done = await wait_until(delivered, TIMEOUT)
            finally:
                await receiver.stop()
            # Every failed attempt, then the one that succeeded. One more may fail between reading
            # `before` and the receiver's start (an attempt a second): so counted, not `before` + 1.
            retried = await gw.metric('studio_webhook_deliveries_total{result="retry"}')
            assert done["attempts"] == retried + 1 > before["attempts"] and done["lastStatus"] == 200
            assert before["attempts"] >= 5, before  # retried all along, with a backoff capped at 1 s
            assert len(receiver.raw) == 1 and receiver.raw[0].valid
            assert list(receiver.unique) == [done["id"]]
            print(f"receiver down 10 s: {before['attempts']} failed attempts, then delivered")
        finally:
            await desktop.close()


async def test_a_permanently_failing_url_ends_failed(js_server: NatsServer) -> None:
    env = {**TEST_ENV, "WEBHOOKS_MAX_ATTEMPTS": "3"}
    async with (
        webhook_gateway(js_server.url, env) as gw,
        receiver_on(free_port(), status=500) as receiver,
    ):
        desktop = await accepting_desktop(js_server.url, "dave")
        try:
            run_id = await started_run(gw, desktop, "dave")
            _, hook = await register(gw, "dave", {"url": receiver.url})
            receiver.secrets.append(hook["secret"])
            await publish_event(desktop.nc, desktop.hostname, run_id, 1, "done", finalSeq=1, status="failed")

            async def failed() -> dict[str, Any] | None:
                rows = await deliveries(gw, "dave", hook["id"])
                return rows[0] if rows and rows[0]["status"] == "failed" else None

            row = await wait_until(failed, TIMEOUT)
            assert row["attempts"] == 3 and row["lastStatus"] == 500 and row["lastError"] == "HTTP 500"
            assert row["nextAttemptAt"] is None
            assert len(receiver.raw) == 3 and len({r.delivery for r in receiver.raw}) == 1
            assert all(r.valid for r in receiver.raw)
            assert await gw.metric('studio_webhook_deliveries_total{result="retry"}') == 2
            assert await gw.metric('studio_webhook_deliveries_total{result="failed"}') == 1
        finally:
            await desktop.close()


async def test_urls_the_settings_do_not_allow_are_refused(js_server: NatsServer) -> None:
    async with webhook_gateway(js_server.url, {}) as gw:
        for url in (
            "http://example.com/hook",
            "https://127.0.0.1/hook",
            "https://localhost/hook",
            "https://10.1.2.3/hook",
            "https://169.254.169.254/latest",
            "https://[::1]/hook",
            "ftp://example.com/",
        ):
            status, body = await register(gw, "erin", {"url": url})
            assert status == 422, (url, body)
            assert body["error"]["code"] == "invalid_url"
        status, body = await register(
            gw, "erin", {"url": "https://hooks.example.com/x", "eventTypes": ["nope"]}
        )
        assert status == 422 and body["error"]["field"] == "eventTypes"
        status, body = await register(gw, "erin", {"url": "https://hooks.example.com/x"})
        assert status == 201 and body["eventTypes"] == ["done"] and body["runId"] is None


async def test_a_removed_webhooks_pending_delivery_ends_failed(js_server: NatsServer) -> None:
    env = {**TEST_ENV, "WEBHOOKS_MAX_ATTEMPTS": "100"}
    async with webhook_gateway(js_server.url, env) as gw:
        desktop = await accepting_desktop(js_server.url, "gina")
        try:
            run_id = await started_run(gw, desktop, "gina")
            _, hook = await register(gw, "gina", {"url": f"http://127.0.0.1:{free_port()}/hook"})
            await publish_event(
                desktop.nc, desktop.hostname, run_id, 1, "done", finalSeq=1, status="completed"
            )

            async def failing() -> dict[str, Any] | None:
                rows = await deliveries(gw, "gina", hook["id"])
                return rows[0] if rows and rows[0]["attempts"] >= 1 else None

            row = await wait_until(failing, TIMEOUT)
            resp = await gw.client.delete(f"/api/webhooks/{hook['id']}", headers=gw.headers("gina"))
            assert resp.status == 200
            store = gw.app[WEBHOOKS].store
            assert store is not None

            async def ended() -> dict[str, Any] | None:
                found = await store.delivery(hook["id"], row["id"])
                return found[0] if found and found[0]["status"] == "failed" else None

            record = await wait_until(ended, TIMEOUT)
            assert record["lastError"] == "webhook_deleted" and record["attempts"] >= 2
        finally:
            await desktop.close()
