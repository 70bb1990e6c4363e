"""The projector's side of stalled runs and of daemon-named failures, against a real JetStream
nats-server and the gateway app in-process.

The stall itself is written into the state bucket by the test (as the reaper would, see
``test_gateway_runs_stalled.py`` for the real thing), so that what the projector does with the
next event is deterministic: within the resume window it resumes the run; past it, it fails the
run ``desktop_lost`` itself and ignores the event (the reaper of this gateway would only look a
minute later: the default liveness timeout).
"""

from __future__ import annotations

import time

import pytest

from cli.nats_server import NatsServer
from contract.run_protocol import DAEMON_RESTARTED, FAILURE_KIND_FIELD
from studio_gateway.runs.state import stall
from studio_gateway.runs.store import RunStore
from tests.helpers import NatsServerFactory, wait_until
from tests.integration.gateway_runs_harness import RunsGateway, accepting_desktop, publish_event, runs_gateway

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def js_server(nats_server_factory: NatsServerFactory) -> NatsServer:
    return nats_server_factory(jetstream=True)


def now_ms() -> int:
    return int(time.time() * 1000)


async def stall_now(gw: RunsGateway, run_id: str, deadline_in_ms: int) -> None:
    """Mark the run stalled with its deadline ``deadline_in_ms`` from now, as the reaper would."""
    store = gw.service.store
    assert isinstance(store, RunStore)
    loaded = await store.load(run_id)
    assert loaded is not None
    now = now_ms()
    new = stall(loaded[0], now_ms=now, since_ms=now - 1000, deadline_ms=now + deadline_in_ms)
    assert new is not None
    await store.write(new, loaded[1])


async def test_the_next_event_resumes_a_stalled_run_and_after_the_window_none_does(
    js_server: NatsServer,
) -> None:
    desktop = await accepting_desktop(js_server.url, "una")
    try:
        async with runs_gateway(js_server.url) as gw:
            run_id = await gw.start_run("una", {"runner": "echo"})
            await wait_until(lambda: len(desktop.work) == 1, 5.0)
            host = desktop.hostname
            await publish_event(desktop.nc, host, run_id, 1, "stage", stage="working")

            async def applied() -> bool:
                return (await gw.get_run("una", run_id))["seq"] == 1

            await wait_until(applied, 5.0, message="the first event was never applied")

            await stall_now(gw, run_id, 60_000)
            stalled = await gw.get_run("una", run_id)
            assert stalled["status"] == "stalled" and stalled["seq"] == 1, stalled
            assert stalled["resumeDeadline"] == stalled["stalledSince"] + 61_000, stalled
            await publish_event(desktop.nc, host, run_id, 2, "output", data="back\n")
            resumed = await gw.wait_status("una", run_id, {"in_progress", "failed"})
            assert resumed["status"] == "in_progress" and resumed["seq"] == 2, resumed
            assert resumed["stalledSince"] is None and resumed["resumeDeadline"] is None, resumed
            # Counted once the write's acknowledgement is in, which a reader may beat.
            assert await gw.settled_metric("studio_runs_resumed_total", 1) == 1

            # Past its window: the next event fails it instead, and is itself ignored.
            await stall_now(gw, run_id, -1)
            await publish_event(desktop.nc, host, run_id, 3, "output", data="too late\n")
            lost = await gw.wait_status("una", run_id, {"failed", "in_progress"})
            assert lost["status"] == "failed" and lost["failureKind"] == "desktop_lost", lost
            assert "resume window" in lost["failureReason"] and lost["fence"] == 2, lost
            assert lost["seq"] == 2 and lost["outputBytes"] == len("back\n"), lost
            assert await gw.settled_metric("studio_runs_resume_expired_total", 1) == 1
            assert await gw.metric("studio_runs_resumed_total") == 1
            assert [e["seq"] for e in await gw.export("una", run_id)] == [1, 2]
            # And so do the ones after it.
            await publish_event(desktop.nc, host, run_id, 4, "done", finalSeq=4, status="completed")
            await wait_until(
                lambda: gw.metric('studio_runs_uplink_events_total{result="terminal"}'), 5.0, message="late"
            )
            assert await gw.get_run("una", run_id) == lost
    finally:
        await desktop.close()


async def test_a_daemon_names_daemon_restarted_and_nothing_else(js_server: NatsServer) -> None:
    desktop = await accepting_desktop(js_server.url, "vera")
    try:
        async with runs_gateway(js_server.url) as gw:
            first = await gw.start_run("vera", {"runner": "echo"})
            second = await gw.start_run("vera", {"runner": "echo"})
            await wait_until(lambda: len(desktop.work) == 2, 5.0)
            host = desktop.hostname
            for run_id, kind in ((first, DAEMON_RESTARTED), (second, "desktop_lost")):
                await publish_event(desktop.nc, host, run_id, 1, "stage", stage="working")
                await publish_event(
                    desktop.nc,
                    host,
                    run_id,
                    2,
                    "done",
                    finalSeq=2,
                    status="failed",
                    reason="the daemon restarted",
                    **{FAILURE_KIND_FIELD: kind},
                )
            restarted = await gw.wait_status("vera", first, {"failed", "completed"})
            assert restarted["failureKind"] == DAEMON_RESTARTED, restarted
            assert restarted["failureReason"] == "the daemon restarted" and restarted["seq"] == 2
            # A gateway verdict is not the desktop's to claim.
            claimed = await gw.wait_status("vera", second, {"failed", "completed"})
            assert claimed["failureKind"] == "run_failed", claimed
            sample = f'studio_runs_finished_total{{status="failed",failure_kind="{DAEMON_RESTARTED}"}}'
            assert await gw.metric(sample) == 1
    finally:
        await desktop.close()
