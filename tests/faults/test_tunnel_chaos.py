"""Chaos for the tunnel: real faults on the daemon's network link under steady mixed load.

Each scenario runs the load of ``tests/faults/chaos.py`` (small requests, 5-7 MiB bodies
streamed both ways and sha256-checked), injects one fault into the daemon's TCP path to
nats-server (through ``tests/faultproxy.py``) or kills nats-server itself, heals it, and
checks the invariants listed in ``chaos.py``: every request ends with success or a typed
``tunnel.TunnelError`` and never hangs past its timeouts, no body is delivered corrupted or
truncated as a success, requests cut off by a partition fail within the promised time,
requests after recovery succeed, and nothing is left in flight on either end.

A few seconds each; ``scripts/soak_tunnel.py`` runs the same faults for minutes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from cli.nats_server import NatsServer
from tests.faults.chaos import (
    BLACKHOLE,
    KILL_NATS,
    PAUSE_LONG,
    PAUSE_SHORT,
    RESET,
    THROTTLE,
    THROTTLE_RATE,
    ChaosRig,
    Fault,
    FaultReport,
    run_fault,
)


@pytest.fixture
async def rig(nats_server: NatsServer) -> AsyncIterator[ChaosRig]:
    async with ChaosRig(nats_server) as rig:
        yield rig


def assert_invariants(report: FaultReport) -> None:
    print(report.summary())
    assert report.violations == []
    # The load really ran through the fault: big bodies both ways and small requests succeeded.
    outcomes = report.ledger.outcomes()
    for kind in ("small_get", "small_post", "download", "upload"):
        assert outcomes[f"{kind}:ok"] >= 1, f"no successful {kind} during {report.fault}: {outcomes}"


async def check(rig: ChaosRig, fault: Fault) -> FaultReport:
    report = await run_fault(rig, fault)
    # A reset or a restart may lose a whole window of data: heartbeats and upload probes carry
    # sequence numbers, so that is detected and ends the request typed, in time (no "late").
    assert_invariants(report)
    return report


async def test_pause_longer_than_idle_timeout_fails_in_flight_requests_typed_then_recovers(
    rig: ChaosRig,
) -> None:
    report = await check(rig, PAUSE_LONG)
    codes = {op.outcome for op in report.ledger.ops if not op.ok}
    assert codes & {"tunnel_idle_timeout", "tunnel_no_first_frame"}, codes


async def test_pause_shorter_than_idle_timeout_loses_nothing(rig: ChaosRig) -> None:
    report = await check(rig, PAUSE_SHORT)
    assert all(op.ok for op in report.ledger.ops)
    spanning = [op for op in report.in_flight_at_inject() if (op.ended or 0) > report.healed_at]
    assert spanning, "no request was in flight across the whole pause: the scenario proved nothing"


async def test_throttled_daemon_link_is_slower_but_everything_succeeds(rig: ChaosRig) -> None:
    report = await check(rig, THROTTLE)
    assert all(op.ok for op in report.ledger.ops)
    throttled = [
        op.verified_bytes / (op.ended - op.started)
        for op in report.ledger.ops
        if op.ended is not None
        and op.kind in ("download", "upload")
        and report.injected_at <= op.started
        and op.ended < report.healed_at
    ]
    assert throttled, "no big body travelled entirely while the link was throttled"
    assert max(throttled) <= 1.2 * THROTTLE_RATE, f"throttled transfers ran at {max(throttled):.0f} B/s"


async def test_blackholed_daemon_link_gives_typed_errors_not_hangs_then_recovers(rig: ChaosRig) -> None:
    report = await check(rig, BLACKHOLE)
    assert any(not op.ok for op in report.ledger.ops), "a 2.5 s blackhole failed no request"
    assert rig.reconnects["chaos-daemon"] >= 1, "the daemon never noticed the dead link"


async def test_reset_daemon_connection_gives_typed_errors_or_success_and_the_daemon_serves_again(
    rig: ChaosRig,
) -> None:
    await check(rig, RESET)
    assert rig.reconnects["chaos-daemon"] >= 1


async def test_nats_server_killed_and_restarted_mid_load_then_everything_recovers(rig: ChaosRig) -> None:
    report = await check(rig, KILL_NATS)
    assert any(not op.ok for op in report.ledger.ops), "killing nats-server failed no request"
    assert rig.reconnects["chaos-daemon"] >= 1 and rig.reconnects["chaos-caller"] >= 1
