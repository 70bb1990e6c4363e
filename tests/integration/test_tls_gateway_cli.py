"""``studio-gateway serve`` connecting to NATS over ``tls://`` with ``--nats-ca`` / ``NATS_CA`` (a process).

With the right CA it connects; with another CA it stays up (health checks, clear 503s), logs one
line naming the URL and the fix, and keeps retrying; a CA file it cannot read is a start-up error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from cli.nats_server import NatsServerTLS, free_port
from tests.helpers import NatsServerFactory, wait_until_sync
from tests.integration.gateway_harness import SECRET
from tests.tls_certs import TestCerts, make_certs

pytestmark = pytest.mark.timeout(60)

CLI = [sys.executable, "-m", "studio_gateway.cli"]
READY_TIMEOUT = 20.0


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> TestCerts:
    return make_certs(tmp_path_factory.mktemp("tls"))


def gateway_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "GATEWAY_", "TUNNEL_"))}
    env.update({"GATEWAY_JWT_SECRET": SECRET, "NATS_TOKEN": "tok"}, **extra)
    return env


@dataclass
class Gateway:
    proc: subprocess.Popen[str]
    http: httpx.Client
    lines: list[str] = field(default_factory=list)

    def health(self) -> dict[str, object] | None:
        assert self.proc.poll() is None, f"the gateway exited: {self.lines[-5:]}"
        try:
            doc: dict[str, object] = self.http.get("/healthz").json()
            return doc
        except httpx.TransportError:
            return None

    def messages(self) -> list[str]:
        return [json.loads(line)["message"] for line in list(self.lines) if line.startswith("{")]


@contextmanager
def serving(url: str, *args: str, env: dict[str, str]) -> Iterator[Gateway]:
    port = free_port()
    cmd = [*CLI, "serve", "--port", str(port), "--nats-url", url, "--public-url", url, *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        lines.extend(proc.stderr)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5.0, trust_env=False) as http:
            yield Gateway(proc, http, lines)
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(timeout=30)
        reader.join(timeout=10)


def test_the_gateway_connects_over_tls_with_its_ca_flag(
    nats_server_factory: NatsServerFactory, certs: TestCerts
) -> None:
    tls = NatsServerTLS(str(certs.server_cert), str(certs.server_key))
    server = nats_server_factory(token="tok", tls=tls)
    with serving(server.url, "--nats-ca", str(certs.ca), env=gateway_env()) as gw:

        def connected() -> bool:
            doc = gw.health()
            return doc is not None and doc.get("nats") == "connected"

        wait_until_sync(connected, READY_TIMEOUT, interval=0.05, message="never connected over TLS")
        conns = server.monitor_json("connz?auth=1")["connections"]
        assert conns and all(c.get("tls_version") for c in conns)


def test_an_unknown_ca_is_logged_in_one_line_with_its_fix_and_the_gateway_stays_up(
    nats_server_factory: NatsServerFactory, certs: TestCerts
) -> None:
    tls = NatsServerTLS(str(certs.server_cert), str(certs.server_key))
    server = nats_server_factory(token="tok", tls=tls)
    with serving(server.url, env=gateway_env(NATS_CA=str(certs.other_ca))) as gw:

        def tls_line() -> str | None:
            return next((m for m in gw.messages() if "unknown CA" in m), None)

        line = wait_until_sync(tls_line, READY_TIMEOUT, interval=0.05, message=lambda: str(gw.lines[-5:]))
        assert line == (
            f"nats {server.url}: certificate signed by an unknown CA: pass NATS_CA (--nats-ca FILE) "
            "with the CA that signed the server's certificate; retrying every 10 s"
        )
        doc = gw.health()  # still up, saying NATS is not there
        assert doc is not None and doc["nats"] == "disconnected"
    assert not any("Traceback" in line for line in gw.lines)


def test_an_unreadable_ca_file_is_a_start_up_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    result = subprocess.run(
        [*CLI, "serve", "--port", str(free_port()), "--nats-url", "tls://127.0.0.1:9"],
        env=gateway_env(NATS_CA=str(missing)),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode != 0
    assert "NATS_CA" in result.stderr and f"cannot read the TLS CA file {missing}" in result.stderr
    assert "Traceback" not in result.stderr
