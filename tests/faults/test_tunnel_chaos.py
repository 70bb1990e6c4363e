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
    ChaosSettings,
    Fault,
    FaultReport,
    MiB,
    run_fault,
)


@pytest.fixture
async def rig(nats_server: NatsServer) -> AsyncIterator[ChaosRig]:
    async with ChaosRig(nats_server) as rig:
        yield rig


# The two "only slows things down" faults promise that *every* request succeeds, so on two
# shared, busy cores a scheduling hiccup must not look like a failure: their timeouts get wide
# margins over the fault (derived below from the fault's size), and the load is lighter.
# What they assert is unchanged.
GENTLE: ChaosSettings = ChaosSettings(
    idle_timeout=3.0,
    first_frame_timeout=3.0,
    total_timeout=16.0,
    # 2-3 MiB at THROTTLE_RATE is 0.5-0.8 s, so several whole bodies fit inside a 3 s throttle
    # even when the CPU runs at half speed; still 4-6 flow-control windows each.
    big_sizes=(2 * MiB, 3 * MiB),
    small_workers=2,
    # A pause must never look like a dead link to the daemon's own pings (stale after
    # max_outstanding_pings missed intervals): ~3 s here, against a 0.4 s pause.
    daemon_ping_interval=1.0,
)


@pytest.fixture
async def gentle_rig(nats_server: NatsServer) -> AsyncIterator[ChaosRig]:
    async with ChaosRig(nats_server, GENTLE) as rig:
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


async def test_pause_shorter_than_idle_timeout_loses_nothing(gentle_rig: ChaosRig) -> None:
    s = gentle_rig.settings
    # Margins: the pause is at most a quarter of the idle timeout, and of the daemon's ping staleness.
    assert PAUSE_SHORT.hold <= s.idle_timeout / 4
    assert PAUSE_SHORT.hold <= s.daemon_ping_interval * s.daemon_max_outstanding_pings / 4
    report = await check(gentle_rig, PAUSE_SHORT)
    assert all(op.ok for op in report.ledger.ops)
    spanning = [op for op in report.in_flight_at_inject() if (op.ended or 0) > report.healed_at]
    assert spanning, "no request was in flight across the whole pause: the scenario proved nothing"


async def test_throttled_daemon_link_is_slower_but_everything_succeeds(gentle_rig: ChaosRig) -> None:
    s = gentle_rig.settings
    # A whole big body at the throttled rate takes well under a third of the throttle's hold,
    # so at least one starts and ends inside it even at half speed; and a full window drains
    # far inside the idle timeout (a heartbeat never waits long behind data).
    biggest = max(s.big_sizes) / THROTTLE_RATE
    assert 3 * biggest <= THROTTLE.hold
    assert s.window / THROTTLE_RATE <= s.idle_timeout / 10
    assert 4 * biggest <= s.total_timeout
    report = await check(gentle_rig, THROTTLE)
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
    await check(rig, KILL_NATS)
    # The kill was real: both ends reconnected. Requests in flight may fail (typed, within the
    # bound) or may all succeed: nats-py holds unsent publishes across a reconnect, so when no
    # frame was inside the killed server, transfers resume; the lost-data checks cover the rest.
    assert rig.reconnects["chaos-daemon"] >= 1 and rig.reconnects["chaos-caller"] >= 1
