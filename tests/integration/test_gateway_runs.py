"""Runs through the gateway against a real JetStream nats-server and real linkd runs/routes/uplink.

Covers: offline fail-fast, a run completing with exact state and events, SSE/NDJSON replay
and resume, the export, validation errors and ownership.
"""

from __future__ import annotations

import json
import time

import pytest

from cli.nats_server import NatsServer
from tests.helpers import NatsServerFactory
from tests.integration.gateway_runs_harness import runs_gateway, start_desktop

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def js_server(nats_server_factory: NatsServerFactory) -> NatsServer:
    return nats_server_factory(jetstream=True)


async def test_offline_desktop_202_then_failed_desktop_unreachable_within_a_second(
    js_server: NatsServer,
) -> None:
    async with runs_gateway(js_server.url) as gw:
        started = time.monotonic()
        status, body = await gw.post_run("nobody-home", {"runner": "echo", "input": "hi", "title": "t"})
        assert status == 202, body
        assert body["status"] == "dispatching" and body["runId"].startswith("run_")
        state = await gw.wait_status("nobody-home", body["runId"], {"failed"}, timeout=5.0)
        # Within a second by the gateway's own clock (creation to failure). Seen from here it adds
        # the POST, the 20 ms polls and a loaded machine's delays: that bound only has to stay under
        # the dispatch timeout (10 s), the slow path of a run nobody answers.
        assert state["finishedAt"] - state["createdAt"] <= 1000, state
        assert time.monotonic() - started < 5.0
        assert state["failureKind"] == "desktop_unreachable"
        assert "no desktop is connected" in state["failureReason"]
        assert state["finishedAt"] is not None and state["title"] == "t"
        # An attached reader of a failed run gets no events, just the end with the state.
        messages = await gw.sse("nobody-home", body["runId"])
        assert [m["event"] for m in messages] == ["end"]
        assert messages[0]["data"]["failureKind"] == "desktop_unreachable"
        # Counted by the dispatcher after its write and the active index's (store.modify).
        unreachable = 'studio_runs_finished_total{status="failed",failure_kind="desktop_unreachable"}'
        assert await gw.settled_metric(unreachable, 1) == 1


async def test_a_run_completes_with_exact_state_events_and_export(js_server: NatsServer) -> None:
    desktop = await start_desktop(js_server.url, "alice")
    try:
        async with runs_gateway(js_server.url) as gw:
            run_id = await gw.start_run("alice", {"runner": "mock", "input": {"count": 5, "prefix": "line"}})
            state = await gw.wait_status("alice", run_id, {"completed"})
            events = await gw.export("alice", run_id)
            assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
            assert events[-1]["type"] == "done" and events[-1]["status"] == "completed"
            outputs = [e["data"] for e in events if e["type"] == "output"]
            assert outputs == [f"line {i}\n" for i in range(5)]
            assert state["seq"] == state["finalSeq"] == len(events)
            assert state["outputBytes"] == sum(len(o.encode()) for o in outputs)
            assert state["fence"] == 1 and state["failureKind"] is None
            assert state["stage"] is not None
            assert state["hostname"] == desktop.hostname and state["userId"] == "alice"
            assert state["createdAt"] <= state["lastEventAt"] <= state["finishedAt"]

            messages = await gw.sse("alice", run_id)
            assert [m["data"] for m in messages[:-1]] == events
            assert [m["id"] for m in messages[:-1]] == [str(e["seq"]) for e in events]
            assert messages[-1]["event"] == "end" and "id" not in messages[-1]
            assert messages[-1]["data"] == state
    finally:
        await desktop.close()


async def test_sse_resumes_after_k_and_last_event_id_and_ndjson(js_server: NatsServer) -> None:
    desktop = await start_desktop(js_server.url, "bob")
    try:
        async with runs_gateway(js_server.url) as gw:
            run_id = await gw.start_run("bob", {"runner": "mock", "input": {"count": 6}})
            await gw.wait_status("bob", run_id, {"completed"})
            everything = await gw.export("bob", run_id)
            k = 3
            after = await gw.sse("bob", run_id, query=f"?after={k}")
            assert [int(m["id"]) for m in after[:-1]] == list(range(k + 1, len(everything) + 1))
            resumed = await gw.sse("bob", run_id, **{"Last-Event-ID": str(k)})
            assert [m["data"] for m in resumed] == [m["data"] for m in after]
            text, content_type = await gw.events_text(
                "bob", run_id, query="?after=2", Accept="application/x-ndjson"
            )
            assert content_type.startswith("application/x-ndjson")
            lines = [json.loads(line) for line in text.splitlines()]
            assert lines[:-1] == everything[2:]
            assert lines[-1]["type"] == "end" and lines[-1]["run"]["status"] == "completed"
            bad = await gw.client.get(f"/api/runs/{run_id}/events?after=x", headers=gw.headers("bob"))
            assert bad.status == 400 and (await bad.json())["error"]["code"] == "invalid_after"
    finally:
        await desktop.close()


async def test_live_reader_follows_a_running_run_to_its_end(js_server: NatsServer) -> None:
    desktop = await start_desktop(js_server.url, "carol")
    try:
        async with runs_gateway(js_server.url) as gw:
            run_id = await gw.start_run("carol", {"runner": "mock", "input": {"count": 8, "delayMs": 100}})
            messages = await gw.sse("carol", run_id)  # attached while it runs
            kinds = [m["event"] for m in messages]
            assert kinds[-2:] == ["done", "end"]
            seqs = [int(m["id"]) for m in messages[:-1]]
            assert seqs == list(range(1, len(seqs) + 1))
            assert messages[-1]["data"]["status"] == "completed"
            assert messages[-1]["data"]["finalSeq"] == seqs[-1]
    finally:
        await desktop.close()


async def test_validation_errors_and_ownership(js_server: NatsServer) -> None:
    async with runs_gateway(js_server.url, runners=("echo", "mock")) as gw:
        resp = await gw.client.post("/api/runs", headers=gw.headers("dave"), data=b"{nope")
        assert resp.status == 400 and (await resp.json())["error"]["code"] == "invalid_json"
        resp = await gw.client.post("/api/runs", headers=gw.headers("dave"), data=b"[1]")
        assert resp.status == 400
        status, body = await gw.post_run("dave", {"input": 1})
        assert (
            status == 422 and body["error"]["field"] == "runner" and body["error"]["code"] == "invalid_field"
        )
        status, body = await gw.post_run("dave", {"runner": "command"})
        assert status == 422 and body["error"]["code"] == "unknown_runner"
        assert body["error"]["runners"] == ["echo", "mock"]
        status, body = await gw.post_run("dave", {"runner": "echo", "threadId": "bad id!"})
        assert status == 422 and body["error"]["field"] == "threadId"
        status, body = await gw.post_run("dave", {"runner": "echo", "title": "x" * 201})
        assert status == 422 and body["error"]["field"] == "title"

        # A mock input the runner would refuse is refused at POST (not a 202 that fails later).
        for bad_input in ({"count": "five"}, {"count": -1}, {"colour": "red"}, [1, 2]):
            status, body = await gw.post_run("dave", {"runner": "mock", "input": bad_input})
            assert status == 422 and body["error"]["code"] == "invalid_field", (bad_input, body)
            assert body["error"]["field"] == "input" and "mock input" in body["error"]["message"]
        status, body = await gw.post_run("dave", {"runner": "mock", "input": {"count": 2}})
        assert status == 202, body
        status, body = await gw.post_run("dave", {"runner": "echo"}, path="/api/threads/bad%20id/messages")
        assert status == 422 and body["error"]["field"] == "threadId"
        resp = await gw.client.post("/api/runs", data=b"{}")
        assert resp.status == 401
        big = json.dumps({"runner": "echo", "input": "x" * (gw.config.runs.max_body_bytes + 1)})
        resp = await gw.client.post("/api/runs", headers=gw.headers("dave"), data=big)
        assert resp.status == 413 and (await resp.json())["error"]["code"] == "payload_too_large"

        status, body = await gw.post_run("dave", {"runner": "echo"}, path="/api/threads/thread-1/messages")
        assert status == 202 and body["threadId"] == "thread-1"
        run_id = body["runId"]
        assert (await gw.get_run("dave", run_id))["threadId"] == "thread-1"
        for path in (f"/api/runs/{run_id}", f"/api/runs/{run_id}/events", f"/api/runs/{run_id}/export"):
            resp = await gw.client.get(path, headers=gw.headers("eve"))
            assert resp.status == 404 and (await resp.json())["error"]["code"] == "run_not_found"
        resp = await gw.client.post(f"/api/runs/{run_id}/cancel", headers=gw.headers("eve"))
        assert resp.status == 404
        resp = await gw.client.get("/api/runs/..%2F..", headers=gw.headers("dave"))
        assert resp.status == 404


async def test_a_large_input_arrives_whole(js_server: NatsServer) -> None:
    desktop = await start_desktop(js_server.url, "yuri")
    try:
        async with runs_gateway(js_server.url) as gw:
            text = "".join(f"line {i:06d} é\n" for i in range(20_000))  # ~300 KB, in many TCP reads
            run_id = await gw.start_run("yuri", {"runner": "echo", "input": text})
            state = await gw.wait_status("yuri", run_id, {"completed", "failed"})
            assert state["status"] == "completed", state
            output = "".join(e["data"] for e in await gw.export("yuri", run_id) if e["type"] == "output")
            assert output == text and state["outputBytes"] == len(text.encode())
    finally:
        await desktop.close()
