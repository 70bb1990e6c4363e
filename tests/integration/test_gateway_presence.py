"""``GET /api/links/me``: a live probe through the tunnel, never a 500.

The daemon here is a plain ``tunnel.serve`` connected with the credential the gateway
minted, answering ``/api/links/status`` like linkd does.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

import tunnel
from tests.helpers import NatsServerFactory, wait_until
from tests.integration.gateway_harness import (
    EVENT_TIMEOUT,
    STATUS,
    OperatorServer,
    connect_daemon,
    creds_auth,
    running_gateway,
    serve_status,
    start_operator_server,
)

# The promise: "offline" is known fast, because nobody subscribed means NATS no-responders.
OFFLINE_WITHIN = 1.0


@pytest.fixture
def op(nats_server_factory: NatsServerFactory, tmp_path: Path) -> OperatorServer:
    return start_operator_server(nats_server_factory, tmp_path)


async def test_me_is_online_with_latency_when_the_daemon_serves_the_host(op: OperatorServer) -> None:
    async with running_gateway(op.env()) as gw:
        session = await gw.ok_session("alice")
        daemon = await connect_daemon(op.server.url, **creds_auth(session["credentials"]["creds"]))
        try:
            server = await serve_status(daemon.nc, session["tunnelHostname"])
            me = await gw.me("alice")
            assert me == {
                "online": True,
                "tunnelHostname": session["tunnelHostname"],
                "hostname": STATUS["hostname"],
                "capabilities": STATUS["capabilities"],
                "cliVersion": STATUS["cliVersion"],
                "latencyMs": me["latencyMs"],
            }
            assert isinstance(me["latencyMs"], float) and 0 < me["latencyMs"] < 1000
            # Another user's presence is theirs: bob has no desktop, alice's does not count.
            bob = await gw.me("bob")
            assert bob["online"] is False and bob["reason"] == "not_connected"
            await server.close()
            assert daemon.errors == []
        finally:
            await daemon.nc.close()


async def test_me_is_offline_within_a_second_when_no_daemon_serves_the_host(op: OperatorServer) -> None:
    async with running_gateway(op.env()) as gw:
        started = time.monotonic()
        me = await gw.me("nobody-home")
        elapsed = time.monotonic() - started
        assert me["online"] is False
        assert me["reason"] == "not_connected"
        assert set(me) == {"online", "tunnelHostname", "reason", "detail"}
        assert elapsed < OFFLINE_WITHIN, f"offline took {elapsed:.3f}s"


async def test_me_reports_a_daemon_that_answers_wrongly_or_too_slowly_as_offline(op: OperatorServer) -> None:
    async with running_gateway(op.env(), presence_timeout=0.5) as gw:
        for user, handler_kind in (("u500", "error"), ("ujunk", "junk"), ("uslow", "slow")):

            async def handler(request: tunnel.Request, kind: str = handler_kind) -> tunnel.Response:
                if kind == "slow":
                    await asyncio.sleep(30)
                if kind == "error":
                    return tunnel.Response(500, [], b"boom")
                return tunnel.Response(200, [("content-type", "application/json")], b"[not, json")

            session = await gw.ok_session(user)
            daemon = await connect_daemon(op.server.url, **creds_auth(session["credentials"]["creds"]))
            try:
                server = await tunnel.serve(daemon.nc, session["tunnelHostname"], handler)
                started = time.monotonic()
                me = await gw.me(user)
                assert me["online"] is False
                expected = {"error": "bad_status", "junk": "bad_response", "slow": "timeout"}[handler_kind]
                assert me["reason"] == expected, me
                assert time.monotonic() - started < 0.5 + OFFLINE_WITHIN
                await server.close(timeout=0.1)
            finally:
                await daemon.nc.close()


async def test_me_is_offline_and_session_is_503_while_the_gateways_nats_is_down_then_recover(
    op: OperatorServer,
) -> None:
    async with running_gateway(op.env()) as gw:
        session = await gw.ok_session("alice")
        op.server.stop()
        await wait_until(lambda: not gw.nc.is_connected, EVENT_TIMEOUT, message="gateway never noticed")

        started = time.monotonic()
        me = await gw.me("alice")
        assert time.monotonic() - started < OFFLINE_WITHIN
        assert me["online"] is False and me["reason"] == "nats_unavailable"
        status, body = await gw.session("alice")
        assert status == 503 and body["error"]["code"] == "nats_unavailable"
        health = await (await gw.client.get("/healthz")).json()
        assert health["status"] == "ok" and health["nats"] == "disconnected"
        assert health["runs"] == "unavailable" and health["runsReason"]

        # NATS comes back: the gateway reconnects by itself and the desktop is visible again.
        op.server.start()
        await wait_until(lambda: gw.nc.is_connected, 10.0, message="gateway never reconnected")
        daemon = await connect_daemon(op.server.url, **creds_auth(session["credentials"]["creds"]))
        try:
            server = await serve_status(daemon.nc, session["tunnelHostname"])
            me = await gw.me("alice")
            assert me["online"] is True, me
            await server.close()
        finally:
            await daemon.nc.close()


async def test_gateway_starts_while_nats_is_unreachable_and_answers_clearly(
    nats_server_factory: NatsServerFactory, tmp_path: Path
) -> None:
    op = start_operator_server(nats_server_factory, tmp_path)
    op.server.stop()
    async with running_gateway(op.env(), wait_nats=False) as gw:
        me = await gw.me("alice")
        assert me["online"] is False and me["reason"] == "nats_unavailable"
        status, body = await gw.session("alice")
        assert status == 503 and body["error"]["code"] == "nats_unavailable"
        assert "NATS" in body["error"]["message"]
