"""``linkd up`` against a real operator-mode nats-server and the real gateway app on a local port.

The daemon runs in-process here (its state changes are observable); the CLI-as-a-process
tests are in test_linkd_cli_process.py, credential rotation in test_linkd_lifecycle_rotation.py.
"""

from __future__ import annotations

import time
from pathlib import Path

import nats
import pytest
from nats.aio.client import RawCredentials

import tunnel
from linkd.daemon import State
from studio_gateway.hostnames import tunnel_hostname
from tests.helpers import NatsServerFactory, wait_until
from tests.integration.gateway_harness import OperatorServer, base_env, start_operator_server
from tests.integration.linkd_harness import (
    EVENT_TIMEOUT,
    daemon_settings,
    live_gateway,
    probe,
    running_daemon,
)
from tunnel.backoff import Backoff

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def op(nats_server_factory: NatsServerFactory, tmp_path: Path) -> OperatorServer:
    return start_operator_server(nats_server_factory, tmp_path)


async def caller(op: OperatorServer) -> nats.aio.client.Client:
    """A gateway-side connection of the test's own (reconnects quickly after a server restart)."""
    return await nats.connect(
        op.server.url,
        user_credentials=RawCredentials(op.gateway_creds.read_text()),
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.1,
        connect_timeout=EVENT_TIMEOUT,
    )


async def test_up_serves_status_and_the_gateway_sees_it_online(op: OperatorServer, tmp_path: Path) -> None:
    connections: list[object] = []
    async with (
        live_gateway(op.env(NATS_TUNNEL_SESSION_TTL_SECONDS="600")) as gw,
        running_daemon(tmp_path, gw.url, gw.token("alice"), on_connection=connections.append) as d,
    ):
        assert connections == [d.daemon.nc]
        assert d.hostname == tunnel_hostname("alice")
        doc = await probe(gw.nc, d.hostname)
        assert doc["hostname"] == "test-desktop" and doc["tunnelHostname"] == d.hostname
        assert doc["capabilities"] == ["echo", "mock", "cancel"]
        assert doc["cliVersion"]
        assert d.messages()[:2] == [f"connecting to {gw.url}", f"online as {d.hostname}"]
        status = d.daemon.status_document()
        assert status["state"] == "online" and status["credentialsExpireAt"] is not None
        assert (tmp_path / "linkd-status.json").exists()
    assert d.daemon.state is State.STOPPED
    assert not (tmp_path / "linkd-status.json").exists()
    assert len(connections) == 2 and connections[1] is None


async def test_survives_a_nats_server_restart_without_a_daemon_restart(
    op: OperatorServer, tmp_path: Path
) -> None:
    nc = await caller(op)
    try:
        async with (
            live_gateway(op.env(NATS_TUNNEL_SESSION_TTL_SECONDS="600")) as gw,
            running_daemon(tmp_path, gw.url, gw.token("bob")) as d,
        ):
            await probe(nc, d.hostname)
            first_nc = d.daemon.nc
            op.server.stop()
            await d.wait_state(State.RECONNECTING)
            op.server.start()
            back = time.monotonic()

            async def probe_ok() -> bool:
                try:
                    await probe(nc, d.hostname, timeout=1.0)
                except tunnel.TunnelError:
                    return False
                return True

            # The daemon's next reconnect attempt may be up to its backoff cap away (3 s + 1 s
            # jitter, linkd.connection) once nats-server is back, on a loaded machine a slow start
            # later still: 5 s left ~1 s for that. Twice the worst backoff, plus slack.
            await wait_until(probe_ok, timeout=10.0, interval=0.05, message="not probed OK within 10 s")
            elapsed = time.monotonic() - back
            await d.wait_state(State.ONLINE)
            assert d.daemon.nc is first_nc, "the daemon reconnected the same connection (no restart)"
            assert [c.state for c in d.changes].count(State.OFFLINE) == 0
            print(f"probed OK {elapsed:.2f}s after nats-server came back")
    finally:
        await nc.close()


async def test_gateway_down_keeps_serving_until_expiry_then_offline_then_recovers(
    op: OperatorServer, tmp_path: Path
) -> None:
    ttl = 4
    async with (
        live_gateway(op.env(NATS_TUNNEL_SESSION_TTL_SECONDS=str(ttl))) as gw,
        running_daemon(tmp_path, gw.url, gw.token("dave"), retry_backoff=Backoff(0.2, 0.5)) as d,
    ):
        nc = await caller(op)
        try:
            session = d.daemon.session
            assert session is not None and session.expires_monotonic is not None
            await gw.stop()
            # Still serving with the credential it has, through failed refreshes ...
            await d.wait_state(State.ONLINE)
            await wait_until(lambda: any(c.event == "refresh_failed" for c in d.changes), timeout=ttl + 1)
            assert time.monotonic() < session.expires_monotonic
            await probe(nc, d.hostname)
            # ... until it expires: then offline, with the reason.
            await d.wait_state(State.OFFLINE, timeout=ttl + EVENT_TIMEOUT)
            assert time.monotonic() >= session.expires_monotonic - 0.5
            offline = [m for m in d.messages() if m.startswith("offline:")]
            assert "credentials expired" in offline[0], offline
            await wait_until(lambda: "unreachable" in d.daemon.message, timeout=EVENT_TIMEOUT)
            with pytest.raises(tunnel.TunnelUnreachable):
                await probe(nc, d.hostname)
            # The gateway comes back: the daemon recovers by itself.
            await gw.start()
            await d.wait_state(State.ONLINE, timeout=EVENT_TIMEOUT)
            await probe(nc, d.hostname)
            print("\n".join(d.messages()))
        finally:
            await nc.close()


async def test_token_mode_gateway(nats_server_factory: NatsServerFactory, tmp_path: Path) -> None:
    server = nats_server_factory(token="nats-dev-token")
    env = base_env(NATS_URL=server.url, NATS_TOKEN="nats-dev-token", NATS_PUBLIC_URL=server.url)
    async with live_gateway(env) as gw, running_daemon(tmp_path, gw.url, gw.token("erin")) as d:
        assert d.daemon.session is not None and d.daemon.session.token == "nats-dev-token"
        assert (await probe(gw.nc, d.hostname))["tunnelHostname"] == d.hostname


async def test_websocket_only_credentials_connect_over_websocket(op: OperatorServer, tmp_path: Path) -> None:
    ws_url = op.server.websocket_url
    assert ws_url is not None
    async with (
        live_gateway(op.env(NATS_PUBLIC_URL=ws_url)) as gw,
        running_daemon(tmp_path, gw.url, gw.token("frank"), settings=daemon_settings(tmp_path)) as d,
    ):
        assert d.daemon.status_document()["natsUrl"].startswith("ws://")
        await probe(gw.nc, d.hostname)


async def test_gateway_made_keys_work_too(op: OperatorServer, tmp_path: Path) -> None:
    async with (
        live_gateway(op.env(NATS_TUNNEL_SESSION_TTL_SECONDS="600")) as gw,
        running_daemon(tmp_path, gw.url, gw.token("grace"), seed=None) as d,
    ):
        assert d.daemon.session is not None and d.daemon.session.seed is not None
        await probe(gw.nc, d.hostname)


async def test_a_refused_api_token_is_reported_offline_with_the_fix(
    op: OperatorServer, tmp_path: Path
) -> None:
    async with (
        live_gateway(op.env()) as gw,
        running_daemon(tmp_path, gw.url, "not-a-token", wait_online=False) as d,
    ):
        await d.wait_state(State.OFFLINE, contains="run 'linkd login' again")
