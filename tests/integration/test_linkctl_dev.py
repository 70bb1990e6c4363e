"""``linkctl dev`` as a user runs it: real nats-server, gateway and linkd processes.

Promises checked: everything is ready and reachable (the desktop is online through the
gateway), SIGTERM stops all three and leaves nothing running, a second stack on the same
state directory is refused, and a child that dies takes the stack down with its log shown.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.helpers import wait_until, wait_until_sync
from tests.integration.linkctl_harness import LINKCTL, dev_stack, live_pids_mentioning

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="scans /proc for leftovers"),
]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_dev_starts_everything_serves_the_desktop_and_sigterm_stops_all_of_it(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with dev_stack(state) as stack:
        pids = stack.child_pids()
        assert all(_alive(pid) for pid in pids.values()), pids
        me = httpx.get(
            f"{stack.gateway}/api/links/me",
            headers={"Authorization": f"Bearer {stack.token}"},
            timeout=10,
            trust_env=False,
        ).json()
        assert me["online"] is True and me["tunnelHostname"] == stack.hostname
        assert stack.info["user"] == "dev@localhost"
        assert stack.info["nats"]["websocketUrl"].startswith("ws://127.0.0.1:")
        # Logs, keys and the env file are in the state directory, private to the user.
        env_file = Path(stack.info["envFile"])
        assert f"export LINKCTL_TOKEN={stack.token}" in env_file.read_text()
        for private in (state / "keys.json", state / "linkctl.creds", env_file):
            assert private.stat().st_mode & 0o077 == 0, private
        assert (state / "nats" / "jetstream-store").is_dir()
        assert (state / "gateway" / "gateway.log").stat().st_size > 0

        # One stack per state directory.
        second = subprocess.run(
            [*LINKCTL, "dev", "--state-dir", str(state)], capture_output=True, text=True, timeout=60
        )
        assert second.returncode == 2
        assert "another linkctl dev/demo is using" in second.stderr
        assert "Traceback" not in second.stderr

        started = time.monotonic()
        code, err = stack.stop()
        took = time.monotonic() - started
        assert code == 0, err
        assert took < 20, f"stopping took {took:.1f}s"
        order = [line.split()[2] for line in err.splitlines() if line.startswith("  ok  stopped ")]
        assert order == ["linkd", "gateway", "nats-server"], err
        assert not any(_alive(pid) for pid in pids.values())
        assert live_pids_mentioning(str(state)) == []
        assert not env_file.exists()


def test_a_child_that_dies_stops_the_rest_and_shows_its_log(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with dev_stack(state) as stack:
        pids = stack.child_pids()
        os.kill(pids["gateway"], signal.SIGKILL)
        code = stack.proc.wait(timeout=60)
        err = stack.proc.stderr.read() if stack.proc.stderr else ""
        assert code == 8, err
        assert f"gateway (pid {pids['gateway']}) exited with status -9" in err
        assert "last lines of" in err and "gateway.log" in err
        assert "Traceback" not in err
        assert live_pids_mentioning(str(state)) == []


def test_ctrl_c_while_starting_stops_what_already_started(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LINKCTL_", "LINKD_"))}
    proc = subprocess.Popen(
        [*LINKCTL, "dev", "--state-dir", str(state)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        seen: list[str] = []
        for line in proc.stdout:  # progress lines, one per step
            seen.append(line)
            if line.startswith("  ok  gateway"):
                break
        assert any(line.startswith("  ok  gateway") for line in seen), seen
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends: only to linkctl, the children are detached
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "SIGINT: stopping" in out and "everything stopped" in out
    assert "Traceback" not in err
    assert live_pids_mentioning(str(state)) == []


async def test_linkctl_killed_hard_leaves_no_child_behind(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with dev_stack(state) as stack:
        pids = stack.child_pids()
        stack.proc.kill()  # SIGKILL: no chance to stop anything itself
        stack.proc.wait(timeout=10)
        await wait_until(
            lambda: not any(_alive(pid) for pid in pids.values()),
            30,
            message=f"children outlived linkctl: {live_pids_mentioning(str(state))}",
        )
    assert live_pids_mentioning(str(state)) == []


def test_a_part_that_cannot_start_is_reported_with_its_log_and_nothing_is_left(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [*LINKCTL, "dev", "--state-dir", str(state), "--gateway-port", str(port)],
            capture_output=True,
            text=True,
            timeout=90,
        )
    assert result.returncode == 8, result.stdout + result.stderr
    assert "gateway exited with status 2 while waiting for /healthz" in result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr  # the gateway's own log line
    assert "Traceback" not in result.stderr
    assert live_pids_mentioning(str(state)) == []


def test_dev_cluster_3_serves_runs_survives_a_node_and_stops_every_node(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with dev_stack(state, "--cluster", "3") as stack:
        nats = stack.info["nats"]
        nodes = nats["nodes"]
        urls = [node["url"] for node in nodes]
        assert [node["name"] for node in nodes] == ["n1", "n2", "n3"]
        assert nats["cluster"] == 3 and nats["runsReplicas"] == 3
        assert nats["url"] == ",".join(urls) and nats["urls"] == urls and len(set(urls)) == 3
        assert all(node["websocketUrl"].startswith("ws://127.0.0.1:") for node in nodes)
        pids = [node["pid"] for node in nodes] + [stack.info["gateway"]["pid"], stack.info["linkd"]["pid"]]
        assert all(_alive(pid) for pid in pids), pids
        assert (state / "nats-cluster-3" / "n3" / "jetstream-store").is_dir()
        assert f"export LINKCTL_NATS_URL={nats['url']}" in Path(stack.info["envFile"]).read_text()

        with httpx.Client(trust_env=False, timeout=10) as http:
            # The gateway checks its streams every 0.5 s; one slow answer of a 3-node cluster
            # under load says "unavailable" until the next check.
            wait_until_sync(
                lambda: (
                    http.get(f"{stack.gateway}/healthz").json()
                    == {"status": "ok", "nats": "connected", "runs": "ready"}
                ),
                10.0,
                message="the gateway's runs never said ready",
            )
            # Desktops are handed every node's URL (the gateway's NATS_PUBLIC_URL).
            session = http.post(
                f"{stack.gateway}/api/links/session", headers={"Authorization": f"Bearer {stack.token}"}
            ).json()
            assert session["connection"]["urls"] == urls
            # The run stream is replicated on all three nodes.
            jsz = http.get(f"{nodes[0]['monitorUrl']}/jsz?accounts=true&streams=true&config=true").json()
            replicas = {
                s["name"]: s["config"]["num_replicas"]
                for acc in jsz["account_details"]
                for s in acc["stream_detail"]
            }
            assert replicas and set(replicas.values()) == {3}, replicas

        # One node killed: reported, and the stack carries on (2 of 3 is a majority).
        os.kill(nodes[2]["pid"], signal.SIGKILL)
        assert stack.proc.stderr is not None
        fd = stack.proc.stderr.fileno()  # raw reads: nothing is left in the text wrapper's buffer
        deadline = time.monotonic() + 10
        seen = b""
        while b"carries on" not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
            seen += os.read(fd, 65536) if ready else b""
        warning = seen.decode()
        assert f"warning: nats-n3 (pid {nodes[2]['pid']}) exited with status -9" in warning, warning
        assert "carries on with 2 of 3 nodes" in warning
        assert stack.proc.poll() is None

        code, err = stack.stop()
        assert code == 0, err
        order = [line.split()[2] for line in err.splitlines() if line.startswith("  ok  stopped ")]
        assert order == ["linkd", "gateway", "nats-n2", "nats-n1"], err
        assert not any(_alive(pid) for pid in pids)
        assert live_pids_mentioning(str(state)) == []


class _Upstream(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"upstream saw {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_dev_passes_linkd_upstream_on_linkd_status_finds_it_and_a_second_dev_keeps_dev_env(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{upstream.server_address[1]}"
    try:
        with dev_stack(state, env_vars={"LINKD_UPSTREAM": url, "LINKD_DRAIN_TIMEOUT": "1"}) as stack:
            assert stack.info["linkd"]["upstream"] == url
            # Through the tunnel: the status route is linkd's own, every other path is the upstream's.
            nats, creds = stack.info["nats"]["url"], stack.info["nats"]["creds"]
            fetched = subprocess.run(
                [*LINKCTL, "fetch", f"tunnel://{stack.hostname}/hello?x=1", "--nats", nats, "--creds", creds],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert fetched.returncode == 0, fetched.stderr
            assert fetched.stdout == "upstream saw /hello?x=1\n"

            # `linkd status` in another terminal finds the stack's daemon (no flags).
            env = {k: v for k, v in os.environ.items() if not k.startswith(("LINKD_", "LINKCTL_"))}
            env.update(
                LINKCTL_STATE_DIR=str(state),
                LINKD_CONFIG_DIR=str(tmp_path / "my-config"),
                LINKD_RUNTIME_DIR=str(tmp_path / "my-run"),
            )
            status = subprocess.run(
                [sys.executable, "-m", "linkd.cli", "status"],
                capture_output=True,
                text=True,
                timeout=60,
                env=env,
            )
            assert status.returncode == 0, status.stdout + status.stderr
            assert f"online as {stack.hostname}" in status.stdout
            assert f"the `linkctl dev` stack in {state}" in status.stdout
            assert f"upstream:    {url}" in status.stdout

            # A second stack on the same directory is refused, and leaves the first one's dev.env.
            env_file = Path(stack.info["envFile"])
            before = env_file.read_text()
            second = subprocess.run(
                [*LINKCTL, "dev", "--state-dir", str(state)], capture_output=True, text=True, timeout=60
            )
            assert second.returncode == 2 and "another linkctl dev/demo is using" in second.stderr
            assert env_file.read_text() == before

            code, err = stack.stop()
            assert code == 0, err
            assert "does not get LINKD_DRAIN_TIMEOUT from this environment" in err  # said, not dropped
            assert not env_file.exists()
    finally:
        upstream.shutdown()
        upstream.server_close()


def test_dev_refuses_a_malformed_upstream_before_starting_anything(tmp_path: Path) -> None:
    result = subprocess.run(
        [*LINKCTL, "dev", "--state-dir", str(tmp_path / "state"), "--upstream", "ftp://x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "linkctl: error: --upstream / LINKD_UPSTREAM: 'ftp://x' must be an http:// or https:// URL "
        "with a host"
    )
    assert not (tmp_path / "state").exists()
