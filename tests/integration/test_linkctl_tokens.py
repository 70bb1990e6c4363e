"""One rule for tokens in ``linkctl``: ``--token`` is always the NATS token, ``--gateway-token``
the gateway's API token, and a flag overrides its environment variable (``dev.env`` sourced).

Against a real nats-server (token auth) and the real gateway (operator mode); linkctl runs as a
subprocess, with the environment a user who sourced ``dev.env`` has.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from cli import exitcodes
from tests.helpers import NatsServerFactory
from tests.integration.gateway_harness import OperatorServer, start_operator_server
from tests.integration.linkctl_harness import LINKCTL
from tests.integration.linkd_harness import live_gateway

pytestmark = pytest.mark.timeout(90)

NATS_TOKEN = "s3cret-nats-token"


async def linkctl(*args: str, **env_vars: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINKCTL_")}
    env.update(NO_COLOR="1", **env_vars)
    proc = await asyncio.create_subprocess_exec(
        *LINKCTL, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def dev_env(tmp_path: Path, nats_url: str) -> dict[str, str]:
    """What ``source dev.env`` exports (a creds file that is not this server's)."""
    creds = tmp_path / "linkctl.creds"
    creds.write_text("not for this server\n", encoding="utf-8")
    return {"LINKCTL_NATS_URL": nats_url, "LINKCTL_NATS_CREDS": str(creds)}


async def test_token_flag_overrides_creds_from_the_environment(
    nats_server_factory: NatsServerFactory, tmp_path: Path
) -> None:
    server = nats_server_factory(token=NATS_TOKEN)
    env = dev_env(tmp_path, server.url)
    # Connected with the token (the creds file would not even parse): the host is just offline.
    code, out, err = await linkctl("status", "nobody.test", "--token", NATS_TOKEN, "--json", **env)
    assert code == exitcodes.OFFLINE, err
    assert json.loads(out)["reason"] == "not_connected"
    assert "not both" not in err
    # The flag is what is used: a wrong one is refused by the server, not mixed up with the creds.
    code, _, err = await linkctl("status", "nobody.test", "--token", "wrong", **env)
    assert code == exitcodes.USAGE and "authorization violation" in err
    # And the other way round: --creds FILE on the command line beats LINKCTL_NATS_TOKEN.
    code, _, err = await linkctl(
        "status", "nobody.test", "--creds", env["LINKCTL_NATS_CREDS"], LINKCTL_NATS_TOKEN=NATS_TOKEN, **env
    )
    assert code == exitcodes.USAGE and "not both" not in err and "--creds" in err


async def test_creds_and_token_both_as_flags_or_both_as_variables_are_refused(tmp_path: Path) -> None:
    env = dev_env(tmp_path, "nats://127.0.0.1:4222")
    creds = env["LINKCTL_NATS_CREDS"]
    code, _, err = await linkctl("status", "desk.example", "--creds", creds, "--token", "t", **env)
    assert code == exitcodes.USAGE
    assert err.strip() == "linkctl: error: give --creds or --token, not both"
    code, _, err = await linkctl("status", "desk.example", LINKCTL_NATS_TOKEN="t", **env)
    assert code == exitcodes.USAGE
    assert "LINKCTL_NATS_CREDS and LINKCTL_NATS_TOKEN are both set" in err


@pytest.fixture
def op(nats_server_factory: NatsServerFactory, tmp_path: Path) -> OperatorServer:
    return start_operator_server(nats_server_factory, tmp_path)


async def test_gateway_commands_take_the_gateway_token_as_gateway_token(
    op: OperatorServer, tmp_path: Path
) -> None:
    async with live_gateway(op.env()) as gw:
        token = gw.token("alice")
        env = dev_env(tmp_path, op.server.url)
        # status --gateway with --gateway-token: answered by the gateway (alice's desktop is offline).
        code, out, err = await linkctl(
            "status", "--gateway", gw.url, "--gateway-token", token, "--json", **env
        )
        assert code == exitcodes.OFFLINE, err
        assert json.loads(out)["via"] == gw.url
        # --token next to --gateway is the NATS token: not misread as the gateway's, one clear line.
        code, out, err = await linkctl("status", "--gateway", gw.url, "--token", token, **env)
        assert code == exitcodes.USAGE and out == ""
        assert err.startswith("linkctl: error: --token is the NATS token") and "--gateway-token" in err
        # LINKCTL_NATS_TOKEN in the environment (dev.env) is no reason to refuse status --gateway.
        code, _, err = await linkctl(
            "status", "--gateway", gw.url, LINKCTL_TOKEN=token, LINKCTL_NATS_TOKEN=NATS_TOKEN, **env
        )
        assert code == exitcodes.OFFLINE, err
        # A missing gateway token names the flag that gives it.
        code, _, err = await linkctl("session", "--gateway", gw.url)
        assert code == exitcodes.USAGE and "pass --gateway-token or set LINKCTL_TOKEN" in err
        # session/runs: --gateway-token; the old --token still works there, with a warning.
        code, out, err = await linkctl("session", "--gateway", gw.url, "--gateway-token", token, "--json")
        assert code == 0, err
        assert json.loads(out)["tunnelHostname"]
        code, out, err = await linkctl("session", "--gateway", gw.url, "--token", token, "--json")
        assert code == 0, err
        assert "warning: --token is the NATS token; give the gateway's as --gateway-token" in err
        code, _, err = await linkctl("runs", "show", "no-such-run", "--gateway", gw.url, "--token", token)
        # (no JetStream on this server: runs answer 503; the token itself was taken)
        assert "no gateway API token" not in err and "refused the token" not in err, err
        assert "--gateway-token" in err  # the warning


@pytest.mark.parametrize(
    "command", [["status", "--help"], ["session", "--help"], ["runs", "send", "--help"], ["fetch", "--help"]]
)
async def test_every_help_states_the_token_rule(command: list[str]) -> None:
    code, out, _ = await linkctl(*command)
    assert code == 0
    flat = " ".join(out.split())
    assert ("--token TOKEN" in flat and "always the NATS token" in flat) or (
        "--gateway-token TOKEN" in flat and "--token is always the NATS token" in flat
    )
