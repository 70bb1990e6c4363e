"""The standing pull feed under consumer faults, on a real JetStream nats-server.

A 503 (nobody serves the consumer) must never latch: it is what every leader change
looks like on a cluster. Only a deletion, or staying unserved past the owner's bound,
ends a feed; and the projector then re-creates its consumer and goes on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client
from nats.js import api

import tunnel
from cli.nats_server import NatsServer
from contract.run_protocol import RUN_STREAM
from studio_gateway.hostnames import tunnel_hostname
from studio_gateway.runs.pull_feed import ConsumerGone, FeedUnavailable, PullFeed, stored_at
from studio_gateway.runs.store import host_consumer_name
from tests.helpers import NatsServerFactory, wait_until
from tests.integration.gateway_runs_harness import accepting_desktop, runs_gateway, start_desktop

pytestmark = pytest.mark.timeout(60)

STREAM = "FEEDTEST"
TERMINAL = {"completed", "failed", "cancelled"}


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
        loop = asyncio.get_running_loop()
        asked_at = loop.time()
        assert await feed.fetch(8, 0.3) == []
        assert 0 < feed.unavailable_for() <= loop.time() - asked_at
        since = loop.time() - feed.unavailable_for()
        assert await feed.fetch(8, 0.3) == []  # more 503s: still unavailable since the first
        assert abs((loop.time() - feed.unavailable_for()) - since) < 0.01
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


async def _consumer_exists(nc: Client, name: str) -> bool:
    try:
        await nc.jetstream().consumer_info(RUN_STREAM, name)
    except nats.js.errors.NotFoundError:
        return False
    return True


async def test_projector_recreates_a_deleted_host_consumer_and_runs_complete(js_server: NatsServer) -> None:
    desktop = await start_desktop(js_server.url, "gina")
    name = host_consumer_name(tunnel.host_token(tunnel_hostname("gina")))
    body = {"runner": "mock", "input": {"count": 5, "delayMs": 10}}
    try:
        async with runs_gateway(js_server.url) as gateway:
            admin = await nats.connect(js_server.url)
            try:
                first = await gateway.start_run("gina", body)
                assert (await gateway.wait_status("gina", first, TERMINAL))["status"] == "completed"
                assert await _consumer_exists(admin, name)
                await admin.jetstream().delete_consumer(RUN_STREAM, name)
                second = await gateway.start_run("gina", body)
                state = await gateway.wait_status("gina", second, TERMINAL)
                assert state["status"] == "completed", state
                assert await _consumer_exists(admin, name)  # re-created
            finally:
                await admin.close()
            assert await gateway.metric('studio_runs_projector_errors_total{kind="consumer_gone"}') >= 1
            assert await gateway.metric("studio_runs_projector_restarts_total") >= 1
            health = await (await gateway.client.get("/healthz")).json()
            assert health["runs"] == "ready", health
            assert await gateway.metric("studio_runs_ready") == 1
    finally:
        await desktop.close()


async def test_healthz_says_unavailable_while_the_projector_is_not_served(js_server: NatsServer) -> None:
    """A host consumer gone and not re-creatable (JetStream refuses it): unavailable, with why."""
    desktop = await accepting_desktop(js_server.url, "hana")  # takes the run, sends nothing
    name = host_consumer_name(tunnel.host_token(tunnel_hostname("hana")))
    try:
        async with runs_gateway(js_server.url, liveness_timeout=60.0) as gateway:
            admin = await nats.connect(js_server.url)
            try:
                js = admin.jetstream()
                await gateway.start_run("hana", {"runner": "echo", "input": {}})
                await wait_until(lambda: _consumer_exists(admin, name), timeout=10.0)
                # A placeholder, then the limit at today's count (0 would mean "no limit"): the
                # projector cannot re-create the host's consumer once it is deleted.
                await js.add_consumer(RUN_STREAM, _durable("PLACEHOLDER"))
                await js.delete_consumer(RUN_STREAM, name)
                config = (await js.stream_info(RUN_STREAM)).config
                config.max_consumers = len(await js.consumers_info(RUN_STREAM))
                await js.update_stream(config)

                async def health() -> dict[str, str]:
                    answer: dict[str, str] = await (await gateway.client.get("/healthz")).json()
                    return answer

                async def unavailable() -> bool:
                    body = await health()
                    return body["runs"] == "unavailable" and "projector" in body.get("runsReason", "")

                await wait_until(unavailable, timeout=10.0, message="healthz never said unavailable")
                assert await gateway.metric("studio_runs_ready") == 0
                # Unavailable after a second unserved; counted when a re-open attempt fails, which
                # may come later (its JetStream requests).
                assert await gateway.settled_metric('studio_runs_projector_errors_total{kind="open"}', 1) >= 1
                config.max_consumers = -1
                await js.update_stream(config)

                async def ready() -> bool:
                    return (await health())["runs"] == "ready"

                await wait_until(ready, timeout=15.0, message="healthz never came back to ready")
                assert await _consumer_exists(admin, name)
            finally:
                await admin.close()
    finally:
        await desktop.close()


async def test_stored_at_reads_the_ack_subject_like_nats_py_does(nc: Client) -> None:
    await nc.jetstream().add_consumer(STREAM, _durable("STAMPS"))
    await nc.jetstream().publish("feedtest.t", b"x")
    feed = await PullFeed.open(nc, STREAM, "STAMPS", batch=8, expires=1.0)
    try:
        (msg,) = await feed.fetch(8, 5.0)
        stamp = msg.metadata.timestamp
        assert stamp is not None
        assert stored_at(msg) == pytest.approx(stamp.timestamp(), abs=1e-6)
    finally:
        await feed.unsubscribe()
