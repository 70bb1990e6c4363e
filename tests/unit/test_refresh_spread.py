"""A fleet that got its credentials at the same moment does not refresh at the same moment.

10,000 desktops started together (a mass start, or all back after an outage) each schedule
their refresh with :func:`linkd.daemon.refresh_delay`; every refresh is a session mint on the
gateway and a new NATS connection with its subscriptions. Before the spread grew with the
lifetime, one-hour credentials put all of them into 150 s (~67 refreshes/s at the busiest) and
day-long ones too; now they spread over 30% of the refreshable span.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from linkd.daemon import refresh_delay

FLEET = 10_000


def busiest(delays: list[float], window: float) -> int:
    """Refreshes in the busiest ``window``-second bucket."""
    return max(Counter(int(d // window) for d in delays).values())


def fleet_delays(lifetime: float, seed: int = 7) -> list[float]:
    rng = random.Random(seed)
    return [refresh_delay(lifetime, rng=rng) for _ in range(FLEET)]


def test_one_hour_credentials_spread_over_twelve_minutes() -> None:
    delays = fleet_delays(3600)
    # Never later than the margin before expiry, never earlier than a quarter of the lifetime.
    assert all(900 <= d <= 3300 for d in delays)
    assert max(delays) - min(delays) > 700
    # Uniform over 720 s: ~139 per 10 s; 150 s of spread (the old cap) would put ~667 there.
    assert busiest(delays, 10.0) < 200
    # The price: a credential is used for ~2,940 s on average instead of ~3,225 (~10% more refreshes).
    assert sum(delays) / len(delays) > 2900


def test_day_long_credentials_spread_over_hours() -> None:
    delays = fleet_delays(24 * 3600)
    assert max(delays) - min(delays) > 4 * 3600
    assert busiest(delays, 60.0) < 60  # the old 150-s cap put ~4,000 in one minute


@pytest.mark.parametrize("lifetime", [4.0, 60.0, 300.0, 600.0, 3600.0, 86400.0])
def test_the_spread_keeps_the_drain_room(lifetime: float) -> None:
    delays = fleet_delays(lifetime)
    drain_room = min(30.25, lifetime * 0.75)
    assert all(d <= lifetime - drain_room + 1e-9 for d in delays)
    assert all(d >= lifetime * 0.25 - 1e-9 for d in delays)
