"""``linkctl``'s error lines point at the fix that applies, in the user's terms (never at the API).

Real nats-servers (token mode, operator mode) and a real ``studio-gateway`` process, frozen with
SIGSTOP: the kernel still accepts connections on its port, nobody answers.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cli import exitcodes
from cli.gateway_api import GatewayApiError, GatewayClient, GatewayOptions
from cli.nats_server import free_port
from studio_gateway.nats_jwt import OperatorSetup
from tests.helpers import NatsServerFactory, wait_until_sync
from tests.integration.gateway_harness import SECRET, OperatorServer, start_operator_server
from tests.integration.linkctl_harness import LINKCTL

pytestmark = [pytest.mark.timeout(90), pytest.mark.skipif(sys.platform == "win32", reason="SIGSTOP")]

NATS_TOKEN = "s3cret-nats-token"


async def linkctl(*args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINKCTL_")}
    env["NO_COLOR"] = "1"
    proc = await asyncio.create_subprocess_exec(
        *LINKCTL, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


async def test_a_refused_token_names_the_token_flag_not_the_url(
    nats_server_factory: NatsServerFactory,
) -> None:
    server = nats_server_factory(token=NATS_TOKEN)
    code, _, err = await linkctl("status", "desk.example", "--nats", server.url, "--token", "wrong")
    line = one_line(err)
    assert code == exitcodes.USAGE
    assert "authorization violation" in line
    assert line.endswith("check the token given by --token / LINKCTL_NATS_TOKEN"), line
    assert "--nats" not in line and "LINKCTL_NATS_URL" not in line
    code, _, err = await linkctl("status", "desk.example", "--nats", server.url)
    assert code == exitcodes.USAGE
    assert one_line(err).endswith(
        "this server wants credentials: pass --creds FILE (LINKCTL_NATS_CREDS) "
        "or --token TOKEN (LINKCTL_NATS_TOKEN)"
    )


@pytest.fixture
def op(nats_server_factory: NatsServerFactory, tmp_path: Path) -> OperatorServer:
    return start_operator_server(nats_server_factory, tmp_path)


async def test_refused_creds_and_a_bad_creds_file_say_which_file_and_what_is_wrong(
    op: OperatorServer, tmp_path: Path
) -> None:
    foreign = tmp_path / "other-operator.creds"
    foreign.write_text(OperatorSetup.generate().user_creds("mallory"), encoding="utf-8")
    code, _, err = await linkctl("status", "desk.example", "--nats", op.server.url, "--creds", str(foreign))
    line = one_line(err)
    assert code == exitcodes.USAGE and "authorization violation" in line
    assert line.endswith(f"check the credentials file given by --creds / LINKCTL_NATS_CREDS ({foreign})")

    garbage = tmp_path / "notes.txt"
    garbage.write_text("user: alice\npassword: hunter2\n", encoding="utf-8")
    code, _, err = await linkctl("status", "desk.example", "--nats", op.server.url, "--creds", str(garbage))
    assert code == exitcodes.USAGE
    assert one_line(err) == (
        f"linkctl: error: --creds: '{garbage}' is not a NATS credentials file: it has no user JWT block "
        "(expected a line '-----BEGIN NATS USER JWT-----')"
    )
    assert "creds_text" not in err and "hunter2" not in err

    broken = tmp_path / "truncated.creds"
    good = OperatorSetup.generate().user_creds("x")
    broken.write_text(good.replace(good.split("\n")[1], "not-a-jwt"), encoding="utf-8")
    code, _, err = await linkctl(
        "fetch", "tunnel://desk.example/", "--nats", op.server.url, "--creds", str(broken)
    )
    assert code == exitcodes.USAGE
    assert one_line(err).startswith(f"linkctl: error: --creds: '{broken}' is not a NATS credentials file: ")


@pytest.fixture
def frozen_gateway(nats_server_factory: NatsServerFactory) -> Iterator[str]:
    """A real studio-gateway process that answered /healthz, then was stopped (SIGSTOP)."""
    nats = nats_server_factory(token=NATS_TOKEN)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "GATEWAY_", "TUNNEL_"))}
    env.update(GATEWAY_JWT_SECRET=SECRET, NATS_TOKEN=NATS_TOKEN)
    argv = [sys.executable, "-m", "studio_gateway.cli", "serve", "--port", str(port), "--nats-url", nats.url]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:

        def healthy() -> bool:
            assert proc.poll() is None, "the gateway exited"
            try:
                return httpx.get(f"{url}/healthz", timeout=2.0, trust_env=False).status_code == 200
            except httpx.TransportError:
                return False

        wait_until_sync(healthy, 20.0, interval=0.05, message="the gateway never answered /healthz")
        proc.send_signal(signal.SIGSTOP)
        yield url
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait()


async def test_a_frozen_gateway_is_a_timeout_not_a_wrong_url(frozen_gateway: str) -> None:
    async with GatewayClient(GatewayOptions(frozen_gateway, "token", timeout=1.0)) as client:
        with pytest.raises(GatewayApiError) as info:
            await client.call("GET", "/api/runs/r1")
    assert info.value.exit_code == exitcodes.GATEWAY_ERROR
    assert info.value.message == (
        f"GET /api/runs/r1: the gateway at {frozen_gateway} took the connection but did not answer "
        "within 1 s (is it overloaded or stuck?)"
    )
    assert "--gateway" not in info.value.message
    # Nobody listening at all is still the wrong URL.
    closed = f"http://127.0.0.1:{free_port()}"
    async with GatewayClient(GatewayOptions(closed, "token", timeout=1.0)) as client:
        with pytest.raises(GatewayApiError) as info:
            await client.call("GET", "/api/runs/r1")
    assert info.value.exit_code == exitcodes.USAGE
    assert info.value.message.startswith(f"cannot reach the gateway at {closed} (")
    assert info.value.message.endswith("set --gateway or LINKCTL_GATEWAY")
