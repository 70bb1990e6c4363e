"""linkd's inspector against the real thing: requests through the tunnel to a real upstream
show in its JSON API and stream with headers and bodies; Replay (as captured and edited)
reaches the upstream and is listed as a replay; the loopback Host/Origin guard; a taken
port costs one warning line, not the daemon."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from linkd.daemon import State
from tests.helpers import NatsServerFactory, wait_until
from tests.integration.inspector_harness import PNG, InspectedLink, as_json, inspected_link

pytestmark = pytest.mark.timeout(90)
TIMEOUT = 10.0


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def finished_rows(session: aiohttp.ClientSession, link: InspectedLink, count: int) -> list[Any]:
    rows: list[Any] = []

    async def enough() -> bool:
        nonlocal rows
        rows = [r for r in (await get_json(session, f"{link.inspector_url}/api/requests"))["requests"]]
        return len([r for r in rows if not r["inFlight"]]) >= count

    await wait_until(enough, TIMEOUT, message=lambda: f"the inspector lists {rows}")
    return rows


async def test_requests_appear_with_headers_and_bodies_and_replay_reaches_the_upstream(
    nats_server_factory: NatsServerFactory, tmp_path: Path
) -> None:
    async with inspected_link(nats_server_factory, tmp_path) as link, aiohttp.ClientSession() as http:
        base = link.inspector_url
        # The status document (linkd status) names the inspector.
        assert link.daemon.status_document()["inspector"]["url"] == base + "/"
        status, body = await link.fetch(
            "/items?page=2",
            method="POST",
            headers=[("Content-Type", "application/json"), ("X-Trace", "t-1")],
            body=b'{"name": "widget"}',
        )
        assert status == 200 and as_json(body)["bodyBytes"] == 18
        assert (await link.fetch("/png"))[0] == 200
        assert (await link.fetch("/fail"))[0] == 503
        assert (await link.fetch("/api/links/status"))[0] == 200

        rows = await finished_rows(http, link, 4)
        assert [(r["method"], r["target"], r["status"]) for r in rows] == [
            ("GET", "/api/links/status", 200),
            ("GET", "/fail", 503),
            ("GET", "/png", 200),
            ("POST", "/items?page=2", 200),
        ]
        post = rows[-1]
        assert post["route"] == "upstream" and post["requestBytes"] == 18 and post["responseBytes"] > 0
        assert post["durationMs"] >= post["ttfbMs"] > 0

        detail = await get_json(http, f"{base}/api/requests/{post['id']}")
        assert ["X-Trace", "t-1"] in detail["request"]["headers"]
        assert detail["request"]["body"] == {
            "kind": "text",
            "text": '{"name": "widget"}',
            "size": 18,
            "captured": 18,
            "truncated": False,
        }
        assert ["X-Upstream", "echo"] in detail["response"]["headers"]
        assert json.loads(detail["response"]["body"]["text"])["path"] == "/items?page=2"
        png = await get_json(http, f"{base}/api/requests/{rows[2]['id']}")
        assert png["response"]["body"]["kind"] == "hex" and "89 50 4e 47" in png["response"]["body"]["hex"]
        assert png["response"]["body"]["size"] == len(PNG)

        # Filters: status class, path substring, limit.
        only5 = await get_json(http, f"{base}/api/requests?status=5xx")
        assert [r["target"] for r in only5["requests"]] == ["/fail"]
        items = await get_json(http, f"{base}/api/requests?path=/items")
        assert [r["id"] for r in items["requests"]] == [post["id"]]
        assert len((await get_json(http, f"{base}/api/requests?limit=2"))["requests"]) == 2
        async with http.get(f"{base}/api/requests?status=7xx") as resp:
            assert resp.status == 400

        # Replay as captured: the upstream sees the same request again, the list marks it.
        before = len(link.upstream.seen)
        async with http.post(f"{base}/api/requests/{post['id']}/replay", json={}) as resp:
            assert resp.status == 200, await resp.text()
            replay = await resp.json()
        assert replay["replayOf"] == post["id"] and replay["status"] == 200
        seen = link.upstream.seen[before]
        assert (seen.method, seen.path_qs, seen.body) == ("POST", "/items?page=2", b'{"name": "widget"}')
        assert seen.headers["X-Trace"] == "t-1" and seen.headers["X-Linkd-Replay-Of"] == post["id"]
        assert json.loads(replay["response"]["body"]["text"])["n"] == len(link.upstream.seen)

        # Replay edited: method, path, a header and the body changed.
        edits = {
            "method": "PUT",
            "target": "/items/7?page=3",
            "headers": [["Content-Type", "application/json"], ["X-Trace", "t-2"]],
            "body": '{"name": "gadget"}',
        }
        async with http.post(f"{base}/api/requests/{post['id']}/replay", json=edits) as resp:
            assert resp.status == 200, await resp.text()
            edited = await resp.json()
        seen = link.upstream.seen[-1]
        assert (seen.method, seen.path_qs, seen.body) == ("PUT", "/items/7?page=3", b'{"name": "gadget"}')
        assert seen.headers["X-Trace"] == "t-2"
        assert edited["method"] == "PUT" and edited["replayOf"] == post["id"]
        listed = (await get_json(http, f"{base}/api/requests?limit=2"))["requests"]
        assert [r["id"] for r in listed] == [edited["id"], replay["id"]]
        assert all(r["replayOf"] == post["id"] for r in listed)

        # What cannot be replayed says why.
        async with http.post(f"{base}/api/requests/{rows[0]['id']}/replay", json={}) as resp:
            assert resp.status == 409 and (await resp.json())["error"]["code"] == "not_replayable"
        async with http.post(f"{base}/api/requests/nope/replay", json={}) as resp:
            assert resp.status == 404


async def test_the_stream_sends_each_request_as_it_starts_and_ends(
    nats_server_factory: NatsServerFactory, tmp_path: Path
) -> None:
    async with inspected_link(nats_server_factory, tmp_path) as link, aiohttp.ClientSession() as http:
        async with http.get(f"{link.inspector_url}/api/requests/stream?path=/watched") as stream:
            assert stream.status == 200 and stream.content_type == "text/event-stream"
            await link.fetch("/not-this-one")
            await link.fetch("/watched?x=1")
            events: list[Any] = []

            async def read_until_finished() -> None:
                async for line in stream.content:
                    if line.startswith(b"data: "):
                        events.append(json.loads(line[6:]))
                        if not events[-1]["inFlight"]:
                            return

            await asyncio.wait_for(read_until_finished(), TIMEOUT)
        assert {e["target"] for e in events} == {"/watched?x=1"}
        assert events[-1]["status"] == 200 and events[-1]["durationMs"] is not None


async def test_only_loopback_hosts_and_the_page_own_origin_are_answered(
    nats_server_factory: NatsServerFactory, tmp_path: Path
) -> None:
    async with inspected_link(nats_server_factory, tmp_path) as link, aiohttp.ClientSession() as http:
        base = link.inspector_url
        await link.fetch("/x")
        row = (await finished_rows(http, link, 1))[0]
        # DNS rebinding: a page on evil.example resolving to 127.0.0.1 sends its own Host.
        for path in ("/", "/api/requests", f"/api/requests/{row['id']}"):
            async with http.get(base + path, headers={"Host": "evil.example:4041"}) as resp:
                assert resp.status == 403, path
                assert "forbidden_host" in await resp.text()
        replay = f"{base}/api/requests/{row['id']}/replay"
        async with http.post(replay, json={}, headers={"Origin": "http://evil.example"}) as resp:
            assert resp.status == 403
        async with http.post(replay, json={}, headers={"Origin": "http://127.0.0.1:1"}) as resp:
            assert resp.status == 403  # another loopback origin (another local page)
        async with http.post(replay, data="{}", headers={"Content-Type": "text/plain"}) as resp:
            assert resp.status == 415  # what a cross-origin form could send
        port = base.rsplit(":", 1)[1]
        async with http.post(replay, json={}, headers={"Origin": f"http://localhost:{port}"}) as resp:
            assert resp.status == 200
        async with http.get(base + "/") as resp:
            assert resp.status == 200 and "linkd inspector" in await resp.text()
            assert resp.headers["X-Frame-Options"] == "DENY"
            assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]


async def test_a_taken_port_is_one_warning_and_the_daemon_serves_on(
    nats_server_factory: NatsServerFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="linkd.inspector")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        async with inspected_link(nats_server_factory, tmp_path, inspect_port=port) as link:
            assert link.daemon.state is State.ONLINE
            assert (await link.fetch("/still-served"))[0] == 200
            assert link.daemon.inspector is not None and link.daemon.inspector.url is None
            assert link.daemon.status_document()["inspector"] is None
    finally:
        taken.close()
    warnings = [r for r in caplog.records if r.name == "linkd.inspector" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert f"127.0.0.1:{port}" in warnings[0].getMessage() and "in use" in warnings[0].getMessage()
