"""Run lifecycle through the gateway against a real JetStream nats-server: several gateway
instances, fences and hosts, the reaper, cancel both ways, idempotent set-up.

Events are published by the real linkd uplink (``start_desktop``) or, where a test needs
to forge or withhold them, by the test itself as a daemon would (``publish_event``).
"""

from __future__ import annotations

import asyncio
import time

import nats
import pytest
from aiohttp.test_utils import TestClient, TestServer

import tunnel
from cli.nats_server import NatsServer
from contract.run_protocol import RUN_STREAM
from studio_gateway.app import create_app
from studio_gateway.auth import issue_token
from studio_gateway.config import GatewayConfig, RunsConfig
from studio_gateway.hostnames import tunnel_hostname
from studio_gateway.natsconn import GATEWAY_NATS
from studio_gateway.runs.metrics import RunMetrics
from studio_gateway.runs.reaper import Reaper
from studio_gateway.runs.state import RunState
from studio_gateway.runs.store import ACTIVE_BUCKET, OUTPUT_BUCKET, STATE_BUCKET, RunStore
from tests.helpers import NatsServerFactory, settled_value, wait_until
from tests.integration.gateway_runs_harness import (
    TIMEOUT,
    RunsGateway,
    accepting_desktop,
    publish_event,
    runs_env,
    runs_gateway,
    start_desktop,
)

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def js_server(nats_server_factory: NatsServerFactory) -> NatsServer:
    return nats_server_factory(jetstream=True)


async def settled_sum(sample: str, at_least: float, *gateways: RunsGateway) -> float:
    """``sample`` summed over ``gateways`` once the sum reaches ``at_least`` (returned, so the
    caller can check it went no further; see :func:`tests.helpers.settled_value`)."""

    async def total() -> float:
        return sum([await gw.metric(sample) for gw in gateways])

    return await settled_value(total, at_least, TIMEOUT, what=f"{sample} summed")


async def test_two_gateway_instances_share_runs_attach_on_the_other_one(js_server: NatsServer) -> None:
    desktop = await start_desktop(js_server.url, "frank")
    try:
        async with runs_gateway(js_server.url) as a, runs_gateway(js_server.url) as b:
            health = await (await a.client.get("/healthz")).json()
            assert health == {"status": "ok", "nats": "connected", "runs": "ready"}
            run_id = await a.start_run("frank", {"runner": "mock", "input": {"count": 20, "delayMs": 30}})
            await b.wait_status("frank", run_id, {"in_progress"})
            live = await b.sse("frank", run_id)  # attached on B while it runs, from the start
            assert live[-1]["event"] == "end" and live[-1]["data"]["status"] == "completed"
            seqs = [int(m["id"]) for m in live[:-1]]
            assert seqs == list(range(1, seqs[-1] + 1))
            outputs = [m["data"]["data"] for m in live if m["event"] == "output"]
            assert outputs == [f"chunk {i}\n" for i in range(20)]
            # Both instances read the same state and the same events.
            assert await a.get_run("frank", run_id) == await b.get_run("frank", run_id)
            assert await a.export("frank", run_id) == await b.export("frank", run_id)
            resumed = await a.sse("frank", run_id, query="?after=10")
            assert [m["data"] for m in resumed] == [m["data"] for m in live[10:]]
            # Each event was applied once, by one of the two projectors (counted after the run's
            # write and its index's: a reader can see it completed first).
            applied = 'studio_runs_uplink_events_total{result="applied"}'
            assert await settled_sum(applied, seqs[-1], a, b) == seqs[-1]
    finally:
        await desktop.close()


async def test_stale_fence_and_other_host_events_are_ignored_and_counted(js_server: NatsServer) -> None:
    desktop = await accepting_desktop(js_server.url, "grace")
    intruder = await nats.connect(js_server.url)
    try:
        async with runs_gateway(js_server.url) as gw:
            run_id = await gw.start_run("grace", {"runner": "echo", "input": "x"})
            await wait_until(lambda: len(desktop.work) == 1, 5.0, message="work item never arrived")
            assert desktop.work[0]["runFenceToken"] == 1 and desktop.work[0]["runId"] == run_id
            host = desktop.hostname
            await publish_event(desktop.nc, host, run_id, 1, "stage", stage="starting-run")
            await publish_event(desktop.nc, host, run_id, 2, "output", fence=7, data="stale\n")
            other = tunnel_hostname("mallory")
            # (Seqs the real daemon does not use yet: message ids are de-duplicated stream-wide.)
            await publish_event(intruder, other, run_id, 8, "output", data="forged\n")
            await publish_event(intruder, other, run_id, 9, "done", finalSeq=9, status="failed", reason="x")
            await publish_event(desktop.nc, host, run_id, 1, "stage", stage="dup")  # same msg id: dropped
            await publish_event(desktop.nc, host, run_id, 2, "output", data="real\n")
            await publish_event(desktop.nc, host, run_id, 3, "done", finalSeq=3, status="completed")
            state = await gw.wait_status("grace", run_id, {"completed", "failed"})
            assert state["status"] == "completed" and state["seq"] == 3 and state["outputBytes"] == 5
            assert state["stage"] == "starting-run"
            events = await gw.export("grace", run_id)
            assert [(e["seq"], e["type"]) for e in events] == [(1, "stage"), (2, "output"), (3, "done")]
            assert events[1]["data"] == "real\n"
            # Settled after the group's write (and its index's): a reader can see the run completed first.
            assert await gw.settled_metric('studio_runs_uplink_events_total{result="stale_fence"}', 1) == 1
            # Mallory's host has no runs, so no consumer: its events never even reach a projector.
            assert await gw.metric('studio_runs_uplink_events_total{result="wrong_host"}') == 0
            assert await gw.metric('studio_runs_uplink_events_total{result="stray"}') == 0
            # A late event after the end changes nothing.
            await publish_event(desktop.nc, host, run_id, 4, "output", data="late\n")
            await wait_until(
                lambda: gw.metric('studio_runs_uplink_events_total{result="terminal"}'), 5.0, message="late"
            )
            assert await gw.get_run("grace", run_id) == state
    finally:
        await intruder.close()
        await desktop.close()


async def test_out_of_order_events_are_applied_in_seq_order(js_server: NatsServer) -> None:
    desktop = await accepting_desktop(js_server.url, "heidi")
    try:
        async with runs_gateway(js_server.url) as gw:
            run_id = await gw.start_run("heidi", {"runner": "echo"})
            await wait_until(lambda: len(desktop.work) == 1, 5.0)
            host = desktop.hostname
            for seq, data in ((2, "b"), (3, "c")):
                await publish_event(desktop.nc, host, run_id, seq, "output", data=data)
            # Seen before seq 1 exists (sent with it, they would be sorted in one batch): held as a gap.
            gap = 'studio_runs_uplink_events_total{result="gap"}'
            assert await gw.settled_metric(gap, 1) >= 1
            assert (await gw.get_run("heidi", run_id))["seq"] in (None, 0)
            await publish_event(desktop.nc, host, run_id, 1, "output", data="a")
            await publish_event(desktop.nc, host, run_id, 4, "done", finalSeq=4, status="completed")
            state = await gw.wait_status("heidi", run_id, {"completed"})
            assert state["seq"] == 4 and state["outputBytes"] == 3
            assert [e.get("data") for e in await gw.export("heidi", run_id)][:3] == ["a", "b", "c"]
    finally:
        await desktop.close()


async def test_reaper_fails_a_silent_run_and_a_late_event_cannot_revive_it(js_server: NatsServer) -> None:
    desktop = await accepting_desktop(js_server.url, "ivan")
    try:
        # No resume window: silent past the liveness timeout is desktop_lost at once (the stalled
        # state in between is tested in test_gateway_runs_stalled.py).
        async with runs_gateway(js_server.url, liveness_timeout=1.5, resume_window=0) as gw:
            run_id = await gw.start_run("ivan", {"runner": "echo"})
            await wait_until(lambda: len(desktop.work) == 1, 5.0)
            await publish_event(desktop.nc, desktop.hostname, run_id, 1, "stage", stage="working")
            await gw.wait_status("ivan", run_id, {"in_progress"})
            reader = asyncio.ensure_future(gw.sse("ivan", run_id))  # attached before the reaping
            silent_since = time.monotonic()
            state = await gw.wait_status("ivan", run_id, {"failed"}, timeout=1.5 + 4.0)
            assert time.monotonic() - silent_since < 1.5 + 2.0 + 1.0
            assert state["failureKind"] == "desktop_lost" and "sent nothing" in state["failureReason"]
            assert state["fence"] == 2  # fenced off: the old execution's events no longer count
            messages = await asyncio.wait_for(reader, 3.0)  # the attached reader ended promptly
            assert [m["event"] for m in messages] == ["stage", "end"]
            assert messages[-1]["data"]["failureKind"] == "desktop_lost"
            await publish_event(
                desktop.nc, desktop.hostname, run_id, 2, "done", finalSeq=2, status="completed"
            )
            await wait_until(
                lambda: gw.metric('studio_runs_uplink_events_total{result="terminal"}'), 5.0, message="late"
            )
            assert await gw.get_run("ivan", run_id) == state
            # Counted once the reaper has its write's acknowledgement, which nothing above waits for.
            assert await gw.settled_metric("studio_runs_reaped_total", 1) == 1
            lost = 'studio_runs_finished_total{status="failed",failure_kind="desktop_lost"}'
            assert await gw.settled_metric(lost, 1) == 1
    finally:
        await desktop.close()


async def test_heartbeats_keep_a_long_quiet_run_alive(js_server: NatsServer) -> None:
    desktop = await start_desktop(js_server.url, "judy", heartbeat_interval=0.2)
    try:
        async with runs_gateway(js_server.url, liveness_timeout=1.0) as gw:
            # 2.5 s of silence from the runner, longer than the liveness timeout.
            run_id = await gw.start_run("judy", {"runner": "mock", "input": {"count": 1, "delayMs": 2500}})
            state = await gw.wait_status("judy", run_id, {"completed", "failed"}, timeout=10.0)
            assert state["status"] == "completed", state
            assert await gw.metric("studio_runs_reaped_total") == 0
    finally:
        await desktop.close()


async def test_cancel_reaches_the_desktop_and_the_run_ends_cancelled(js_server: NatsServer) -> None:
    desktop = await start_desktop(js_server.url, "ken")
    try:
        async with runs_gateway(js_server.url) as gw:
            run_id = await gw.start_run("ken", {"runner": "mock", "input": {"count": 100, "delayMs": 100}})
            await gw.wait_status("ken", run_id, {"in_progress"})
            status, body = await gw.cancel("ken", run_id)
            assert status == 202 and body["cancel"] == "requested", body
            state = await gw.wait_status("ken", run_id, {"cancelled"})
            assert state["fence"] == 1 and state["finalSeq"] == state["seq"]  # ended by its own done
            events = await gw.export("ken", run_id)
            assert events[-1]["type"] == "done" and events[-1]["status"] == "cancelled"
            status, body = await gw.cancel("ken", run_id)
            assert status == 409 and body["error"]["code"] == "run_finished"
    finally:
        await desktop.close()


async def test_cancel_ends_the_run_at_the_gateway_when_the_desktop_is_gone_or_does_not_know_it(
    js_server: NatsServer,
) -> None:
    forgetful = await accepting_desktop(js_server.url, "leo", control_status=404)
    gone = await accepting_desktop(js_server.url, "mia")
    try:
        async with runs_gateway(js_server.url) as gw:
            first = await gw.start_run("leo", {"runner": "echo"})
            await gw.wait_status("leo", first, {"in_progress"})
            status, body = await gw.cancel("leo", first)
            assert status == 202 and body == {"runId": first, "status": "cancelled", "cancel": "gateway"}
            assert forgetful.controls == [
                {"runId": first, "action": "cancel", "reason": "cancelled by the user"}
            ]
            state = await gw.get_run("leo", first)
            assert state["status"] == "cancelled" and state["fence"] == 2
            assert "does not know the run" in state["failureReason"]

            second = await gw.start_run("mia", {"runner": "echo"})
            await gw.wait_status("mia", second, {"in_progress"})
            await publish_event(gone.nc, gone.hostname, second, 1, "stage", stage="working")
            await gone.server.close()  # the desktop disconnects
            started = time.monotonic()
            status, body = await gw.cancel("mia", second)
            # A host seen serving lately gets the tunnel's 1 s unreachable grace before "gone", so
            # ~1.1 s here; the slow path it guards against is the dispatch timeout (10 s).
            assert status == 202 and body["status"] == "cancelled" and time.monotonic() - started < 5.0
            # Late events of the fenced-off execution are ignored.
            await publish_event(gone.nc, gone.hostname, second, 2, "done", finalSeq=2, status="completed")
            await wait_until(
                lambda: gw.metric('studio_runs_uplink_events_total{result="terminal"}'), 5.0, message="late"
            )
            state = await gw.get_run("mia", second)
            assert state["status"] == "cancelled" and state["seq"] == 1
            assert await gw.metric('studio_runs_cancels_total{outcome="gateway"}') == 2
    finally:
        await forgetful.close()
        await gone.close()


async def test_stream_and_buckets_are_created_idempotently_and_follow_the_settings(
    js_server: NatsServer,
) -> None:
    async with runs_gateway(js_server.url) as first:
        assert first.service.setup_result[RUN_STREAM] in ("created", "unchanged")
        async with runs_gateway(js_server.url) as second:
            assert set(second.service.setup_result.values()) == {"unchanged"}
    nc = await nats.connect(js_server.url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(RUN_STREAM)
        assert info.config.max_age == 1800 and info.config.duplicate_window == 120
        assert str(getattr(info.config.storage, "value", info.config.storage)) == "file"
        for bucket in (STATE_BUCKET, OUTPUT_BUCKET, ACTIVE_BUCKET):
            await js.stream_info(f"KV_{bucket}")
        store = RunStore(nc, RunsConfig(stream_max_age=600, duplicate_window=30), tunnel.DEFAULT_PREFIX)
        result = await store.setup()
        assert result[RUN_STREAM] == "updated"
        info = await js.stream_info(RUN_STREAM)
        assert info.config.max_age == 600 and info.config.duplicate_window == 30
        assert (await store.setup())[RUN_STREAM] == "unchanged"
    finally:
        await nc.close()


async def test_without_jetstream_runs_answer_503_and_the_rest_works(nats_server: NatsServer) -> None:
    config = GatewayConfig.from_env(runs_env(nats_server.url))
    app = create_app(config)
    async with TestClient(TestServer(app)) as client:
        assert await app[GATEWAY_NATS].wait_connected(5.0)
        headers = {"Authorization": f"Bearer {issue_token(config.auth, 'nina', 60)}"}
        resp = await client.post("/api/runs", headers=headers, json={"runner": "echo"})
        assert resp.status == 503
        error = (await resp.json())["error"]
        assert error["code"] == "runs_unavailable" and "JetStream" in error["message"]
        health = await client.get("/healthz")
        assert health.status == 200
        body = await health.json()
        assert body["nats"] == "connected" and body["runs"] == "unavailable"
        assert "JetStream" in body["runsReason"]
        assert "studio_runs_ready 0" in await (await client.get("/metrics")).text()


async def test_reapers_on_two_instances_fail_a_silent_run_exactly_once(js_server: NatsServer) -> None:
    desktop = await accepting_desktop(js_server.url, "xena")
    try:
        async with (
            runs_gateway(js_server.url, liveness_timeout=1.0, reaper_interval=0.05, resume_window=0) as a,
            runs_gateway(js_server.url, liveness_timeout=1.0, reaper_interval=0.05, resume_window=0) as b,
        ):
            run_ids = [await a.start_run("xena", {"runner": "echo"}) for _ in range(5)]
            for run_id in run_ids:
                state = await b.wait_status("xena", run_id, {"failed"}, timeout=8.0)
                assert state["failureKind"] == "desktop_lost" and state["fence"] == 2
            # Counted once a reaper has its write's acknowledgement, which a reader may beat.
            assert await settled_sum("studio_runs_reaped_total", 5, a, b) == 5
            lost = 'studio_runs_finished_total{status="failed",failure_kind="desktop_lost"}'
            assert await settled_sum(lost, 5, a, b) == 5
    finally:
        await desktop.close()


async def test_runs_can_be_switched_off(js_server: NatsServer) -> None:
    config = GatewayConfig.from_env(runs_env(js_server.url, RUNS_ENABLED="false"))
    app = create_app(config)
    async with TestClient(TestServer(app)) as client:
        assert await app[GATEWAY_NATS].wait_connected(5.0)
        headers = {"Authorization": f"Bearer {issue_token(config.auth, 'olaf', 60)}"}
        resp = await client.post("/api/runs", headers=headers, json={"runner": "echo"})
        assert resp.status == 503 and "RUNS_ENABLED" in (await resp.json())["error"]["message"]
        health = await (await client.get("/healthz")).json()
        assert health == {"status": "ok", "nats": "connected", "runs": "disabled"}
    nc = await nats.connect(js_server.url)
    try:
        with pytest.raises(nats.js.errors.NotFoundError):
            await nc.jetstream().stream_info(RUN_STREAM)  # nothing was created
    finally:
        await nc.close()


async def test_a_run_missing_an_event_for_good_is_failed_even_while_the_desktop_talks(
    js_server: NatsServer,
) -> None:
    desktop = await accepting_desktop(js_server.url, "bert")
    try:
        async with runs_gateway(js_server.url, liveness_timeout=1.0) as gw:
            run_id = await gw.start_run("bert", {"runner": "echo"})
            await wait_until(lambda: len(desktop.work) == 1, 5.0)
            await publish_event(desktop.nc, desktop.hostname, run_id, 1, "stage", stage="working")
            # seq 2 is lost; the desktop goes on sending heartbeats after it.
            state: dict[str, object] = {}
            seq = 3
            deadline = asyncio.get_running_loop().time() + 8.0
            while asyncio.get_running_loop().time() < deadline:
                await publish_event(desktop.nc, desktop.hostname, run_id, seq, "heartbeat")
                seq += 1
                state = await gw.get_run("bert", run_id)
                if state["status"] == "failed":
                    break
                await asyncio.sleep(0.2)  # the desktop's heartbeat interval, not synchronisation
            assert state["status"] == "failed" and state["failureKind"] == "events_lost", state
            assert "event 2 of the run never arrived" in str(state["failureReason"])
            assert state["seq"] == 1
    finally:
        await desktop.close()


async def test_active_index_lists_runs_without_a_consumer_and_the_reaper_drops_orphans(
    js_server: NatsServer,
) -> None:
    """The reaper's scan lists the active bucket with stream info (paged, no ephemeral consumer);
    an entry whose run does not exist (a create in flight, or a failed one) is dropped only when
    it is still missing on the next pass."""
    nc = await nats.connect(js_server.url)
    try:
        config = RunsConfig(liveness_timeout=60)
        store = RunStore(nc, config, tunnel.DEFAULT_PREFIX)
        await store.setup()
        ids = [f"run_{i:032x}" for i in range(30)]
        await asyncio.gather(*(store.mark_active(run_id, "aG9zdA") for run_id in ids))
        assert sorted(await store.active_ids()) == ids
        await store.mark_inactive(ids[0])
        assert sorted(await store.active_ids()) == ids[1:]
        consumers = await nc.jetstream().consumers_info(f"KV_{ACTIVE_BUCKET}")
        assert consumers == []
        reaper = Reaper(store, RunMetrics(), config)
        assert await reaper.scan() == []
        assert sorted(await store.active_ids()) == ids[1:]  # first pass: maybe a create in flight
        assert await reaper.scan() == []
        assert await store.active_ids() == []  # second pass: orphans, dropped
    finally:
        await nc.close()


async def test_a_run_left_dispatching_by_a_dead_gateway_fails_as_dispatch_error(
    js_server: NatsServer,
) -> None:
    """The instance delivering a run died before the dispatcher decided, and nothing came from
    the desktop: the reaper fails it, as a delivery that never finished, not as a lost desktop."""
    nc = await nats.connect(js_server.url)
    try:
        config = RunsConfig(liveness_timeout=2, dispatch_timeout=3)
        store = RunStore(nc, config, tunnel.DEFAULT_PREFIX)
        await store.setup()
        created = int(time.time() * 1000) - 6_000  # past dispatch timeout + liveness
        hostname = tunnel_hostname("rita")
        state = RunState(
            run_id=f"run_{1:032x}", thread_id=f"thr_{1:032x}", user_id="rita", hostname=hostname,
            host_token=tunnel.host_token(hostname), runner="echo", created_at=created, updated_at=created,
        )  # fmt: skip
        await store.create(state)
        metrics = RunMetrics()
        assert await Reaper(store, metrics, config).scan() == [state.run_id]
        loaded = await store.load(state.run_id)
        assert loaded is not None
        reaped = loaded[0]
        assert reaped.status == "failed" and reaped.failure_kind == "dispatch_error"
        assert (
            reaped.failure_reason is not None
            and "delivery to the desktop never finished" in reaped.failure_reason
        )
        assert reaped.fence == state.fence + 1
        assert await store.active_ids() == []
        assert metrics.finished.value(status="failed", failure_kind="dispatch_error") == 1
    finally:
        await nc.close()
