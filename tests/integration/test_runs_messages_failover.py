"""A context message survives a gateway SIGKILLed between send and ack: exactly once on the desktop.

Two gateway processes on one JetStream nats-server, and a real linkd desktop (routes, run
manager, mock runner, uplink) whose control route takes the first context message, hands it
to the run, and then holds its answer back. The gateway that sent it is SIGKILLed while it
waits; its record stays ``sent``; the other gateway's resend loop finds it and sends it
again with the same message id; the desktop answers ``duplicate`` and the message is
``acknowledged`` (two attempts). The mock run's output shows the message once, and a retry
of the POST with the same idempotency key at the surviving gateway sends nothing new.

The same for a work item (``kickoff``) that never reached the desktop: its gateway dies
waiting; the other one delivers it again with the same message id, and the run completes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import httpx
import pytest

import tunnel
from cli.nats_server import NatsServer
from linkd.routes import LinkRoutes
from linkd.runners import MockRunner
from linkd.runners.mock import MESSAGES_STREAM
from studio_gateway.hostnames import tunnel_hostname
from tests.faults.killable_processes import GatewayProcess
from tests.helpers import NatsServerFactory, wait_until
from tests.integration.gateway_harness import SECRET
from tests.integration.gateway_runs_harness import start_desktop

pytestmark = pytest.mark.timeout(120)

USER = "dora"
# Short, so the resend comes within seconds: a message untouched for dispatch timeout + 2 s is resent.
DISPATCH_TIMEOUT = "3"


class HoldFirstContext:
    """The desktop's routes, except that the first context's answer is held back until released."""

    def __init__(self, routes: LinkRoutes) -> None:
        self.routes = routes
        self.seen = asyncio.Event()
        self.release = asyncio.Event()
        self.context_requests: list[dict[str, Any]] = []

    async def __call__(self, request: tunnel.Request) -> tunnel.Response:
        if request.path != "/api/links/control":
            return await self.routes(request)
        body = await request.json()
        if body.get("action") == "context":
            self.context_requests.append(body)
        answer = await self.routes.answer_control(body)
        if body.get("action") == "context" and len(self.context_requests) == 1:
            self.seen.set()
            await self.release.wait()
        return answer


async def test_a_gateway_killed_between_send_and_ack_the_other_completes_delivery_once(
    nats_server_factory: NatsServerFactory,
) -> None:
    server: NatsServer = nats_server_factory(jetstream=True)
    env = {
        "GATEWAY_JWT_SECRET": SECRET,
        "NATS_URL": server.url,
        "RUNS_DISPATCH_TIMEOUT_SECONDS": DISPATCH_TIMEOUT,
    }
    first, second = GatewayProcess(env), GatewayProcess(env)
    desktop = await start_desktop(server.url, USER, runners={"mock": MockRunner()})
    assert desktop.runs is not None
    hold = HoldFirstContext(LinkRoutes(desktop.runs))
    await desktop.server.close()
    desktop.server = await tunnel.serve(desktop.nc, tunnel_hostname(USER), hold)
    try:
        await asyncio.gather(first.start(), second.start())
        auth = {"Authorization": f"Bearer {first.token(USER)}"}
        async with (
            httpx.AsyncClient(base_url=first.url, headers=auth, trust_env=False, timeout=30) as a,
            httpx.AsyncClient(base_url=second.url, headers=auth, trust_env=False, timeout=30) as b,
        ):

            async def runs_ready() -> bool:
                docs = [(await c.get("/healthz")).json() for c in (a, b)]
                return all(doc.get("runs") == "ready" for doc in docs)

            await wait_until(runs_ready, 20.0, interval=0.1, message="runs never ready on both gateways")
            created = await a.post(
                "/api/runs", json={"runner": "mock", "input": {"count": 4000, "delayMs": 50}}
            )
            assert created.status_code == 202, created.text
            run_id = created.json()["runId"]

            async def in_progress() -> bool:
                return bool((await b.get(f"/api/runs/{run_id}")).json()["status"] == "in_progress")

            await wait_until(in_progress, 20.0, interval=0.05)
            body = {"context": {"note": "once"}, "idempotencyKey": "ctx-1"}
            posting = asyncio.ensure_future(a.post(f"/api/runs/{run_id}/context", json=body))
            await asyncio.wait_for(hold.seen.wait(), 20.0)
            assert first.proc is not None
            await first.kill()  # between the send and the ack
            with contextlib.suppress(httpx.TransportError):
                await posting

            async def acknowledged() -> dict[str, Any] | None:
                listing = (await b.get(f"/api/runs/{run_id}/messages")).json()
                contexts = [m for m in listing["messages"] if m["kind"] == "context"]
                return contexts[0] if contexts and contexts[0]["status"] == "acknowledged" else None

            await wait_until(
                acknowledged, 30.0, interval=0.2, message="the surviving gateway never resent it"
            )
            record = await acknowledged()
            assert record is not None
            assert record["attempts"] == 2 and record["ack"]["duplicate"] is True, record
            assert [r["messageId"] for r in hold.context_requests] == [record["messageId"]] * 2

            # A retried POST at the surviving gateway: the same message, nothing sent again.
            retried = await b.post(f"/api/runs/{run_id}/context", json=body)
            assert retried.status_code == 202, retried.text
            assert retried.json()["messageId"] == record["messageId"] and retried.json()["idempotentReplay"]
            assert len(hold.context_requests) == 2

            hold.release.set()
            cancelled = await b.post(f"/api/runs/{run_id}/cancel")
            assert cancelled.status_code == 202, cancelled.text

            async def ended() -> bool:
                return bool((await b.get(f"/api/runs/{run_id}")).json()["status"] == "cancelled")

            await wait_until(ended, 20.0, interval=0.1)
            export = await b.get(f"/api/runs/{run_id}/export")
            events = [json.loads(line) for line in export.text.splitlines()]
            received = [
                json.loads(e["data"])
                for e in events
                if e["type"] == "output" and e.get("stream") == MESSAGES_STREAM
            ]
            assert received == [
                {"messageId": record["messageId"], "kind": "context", "context": {"note": "once"}}
            ]
    finally:
        hold.release.set()
        await first.stop()
        await second.stop()
        await desktop.close()


class SwallowFirstWork:
    """The desktop's routes, except that the first work item is taken and never answered (lost)."""

    def __init__(self, routes: LinkRoutes) -> None:
        self.routes = routes
        self.seen = asyncio.Event()
        self.release = asyncio.Event()
        self.work_requests = 0

    async def __call__(self, request: tunnel.Request) -> tunnel.Response:
        if request.path != "/api/links/work":
            return await self.routes(request)
        self.work_requests += 1
        if self.work_requests == 1:
            self.seen.set()
            await self.release.wait()
            return tunnel.Response(503, [], b"")
        return await self.routes(request)


async def test_a_work_item_whose_gateway_died_is_delivered_by_the_other(
    nats_server_factory: NatsServerFactory,
) -> None:
    server: NatsServer = nats_server_factory(jetstream=True)
    env = {
        "GATEWAY_JWT_SECRET": SECRET,
        "NATS_URL": server.url,
        "RUNS_DISPATCH_TIMEOUT_SECONDS": DISPATCH_TIMEOUT,
        # Longer than the resend takes: the reaper must not end the run as dispatch_error first.
        "RUNS_LIVENESS_TIMEOUT_SECONDS": "60",
    }
    first, second = GatewayProcess(env), GatewayProcess(env)
    desktop = await start_desktop(server.url, USER, runners={"mock": MockRunner()})
    assert desktop.runs is not None
    swallow = SwallowFirstWork(LinkRoutes(desktop.runs))
    await desktop.server.close()
    desktop.server = await tunnel.serve(desktop.nc, tunnel_hostname(USER), swallow)
    try:
        await asyncio.gather(first.start(), second.start())
        auth = {"Authorization": f"Bearer {first.token(USER)}"}
        async with (
            httpx.AsyncClient(base_url=first.url, headers=auth, trust_env=False, timeout=30) as a,
            httpx.AsyncClient(base_url=second.url, headers=auth, trust_env=False, timeout=30) as b,
        ):

            async def runs_ready() -> bool:
                docs = [(await c.get("/healthz")).json() for c in (a, b)]
                return all(doc.get("runs") == "ready" for doc in docs)

            await wait_until(runs_ready, 20.0, interval=0.1, message="runs never ready on both gateways")
            created = await a.post("/api/runs", json={"runner": "mock", "input": {"count": 3}})
            assert created.status_code == 202, created.text
            run_id = created.json()["runId"]
            await asyncio.wait_for(swallow.seen.wait(), 20.0)
            await first.kill()  # the work item is on its way; nobody will answer it

            async def completed() -> dict[str, Any] | None:
                doc = (await b.get(f"/api/runs/{run_id}")).json()
                return doc if doc["status"] in ("completed", "failed", "cancelled") else None

            await wait_until(completed, 40.0, interval=0.2, message="the run never ended")
            state = await completed()
            assert state is not None and state["status"] == "completed", state

            # The dispatcher records the desktop's answer after its own state write: the run's
            # events can complete it first.
            async def kickoff_answered() -> list[dict[str, Any]] | None:
                listing = (await b.get(f"/api/runs/{run_id}/messages")).json()
                kickoff = [m for m in listing["messages"] if m["kind"] == "kickoff"]
                return kickoff if kickoff and kickoff[0]["status"] not in ("queued", "sent") else None

            kickoff = await wait_until(
                kickoff_answered, 20.0, interval=0.1, message="the kickoff stayed sent"
            )
            assert len(kickoff) == 1 and kickoff[0]["status"] == "acknowledged", kickoff
            assert kickoff[0]["attempts"] == 2 and swallow.work_requests == 2
    finally:
        swallow.release.set()
        await first.stop()
        await second.stop()
        await desktop.close()
