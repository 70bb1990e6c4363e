"""Delivery outcomes, shutdown drain, retention fallback, projector restart and SSE keep-alives,
against a real JetStream nats-server and real linkd routes."""

from __future__ import annotations

import asyncio
import json

import nats
import pytest

import tunnel
from cli.nats_server import NatsServer
from contract.run_protocol import RUN_STREAM
from studio_gateway.hostnames import tunnel_hostname
from tests.helpers import NatsServerFactory, wait_until
from tests.integration.gateway_runs_harness import (
    accepting_desktop,
    parse_sse,
    publish_event,
    runs_gateway,
    start_desktop,
)

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def js_server(nats_server_factory: NatsServerFactory) -> NatsServer:
    return nats_server_factory(jetstream=True)


async def test_a_desktop_refusal_is_desktop_rejected_with_its_error_code(js_server: NatsServer) -> None:
    desktop = await start_desktop(js_server.url, "quinn")  # offers echo and mock only
    try:
        async with runs_gateway(js_server.url) as gw:
            run_id = await gw.start_run("quinn", {"runner": "command", "input": {"template": "x"}})
            state = await gw.wait_status("quinn", run_id, {"failed"})
            assert state["failureKind"] == "desktop_rejected"
            assert "unknown_runner" in state["failureReason"] and "422" in state["failureReason"]
            # A mock input the desktop would refuse never gets that far: the gateway knows the
            # shape (contract.runner_inputs) and answers 422 at POST, so nothing is dispatched.
            status, body = await gw.post_run("quinn", {"runner": "mock", "input": {"count": -1}})
            assert status == 422 and body["error"]["field"] == "input"
            assert await gw.metric('studio_runs_dispatch_seconds_count{outcome="desktop_rejected"}') == 1
    finally:
        await desktop.close()


async def test_a_desktop_that_never_answers_is_dispatch_timeout(js_server: NatsServer) -> None:
    nc = await nats.connect(js_server.url)
    answered = asyncio.Event()

    async def wedged(request: tunnel.Request) -> tunnel.Response:
        await asyncio.sleep(30)
        answered.set()
        return tunnel.Response(202, [], b"")

    server = await tunnel.serve(nc, tunnel_hostname("rita"), wedged)
    try:
        async with runs_gateway(js_server.url, dispatch_timeout=0.5) as gw:
            run_id = await gw.start_run("rita", {"runner": "echo"})
            state = await gw.wait_status("rita", run_id, {"failed"}, timeout=5.0)
            assert (
                state["failureKind"] == "dispatch_timeout"
                and "did not answer in time" in state["failureReason"]
            )
            assert not answered.is_set()
    finally:
        await server.close()
        await nc.close()


async def test_shutdown_drains_a_delivery_in_flight_instead_of_losing_it(js_server: NatsServer) -> None:
    nc = await nats.connect(js_server.url)

    async def slow(request: tunnel.Request) -> tunnel.Response:
        await asyncio.sleep(20)
        return tunnel.Response(202, [], b"")

    server = await tunnel.serve(nc, tunnel_hostname("sam"), slow)
    try:
        async with runs_gateway(js_server.url, dispatch_timeout=30.0) as gw:
            run_id = await gw.start_run("sam", {"runner": "echo"})
            await wait_until(lambda: gw.service.dispatcher.in_flight == 1, 5.0)
        # The first gateway is gone (its drain gave up on the delivery); another one reads the run.
        async with runs_gateway(js_server.url) as other:
            state = await other.get_run("sam", run_id)
            assert state["status"] == "failed" and state["failureKind"] == "dispatch_error", state
            assert "stopped before" in state["failureReason"]
    finally:
        await server.close()
        await nc.close()


async def test_after_the_streams_retention_export_and_replay_use_the_kept_events(
    js_server: NatsServer,
) -> None:
    desktop = await start_desktop(js_server.url, "tina", heartbeat_interval=30)
    try:
        async with runs_gateway(js_server.url, stream_max_age=1.0, duplicate_window=0.5) as gw:
            run_id = await gw.start_run("tina", {"runner": "mock", "input": {"count": 4}})
            await gw.wait_status("tina", run_id, {"completed"})
            before = await gw.export("tina", run_id)
            nc = await nats.connect(js_server.url)
            try:
                js = nc.jetstream()

                async def expired() -> bool:
                    return (await js.stream_info(RUN_STREAM)).state.messages == 0

                await wait_until(
                    expired, 10.0, interval=0.1, message="the stream never expired the run's events"
                )
            finally:
                await nc.close()
            assert await gw.export("tina", run_id) == before  # no heartbeats in this run
            messages = await gw.sse("tina", run_id, query="?after=2")
            assert [m["data"] for m in messages[:-1]] == before[2:]
            assert messages[-1]["data"]["status"] == "completed"
    finally:
        await desktop.close()


async def test_kept_events_are_capped_but_the_done_is_always_kept(js_server: NatsServer) -> None:
    desktop = await start_desktop(js_server.url, "uma", heartbeat_interval=30)
    try:
        async with runs_gateway(js_server.url, output_max_bytes=600) as gw:
            run_id = await gw.start_run("uma", {"runner": "mock", "input": {"count": 20}})
            await gw.wait_status("uma", run_id, {"completed"})
            kept = await gw.service.store.kept_events(run_id)  # type: ignore[union-attr]
            assert sum(len(json.dumps(e, separators=(",", ":"))) for e in kept[:-1]) <= 600
            assert kept[-1]["type"] == "done" and len(kept) < len(await gw.export("uma", run_id))
            seqs = [e["seq"] for e in kept[:-1]]
            assert seqs == list(range(1, len(seqs) + 1))  # a prefix, no holes in the middle
    finally:
        await desktop.close()


async def test_projector_catches_up_after_every_gateway_was_down(js_server: NatsServer) -> None:
    desktop = await accepting_desktop(js_server.url, "vera")
    try:
        async with runs_gateway(js_server.url) as gw:
            run_id = await gw.start_run("vera", {"runner": "echo"})
            await gw.wait_status("vera", run_id, {"in_progress"})
        # No gateway runs while the desktop publishes the whole run.
        for seq in range(1, 6):
            await publish_event(desktop.nc, desktop.hostname, run_id, seq, "output", data=f"{seq}")
        await publish_event(desktop.nc, desktop.hostname, run_id, 6, "done", finalSeq=6, status="completed")
        async with runs_gateway(js_server.url) as gw:
            state = await gw.wait_status("vera", run_id, {"completed"})
            assert state["seq"] == 6 and state["outputBytes"] == 5
            # Counted once the run's write and its index's are in: a reader can see it completed first.
            assert await gw.settled_metric('studio_runs_uplink_events_total{result="applied"}', 6) == 6
            assert await gw.metric("studio_runs_projector_lag_seconds") >= 0
    finally:
        await desktop.close()


async def test_idle_sse_streams_send_keepalive_comments(js_server: NatsServer) -> None:
    desktop = await accepting_desktop(js_server.url, "walt")
    try:
        async with runs_gateway(js_server.url, keepalive=0.1) as gw:
            run_id = await gw.start_run("walt", {"runner": "echo"})
            await gw.wait_status("walt", run_id, {"in_progress"})
            resp = await gw.client.get(f"/api/runs/{run_id}/events", headers=gw.headers("walt"))
            assert resp.status == 200 and resp.headers["Cache-Control"] == "no-store"
            first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5.0)
            assert first == b": keepalive\n\n"
            await publish_event(
                desktop.nc, desktop.hostname, run_id, 1, "done", finalSeq=1, status="completed"
            )
            rest = await asyncio.wait_for(resp.content.read(), 5.0)
            messages = parse_sse(rest.decode())
            assert [m["event"] for m in messages] == ["done", "end"]
    finally:
        await desktop.close()


async def test_cancel_while_the_work_item_is_on_its_way_stops_it_on_the_desktop_too(
    js_server: NatsServer,
) -> None:
    nc = await nats.connect(js_server.url)
    release = asyncio.Event()
    controls: list[dict[str, object]] = []

    async def handler(request: tunnel.Request) -> tunnel.Response:
        if request.path == "/api/links/work":
            await release.wait()  # a slow desktop: the work item is not taken yet
            return tunnel.Response(202, [("content-type", "application/json")], b"{}")
        controls.append(await request.json())
        error = {"error": {"code": "unknown_run", "message": "no such run"}}
        return tunnel.Response(404, [("content-type", "application/json")], json.dumps(error))

    server = await tunnel.serve(nc, tunnel_hostname("zoe"), handler)
    try:
        async with runs_gateway(js_server.url) as gw:
            run_id = await gw.start_run("zoe", {"runner": "echo"})
            await wait_until(lambda: gw.service.dispatcher.in_flight == 1, 5.0)
            status, body = await gw.cancel("zoe", run_id)
            assert status == 202 and body["status"] == "cancelled" and body["cancel"] == "gateway"
            release.set()  # now the desktop takes the work item: the gateway cancels it there as well
            await wait_until(lambda: len(controls) == 2, 5.0, message="no second cancel")
            assert controls[1]["runId"] == run_id and controls[1]["action"] == "cancel"
            state = await gw.get_run("zoe", run_id)
            assert state["status"] == "cancelled" and state["fence"] == 2
    finally:
        await server.close()
        await nc.close()


async def test_a_live_reader_of_a_run_older_than_the_retention_gets_the_kept_start(
    js_server: NatsServer,
) -> None:
    desktop = await accepting_desktop(js_server.url, "abe")
    try:
        async with runs_gateway(js_server.url, stream_max_age=1.0, duplicate_window=0.5) as gw:
            run_id = await gw.start_run("abe", {"runner": "echo"})
            await wait_until(lambda: len(desktop.work) == 1, 5.0)
            for seq in (1, 2, 3):
                await publish_event(desktop.nc, desktop.hostname, run_id, seq, "output", data=f"{seq}")
            applied = 'studio_runs_uplink_events_total{result="applied"}'

            async def all_applied() -> bool:
                return await gw.metric(applied) == 3

            await wait_until(all_applied, 5.0, message="the first events were never applied")
            js = desktop.nc.jetstream()

            async def expired() -> bool:
                return (await js.stream_info(RUN_STREAM)).state.messages == 0

            await wait_until(expired, 10.0, interval=0.1, message="the stream never expired the run's events")
            await publish_event(desktop.nc, desktop.hostname, run_id, 4, "output", data="4")
            # Attached while the run is live: the kept start, then the stream.
            resp = await gw.client.get(f"/api/runs/{run_id}/events?after=1", headers=gw.headers("abe"))
            head = b""
            while b"id: 4\n" not in head:
                head += await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5.0)
            assert (await gw.get_run("abe", run_id))["status"] == "in_progress"
            await publish_event(
                desktop.nc, desktop.hostname, run_id, 5, "done", finalSeq=5, status="completed"
            )
            messages = parse_sse((head + await asyncio.wait_for(resp.content.read(), 10.0)).decode())
            assert [m["data"].get("data") for m in messages if m["event"] == "output"] == ["2", "3", "4"]
            assert messages[-1]["event"] == "end" and messages[-1]["data"]["status"] == "completed"
    finally:
        await desktop.close()


async def test_a_live_reader_survives_losing_its_consumer(js_server: NatsServer) -> None:
    desktop = await accepting_desktop(js_server.url, "cleo")
    try:
        async with runs_gateway(js_server.url) as gw:
            run_id = await gw.start_run("cleo", {"runner": "echo"})
            await wait_until(lambda: len(desktop.work) == 1, 5.0)
            await publish_event(desktop.nc, desktop.hostname, run_id, 1, "output", data="a")
            resp = await gw.client.get(f"/api/runs/{run_id}/events", headers=gw.headers("cleo"))
            head = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5.0)
            assert head.startswith(b"id: 1\n")
            js = desktop.nc.jetstream()
            readers = [c.name for c in await js.consumers_info(RUN_STREAM) if c.name.startswith("reader_")]
            assert len(readers) == 1
            await js.delete_consumer(RUN_STREAM, readers[0])  # e.g. removed by an operator
            await publish_event(desktop.nc, desktop.hostname, run_id, 2, "output", data="b")
            await publish_event(
                desktop.nc, desktop.hostname, run_id, 3, "done", finalSeq=3, status="completed"
            )
            messages = parse_sse((head + await asyncio.wait_for(resp.content.read(), 10.0)).decode())
            assert [m.get("id") for m in messages] == ["1", "2", "3", None]
            assert messages[-1]["data"]["status"] == "completed"
    finally:
        await desktop.close()
