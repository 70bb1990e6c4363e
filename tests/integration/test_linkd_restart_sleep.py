"""The daemon's reaction to its own sleep (issue 15): a real operator-mode nats-server, the real
gateway app, ``linkd up`` in-process. The clock jump itself is unit-tested (linkd.sleep); here
the daemon is told it woke, as its periodic check would, and must refresh a valid credential at
once, or replace one that expired during the sleep (by the wall clock; the monotonic clock
stood still), and be online again."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import pytest

from linkd.daemon import State
from tests.helpers import NatsServerFactory, wait_until
from tests.integration.gateway_harness import OperatorServer, start_operator_server
from tests.integration.linkd_harness import EVENT_TIMEOUT, live_gateway, probe, running_daemon

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def op(nats_server_factory: NatsServerFactory, tmp_path: Path) -> OperatorServer:
    return start_operator_server(nats_server_factory, tmp_path)


async def test_waking_refreshes_a_valid_credential_at_once(
    op: OperatorServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        live_gateway(op.env(NATS_TUNNEL_SESSION_TTL_SECONDS="600")) as gw,
        running_daemon(tmp_path, gw.url, gw.token("sleeper")) as d,
    ):
        old_nc = d.daemon.nc
        assert d.daemon.refreshes == 0  # the next refresh would be minutes away
        with caplog.at_level(logging.INFO, logger="linkd.state"):
            d.daemon._on_wake(600.0)
            await wait_until(
                lambda: d.daemon.refreshes == 1, EVENT_TIMEOUT, message="no refresh after waking"
            )
        assert any(r.getMessage() == "woke after 600 s of sleep" for r in caplog.records)
        assert d.daemon.nc is not old_nc  # a new connection
        assert d.daemon.state is State.ONLINE
        doc = d.daemon.status_document()
        assert doc["sleeps"] == 1 and doc["reconnects"] == 0
        assert (await probe(gw.nc, d.hostname))["tunnelHostname"] == d.hostname


async def test_waking_with_a_credential_that_expired_asleep_gets_a_new_session(
    op: OperatorServer, tmp_path: Path
) -> None:
    async with (
        live_gateway(op.env(NATS_TUNNEL_SESSION_TTL_SECONDS="600")) as gw,
        running_daemon(tmp_path, gw.url, gw.token("sleeper")) as d,
    ):
        serving = d.daemon._current
        assert serving is not None and serving.session.expires_at is not None
        # As after a long suspend: by the wall clock it expired; by the monotonic clock it has minutes left.
        serving.session = replace(serving.session, expires_at=time.time() - 30)
        d.daemon._on_wake(900.0)
        await wait_until(
            lambda: any("expired during 900 s of sleep" in m for m in d.messages()),
            EVENT_TIMEOUT,
            message=f"no offline line for the expired credential: {d.messages()}",
        )
        await wait_until(
            lambda: d.daemon.state is State.ONLINE and d.daemon._current is not serving,
            EVENT_TIMEOUT,
            message=f"not online again: {d.messages()}",
        )
        assert d.daemon.status_document()["reconnects"] == 1
        assert (await probe(gw.nc, d.hostname))["tunnelHostname"] == d.hostname
