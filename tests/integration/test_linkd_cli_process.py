"""``linkd`` as the user runs it: separate processes, a real gateway on a port, a real nats-server.

Secrets go to a file-backed test keyring (``tests.linkd_support.FileKeyring``), never the user's.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

import tunnel
from cli.nats_server import free_port
from linkd.credentials_store import SEED_KEY, SERVICE_NAME, TOKEN_KEY
from tests.helpers import NatsServerFactory, wait_until
from tests.integration.gateway_harness import OperatorServer, start_operator_server
from tests.integration.linkd_harness import LiveGateway, live_gateway
from tests.linkd_support import jsonl, process_gone, subprocess_env

pytestmark = [pytest.mark.timeout(60), pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")]

LINKD = [sys.executable, "-m", "linkd.cli"]
TIMEOUT = 15.0  # a cold Python start of the CLI is part of it


@pytest.fixture
def op(nats_server_factory: NatsServerFactory, tmp_path: Path) -> OperatorServer:
    return start_operator_server(nats_server_factory, tmp_path)


async def linkd(env: dict[str, str], *args: str, stdin: str | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *LINKD,
        *args,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode() if stdin else b""), TIMEOUT)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@dataclass
class Daemon:
    proc: asyncio.subprocess.Process
    lines: list[dict[str, Any]] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)

    def states(self) -> list[str]:
        return [line["message"] for line in self.lines if line.get("event") == "state"]

    async def wait_state(self, state: str, timeout: float = TIMEOUT) -> None:
        await wait_until(
            lambda: any(line.get("state") == state for line in self.lines if line.get("event") == "state"),
            timeout,
            message=f"linkd never {state}: {self.states()} / {self.stderr[-5:]}",
        )


@asynccontextmanager
async def linkd_up(env: dict[str, str], *args: str) -> AsyncIterator[Daemon]:
    proc = await asyncio.create_subprocess_exec(
        *LINKD,
        "up",
        "--json-logs",
        *args,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    daemon = Daemon(proc)

    async def read_stdout() -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:  # linkd up prints nothing on stdout: its logs go to stderr
            daemon.stderr.append("stdout: " + raw.decode(errors="replace"))

    async def read_stderr() -> None:
        assert proc.stderr is not None
        async for raw in proc.stderr:
            try:
                daemon.lines.append(json.loads(raw))
            except ValueError:
                daemon.stderr.append(raw.decode(errors="replace"))

    readers = [asyncio.ensure_future(read_stdout()), asyncio.ensure_future(read_stderr())]
    try:
        yield daemon
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await asyncio.gather(*readers, return_exceptions=True)


def keyring_data(tmp_path: Path) -> dict[str, str]:
    path = tmp_path / "keyring.json"
    data: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
    return data


async def login(gw: LiveGateway, env: dict[str, str], user: str) -> str:
    token = gw.token(user)
    code, out, err = await linkd(env, "login", "--gateway", gw.url, stdin=token + "\n")
    assert code == 0, err
    assert token not in out + err
    return token


async def test_login_up_probe_status_logout(op: OperatorServer, tmp_path: Path) -> None:
    env = subprocess_env(tmp_path)
    async with live_gateway(op.env(NATS_TUNNEL_SESSION_TTL_SECONDS="600")) as gw:
        token = await login(gw, env, "alice")
        stored = keyring_data(tmp_path)
        assert stored[f"{SERVICE_NAME}/{TOKEN_KEY}"] == token
        assert stored[f"{SERVICE_NAME}/{SEED_KEY}"].startswith("SU")

        async with linkd_up(env, "--drain-timeout", "3") as daemon:
            await daemon.wait_state("online")
            host = next(line["tunnel_hostname"] for line in daemon.lines if line.get("state") == "online")
            # The probe through the tunnel, as the gateway does it for the user.
            async with httpx.AsyncClient() as http:
                me = (
                    await http.get(f"{gw.url}/api/links/me", headers={"Authorization": f"Bearer {token}"})
                ).json()
            assert me["online"] is True and me["tunnelHostname"] == host
            assert me["capabilities"] == ["echo", "mock", "cancel"]
            code, out, _ = await linkd(env, "status", "--json")
            status = json.loads(out)
            assert code == 0 and status["running"] is True and status["state"] == "online"
            assert status["tunnelHostname"] == host and status["credentialsExpireAt"]
            code, out, _ = await linkd(env, "status")
            assert code == 0 and f"online as {host}" in out

            daemon.proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(daemon.proc.wait(), 5.0) == 0
            await wait_until(lambda: daemon.states()[-1:] == ["stopped"], TIMEOUT)  # its last lines read
        code, out, _ = await linkd(env, "status")
        assert code == 1 and "not running" in out

        code, out, err = await linkd(env, "logout")
        assert code == 0 and "removed the gateway token" in out, err
        assert f"{SERVICE_NAME}/{TOKEN_KEY}" not in keyring_data(tmp_path)
        code, _, err = await linkd(env, "up", "--gateway", gw.url)
        assert code == 2
        assert (
            err.strip()
            == f"linkd: error: not logged in: run 'linkd login --gateway {gw.url}' (or set LINKD_TOKEN)"
        )


async def test_sigterm_during_long_runs_cancels_them_and_exits_within_the_drain_deadline(
    op: OperatorServer, tmp_path: Path
) -> None:
    drain = 3.0
    config = tmp_path / "linkd.toml"
    config.write_text(
        f"drain_timeout = {drain}\n[runners]\nheartbeat_interval = 0.5\nkill_grace = 10\n"
        "[runners.command.sleepy]\n"
        'argv = ["sh", "-c", "trap \\"\\" TERM; echo pid=$$; sleep 300 & wait; wait"]\n'
        f'cwd = "{tmp_path}"\n',
        encoding="utf-8",
    )
    events_file = tmp_path / "events.jsonl"
    env = subprocess_env(tmp_path, LINKD_CONFIG=str(config))
    async with live_gateway(op.env(NATS_TUNNEL_SESSION_TTL_SECONDS="600")) as gw:
        await login(gw, env, "bob")
        async with linkd_up(env, "--events-file", str(events_file)) as daemon:
            await daemon.wait_state("online")
            host = next(line["tunnel_hostname"] for line in daemon.lines if line.get("state") == "online")
            items = [
                {"runId": "long-mock", "runner": "mock", "input": {"count": 100000, "delayMs": 20}},
                {"runId": "long-cmd", "runner": "command", "input": {"template": "sleepy"}},
            ]
            for item in items:
                body = {"threadId": "t", "userId": "bob", "runFenceToken": 3, **item}
                async with await tunnel.fetch(
                    gw.nc,
                    f"tunnel://{host}/api/links/work",
                    method="POST",
                    body=json.dumps(body).encode(),
                    first_frame_timeout=TIMEOUT,
                ) as resp:
                    assert resp.status == 202, await resp.read()

            def outputs(run_id: str) -> list[dict[str, Any]]:
                return [e for e in jsonl(events_file) if e["runId"] == run_id and e["type"] == "output"]

            await wait_until(
                lambda: len(outputs("long-mock")) >= 5 and len(outputs("long-cmd")) >= 1, TIMEOUT
            )
            child = int(outputs("long-cmd")[0]["data"].strip().split("=")[1])
            # The command ignores SIGTERM: only the shutdown's escalation to SIGKILL stops it in time.
            daemon.proc.send_signal(signal.SIGTERM)
            started = time.monotonic()
            code = await asyncio.wait_for(daemon.proc.wait(), drain + 5)
            took = time.monotonic() - started
            assert code == 0
            assert took <= drain + 1.0, f"exit took {took:.2f}s (drain deadline {drain}s)"
            print(f"linkd exited {took:.2f}s after SIGTERM (drain deadline {drain}s)")

        events = jsonl(events_file)
        for run_id in ("long-mock", "long-cmd"):
            run = [e for e in events if e["runId"] == run_id]
            assert [e["seq"] for e in run] == list(range(1, len(run) + 1)), run_id
            assert run[-1]["type"] == "done" and run[-1]["status"] == "cancelled", run[-1]
            assert run[-1]["finalSeq"] == run[-1]["seq"] and run[-1]["fence"] == 3
            assert run[-1]["reason"] == "the desktop daemon is shutting down"
        assert any(e["type"] == "heartbeat" for e in events)
        # Killed at the drain deadline; ignoring SIGTERM it would live 300 s: a generous bound still tells.
        await wait_until(lambda: process_gone(child), TIMEOUT, message="the command survived the daemon")
        states = daemon.states()
        assert states[-1] == "stopped" and any(s.startswith("stopping (received SIGTERM)") for s in states)
        assert not (tmp_path / "run" / "linkd-status.json").exists()
        assert os.environ.get("LINKD_TEST_KEYRING") is None  # the test process never used the file keyring


async def test_login_to_an_unreachable_gateway_fails_and_keeps_the_good_login(
    op: OperatorServer, tmp_path: Path
) -> None:
    env = subprocess_env(tmp_path)
    async with live_gateway(op.env()) as gw:
        token = await login(gw, env, "alice")
        before = keyring_data(tmp_path)
        login_file = tmp_path / "config" / "login.json"
        remembered = login_file.read_text()
        dead = f"http://127.0.0.1:{free_port()}"
        code, out, err = await linkd(env, "login", "--gateway", dead, stdin="another-token\n")
        assert code == 2, out + err
        assert "Logged in" not in out
        line = err.strip()
        assert line.startswith(f"linkd: error: could not check the token: gateway {dead} is unreachable")
        assert line.endswith(
            "nothing was stored (check the --gateway URL, or store the token unchecked with --no-verify)"
        )
        assert keyring_data(tmp_path) == before and before[f"{SERVICE_NAME}/{TOKEN_KEY}"] == token
        assert login_file.read_text() == remembered  # still the working gateway
        async with linkd_up(env) as daemon:  # and the good login still works
            await daemon.wait_state("online")
            daemon.proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(daemon.proc.wait(), TIMEOUT) == 0


async def test_insecure_file_store_is_given_once_at_login(op: OperatorServer, tmp_path: Path) -> None:
    # No OS keyring at all: the file store must be opted into, once.
    env = subprocess_env(tmp_path, PYTHON_KEYRING_BACKEND="keyring.backends.null.Keyring")
    async with live_gateway(op.env()) as gw:
        token = gw.token("carol")
        code, _, err = await linkd(env, "login", "--gateway", gw.url, stdin=token + "\n")
        assert code == 2 and "--insecure-file-store" in err
        code, _, err = await linkd(
            env, "login", "--gateway", gw.url, "--insecure-file-store", stdin=token + "\n"
        )
        assert code == 0, err
        assert (tmp_path / "config" / "secrets" / TOKEN_KEY).read_text().strip() == token
        async with linkd_up(env) as daemon:  # no flag: remembered from the login
            await daemon.wait_state("online")
            daemon.proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(daemon.proc.wait(), TIMEOUT) == 0
        # An explicit --no-insecure-file-store (or the variable, or the config file) still decides.
        code, _, err = await linkd(env, "up", "--no-insecure-file-store")
        assert code == 2 and "no OS keyring backend" in err
