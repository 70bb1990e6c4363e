"""Diagnostics: both ends report each request's start and end, dropped frames, and keep counters."""

from __future__ import annotations

import asyncio
import logging

import pytest

import tunnel
from cli.nats_server import NatsServer
from tests.helpers import wait_until
from tests.integration.tunnel_harness import connect_peers, serving

HOST = "diag.test"


async def handler(req: tunnel.Request) -> tunnel.Response:
    if req.path == "/boom":
        raise RuntimeError("handler bug")
    if req.path == "/slow":
        await asyncio.Event().wait()
    body = await req.read()
    return tunnel.Response(201, [], body or b"hello")


async def test_events_and_counters_describe_every_request_on_both_ends(nats_server: NatsServer) -> None:
    server_events: list[tunnel.TunnelEvent] = []
    client_events: list[tunnel.TunnelEvent] = []
    async with (
        connect_peers(nats_server) as p,
        serving(p.server_nc, HOST, handler, on_event=server_events.append) as server,
    ):
        client = tunnel.TunnelClient(p.caller_nc, on_event=client_events.append)
        ok = await client.fetch(f"tunnel://{HOST}/ok", method="POST", body=b"x" * 1000)
        assert await ok.read() == b"x" * 1000
        with pytest.raises(tunnel.RemoteError):
            await client.fetch(f"tunnel://{HOST}/boom")
        with pytest.raises(tunnel.DeadlineExceeded):
            await client.fetch(f"tunnel://{HOST}/slow", timeout=0.3)
        await wait_until(lambda: server.in_flight == 0 and client.in_flight == 0)

    ended = {e.path: e for e in server_events if e.kind == "request.ended"}
    assert [e.kind for e in server_events].count("request.started") == 3
    assert ended["/ok"].outcome == "ok" and ended["/ok"].status == 201
    assert ended["/ok"].bytes_in == 1000 and ended["/ok"].bytes_out == 1000
    assert ended["/ok"].duration is not None and ended["/ok"].duration >= 0
    assert ended["/boom"].outcome == "tunnel_handler_error"
    assert ended["/slow"].outcome in {"tunnel_timeout", "tunnel_aborted"}
    assert server.stats.outcomes["ok"] == 1 and server.stats.outcomes["tunnel_handler_error"] == 1
    assert server.stats.active == 0 and server.stats.requests == 3
    # Body bytes, like the events (not the bytes of the frames that carried them).
    assert server.stats.bytes_out == 1000 and server.stats.bytes_in == 1000

    client_outcomes = sorted(e.outcome or "" for e in client_events if e.kind == "request.ended")
    assert client_outcomes == ["ok", "tunnel_handler_error", "tunnel_timeout"]
    assert client.stats.outcomes == {"ok": 1, "tunnel_handler_error": 1, "tunnel_timeout": 1}
    assert client.stats.bytes_out == 1000 and client.stats.bytes_in == 1000
    assert client.stats.active == 0


async def test_dropped_frames_are_reported_and_a_failing_hook_never_breaks_traffic(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[tunnel.TunnelEvent] = []

    def hook(event: tunnel.TunnelEvent) -> None:
        seen.append(event)
        raise ValueError("broken metrics exporter")

    async with (
        connect_peers(nats_server) as p,
        serving(p.server_nc, HOST, handler, on_event=hook) as server,
    ):
        await p.caller_nc.publish(server.subjects.request, b"not a frame")
        await p.caller_nc.flush()
        await wait_until(lambda: server.stats.frames_dropped == 1)
        client = tunnel.TunnelClient(p.caller_nc)
        resp = await client.fetch(f"tunnel://{HOST}/ok")
        assert await resp.read() == b"hello"
    dropped = [e for e in seen if e.kind == "frame.dropped"]
    assert len(dropped) == 1 and dropped[0].detail and "JSON" in dropped[0].detail
    assert any("on_event hook failed" in r.message for r in caplog.records)


async def test_logging_hook_writes_one_structured_record_per_event(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    logger = logging.getLogger("test.tunnel.events")
    caplog.set_level(logging.INFO, logger="test.tunnel.events")
    async with (
        connect_peers(nats_server) as p,
        serving(p.server_nc, HOST, handler, on_event=tunnel.logging_hook(logger)),
    ):
        client = tunnel.TunnelClient(p.caller_nc)
        assert await (await client.fetch(f"tunnel://{HOST}/ok")).read() == b"hello"
        await wait_until(lambda: len(caplog.records) >= 2)
    fields = [r.__dict__["tunnel"] for r in caplog.records]
    assert [f["kind"] for f in fields] == ["request.started", "request.ended"]
    assert fields[1]["outcome"] == "ok" and fields[1]["status"] == 201
