"""Chaos around the gateway: nats-server killed under it, one gateway instance killed among two.

Everything real: an operator-mode nats-server, the gateway app (in-process on a port, or as
OS processes), and a linkd daemon. Bounds are generous for a loaded machine; a hang or a
presence answer that never recovers fails.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Final

import pytest

from linkd.daemon import State
from tests.faults.killable_processes import GatewayProcess, presence, wait_presence
from tests.helpers import NatsServerFactory
from tests.integration.gateway_harness import start_operator_server
from tests.integration.linkd_harness import live_gateway, running_daemon

pytestmark = pytest.mark.timeout(120)

# After nats-server is back: the gateway reconnects in ~0.1-2 s, the daemon within its
# reconnect backoff (<= 3 s + 1 s jitter); twice that, plus slack for a loaded machine.
BACK_ONLINE_WITHIN: Final = 15.0
OFFLINE_WITHIN: Final = 10.0


async def test_nats_server_kill_9_and_restart_presence_is_online_again_within_bounds(
    nats_server_factory: NatsServerFactory, tmp_path: Path
) -> None:
    op = start_operator_server(nats_server_factory, tmp_path)
    async with (
        live_gateway(op.env(NATS_TUNNEL_SESSION_TTL_SECONDS="600")) as gw,
        running_daemon(tmp_path, gw.url, gw.token("kim")) as d,
    ):
        token = gw.token("kim")
        assert (await presence(gw.url, token))["online"] is True
        for round_ in range(2):
            op.server.kill()  # SIGKILL: no goodbye to anyone
            started = time.monotonic()
            down = await presence(gw.url, token)  # answers (never a 500, never a hang) while NATS is gone
            assert down["online"] is False, down
            assert time.monotonic() - started < OFFLINE_WITHIN
            op.server.start()
            took = await wait_presence(gw.url, token, True, BACK_ONLINE_WITHIN)
            print(f"round {round_}: presence online {took:.2f}s after nats-server came back")
            await d.wait_state(State.ONLINE, BACK_ONLINE_WITHIN)
        # The daemon rode it out on its own connection (no new session was needed).
        assert [c.state for c in d.changes].count(State.OFFLINE) == 0


async def test_gateway_instance_kill_9_while_linkd_keeps_serving_through_another(
    nats_server_factory: NatsServerFactory, tmp_path: Path
) -> None:
    op = start_operator_server(nats_server_factory, tmp_path)
    env = op.env(NATS_TUNNEL_SESSION_TTL_SECONDS="600")
    first = GatewayProcess(env)  # the daemon's gateway, a process so it can die by SIGKILL
    try:
        await first.start()
        async with (
            live_gateway(env) as second,
            running_daemon(tmp_path, first.url, first.token("lee")) as d,
        ):
            token = second.token("lee")  # instances share the secret: a token works on both
            await wait_presence(second.url, token, True, BACK_ONLINE_WITHIN)
            await first.kill()  # gone without a word
            # The desktop stays reachable through the other instance: its NATS connection never
            # depended on the gateway process (only its next credential refresh does).
            deadline = time.monotonic() + 3.0
            probes = 0
            while time.monotonic() < deadline:
                assert (await presence(second.url, token))["online"] is True
                probes += 1
            assert probes >= 3
            # The instance comes back at the same address and answers presence at once.
            await first.start()
            assert (await presence(first.url, token))["online"] is True
            assert (await presence(second.url, token))["online"] is True
            assert d.daemon.state is State.ONLINE
            assert [c.state for c in d.changes].count(State.OFFLINE) == 0
    finally:
        await first.kill()
