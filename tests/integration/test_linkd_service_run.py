"""The command a ``linkd service install`` unit starts really serves: its ``ExecStart`` and
``Environment=`` lines, run the way systemd would run them (a clean environment, the home
directory as working directory), bring ``linkd up`` online against a real gateway and a real
operator-mode nats-server, and SIGTERM (``systemctl stop``) ends it with status 0, which
``Restart=on-failure`` leaves stopped.

``systemctl`` itself is a recording stand-in on PATH (a test cannot drive the user's systemd);
the keyring is the file-backed test keyring, named by the only variables the test adds to the
unit's environment (PYTHON_KEYRING_BACKEND, LINKD_TEST_KEYRING, PYTHONPATH).
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from linkd.cli import app
from linkd.credentials_store import SERVICE_NAME, TOKEN_KEY
from linkd.login_state import write_login
from linkd.status_file import read_status
from tests.helpers import NatsServerFactory, wait_until
from tests.integration.gateway_harness import start_operator_server
from tests.integration.linkd_harness import live_gateway
from tests.linkd_support import REPO_ROOT

pytestmark = [pytest.mark.timeout(90), pytest.mark.skipif(sys.platform == "win32", reason="POSIX")]

TIMEOUT = 30.0


def unit_command(unit: str) -> tuple[list[str], dict[str, str]]:
    """(ExecStart's argv, the Environment= variables) of a unit: its quoting is shell-compatible
    for what install writes (double quotes, backslash escapes; %% and $$ doubled)."""
    argv: list[str] = []
    env: dict[str, str] = {}
    for line in unit.splitlines():
        key, _, value = line.partition("=")
        value = value.replace("%%", "%").replace("$$", "$")
        if key == "ExecStart":
            argv = shlex.split(value)
        elif key == "Environment":
            name, _, setting = shlex.split(value)[0].partition("=")
            env[name] = setting
    return argv, env


async def test_the_installed_command_goes_online_and_stops_cleanly(
    nats_server_factory: NatsServerFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        if name.startswith("LINKD_"):
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    home.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "systemctl").write_text('#!/bin/sh\necho "systemctl $*" >> "$FAKE_LOG"\n', encoding="utf-8")
    (bin_dir / "systemctl").chmod(0o755)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("LINKD_CONFIG_DIR", str(tmp_path / "linkd-config"))
    monkeypatch.setenv("LINKD_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "calls.log"))

    op = start_operator_server(nats_server_factory, tmp_path)
    async with live_gateway(op.env()) as gw:
        # What `linkd login` leaves: the URL remembered, the token in the (test) keyring.
        write_login(gw.url)
        keyring_file = tmp_path / "keyring.json"
        keyring_file.write_text(
            json.dumps({f"{SERVICE_NAME}/{TOKEN_KEY}": gw.token("alice")}), encoding="utf-8"
        )

        result = CliRunner().invoke(app, ["service", "install", "--", "--drain-timeout", "2"])
        assert result.exit_code == 0, result.output
        unit = (home / ".config" / "systemd" / "user" / "linkd.service").read_text(encoding="utf-8")
        argv, unit_env = unit_command(unit)
        assert argv[1:] == ["up", "--drain-timeout", "2"]
        assert unit_env["LINKD_CONFIG_DIR"] == str(tmp_path / "linkd-config")

        env = {
            "PATH": "/usr/bin:/bin",  # what a systemd user manager gives a service
            "HOME": str(home),
            **unit_env,
            "PYTHON_KEYRING_BACKEND": "tests.linkd_support.FileKeyring",
            "LINKD_TEST_KEYRING": str(keyring_file),
            "PYTHONPATH": str(REPO_ROOT),
        }
        proc = await asyncio.create_subprocess_exec(
            *argv,
            env=env,
            cwd=home,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        status_file = tmp_path / "run" / "linkd-status.json"
        try:
            await wait_until(
                lambda: (
                    (read_status(status_file) or {}).get("state") == "online" or proc.returncode is not None
                ),
                TIMEOUT,
                message=lambda: f"never online: {read_status(status_file)}",
            )
            assert proc.returncode is None, "linkd exited before it went online"
            assert (read_status(status_file) or {}).get("gateway") == gw.url
            proc.send_signal(signal.SIGTERM)  # systemctl --user stop linkd
            assert await asyncio.wait_for(proc.wait(), TIMEOUT) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            assert proc.stderr is not None
            log = (await proc.stderr.read()).decode(errors="replace")
        assert "online" in log, log
