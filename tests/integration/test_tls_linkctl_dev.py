"""``linkctl dev --tls``: the production shape locally (TLS on the NATS port, wss for linkd, a dev CA).

One stack: it comes up, linkd is online over ``wss://`` with WEBSOCKET-only credentials, a
tunnel request goes through over ``tls://`` with the variables of ``dev.env`` (the dev CA
trusted by ``LINKCTL_NATS_CA``), a run completes, and without the CA linkctl names the fix.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from cli import exitcodes
from tests.integration.linkctl_harness import LINKCTL, dev_stack

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="scans /proc for leftovers"),
]
RUN_TIMEOUT = 60


def env_file_vars(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        out[name] = value
    return out


def linkctl(*args: str, **env_vars: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LINKCTL_", "LINKD_"))}
    env.update(env_vars)
    return subprocess.run(
        [*LINKCTL, *args], capture_output=True, text=True, timeout=RUN_TIMEOUT, env=env, check=False
    )


def test_dev_tls_serves_the_desktop_over_tls_and_wss(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with dev_stack(state, "--tls") as stack:
        nats = stack.info["nats"]
        assert nats["url"].startswith("tls://127.0.0.1:")
        assert nats["websocketUrl"].startswith("wss://127.0.0.1:")
        assert nats["publicUrl"] == nats["websocketUrl"]
        ca = Path(nats["ca"])
        assert ca == state / "tls" / "ca.pem" and ca.is_file()
        assert (state / "tls" / "server.key").stat().st_mode & 0o077 == 0

        # The session the gateway hands out: wss only, so WEBSOCKET-only credentials.
        auth = {"Authorization": f"Bearer {stack.token}"}
        session = httpx.post(f"{stack.gateway}/api/links/session", headers=auth, timeout=10, trust_env=False)
        assert session.status_code == 200, session.text
        connection = session.json()["connection"]
        assert connection["urls"] == [nats["websocketUrl"]]
        assert connection["allowedConnectionTypes"] == ["WEBSOCKET"]
        # ... and linkd really uses it.
        status = json.loads((state / "linkd" / "linkd-status.json").read_text())
        assert status["state"] == "online" and status["natsUrl"].startswith("wss://"), status

        # A tunnel request over tls:// with what dev.env exports (creds and the dev CA).
        env = env_file_vars(Path(stack.info["envFile"]))
        assert env["LINKCTL_NATS_CA"] == str(ca) and env["LINKCTL_NATS_URL"] == nats["url"]
        fetched = linkctl("fetch", f"tunnel://{stack.hostname}/api/links/status", **env)
        assert fetched.returncode == 0, fetched.stderr
        assert json.loads(fetched.stdout)["hostname"]

        # A run: the gateway dispatches it through the tunnel, linkd's events come back over wss.
        run = linkctl("runs", "send", "mock", '{"count": 2, "delayMs": 10}', "--attach", **env)
        assert run.returncode == 0, run.stderr

        # Without the dev CA: one line naming the URL and the fix.
        without_ca = {k: v for k, v in env.items() if k != "LINKCTL_NATS_CA"}
        refused = linkctl("status", stack.hostname, **without_ca)
        assert refused.returncode == exitcodes.TLS_ERROR, refused.stderr
        assert refused.stderr == (
            f"linkctl: error: nats {nats['url']}: certificate signed by an unknown CA: "
            "pass --nats-ca FILE (or LINKCTL_NATS_CA) with the CA that signed the server's certificate\n"
        )
        code, err = stack.stop()
        assert code == 0, err
