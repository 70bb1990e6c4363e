"""Fixtures that give tests a real nats-server (see cli/nats_server.py)."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from typing import Any

import pytest

from cli.nats_server import NatsServer, NatsServerConfig
from tests.helpers import NatsServerFactory

_REPORT_KEY = pytest.StashKey[dict[str, pytest.TestReport]]()


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
