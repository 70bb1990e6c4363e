"""``studio-gateway serve`` runs flags as a process: a bad setting is one line naming flag and
variable; a gateway started with runs flags on a JetStream server serves runs with them."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from cli.nats_server import NatsServer, free_port
from studio_gateway.auth import issue_token
from studio_gateway.config import AuthConfig
from tests.helpers import NatsServerFactory, wait_until_sync
from tests.integration.gateway_harness import SECRET

CLI = [sys.executable, "-m", "studio_gateway.cli"]

pytestmark = pytest.mark.timeout(60)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "GATEWAY_", "TUNNEL_", "RUNS_"))}
    env.update(extra)
    return env


@pytest.mark.parametrize(
    ("args", "where"),
    [
        (["--runs-liveness-timeout", "0"], "--runs-liveness-timeout / RUNS_LIVENESS_TIMEOUT_SECONDS"),
        (["--runs-runners", "Echo Runner"], "--runs-runners / RUNS_RUNNERS"),
        (
            ["--runs-stream-max-age", "60", "--runs-duplicate-window", "90"],
            "--runs-duplicate-window / RUNS_DUPLICATE_WINDOW_SECONDS",
        ),
    ],
)
def test_a_bad_runs_setting_is_a_one_line_error_naming_flag_and_variable(args: list[str], where: str) -> None:
    proc = subprocess.run(
        [*CLI, "serve", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(GATEWAY_JWT_SECRET=SECRET),
        check=False,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and where in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_serve_with_runs_flags_serves_runs(nats_server_factory: NatsServerFactory) -> None:
    server: NatsServer = nats_server_factory(jetstream=True)
    port = free_port()
    proc = subprocess.Popen(
        [*CLI, "serve", "--port", str(port), "--nats-url", server.url, "--runs-runners", "echo"],
        env=clean_env(GATEWAY_JWT_SECRET=SECRET),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        token = issue_token(AuthConfig(secret=SECRET), "carl", 60)
        headers = {"Authorization": f"Bearer {token}"}
        url = f"http://127.0.0.1:{port}"

        def unknown_run_status() -> int | None:
            try:
                return httpx.get(f"{url}/api/runs/run_x", headers=headers, timeout=1.0).status_code
            except httpx.HTTPError:
                return None

        # Ready: an unknown run is a 404 (a 503 while setting up).
        wait_until_sync(
            lambda: unknown_run_status() == 404,
            20,
            interval=0.05,
            message=lambda: f"runs API never ready: an unknown run is {unknown_run_status()}, not 404",
        )
        resp = httpx.post(f"{url}/api/runs", headers=headers, json={"runner": "mock"}, timeout=5.0)
        assert resp.status_code == 422 and resp.json()["error"]["runners"] == ["echo"]
        resp = httpx.post(f"{url}/api/runs", headers=headers, json={"runner": "echo"}, timeout=5.0)
        assert resp.status_code == 202
        assert "studio_runs_created_total 1" in httpx.get(f"{url}/metrics", timeout=5.0).text
    finally:
        proc.terminate()
        proc.wait(15)
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
