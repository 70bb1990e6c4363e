"""``studio-gateway`` as a process: start-up errors, issue-token, serve on a real port, clean SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from cli.nats_server import free_port
from studio_gateway.auth import TokenVerifier
from studio_gateway.config import AuthConfig
from studio_gateway.nats_jwt import OperatorSetup
from tests.helpers import NatsServerFactory, wait_until_sync
from tests.integration.gateway_harness import SECRET

CLI = [sys.executable, "-m", "studio_gateway.cli"]
RUN_TIMEOUT = 30.0
READY_TIMEOUT = 15.0


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "GATEWAY_", "TUNNEL_"))}
    full_env.update(env or {})
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=RUN_TIMEOUT, env=full_env, check=False
    )


@pytest.mark.parametrize("url", ["http://nats.example.com", "wss:///no-host"])
def test_a_malformed_public_url_is_a_one_line_start_up_error_naming_the_variable(url: str) -> None:
    proc = run_cli("serve", "--public-url", url, env={"GATEWAY_JWT_SECRET": SECRET})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "--public-url / NATS_PUBLIC_URL" in lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    # The environment variable alone is checked the same way.
    proc = run_cli("serve", env={"GATEWAY_JWT_SECRET": SECRET, "NATS_PUBLIC_URL": f"nats://ok:4222,{url}"})
    assert proc.returncode == 2 and "NATS_PUBLIC_URL" in proc.stderr and "Traceback" not in proc.stderr


def test_a_signing_key_of_another_account_is_a_start_up_error() -> None:
    ours, theirs = OperatorSetup.generate(), OperatorSetup.generate()
    env = {"GATEWAY_JWT_SECRET": SECRET, **ours.gateway_env()}
    env["NATS_ACCOUNT_SIGNING_KEY"] = theirs.account_signing.seed
    proc = run_cli("serve", env=env)
    assert proc.returncode == 2
    assert "NATS_ACCOUNT_SIGNING_KEY" in proc.stderr and "Traceback" not in proc.stderr
    assert theirs.account_signing.seed not in proc.stderr


def test_issue_token_prints_a_token_the_gateway_accepts() -> None:
    proc = run_cli(
        "issue-token", "--user", "alice@example.com", "--ttl", "60", env={"GATEWAY_JWT_SECRET": SECRET}
    )
    assert proc.returncode == 0, proc.stderr
    token = proc.stdout.strip()
    user = TokenVerifier(AuthConfig(secret=SECRET)).verify(token)
    assert user.id == "alice@example.com"
    assert user.claims["exp"] - time.time() <= 60
    missing = run_cli("issue-token", "--user", "alice")
    assert missing.returncode == 2 and "GATEWAY_JWT_SECRET" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_issue_token_adds_scopes_for_operators() -> None:
    proc = run_cli(
        "issue-token",
        "--user",
        "ops",
        "--scope",
        "runs:admin",
        "--scope",
        "x",
        env={"GATEWAY_JWT_SECRET": SECRET},
    )
    assert proc.returncode == 0, proc.stderr
    user = TokenVerifier(AuthConfig(secret=SECRET)).verify(proc.stdout.strip())
    assert user.claims["scope"] == "runs:admin x"


def test_serve_answers_on_a_real_port_logs_json_and_stops_cleanly_on_sigterm(
    nats_server_factory: NatsServerFactory, tmp_path: Path
) -> None:
    nats = nats_server_factory(token="tok")
    port = free_port()
    secret_file = tmp_path / "jwt-secret"
    secret_file.write_text(SECRET + "\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "GATEWAY_", "TUNNEL_"))}
    env.update({"GATEWAY_JWT_SECRET": str(secret_file), "NATS_TOKEN": "tok"})
    proc = subprocess.Popen(
        [*CLI, "serve", "--port", str(port), "--nats-url", nats.url, "--public-url", nats.url],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=5.0, trust_env=False) as http:

            def connected() -> bool:
                try:
                    if http.get("/healthz").json()["nats"] == "connected":
                        return True
                except httpx.TransportError:
                    pass
                assert proc.poll() is None, proc.communicate()[1]
                return False

            wait_until_sync(connected, READY_TIMEOUT, interval=0.05, message="gateway never became ready")
            token = run_cli("issue-token", "--user", "zoe", env={"GATEWAY_JWT_SECRET": SECRET}).stdout.strip()
            auth = {"Authorization": f"Bearer {token}"}
            assert http.get("/api/links/me", headers=auth).json()["reason"] == "not_connected"
            session = http.post("/api/links/session", headers=auth)
            assert session.status_code == 200 and session.json()["token"] == "tok"
            assert session.headers["Cache-Control"] == "no-store"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=RUN_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    records = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    assert records, "no log output"
    assert any(r["message"].startswith("starting studio-gateway") for r in records)
    access = [r for r in records if r["logger"] == "aiohttp.access"]
    assert {"method", "path", "status", "duration_ms"} <= set(access[-1])
    assert SECRET not in stderr and '"tok"' not in stderr  # no secret in any log line
