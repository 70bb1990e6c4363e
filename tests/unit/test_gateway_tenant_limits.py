"""studio_gateway.runs.tenant_limits: per-host budgets that keep one desktop from costing the others."""

from __future__ import annotations

from studio_gateway.runs.tenant_limits import LookupBudget, StrayCounter


def test_stray_counter_fires_once_per_window_and_again_after_a_reset() -> None:
    counter = StrayCounter(limit=10, window=60.0)
    assert not counter.add("a", 0.0, 10)  # at the limit, not over
    assert counter.add("a", 1.0, 1)  # over: fires
    assert not counter.add("a", 2.0, 50)  # same window: once
    assert not counter.add("b", 2.0, 5)  # other hosts count apart
    counter.reset("a")
    assert counter.add("a", 3.0, 11)
    assert counter.count("a", 100.0) == 0  # the window passed


def test_lookup_budget_allows_a_burst_then_its_rate() -> None:
    budget = LookupBudget(rate=10.0, burst=5.0)
    assert [budget.allow("a", 0.0) for _ in range(6)] == [True] * 5 + [False]
    assert budget.allow("b", 0.0)  # another host has its own bucket
    assert not budget.allow("a", 0.05)  # half a token
    assert budget.allow("a", 0.15)  # a token again after 0.1 s
