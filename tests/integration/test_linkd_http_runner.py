"""The ``http`` runner against a real local aiohttp endpoint (like a local model server)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web

from cli.nats_server import free_port
from linkd.config import HttpRunnerConfig
from linkd.run_events import MemoryEventSink, RunEvent
from linkd.runners import HttpRunner, WorkItem
from linkd.runs import RunManager

TIMEOUT = 5.0


class Endpoint:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.disconnected = asyncio.Event()
        app = web.Application()
        app.router.add_post("/generate", self.generate)
        app.router.add_post("/broken", self.broken)
        self.runner = web.AppRunner(app, handle_signals=False)
        self.port = free_port()

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append({"body": body, "run": request.headers.get("X-Linkd-Run-Id")})
        response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        await response.prepare(request)
        try:
            for n in range(body.get("tokens", 3)):
                await response.write(f"tok{n} ".encode())
                await response.write("é".encode()[:1])  # a character split across writes
                await response.write("é".encode()[1:])
                await asyncio.sleep(body.get("delay", 0))
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnected.set()
            raise
        await response.write_eof()
        return response

    async def broken(self, request: web.Request) -> web.Response:
        return web.json_response({"error": "model not loaded"}, status=503)


@asynccontextmanager
async def endpoint() -> AsyncIterator[Endpoint]:
    ep = Endpoint()
    await ep.runner.setup()
    await web.TCPSite(ep.runner, "127.0.0.1", ep.port).start()
    try:
        yield ep
    finally:
        await ep.runner.cleanup()


def manager(url: str) -> tuple[RunManager, MemoryEventSink]:
    sink = MemoryEventSink()
    return RunManager(
        {"http": HttpRunner(HttpRunnerConfig(url, timeout=TIMEOUT))}, sink, heartbeat_interval=60
    ), sink


def text(events: list[RunEvent]) -> str:
    return "".join(e.data["data"] for e in events if e.type == "output")


async def test_streams_the_answer_as_output_events() -> None:
    async with endpoint() as ep:
        runs, sink = manager(f"http://127.0.0.1:{ep.port}/generate")
        runs.submit(WorkItem("h1", "t", "u", 1, "http", {"prompt": "hi", "tokens": 3}))
        info = await runs.wait_finished("h1", TIMEOUT)
        events = sink.events("h1")
        assert info.status == "completed", events[-1].data
        assert text(events) == "tok0 étok1 étok2 é"
        assert all(e.data["stream"] == "body" for e in events if e.type == "output")
        assert ep.requests == [{"body": {"prompt": "hi", "tokens": 3}, "run": "h1"}]


async def test_failures_end_the_run_failed_with_the_reason() -> None:
    async with endpoint() as ep:
        runs, sink = manager(f"http://127.0.0.1:{ep.port}/broken")
        runs.submit(WorkItem("b1", "t", "u", 1, "http", {}))
        await runs.wait_finished("b1", TIMEOUT)
        done = sink.events("b1")[-1].data
        assert done["status"] == "failed" and done["httpStatus"] == 503
        assert "answered 503" in done["reason"] and "model not loaded" in done["reason"]
    runs, sink = manager(f"http://127.0.0.1:{free_port()}/generate")
    runs.submit(WorkItem("u1", "t", "u", 1, "http", {}))
    await runs.wait_finished("u1", TIMEOUT)
    assert "cannot reach" in sink.events("u1")[-1].data["reason"]


async def test_cancel_closes_the_connection() -> None:
    async with endpoint() as ep:
        runs, sink = manager(f"http://127.0.0.1:{ep.port}/generate")
        runs.submit(WorkItem("c1", "t", "u", 1, "http", {"tokens": 1000, "delay": 0.01}))
        await sink.wait_for("c1", lambda evs: sum(e.type == "output" for e in evs) >= 3, TIMEOUT)
        runs.cancel("c1")
        info = await runs.wait_finished("c1", TIMEOUT)
        assert info.status == "cancelled"
        await asyncio.wait_for(ep.disconnected.wait(), TIMEOUT)
        assert json.dumps(sink.events("c1")[-1].data["status"]) == '"cancelled"'
