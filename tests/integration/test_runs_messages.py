"""Talking to a running run (#20 items 1-4) through a real gateway app, a real JetStream
nats-server and a real linkd desktop (routes, run manager, mock runner, uplink).

Covers: context and signals reach a running ``mock`` run once each (also for a POST retried
with the same idempotency key, by body or header), their lifecycles in ``GET /messages``
(kickoff, context, signal, cancel), refusals (a runner that takes no messages, a bad
signal, a finished run), ``POST /api/runs/validate`` for an offline desktop, an unknown
runner, a bad input and a good request, and a rebuild restoring a deliberately corrupted
state.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest

from cli.nats_server import NatsServer
from linkd.runners import EchoRunner, MockRunner
from linkd.runners.mock import MESSAGES_STREAM
from studio_gateway.auth import issue_token
from tests.helpers import NatsServerFactory, wait_until
from tests.integration.gateway_runs_harness import Desktop, RunsGateway, runs_gateway, start_desktop

pytestmark = pytest.mark.timeout(60)

SLOW_MOCK = {"runner": "mock", "input": {"count": 4000, "delayMs": 50}}


@pytest.fixture
def js_server(nats_server_factory: NatsServerFactory) -> NatsServer:
    return nats_server_factory(jetstream=True)


@pytest.fixture
async def gw(js_server: NatsServer) -> AsyncIterator[RunsGateway]:
    async with runs_gateway(js_server.url) as gateway:
        yield gateway


@pytest.fixture
async def desk(js_server: NatsServer) -> AsyncIterator[Desktop]:
    desktop = await start_desktop(
        js_server.url, "alice", runners={"echo": EchoRunner(), "mock": MockRunner()}
    )
    try:
        yield desktop
    finally:
        await desktop.close()


async def post(
    gw: RunsGateway, user: str, path: str, body: Any, **headers: str
) -> tuple[int, dict[str, Any]]:
    resp = await gw.client.post(path, headers=gw.headers(user, **headers), data=json.dumps(body))
    return resp.status, await resp.json()


async def get(gw: RunsGateway, user: str, path: str, token: str | None = None) -> tuple[int, dict[str, Any]]:
    auth = {"Authorization": f"Bearer {token}"} if token else gw.headers(user)
    resp = await gw.client.get(path, headers=auth)
    return resp.status, await resp.json()


async def running(gw: RunsGateway, desk: Desktop) -> str:
    run_id = await gw.start_run("alice", SLOW_MOCK)
    await gw.wait_status("alice", run_id, {"in_progress"})
    assert desk.runs is not None
    await wait_until(lambda: desk.runs is not None and desk.runs.get(run_id) is not None, 10.0)
    return run_id


async def exported_messages(gw: RunsGateway, run_id: str) -> list[dict[str, Any]]:
    events = await gw.export("alice", run_id)
    return [
        json.loads(e["data"]) for e in events if e["type"] == "output" and e.get("stream") == MESSAGES_STREAM
    ]


async def finish(gw: RunsGateway, run_id: str) -> None:
    status, body = await gw.cancel("alice", run_id)
    assert status == 202, body
    await gw.wait_status("alice", run_id, {"cancelled"})


async def test_context_and_signal_reach_the_mock_run_once_with_idempotent_retries(
    gw: RunsGateway, desk: Desktop
) -> None:
    run_id = await running(gw, desk)
    status, first = await post(
        gw, "alice", f"/api/runs/{run_id}/context", {"context": "hello", "idempotencyKey": "k1"}
    )
    assert status == 202 and first["status"] == "acknowledged" and first["duplicate"] is False, first
    assert first["kind"] == "context" and first["messageId"].startswith("msg_")
    # The same key again (in the header this time): the first answer, nothing delivered again.
    status, again = await post(
        gw, "alice", f"/api/runs/{run_id}/context", {"context": "hello"}, **{"Idempotency-Key": "k1"}
    )
    assert status == 202 and again["messageId"] == first["messageId"] and again["idempotentReplay"] is True
    # The same key with another message is refused.
    status, reused = await post(
        gw, "alice", f"/api/runs/{run_id}/context", {"context": "other", "idempotencyKey": "k1"}
    )
    assert status == 422 and reused["error"]["code"] == "idempotency_key_reused"
    signal = {
        "signalType": "build.progress",
        "severity": "warning",
        "payload": {"pct": 40},
        "idempotencyKey": "s1",
    }
    status, sig = await post(gw, "alice", f"/api/runs/{run_id}/signals", signal)
    assert status == 202 and sig["status"] == "acknowledged" and sig["kind"] == "signal", sig
    status, sig_again = await post(gw, "alice", f"/api/runs/{run_id}/signals", signal)
    assert status == 202 and sig_again["messageId"] == sig["messageId"]
    # Without a key, a second identical context is a second message.
    status, second = await post(
        gw, "alice", f"/api/runs/{run_id}/context", {"context": {"doc": [1, 2], "t": "ü\ud800"}}
    )
    assert status == 202 and second["messageId"] != first["messageId"]

    await finish(gw, run_id)
    # The dispatcher records the kickoff's answer (then counts it) after the desktop took the work
    # item, which nothing above waits for.
    kickoff_acks = 'studio_runs_messages_acks_total{kind="kickoff",duplicate="false"}'
    await gw.settled_metric(kickoff_acks, 1)
    got = await exported_messages(gw, run_id)
    assert [(m["messageId"], m["kind"]) for m in got] == [
        (first["messageId"], "context"),
        (sig["messageId"], "signal"),
        (second["messageId"], "context"),
    ]
    assert got[0]["context"] == "hello" and got[2]["context"] == {"doc": [1, 2], "t": "ü\ud800"}
    assert got[1]["signal"] == {"signalType": "build.progress", "severity": "warning", "payload": {"pct": 40}}

    status, listing = await get(gw, "alice", f"/api/runs/{run_id}/messages")
    assert status == 200, listing
    kinds = [(m["kind"], m["status"]) for m in listing["messages"]]
    assert kinds == [
        ("kickoff", "acknowledged"),
        ("context", "acknowledged"),
        ("signal", "acknowledged"),
        ("context", "acknowledged"),
        ("cancel", "acknowledged"),
    ]
    assert all(m["attempts"] == 1 for m in listing["messages"])
    assert listing["summary"]["total"] == 5 and listing["summary"]["byStatus"]["acknowledged"] == 5
    assert listing["summary"]["last"]["kind"] == "cancel"
    status, doc = await get(gw, "alice", f"/api/runs/{run_id}?include=messages")
    assert status == 200 and doc["messages"]["total"] == 5
    # Another user sees nothing; an operator sees the list.
    status, other = await get(gw, "bob", f"/api/runs/{run_id}/messages")
    assert status == 404 and other["error"]["code"] == "run_not_found"
    metric = gw.metric
    assert await metric('studio_runs_messages_outbound_total{kind="context",result="acknowledged"}') == 2
    assert await metric('studio_runs_messages_acks_total{kind="kickoff",duplicate="false"}') == 1
    assert await metric('studio_runs_signals_total{signal_type="build.progress",severity="warning"}') == 1
    admin = issue_token(gw.config.auth, "ops", 300, scopes=["runs:admin"])
    status, seen = await get(gw, "ops", f"/api/runs/{run_id}/messages", token=admin)
    assert status == 200 and len(seen["messages"]) == 5


async def test_refusals_are_typed_and_recorded(gw: RunsGateway, desk: Desktop) -> None:
    echo_run = await gw.start_run("alice", {"runner": "echo", "input": "x"})
    await gw.wait_status("alice", echo_run, {"completed"})
    status, body = await post(gw, "alice", f"/api/runs/{echo_run}/context", {"context": "late"})
    assert status == 409 and body["error"]["code"] == "run_finished"
    run_id = await running(gw, desk)
    for bad, field in (
        ({"signalType": "9bad"}, "signalType"),
        ({"signalType": "ok", "severity": "loud"}, "severity"),
        ({"signalType": "ok", "payload": [1]}, "payload"),
        ({"signalType": "ok", "payload": {"x": "y" * 20000}}, "payload"),
    ):
        status, body = await post(gw, "alice", f"/api/runs/{run_id}/signals", bad)
        assert status == 422 and body["error"]["field"] == field, body
    status, body = await post(gw, "alice", f"/api/runs/{run_id}/context", {})
    assert status == 422 and body["error"]["field"] == "context"
    await finish(gw, run_id)


async def test_a_runner_that_takes_no_messages_is_409_message_not_accepted(js_server: NatsServer) -> None:
    class Quiet(MockRunner):
        message_kinds = frozenset()  # type: ignore[misc]

    desktop = await start_desktop(js_server.url, "carol", runners={"mock": Quiet()})
    try:
        async with runs_gateway(js_server.url) as gw:
            run_id = await gw.start_run("carol", SLOW_MOCK)
            await gw.wait_status("carol", run_id, {"in_progress"})
            status, body = await post(
                gw,
                "carol",
                f"/api/runs/{run_id}/signals",
                {"signalType": "stop.soon", "severity": "critical"},
            )
            assert status == 409 and body["error"]["code"] == "message_not_accepted", body
            assert body["error"]["accepts"] == [] and body["error"]["status"] == "failed"
            status, listing = await get(gw, "carol", f"/api/runs/{run_id}/messages")
            signal = [m for m in listing["messages"] if m["kind"] == "signal"]
            assert len(signal) == 1 and signal[0]["status"] == "failed"
            assert signal[0]["error"]["code"] == "message_not_accepted" and signal[0]["httpStatus"] == 409
            await gw.cancel("carol", run_id)
    finally:
        await desktop.close()


async def test_validate_says_yes_or_no_without_creating_a_run(gw: RunsGateway, desk: Desktop) -> None:
    status, body = await post(gw, "nobody", "/api/runs/validate", {"runner": "mock", "input": {"count": 1}})
    assert status == 409 and body["error"]["code"] == "desktop_unreachable", body
    status, body = await post(gw, "alice", "/api/runs/validate", {"runner": "teleport"})
    assert status == 422 and body["error"]["code"] == "unknown_runner"
    status, body = await post(gw, "alice", "/api/runs/validate", {"runner": "mock", "input": {"count": -1}})
    assert status == 422 and body["error"]["code"] == "invalid_field" and body["error"]["field"] == "input"
    # Known to this gateway, not offered by this desktop.
    status, body = await post(gw, "alice", "/api/runs/validate", {"runner": "command", "input": {}})
    assert status == 422 and body["error"]["code"] == "unknown_runner", body
    assert "mock" in body["error"]["runners"]
    status, body = await post(gw, "alice", "/api/runs/validate", {"runner": "mock", "input": {"count": 1}})
    assert status == 200 and body["ok"] is True and body["runner"] == "mock", body
    assert body["wouldDispatchTo"]["tunnelHostname"] == desk.hostname
    # The same errors as POST /api/runs gives.
    status, post_body = await post(gw, "alice", "/api/runs", {"runner": "mock", "input": {"count": -1}})
    status2, validate_body = await post(
        gw, "alice", "/api/runs/validate", {"runner": "mock", "input": {"count": -1}}
    )
    assert (status, post_body) == (status2, validate_body)
    status, runs = await get(gw, "alice", "/api/runs")
    assert status == 200 and runs["runs"] == []
    resp = await gw.client.post("/api/runs/validate", data="{}")
    assert resp.status == 401


async def test_rebuild_restores_a_corrupted_state(gw: RunsGateway, desk: Desktop) -> None:
    run_id = await gw.start_run("alice", {"runner": "mock", "input": {"count": 4}})
    good = await gw.wait_status("alice", run_id, {"completed"})
    store = gw.service.store
    assert store is not None
    loaded = await store.load(run_id)
    assert loaded is not None
    state, revision = loaded
    corrupt = replace(state, status="in_progress", seq=2, final_seq=None, output_bytes=1, stage="bogus")
    await store.write(corrupt, revision)
    assert (await gw.get_run("alice", run_id))["status"] == "in_progress"

    status, body = await post(gw, "alice", f"/api/runs/{run_id}/projection/rebuild", {})
    assert status == 200, body
    assert body["changed"]["status"] == {"from": "in_progress", "to": "completed"}
    assert body["changed"]["seq"] == {"from": 2, "to": good["seq"]}
    assert body["changed"]["outputBytes"] == {"from": 1, "to": good["outputBytes"]}
    assert set(body["changed"]) == {"status", "seq", "finalSeq", "outputBytes", "stage"}
    restored = await gw.get_run("alice", run_id)
    for name in ("status", "seq", "finalSeq", "outputBytes", "stage", "lastEventAt"):
        assert restored[name] == good[name], name
    # Idempotent: nothing left to change.
    status, body = await post(gw, "alice", f"/api/runs/{run_id}/projection/rebuild", {})
    assert status == 200 and body["changed"] == {}
    status, body = await post(gw, "bob", f"/api/runs/{run_id}/projection/rebuild", {})
    assert status == 404


async def test_rebuild_while_the_projector_writes_never_loses_progress(
    gw: RunsGateway, desk: Desktop
) -> None:
    run_id = await gw.start_run("alice", {"runner": "mock", "input": {"count": 60, "delayMs": 10}})
    await gw.wait_status("alice", run_id, {"in_progress"})
    seqs = []
    for _ in range(8):  # rebuilds racing the projector's writes: compare-and-set on both sides
        status, body = await post(gw, "alice", f"/api/runs/{run_id}/projection/rebuild", {})
        assert status == 200, body
        seqs.append(body["state"]["seq"])
    assert seqs == sorted(seqs)  # never behind an earlier answer
    final = await gw.wait_status("alice", run_id, {"completed"})
    events = await gw.export("alice", run_id)
    assert final["seq"] == final["finalSeq"] == len(events)
    # What the rebuilds applied ahead of the projector is kept for export all the same.
    store = gw.service.store
    assert store is not None
    kept = {e["seq"] for e in await store.kept_events(run_id)}
    assert kept >= {e["seq"] for e in events if e["type"] != "heartbeat"}
    status, body = await post(gw, "alice", f"/api/runs/{run_id}/projection/rebuild", {})
    assert status == 200 and body["changed"] == {}, body


async def test_a_desktop_gone_mid_run_makes_the_message_failed_desktop_unreachable(
    js_server: NatsServer, gw: RunsGateway
) -> None:
    desktop = await start_desktop(js_server.url, "frank", runners={"mock": MockRunner()})
    run_id = await gw.start_run("frank", SLOW_MOCK)
    await gw.wait_status("frank", run_id, {"in_progress"})
    try:
        # Nobody serves the host any more; the run itself goes on (it ends no other way here).
        await desktop.server.close()
        status, body = await post(gw, "frank", f"/api/runs/{run_id}/signals", {"signalType": "hello"})
        assert status == 503 and body["error"]["code"] == "desktop_unreachable", body
        status, listing = await get(gw, "frank", f"/api/runs/{run_id}/messages")
        signal = [m for m in listing["messages"] if m["kind"] == "signal"]
        assert [(m["status"], m["httpStatus"], m["attempts"]) for m in signal] == [("failed", 503, 1)]
    finally:
        await desktop.close()


async def test_concurrent_posts_with_one_key_send_one_message_once(gw: RunsGateway, desk: Desktop) -> None:
    run_id = await running(gw, desk)
    body = {"context": "together", "idempotencyKey": "same"}
    answers = await asyncio.gather(
        *(post(gw, "alice", f"/api/runs/{run_id}/context", body) for _ in range(6))
    )
    assert {status for status, _ in answers} == {202}, answers
    assert len({answer["messageId"] for _, answer in answers}) == 1
    _, listing = await get(gw, "alice", f"/api/runs/{run_id}/messages")
    contexts = [m for m in listing["messages"] if m["kind"] == "context"]
    assert len(contexts) == 1 and contexts[0]["attempts"] == 1
    await finish(gw, run_id)
    assert [m["context"] for m in await exported_messages(gw, run_id)] == ["together"]
