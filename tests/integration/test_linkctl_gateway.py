"""``linkctl session`` and ``linkctl status --gateway`` against the real gateway and nats-server.

The gateway runs in-process on a real port (operator mode); linkctl runs as a subprocess,
as a user would call it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import nats
import pytest
from nats.aio.client import RawCredentials

import tunnel
from cli import exitcodes
from studio_gateway.hostnames import tunnel_hostname
from tests.helpers import NatsServerFactory
from tests.integration.gateway_harness import OperatorServer, serve_status, start_operator_server
from tests.integration.linkctl_harness import LINKCTL
from tests.integration.linkd_harness import live_gateway

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def op(nats_server_factory: NatsServerFactory, tmp_path: Path) -> OperatorServer:
    return start_operator_server(nats_server_factory, tmp_path)


async def linkctl(*args: str, token: str | None = None) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINKCTL_")}
    env["NO_COLOR"] = "1"
    if token is not None:
        env["LINKCTL_TOKEN"] = token
    proc = await asyncio.create_subprocess_exec(
        *LINKCTL, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_status_through_the_gateway_offline_then_online(op: OperatorServer) -> None:
    async with live_gateway(op.env()) as gw:
        token = gw.token("alice")
        host = tunnel_hostname("alice")
        code, out, err = await linkctl("status", "--gateway", gw.url, "--json", token=token)
        assert code == exitcodes.OFFLINE, err
        doc = json.loads(out)
        assert doc["online"] is False and doc["reason"] == "not_connected"
        assert doc["tunnelHostname"] == host and doc["via"] == gw.url and doc["roundTripMs"] > 0

        nc = await nats.connect(op.server.url, user_credentials=str(op.gateway_creds))
        server = await serve_status(nc, host)
        try:
            code, out, err = await linkctl("status", "--gateway", gw.url, token=token)
            assert code == exitcodes.OK, err
            assert out.splitlines()[0] == f"{host}: online"
            assert "desk-of-test" in out and "round trip" in out
            code, out, _ = await linkctl(
                "status", "--gateway", gw.url, "--watch", "0.2", "--count", "2", "--json", token=token
            )
            lines = [json.loads(line) for line in out.splitlines()]
            assert code == 0 and len(lines) == 2 and all(line["online"] for line in lines)
        finally:
            await server.close()
            await nc.close()


async def test_status_through_the_gateway_errors_are_one_line(op: OperatorServer) -> None:
    async with live_gateway(op.env()) as gw:
        code, _, err = await linkctl("status", "--gateway", gw.url, token="not-a-token")
        assert code == exitcodes.USAGE
        assert err.startswith("linkctl: error: the gateway refused the token (invalid_token")
        assert len(err.strip().splitlines()) == 1
        code, _, err = await linkctl("status", "desk", "--gateway", gw.url, token="x")
        assert code == exitcodes.USAGE and "not both" in err
    code, out, _ = await linkctl("status", "--gateway", gw.url, "--json", token="x")
    assert code == exitcodes.USAGE
    assert json.loads(out)["reason"] == "gateway_unavailable"


async def test_session_shows_decoded_claims_and_masks_secrets(op: OperatorServer) -> None:
    async with live_gateway(op.env(NATS_TUNNEL_SESSION_TTL_SECONDS="600")) as gw:
        token = gw.token("bob")
        host = tunnel_hostname("bob")
        code, out, err = await linkctl("session", "--gateway", gw.url, "--json", token=token)
        assert code == 0, err
        doc = json.loads(out)
        assert doc["tunnelHostname"] == host
        assert doc["credentials"]["creds"].startswith("********") and "SU" not in doc["credentials"]["creds"]
        claims = doc["claims"]
        assert claims["nats"]["allowed_connection_types"] == ["STANDARD", "WEBSOCKET"]
        granted = claims["nats"]["pub"]["allow"] + claims["nats"]["sub"]["allow"]
        # Host-scoped, plus the host's own readiness subject (the one grant outside its prefix,
        # contract/permissions.py), subscribe only.
        ready = tunnel.HostSubjects.for_host(host).ready
        assert ready in claims["nats"]["sub"]["allow"] and ready not in claims["nats"]["pub"]["allow"]
        assert all(".host." in s or s.startswith("$SRV.") or s == ready for s in granted), granted
        assert 590 <= claims["exp"] - claims["iat"] <= 600

        code, out, _ = await linkctl("session", "--gateway", gw.url, token=token)
        assert code == 0
        assert out.splitlines()[0] == f"Link session for {host}"
        assert "publish allow" in out and "subscribe allow" in out and "in 9 min" in out
        assert "-----BEGIN USER NKEY SEED-----" not in out

        code, out, _ = await linkctl("session", "--gateway", gw.url, "--show-secrets", "--json", token=token)
        creds = json.loads(out)["credentials"]["creds"]
        assert code == 0 and "-----BEGIN USER NKEY SEED-----" in creds
        # The creds it shows really connect, as the host's daemon.
        nc = await nats.connect(op.server.url, user_credentials=RawCredentials(creds))
        await nc.close()

        code, _, err = await linkctl("session", "--gateway", gw.url, "--public-key", "UNOPE", token=token)
        assert code == exitcodes.USAGE and "invalid_public_key" in err


async def test_session_when_the_tunnel_is_disabled_is_a_gateway_error(op: OperatorServer) -> None:
    async with live_gateway(op.env(NATS_TUNNEL_PUBLIC_ENABLED="false")) as gw:
        code, _, err = await linkctl("session", "--gateway", gw.url, token=gw.token("c"))
        assert code == exitcodes.GATEWAY_ERROR
        assert "tunnel_disabled" in err and "Traceback" not in err


async def test_status_watch_keeps_probing_through_a_gateway_restart(op: OperatorServer) -> None:
    async with live_gateway(op.env()) as gw:
        token = gw.token("dora")
        env = {k: v for k, v in os.environ.items() if not k.startswith("LINKCTL_")}
        env.update(LINKCTL_TOKEN=token, NO_COLOR="1")
        proc = await asyncio.create_subprocess_exec(
            *LINKCTL, "status", "--gateway", gw.url, "--watch", "0.2", "--json", env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None
        reasons: list[str] = []

        async def next_reason() -> str:
            line = await asyncio.wait_for(proc.stdout.readline(), 30)  # type: ignore[union-attr]
            assert line, "status --watch ended"
            reason = str(json.loads(line)["reason"])
            reasons.append(reason)
            return reason

        try:
            assert await next_reason() == "not_connected"
            await gw.stop()
            while await next_reason() != "gateway_unavailable":
                pass
            await gw.start()
            while await next_reason() != "not_connected":
                pass
        finally:
            proc.send_signal(signal.SIGINT)
            await asyncio.wait_for(proc.wait(), 30)
    assert "gateway_unavailable" in reasons and reasons[-1] == "not_connected"
    assert proc.returncode == exitcodes.OFFLINE  # the status of the last probe
