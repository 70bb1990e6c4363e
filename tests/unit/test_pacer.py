"""The v1 pacer (sans-IO): a burst at full speed, then a steady rate, with plain-number time."""

from __future__ import annotations

import pytest

from tests.unit.test_stream import FakeClock, connect
from tunnel._flow import Pacer

MiB = 1024 * 1024


def test_a_burst_then_the_rate() -> None:
    pacer = Pacer(rate=4 * MiB, burst=2 * MiB, now=0.0)
    assert pacer.available(0.0) == 2 * MiB
    pacer.spend(2 * MiB, 0.0)
    assert pacer.available(0.0) == 0
    assert pacer.delay_for(1 * MiB, 0.0) == pytest.approx(0.25)
    assert pacer.available(0.25) == 1 * MiB
    assert pacer.available(100.0) == 2 * MiB, "idle time refills at most one burst"
    assert pacer.delay_for(10 * MiB, 100.0) == 0.0, "a request larger than a burst waits for a burst"


def test_a_paced_v1_response_goes_at_the_pace_and_never_counts_as_stalled() -> None:
    clock = FakeClock()
    link = connect(
        clock,
        caller={"fast_path": False},
        server={"fast_path": False, "v1_pace": 1.0 * MiB, "v1_burst": MiB, "stall_timeout": 1.0},
    )
    link.server.start_response(200, [])
    body = bytes(3 * MiB)
    frames, taken = link.server.send_body(body)
    assert taken == MiB and frames
    assert link.server.pace_delay(len(body) - taken) > 0
    sent = taken
    for _ in range(8):  # 4 s at 1 MiB/s: the rest, in pace, with no stall timeout (1 s) firing
        clock.advance(0.5)
        assert link.server.poll() == []
        _, taken = link.server.send_body(body[sent:])
        sent += taken
    assert sent == len(body)


def test_extended_callers_are_never_paced() -> None:
    link = connect(FakeClock(), server={"v1_pace": 1.0, "v1_burst": 1})
    assert link.server.pacer is None and link.server.pace_delay(10**9) == 0.0
