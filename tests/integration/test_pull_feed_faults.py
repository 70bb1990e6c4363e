"""The standing pull feed under consumer faults, on a real JetStream nats-server.

A 503 (nobody serves the consumer) must never latch: it is what every leader change
looks like on a cluster. Only a deletion, or staying unserved past the owner's bound,
ends a feed; and the projector then re-creates its consumer and goes on.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client
from nats.js import api

from cli.nats_server import NatsServer
from linkd.run_protocol import RUN_STREAM
from studio_gateway.pull_feed import ConsumerGone, FeedUnavailable, PullFeed
from studio_gateway.run_store import PROJECTOR_DURABLE
from tests.helpers import NatsServerFactory, wait_until
from tests.integration.gateway_runs_harness import runs_gateway, start_desktop

pytestmark = pytest.mark.timeout(60)

STREAM = "FEEDTEST"


@pytest.fixture
def js_server(nats_server_factory: NatsServerFactory) -> NatsServer:
    return nats_server_factory(jetstream=True)


@pytest.fixture
async def nc(js_server: NatsServer) -> AsyncIterator[Client]:
    client = await nats.connect(js_server.url)
    await client.jetstream().add_stream(name=STREAM, subjects=["feedtest.>"])
    yield client
    await client.close()


def _durable(name: str) -> api.ConsumerConfig:
    return api.ConsumerConfig(durable_name=name, ack_policy=api.AckPolicy.EXPLICIT)


async def test_a_503_does_not_latch_the_feed_serves_once_the_consumer_is_there(nc: Client) -> None:
    # No consumer yet: every pull request is answered 503 (no responders), as on a cluster
    # while a consumer's new leader is being elected.
    feed = await PullFeed.open(nc, STREAM, "LATER", batch=8, expires=1.0)
    try:
        assert await feed.fetch(8, 0.3) == []
        assert feed.unavailable_for() > 0.2
        assert feed.last_problem.startswith("503")
        await nc.jetstream().add_consumer(STREAM, _durable("LATER"))
        await nc.jetstream().publish("feedtest.a", b"one")
        msgs = await feed.fetch(8, 5.0)  # the backoff is at most 1 s: it asks again and gets it
        assert [m.data for m in msgs] == [b"one"]
        assert feed.unavailable_for() == 0.0
    finally:
        await feed.unsubscribe()


async def test_a_feed_unserved_past_its_bound_gives_up_typed(nc: Client) -> None:
    feed = await PullFeed.open(nc, STREAM, "NEVER", batch=8, expires=1.0, give_up_after=0.3)
    started = time.monotonic()
    try:
        with pytest.raises(FeedUnavailable, match="not served for"):
            await feed.fetch(8, 10.0)
        assert 0.3 <= time.monotonic() - started < 2.0
    finally:
        await feed.unsubscribe()


async def test_a_deleted_consumer_ends_the_feed_at_once(nc: Client) -> None:
    await nc.jetstream().add_consumer(STREAM, _durable("DOOMED"))
    feed = await PullFeed.open(nc, STREAM, "DOOMED", batch=8, expires=5.0, give_up_after=30.0)
    try:
        assert await feed.fetch(8, 0.2) == []  # the request is standing
        await nc.jetstream().delete_consumer(STREAM, "DOOMED")
        started = time.monotonic()
        with pytest.raises(ConsumerGone) as info:
            await feed.fetch(8, 10.0)
        assert not isinstance(info.value, FeedUnavailable)
        assert time.monotonic() - started < 2.0
    finally:
        await feed.unsubscribe()


async def test_projector_recreates_its_deleted_consumer_and_runs_complete(js_server: NatsServer) -> None:
    desktop = await start_desktop(js_server.url, "gina")
    try:
        async with runs_gateway(js_server.url) as gateway:
            admin = await nats.connect(js_server.url)
            try:
                await admin.jetstream().delete_consumer(RUN_STREAM, PROJECTOR_DURABLE)

                async def recreated() -> bool:
                    try:
                        await admin.jetstream().consumer_info(RUN_STREAM, PROJECTOR_DURABLE)
                    except nats.js.errors.NotFoundError:
                        return False
                    return True

                await wait_until(recreated, timeout=10.0, message="projector consumer not re-created")
            finally:
                await admin.close()
            run_id = await gateway.start_run("gina", {"runner": "mock", "input": {"count": 5, "delayMs": 10}})
            state = await gateway.wait_status("gina", run_id, {"completed", "failed", "cancelled"})
            assert state["status"] == "completed", state
            assert await gateway.metric('studio_runs_projector_errors_total{kind="consumer_gone"}') >= 1
            assert await gateway.metric("studio_runs_projector_restarts_total") >= 1
            health = await (await gateway.client.get("/healthz")).json()
            assert health["runs"] == "ready", health
            assert await gateway.metric("studio_runs_ready") == 1
    finally:
        await desktop.close()


async def test_healthz_says_unavailable_while_the_projector_is_not_served(js_server: NatsServer) -> None:
    """The projector's consumer gone and not re-creatable (JetStream refuses it): unavailable, with why."""
    async with runs_gateway(js_server.url) as gateway:
        admin = await nats.connect(js_server.url)
        try:
            js = admin.jetstream()
            # Taking the stream's consumer limit to 0 keeps the projector from re-creating it.
            info = await js.stream_info(RUN_STREAM)
            config = info.config
            await js.delete_consumer(RUN_STREAM, PROJECTOR_DURABLE)
            config.max_consumers = 0
            try:
                await js.update_stream(config)
            except nats.js.errors.BadRequestError:
                pytest.skip("this nats-server does not allow lowering max_consumers")

            async def unavailable() -> bool:
                body = await (await gateway.client.get("/healthz")).json()
                return body["runs"] == "unavailable" and "projector" in body.get("runsReason", "")

            await wait_until(unavailable, timeout=10.0, message="healthz never said unavailable")
            assert await gateway.metric("studio_runs_ready") == 0
            config.max_consumers = -1
            await js.update_stream(config)

            async def ready() -> bool:
                body = await (await gateway.client.get("/healthz")).json()
                return body["runs"] == "ready"

            await wait_until(ready, timeout=15.0, message="healthz never came back to ready")
        finally:
            await admin.close()
