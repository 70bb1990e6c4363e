"""``linkctl status HOST``: a live presence probe over NATS (real nats-server, real desktop)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from typer.testing import CliRunner, Result

import tunnel
from cli.main import app
from cli.nats_server import NatsServer, free_port
from tests.integration.linkctl_harness import HOSTNAME, STATUS, Desktop

CLI = [sys.executable, "-m", "cli"]
RUN_TIMEOUT = 30.0


@pytest.fixture
def desktop(nats_server: NatsServer) -> Iterator[Desktop]:
    desk = Desktop(nats_server.url).start()
    yield desk
    desk.close()


def linkctl(nats_url: str, *args: str) -> Result:
    return CliRunner().invoke(app, list(args), env={"LINKCTL_NATS_URL": nats_url})


def linkctl_process(nats_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINKCTL_")}
    env["LINKCTL_NATS_URL"] = nats_url
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=RUN_TIMEOUT, env=env, check=False
    )


def test_online_desktop_prints_its_status_and_exits_0(desktop: Desktop) -> None:
    result = linkctl(desktop.nats_url, "status", HOSTNAME)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.startswith(f"{HOSTNAME}: online")
    for value in ("test-desktop", "fetch, runs", "9.9.9", " ms"):
        assert value in out
    assert "\033[" not in out  # not a terminal: no colour


def test_json_has_the_gateway_presence_shape(desktop: Desktop) -> None:
    result = linkctl(desktop.nats_url, "status", f"tunnel://{HOSTNAME}", "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["online"] is True
    assert document["tunnelHostname"] == HOSTNAME
    assert document["hostname"] == STATUS["hostname"]
    assert document["capabilities"] == STATUS["capabilities"]
    assert document["cliVersion"] == STATUS["cliVersion"]
    assert isinstance(document["latencyMs"], float) and document["latencyMs"] > 0
    assert document["checkedAt"].endswith("Z")


def test_offline_host_exits_1_fast(desktop: Desktop) -> None:
    started = time.monotonic()
    result = linkctl(desktop.nats_url, "status", "nobody.test", "--json")
    assert result.exit_code == 1, result.output
    document = json.loads(result.stdout)
    assert document["online"] is False and document["reason"] == "not_connected"
    # No responders: known in milliseconds, not after the 2 s probe timeout.
    assert time.monotonic() - started < 1.5

    desktop.stop()  # the desktop goes away: the same host is now offline
    result = linkctl(desktop.nats_url, "status", HOSTNAME)
    assert result.exit_code == 1
    assert result.stdout.startswith(f"{HOSTNAME}: offline (not_connected:")


def test_a_desktop_that_answers_garbage_is_an_error_exit_2(nats_server: NatsServer) -> None:
    async def broken(request: tunnel.Request) -> tunnel.Response:
        return tunnel.Response(200, [("content-type", "text/plain")], "not json")

    desk = Desktop(nats_server.url, "broken.test", handler=broken).start()
    try:
        result = linkctl(nats_server.url, "status", "broken.test", "--json")
    finally:
        desk.close()
    assert result.exit_code == 2
    assert json.loads(result.stdout)["reason"] == "bad_response"


def test_watch_probes_repeatedly_one_json_line_each(desktop: Desktop) -> None:
    result = linkctl(desktop.nats_url, "status", HOSTNAME, "--watch", "0.05", "--count", "3", "--json")
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3
    assert all(json.loads(line)["online"] for line in lines)
    # --watch without a value takes the default interval; --count still bounds it.
    result = linkctl(desktop.nats_url, "status", "--watch", HOSTNAME, "-c", "1")
    assert result.exit_code == 0, result.output
    assert len(result.stdout.strip().splitlines()) == 1
    assert "online" in result.stdout


def test_host_and_gateway_together_is_a_usage_error(desktop: Desktop) -> None:
    # The gateway variant itself is tested against the real gateway in test_linkctl_gateway.py.
    result = linkctl(desktop.nats_url, "status", HOSTNAME, "--gateway", "http://127.0.0.1:8080")
    assert result.exit_code == 2
    assert "not both" in result.stderr


def test_exit_statuses_as_a_process(desktop: Desktop) -> None:
    with ThreadPoolExecutor(4) as pool:  # four interpreters starting at once: a second, not four
        online, offline, no_nats, bad_host = pool.map(
            lambda args: linkctl_process(*args),
            [
                (desktop.nats_url, "status", HOSTNAME),
                (desktop.nats_url, "status", "nobody.test"),
                (f"nats://127.0.0.1:{free_port()}", "status", HOSTNAME),
                (desktop.nats_url, "status", "bad host"),
            ],
        )
    assert (online.returncode, offline.returncode, no_nats.returncode, bad_host.returncode) == (0, 1, 2, 2)
    for proc in (no_nats, bad_host):
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("linkctl: error: "), proc.stderr
    assert "Traceback" not in online.stderr + offline.stderr + no_nats.stderr + bad_host.stderr
