"""``GET /api/runs``: the caller's own runs, newest first, paged with ``next``.

Real JetStream nats-server; the runs go to users without a desktop (they fail at once,
which is all a list needs).
"""

from __future__ import annotations

from typing import Any

import nats
import pytest

from cli.nats_server import NatsServer
from studio_gateway.runs.store import STATE_BUCKET, USER_INDEX_BUCKET, bucket_keys, user_index_token
from tests.helpers import NatsServerFactory
from tests.integration.gateway_runs_harness import RunsGateway, runs_gateway

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def js_server(nats_server_factory: NatsServerFactory) -> NatsServer:
    return nats_server_factory(jetstream=True)


async def list_page(gw: RunsGateway, user: str, query: str = "") -> tuple[int, dict[str, Any]]:
    resp = await gw.client.get(f"/api/runs{query}", headers=gw.headers(user))
    body: dict[str, Any] = await resp.json()
    return resp.status, body


async def start_ended_runs(gw: RunsGateway, user: str, count: int) -> list[dict[str, Any]]:
    """``count`` runs of ``user``, each ended (failed: no desktop), as GET /api/runs/{id} shows them."""
    ids = [await gw.start_run(user, {"runner": "echo", "input": i, "title": f"t{i}"}) for i in range(count)]
    return [await gw.wait_status(user, run_id, {"failed"}) for run_id in ids]


def newest_first(states: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(states, key=lambda s: (s["createdAt"], s["runId"]), reverse=True)


async def test_own_runs_newest_first_paged_with_next_never_another_users(js_server: NatsServer) -> None:
    async with runs_gateway(js_server.url) as gw:
        mine = await start_ended_runs(gw, "lister", 5)
        theirs = await start_ended_runs(gw, "someone-else", 2)

        status, body = await list_page(gw, "lister")
        assert status == 200, body
        assert body == {"runs": newest_first(mine), "next": None}
        created = [s["createdAt"] for s in body["runs"]]
        assert created == sorted(created, reverse=True)

        pages: list[list[dict[str, Any]]] = []
        query = "?limit=2"
        while True:
            status, body = await list_page(gw, "lister", query)
            assert status == 200, body
            pages.append(body["runs"])
            if body["next"] is None:
                break
            query = f"?limit=2&before={body['next']}"
        assert [len(page) for page in pages] == [2, 2, 1]
        assert [s for page in pages for s in page] == newest_first(mine)

        status, body = await list_page(gw, "someone-else", "?limit=100")
        assert body == {"runs": newest_first(theirs), "next": None}
        assert all(s["userId"] == "someone-else" for s in body["runs"])
        # Another user's cursor only positions the caller's own list.
        status, body = await list_page(gw, "nobody-yet", f"?before={'9' * 15}.run_x")
        assert (status, body) == (200, {"runs": [], "next": None})

    nc = await nats.connect(js_server.url)
    try:
        js = nc.jetstream()
        index = (await js.stream_info(f"KV_{USER_INDEX_BUCKET}")).config
        state = (await js.stream_info(f"KV_{STATE_BUCKET}")).config
        assert (index.max_age, index.num_replicas) == (state.max_age, state.num_replicas)
        # Not KeyValue.keys(): nats-py's watcher can report "no keys" before the first entry
        # it already received (consumer info says nothing pending once all were delivered).
        token = user_index_token("lister")
        keys = await bucket_keys(nc, USER_INDEX_BUCKET, f"{token}.>")
        assert sorted(keys) == sorted(f"{token}.{s['createdAt']:015d}.{s['runId']}" for s in mine)
    finally:
        await nc.close()


async def test_a_run_whose_state_is_gone_is_skipped_and_the_page_filled(js_server: NatsServer) -> None:
    async with runs_gateway(js_server.url) as gw:
        runs = newest_first(await start_ended_runs(gw, "forgetful", 4))
        nc = await nats.connect(js_server.url)
        try:
            await (await nc.jetstream().key_value(STATE_BUCKET)).purge(runs[1]["runId"])
        finally:
            await nc.close()
        status, body = await list_page(gw, "forgetful", "?limit=2")
        assert status == 200, body
        assert [s["runId"] for s in body["runs"]] == [runs[0]["runId"], runs[2]["runId"]]
        status, body = await list_page(gw, "forgetful", f"?limit=2&before={body['next']}")
        assert body == {"runs": [runs[3]], "next": None}


async def test_limit_and_cursor_bounds_and_auth(js_server: NatsServer) -> None:
    async with runs_gateway(js_server.url) as gw:
        await start_ended_runs(gw, "bounded", 2)
        for bad in ("0", "101", "-1", "1.5", "abc", "", "²"):
            status, body = await list_page(gw, "bounded", f"?limit={bad}")
            assert status == 422, (bad, body)
            assert body["error"]["code"] == "invalid_field" and body["error"]["field"] == "limit"
        for bad in ("nope", "123.run_x", f"{'1' * 15}.", f"{'1' * 15}.run x", f"{'1' * 15}.{'r' * 129}"):
            status, body = await list_page(gw, "bounded", f"?before={bad}")
            assert status == 422, (bad, body)
            assert body["error"]["code"] == "invalid_field" and body["error"]["field"] == "before"
        status, body = await list_page(gw, "bounded", "?limit=100")
        assert status == 200 and len(body["runs"]) == 2 and body["next"] is None
        status, body = await list_page(gw, "bounded", "?limit=1")
        assert status == 200 and len(body["runs"]) == 1 and body["next"] is not None

        resp = await gw.client.get("/api/runs")
        assert resp.status == 401
        resp = await gw.client.get("/api/runs", headers={"Authorization": "Bearer not-a-token"})
        assert resp.status == 401
