"""Run events batched in one message (contract.run_protocol): applied, streamed and exported once each.

A daemon publishes consecutive events of a run as one message, one JSON object per line; after
a reconnect it may cut them differently, so batches can overlap single events and each other.
Real nats-server with JetStream, the real gateway app; the events are published by the test.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from nats.aio.client import Client

import tunnel
from cli.nats_server import NatsServer
from contract.run_protocol import run_event_subject
from tests.helpers import NatsServerFactory, wait_until
from tests.integration.gateway_runs_harness import accepting_desktop, runs_gateway

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def js_server(nats_server_factory: NatsServerFactory) -> NatsServer:
    return nats_server_factory(jetstream=True)


def event(run_id: str, seq: int, kind: str = "output", **data: Any) -> dict[str, Any]:
    body = {"runId": run_id, "fence": 1, "seq": seq, "ts": 0, "type": kind}
    body.update(data or ({"stream": "stdout", "data": f"line {seq}\n"} if kind == "output" else {}))
    return body


async def publish(nc: Client, hostname: str, run_id: str, events: list[dict[str, Any]], msg_id: str) -> None:
    subject = run_event_subject(tunnel.HostSubjects.for_host(hostname), run_id)
    data = b"\n".join(json.dumps(e, separators=(",", ":")).encode() for e in events)
    await nc.jetstream().publish(subject, data, headers={"Nats-Msg-Id": msg_id})


async def test_batches_overlapping_each_other_apply_each_event_once(js_server: NatsServer) -> None:
    desktop = await accepting_desktop(js_server.url, "ivy")
    try:
        async with runs_gateway(js_server.url) as gw:
            run_id = await gw.start_run("ivy", {"runner": "echo", "input": "x"})
            await wait_until(lambda: len(desktop.work) == 1, 5.0, message="work item never arrived")
            host, nc = desktop.hostname, desktop.nc
            await publish(
                desktop.nc, host, run_id, [event(run_id, 1, "stage", stage="go")], f"{run_id}:1:1:e"
            )
            # A batch 2-4, then (a re-cut after a lost ack) 3-6 overlapping it, then 7 and done.
            await publish(
                desktop.nc, host, run_id, [event(run_id, s) for s in (2, 3, 4)], f"{run_id}:1:2-4:e"
            )
            await publish(
                desktop.nc, host, run_id, [event(run_id, s) for s in (3, 4, 5, 6)], f"{run_id}:1:3-6:e"
            )
            done = event(run_id, 8, "done", finalSeq=8, status="completed")
            await publish(nc, host, run_id, [event(run_id, 7), done], f"{run_id}:1:7-8:e")
            state = await gw.wait_status("ivy", run_id, {"completed", "failed"})
            assert state["status"] == "completed" and state["seq"] == 8
            assert state["outputBytes"] == sum(len(f"line {s}\n") for s in range(2, 8))
            exported = await gw.export("ivy", run_id)
            assert [e["seq"] for e in exported] == list(range(1, 9))
            streamed = await gw.sse("ivy", run_id)
            assert [int(m["id"]) for m in streamed[:-1]] == list(range(1, 9))
            assert streamed[-1]["event"] == "end" and streamed[-1]["data"]["status"] == "completed"
            # Counted after the run's write and its index's: a reader can see it completed first.
            assert await gw.settled_metric('studio_runs_uplink_events_total{result="duplicate"}', 2) == 2
            assert await gw.settled_metric('studio_runs_uplink_events_total{result="applied"}', 8) == 8
    finally:
        await desktop.close()


async def test_an_event_nested_too_deeply_to_parse_is_skipped_and_the_run_goes_on(
    js_server: NatsServer,
) -> None:
    # 100k levels: Python's json parser raises RecursionError (no ValueError) on it. A desktop
    # publishing that must not stop the projector, the SSE reader or the reaper for anybody.
    desktop = await accepting_desktop(js_server.url, "ivy")
    try:
        async with runs_gateway(js_server.url) as gw:
            run_id = await gw.start_run("ivy", {"runner": "echo", "input": "x"})
            await wait_until(lambda: len(desktop.work) == 1, 5.0, message="work item never arrived")
            host, nc = desktop.hostname, desktop.nc
            subject = run_event_subject(tunnel.HostSubjects.for_host(host), run_id)
            deep = b"[" * 100_000 + b"]" * 100_000
            await nc.jetstream().publish(subject, deep, headers={"Nats-Msg-Id": f"{run_id}:deep"})
            await publish(nc, host, run_id, [event(run_id, 1, "stage", stage="go")], f"{run_id}:1:1:e")
            done = event(run_id, 3, "done", finalSeq=3, status="completed")
            await publish(nc, host, run_id, [event(run_id, 2), done], f"{run_id}:1:2-3:e")
            state = await gw.wait_status("ivy", run_id, {"completed", "failed"})
            assert state["status"] == "completed" and state["seq"] == 3
            streamed = await gw.sse("ivy", run_id)
            assert [int(m["id"]) for m in streamed[:-1]] == [1, 2, 3]
            # Another run of the same gateway is served as usual afterwards.
            second = await gw.start_run("ivy", {"runner": "echo", "input": "y"})
            await wait_until(lambda: len(desktop.work) == 2, 5.0, message="second work item never arrived")
            await publish(
                nc,
                host,
                second,
                [event(second, 1), event(second, 2, "done", finalSeq=2, status="completed")],
                f"{second}:1:1-2:e",
            )
            assert (await gw.wait_status("ivy", second, {"completed", "failed"}))["status"] == "completed"
    finally:
        await desktop.close()
