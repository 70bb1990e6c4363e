"""tunnel.backoff: the one retry policy and the nats-py reconnect handler built on it (no server)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunnel.backoff import Backoff, ReconnectPolicy


@dataclass
class Server:
    """What nats-py hands the handler: a snapshot with the server's failed attempts."""

    name: str
    reconnects: int = 0


def test_backoff_doubles_up_to_the_cap_and_reset_starts_over() -> None:
    backoff = Backoff(initial=0.05, cap=0.2, jitter=0.0)
    assert [backoff.next() for _ in range(5)] == [0.05, 0.1, 0.2, 0.2, 0.2]
    backoff.reset()
    assert backoff.next() == 0.05


def test_backoff_jitter_stretches_by_a_share_of_the_delay_plus_seconds() -> None:
    for _ in range(200):
        assert 1.0 <= Backoff(1.0, 30.0).next() <= 1.25
        assert 3.0 <= Backoff(1.0, 3.0, jitter=0.0, jitter_seconds=1.0).delay(5) <= 4.0


def test_backoff_stays_at_the_cap_far_past_it() -> None:
    assert Backoff(0.5, 3.0, jitter=0.0).delay(5000) == 3.0


def test_reconnect_policy_rotates_servers_with_little_jitter_first_then_backs_off() -> None:
    policy = ReconnectPolicy(initial=0.5, cap=3.0, jitter=1.0, first_jitter=0.25)
    servers: list[Any] = [Server("a"), Server("b", reconnects=1), Server("c", reconnects=3)]
    picked: list[tuple[Any, float]] = [policy(servers, {}) for _ in range(6)]
    assert [server.name for server, _ in picked] == ["a", "b", "c", "a", "b", "c"]
    for server, delay in picked:
        low = {"a": 0.0, "b": 0.5, "c": 2.0}[server.name]
        high = {"a": 0.25, "b": 1.5, "c": 3.0}[server.name]
        assert low <= delay <= high
    # After ~1000 failures the doubling is far past any float: still the cap, never an error
    # (nats-py would report it and ask again at once, in a loop).
    far: list[Any] = [Server("d", reconnects=5000)]
    assert 3.0 <= policy(far, {})[1] <= 4.0
