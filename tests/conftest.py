"""Fixtures that give tests a real nats-server or cluster (see cli/nats_server.py, cli/nats_cluster.py)."""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from typing import Any

import pytest

from cli.nats_cluster import NatsCluster
from cli.nats_server import NatsServer, NatsServerConfig
from tests.helpers import NatsClusterFactory, NatsServerFactory

# Property-based tests (hypothesis): modest sizes so they run in seconds; no per-example
# deadline (a loaded CI machine is slow, not wrong). In CI (env CI set) the examples are
# derandomized and no example database is kept, so a run is reproducible and never flaky;
# locally each run explores new examples and remembers failing ones in .hypothesis/.
# HYPOTHESIS_PROFILE overrides the choice.
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # a dev dependency: only the tests/unit/test_fuzz_* modules need it
    pass
else:
    settings.register_profile(
        "natslink", max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )
    settings.register_profile("ci", parent=settings.get_profile("natslink"), derandomize=True, database=None)
    # For a deliberate bug hunt: HYPOTHESIS_PROFILE=thorough pytest tests/unit/test_fuzz_*.py
    settings.register_profile("thorough", parent=settings.get_profile("natslink"), max_examples=5000)
    settings.load_profile(
        os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "natslink")
    )

_REPORT_KEY = pytest.StashKey[dict[str, pytest.TestReport]]()

# Tiers (markers registered in pyproject.toml), from where a test lives: ``unit`` (no server,
# seconds), ``integration`` (real nats-server processes), ``faults`` (fault injection, chaos,
# floods); and ``slow`` for the files that take tens of seconds each (soaks, clusters, floods,
# fresh virtualenvs, benchmark smoke runs). The edit loop: ``pytest -m unit`` or
# ``pytest -m "not slow"``; CI runs everything.
_TIERS = {"unit": "unit", "integration": "integration", "faults": "faults"}
SLOW_FILES = frozenset(
    {
        "test_soak_full.py",
        "test_soak_script.py",
        "test_soak_cluster.py",
        "test_runs_cluster.py",
        "test_tenant_flood.py",
        "test_linkctl_demo.py",
        "test_bench_smoke.py",
        "test_bench_gateway_smoke.py",
        "test_runs_e2e_bench.py",
        "test_nats_cluster.py",
        "test_wheel_install.py",
        "test_tunnel_v1_pacing_full.py",
    }
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        path = item.path
        tier = _TIERS.get(path.parent.name)
        if tier is not None:
            item.add_marker(tier)
        if path.name in SLOW_FILES:
            item.add_marker("slow")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    """Remember each phase's report so fixtures can tell at teardown whether the test failed."""
    report = yield
    item.stash.setdefault(_REPORT_KEY, {})[report.when] = report
    return report


def _test_failed(request: pytest.FixtureRequest) -> bool:
    reports = request.node.stash.get(_REPORT_KEY, {})
    return any(r.failed for r in reports.values())


@pytest.fixture
def nats_server_factory(request: pytest.FixtureRequest) -> Iterator[NatsServerFactory]:
    """``factory(**NatsServerConfig fields) -> started NatsServer``; all closed at teardown.

    If the test failed, each server's log is printed so it shows up in the pytest report.
    """
    servers: list[NatsServer] = []

    def factory(**config_kwargs: Any) -> NatsServer:
        server = NatsServer(NatsServerConfig(**config_kwargs))
        servers.append(server)  # before start(): a failed start still gets cleaned up
        server.start()
        return server

    yield factory
    failed = _test_failed(request)
    for server in servers:
        if failed:
            print(f"\n===== nats-server log for {server.url} =====\n{server.log_text()}")
        server.close()


@pytest.fixture
def nats_server(nats_server_factory: NatsServerFactory) -> NatsServer:
    """A started plain server: loopback, free port, no auth, default limits, monitoring on."""
    return nats_server_factory()


@pytest.fixture
def nats_cluster_factory(request: pytest.FixtureRequest) -> Iterator[NatsClusterFactory]:
    """``factory(**NatsCluster arguments) -> started NatsCluster`` (routes up, JetStream meta
    leader elected); all closed at teardown, every node's log printed if the test failed."""
    clusters: list[NatsCluster] = []

    def factory(**cluster_kwargs: Any) -> NatsCluster:
        cluster = NatsCluster(**cluster_kwargs)
        clusters.append(cluster)  # before start(): a failed start still gets cleaned up
        cluster.start(timeout=30.0)  # a loaded 2-core CI machine elects slowly
        return cluster

    yield factory
    failed = _test_failed(request)
    for cluster in clusters:
        if failed:
            for i, node in enumerate(cluster.nodes):
                print(f"\n===== nats-server {cluster.node_name(i)} log ({node.url}) =====\n{node.log_text()}")
        cluster.close()


@pytest.fixture
def nats_cluster(nats_cluster_factory: NatsClusterFactory) -> NatsCluster:
    """A started 3-node cluster: loopback, JetStream on a file store per node, no auth."""
    return nats_cluster_factory(size=3)
