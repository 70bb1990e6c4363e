"""The processor framework on a real JetStream nats-server, gateways in-process.

A processor added after 1,000 runs' events are in the stream catches up from the start of
retention and performs its side effect once per event (anchors); its lag is measurable and
drains to 0; the projector is listed as a processor through the same API.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nats
import pytest
from aiohttp.test_utils import TestClient, TestServer

import tunnel
from cli.nats_server import NatsServer
from contract.run_protocol import run_event_subject
from studio_gateway.app import create_app
from studio_gateway.auth import issue_token
from studio_gateway.config import GatewayConfig
from studio_gateway.runs.processors import runner as runner_module
from studio_gateway.runs.processors.anchors import ANCHOR_BUCKET
from studio_gateway.runs.processors.base import Processor, RunEvent
from studio_gateway.runs.processors.context import ProcessorContext
from studio_gateway.runs.processors.feed import set_consumer_filters
from studio_gateway.runs.processors.service import PROCESSORS
from studio_gateway.runs.service import RUNS
from studio_gateway.runs.store import bucket_keys
from tests.helpers import NatsServerFactory, wait_until
from tests.integration.counting_processor import CountingProcessor, effects
from tests.integration.gateway_runs_harness import TIMEOUT, RunsGateway, runs_env, runs_gateway

pytestmark = pytest.mark.timeout(120)

RUN_COUNT = 1000
EVENTS_PER_RUN = 3


@pytest.fixture
def js_server(nats_server_factory: NatsServerFactory) -> NatsServer:
    return nats_server_factory(jetstream=True)


@asynccontextmanager
async def runs_gateway_with(url: str, *processors: Processor) -> AsyncIterator[RunsGateway]:
    """A gateway app (in-process) with ``processors`` registered before it starts."""
    config = GatewayConfig.from_env(runs_env(url))
    app = create_app(config)
    for processor in processors:
        app[PROCESSORS].register(processor)
    client: TestClient[Any, Any] = TestClient(TestServer(app))
    await client.start_server()
    try:
        assert await app[RUNS].wait_ready(TIMEOUT), app[RUNS].unavailable_reason()
        await asyncio.wait_for(app[PROCESSORS].ready.wait(), TIMEOUT)
        yield RunsGateway(client, config, app)
    finally:
        await client.close()


async def publish_runs(url: str, runs: int) -> set[str]:
    """``runs`` runs of 3 events each, half of them as one batched message, as linkd sends them."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    keys: set[str] = set()
    try:
        for i in range(runs):
            host = f"host-{i % 7}"
            run_id = f"run_{i:05d}"
            subject = run_event_subject(tunnel.HostSubjects.for_host(host), run_id)
            events = [
                {"runId": run_id, "fence": 1, "seq": seq, "ts": 0, "type": kind}
                for seq, kind in ((1, "stage"), (2, "output"), (3, "done"))
            ]
            keys.update(f"{run_id}.1.{e['seq']}" for e in events)
            if i % 2:
                body = "\n".join(json.dumps(e) for e in events).encode()
                await js.publish(subject, body, headers={"Nats-Msg-Id": f"{run_id}:1:1-3:x"})
            else:
                for e in events:
                    await js.publish(
                        subject, json.dumps(e).encode(), headers={"Nats-Msg-Id": f"{run_id}:1:{e['seq']}:x"}
                    )
    finally:
        await nc.close()
    return keys


async def test_a_processor_added_later_catches_up_once_per_event(
    js_server: NatsServer, tmp_path: Path
) -> None:
    url = js_server.url
    # A first gateway sets the stream up; the events come before any counting processor exists.
    async with runs_gateway(url) as first:
        expected = await publish_runs(url, RUN_COUNT)
        assert len(expected) == RUN_COUNT * EVENTS_PER_RUN
        lags = {lag.name: lag for lag in await first.app[PROCESSORS].lags()}
        assert "projector" in lags and "counting" not in lags
    path = tmp_path / "effects.txt"
    processor = CountingProcessor(path)
    async with runs_gateway_with(url, processor) as gw:
        service = gw.app[PROCESSORS]

        async def all_done() -> bool:
            return len(effects(path)) >= len(expected)

        await wait_until(all_done, 60, interval=0.1, message=lambda: f"{len(effects(path))} effects")
        counts = Counter(key for key, _ in effects(path))
        assert set(counts) == expected
        assert max(counts.values()) == 1, [k for k, n in counts.items() if n > 1][:5]

        async def drained() -> bool:
            lag = {x.name: x for x in await service.lags()}["counting"]
            return lag.pending == 0

        await wait_until(drained, 30, interval=0.1)
        # The server's own subject listing (as the gateway lists keys): nats-py's KeyValue.keys()
        # reads every key through a watcher and once answered NoKeysError for 3,000 keys under load.
        done = await bucket_keys(service.runners["counting"].ctx.nc, ANCHOR_BUCKET, "counting.>")
        assert len(done) == len(expected)
        token = issue_token(gw.config.auth, "ops", scopes=["runs:admin"])
        resp = await gw.client.get("/api/admin/processors", headers={"Authorization": f"Bearer {token}"})
        assert resp.status == 200
        rows = {row["name"]: row for row in (await resp.json())["processors"]}
        assert set(rows) >= {"projector", "webhooks", "counting"}
        assert rows["counting"]["pending"] == 0
        # handle() calls: each event at least once (a redelivery under load calls it again; the
        # anchors keep its effect single, which the file above shows).
        assert rows["counting"]["handledHere"] >= len(expected)
        assert rows["projector"]["checkpoint"].startswith("LINK_RUNS_H_")
        events = await gw.metric('studio_processor_events_total{processor="counting"}')
        assert events >= len(expected)

        async def gauge_drained() -> bool:
            text = await gw.metrics()
            return 'studio_processor_pending{processor="counting"} 0.0' in text

        await wait_until(gauge_drained, 30, interval=0.2)


class LateFilterProcessor(Processor):
    """Wants one host's events, but only from its second look on: the webhook processor when a
    webhook is registered while its consumer is being created."""

    name = "late-filter"

    def __init__(self, host_token: str) -> None:
        self.host_token = host_token
        self.asked = 0
        self.keys: list[str] = []

    def subject_filters(self, prefix: str) -> list[str] | None:
        self.asked += 1
        return [] if self.asked == 1 else [f"{prefix}.host.{self.host_token}.runs.*"]

    async def handle(self, event: RunEvent, ctx: ProcessorContext) -> None:
        self.keys.append(event.key)


async def test_events_stored_while_a_new_host_is_added_to_the_filters_are_delivered(
    js_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host added to a dynamic consumer's filters while a pull with the filters of before
    is standing gets the events stored in between: JetStream does not move the consumer past
    them (the webhook processor relies on it when a webhook is registered while its consumer
    is being made). Checked while looking into a CI failure of the killed-gateway webhook test;
    the filter update is held here until the events are stored, so the window is wide."""
    url = js_server.url
    async with runs_gateway(url):  # sets the stream up
        pass
    host = tunnel.HostSubjects.for_host("late-host")
    updating = asyncio.Event()
    stored = asyncio.Event()

    async def held_update(js: Any, processor: str, subjects: list[str]) -> None:
        if processor == LateFilterProcessor.name:
            updating.set()
            await stored.wait()
        await set_consumer_filters(js, processor, subjects)

    monkeypatch.setattr(runner_module, "set_consumer_filters", held_update)
    processor = LateFilterProcessor(host.token)
    async with runs_gateway_with(url, processor):
        await asyncio.wait_for(updating.wait(), TIMEOUT)
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            for seq in (1, 2, 3):
                event = {"runId": "run_late", "fence": 1, "seq": seq, "ts": 0, "type": "stage"}
                await js.publish(run_event_subject(host, "run_late"), json.dumps(event).encode())
        finally:
            await nc.close()
        stored.set()
        await wait_until(lambda: len(processor.keys) >= 3, 20, message=lambda: f"{processor.keys}")
    assert sorted(processor.keys) == [f"run_late.1.{seq}" for seq in (1, 2, 3)]
