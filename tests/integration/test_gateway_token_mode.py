"""Token mode (dev servers with ``authorization { token }``): sessions hand out the token."""

from __future__ import annotations

import pytest

import tunnel
from studio_gateway.hostnames import tunnel_hostname
from studio_gateway.nats_jwt import KeyKind, new_key
from tests.helpers import NatsServerFactory, wait_until
from tests.integration.gateway_harness import (
    EVENT_TIMEOUT,
    base_env,
    connect_daemon,
    running_gateway,
    serve_status,
)

TOKEN = "dev-token-s3cret"


async def test_token_mode_session_returns_the_token_and_the_daemon_serves_with_it(
    nats_server_factory: NatsServerFactory,
) -> None:
    server = nats_server_factory(token=TOKEN)
    env = base_env(NATS_URL=server.url, NATS_TOKEN=TOKEN, NATS_PUBLIC_URL=server.url)
    async with running_gateway(env) as gw:
        # A daemon key is irrelevant in token mode: there is nothing to sign.
        session = await gw.ok_session("tina", {"publicKey": new_key(KeyKind.USER).public_key})
        assert session == {
            "connection": {
                "urls": [server.url],
                "allowedConnectionTypes": ["STANDARD", "WEBSOCKET"],
                "tunnelPrefix": tunnel.DEFAULT_PREFIX,
            },
            "token": TOKEN,
            "expiresAt": None,
            "tunnelHostname": tunnel_hostname("tina"),
        }
        daemon = await connect_daemon(server.url, token=session["token"])
        try:
            tunnel_server = await serve_status(daemon.nc, session["tunnelHostname"])
            me = await gw.me("tina")
            assert me["online"] is True and me["latencyMs"] > 0
            await tunnel_server.close()
        finally:
            await daemon.nc.close()


async def test_gateway_refused_by_nats_answers_503_with_the_reason(
    nats_server_factory: NatsServerFactory,
) -> None:
    server = nats_server_factory(token=TOKEN)
    env = base_env(NATS_URL=server.url, NATS_TOKEN="wrong-token", NATS_PUBLIC_URL=server.url)
    async with running_gateway(env, wait_nats=False) as gw:
        await wait_until(lambda: "refused" in gw.nats.reason, EVENT_TIMEOUT)
        status, body = await gw.session("tina")
        assert status == 503
        assert body["error"]["code"] == "nats_unavailable"
        assert "credentials" in body["error"]["message"]
        me = await gw.me("tina")
        assert me["online"] is False and me["reason"] == "nats_unavailable"


@pytest.mark.parametrize("prefix", ["tunnel.v1", "acme._tunnel"])
async def test_a_custom_tunnel_prefix_reaches_the_daemon_and_the_session_says_so(
    nats_server_factory: NatsServerFactory, prefix: str
) -> None:
    server = nats_server_factory(token=TOKEN)
    env = base_env(NATS_URL=server.url, NATS_TOKEN=TOKEN, NATS_PUBLIC_URL=server.url, TUNNEL_PREFIX=prefix)
    async with running_gateway(env) as gw:
        session = await gw.ok_session("pat")
        assert session["connection"]["tunnelPrefix"] == prefix
        daemon = await connect_daemon(server.url, token=TOKEN)
        try:
            tunnel_server = await serve_status(daemon.nc, session["tunnelHostname"], prefix=prefix)
            assert (await gw.me("pat"))["online"] is True
            await tunnel_server.close()
        finally:
            await daemon.nc.close()
