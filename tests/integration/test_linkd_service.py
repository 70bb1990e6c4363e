"""``linkd service install|uninstall|status``: the generated unit/plist and the command sequence.

``systemctl`` and ``launchctl`` are replaced by tiny scripts on PATH that record their
arguments (and answer ``is-enabled``/``is-active``, or fail as a machine without a user bus
does). That is not mocking NATS: they are the platform's service managers, which a test
cannot drive (no user systemd in CI containers, no launchd on Linux). The unit itself is
checked by the real ``systemd-analyze verify --user`` where it is installed; the plist is
parsed back with ``plistlib``. HOME and XDG_CONFIG_HOME point into ``tmp_path``.
"""

from __future__ import annotations

import json
import os
import plistlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from linkd.cli import app
from linkd.service_cli import EXIT_MANAGER_FAILED, EXIT_MANAGER_UNAVAILABLE, EXIT_UNSUPPORTED
from linkd.service_unit import LAUNCHD_LABEL, linkd_program, systemd_quote
from linkd.status_file import write_status
from tests.linkd_support import REPO_ROOT
from tests.tls_certs import make_certs

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX shell scripts as fake tools")

UPSTREAM = "http://127.0.0.1:3000"
FAKE_TOOL = """#!/bin/sh
# A stand-in for {name}: records its arguments, answers like the real one ($FAKE_MODE).
echo "{name} $*" >> "$FAKE_LOG"
case "$FAKE_MODE" in
  nobus) echo "Failed to connect to bus: No medium found" >&2; exit 1 ;;
  fail) echo "Failed to enable unit: Access denied" >&2; exit 1 ;;
esac
case "$2" in
  is-enabled) echo enabled ;;
  is-active) echo active ;;
esac
case "$1" in
  print) echo "gui/1/{label} = {{"; echo "	state = running"; echo "}}" ;;
esac
exit 0
"""


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private HOME, config dirs and a PATH whose systemctl/launchctl are the recording fakes."""
    for name in list(os.environ):
        if name.startswith("LINKD_"):
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    home.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("systemctl", "launchctl"):
        script = bin_dir / tool
        script.write_text(FAKE_TOOL.format(name=tool, label=LAUNCHD_LABEL), encoding="utf-8")
        script.chmod(0o755)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / "xdg-config"))
    monkeypatch.setenv("LINKD_CONFIG_DIR", str(tmp_path / "linkd-config"))
    monkeypatch.setenv("LINKD_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("LINKCTL_STATE_DIR", str(tmp_path / "dev-stack"))
    monkeypatch.setenv("LINKD_TOKEN", "secret-token-never-in-a-unit")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "calls.log"))
    monkeypatch.setenv("FAKE_MODE", "ok")
    return home


def calls(tmp_path: Path) -> list[str]:
    log = tmp_path / "calls.log"
    return log.read_text(encoding="utf-8").splitlines() if log.exists() else []


def run(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


def unit_path(home: Path) -> Path:
    return home / "xdg-config" / "systemd" / "user" / "linkd.service"


def test_dry_run_prints_the_unit_and_commands_and_writes_nothing(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    make_certs(tmp_path / "certs")  # install reads the CA file, as `linkd up` does
    monkeypatch.setenv("LINKD_NATS_CA", "certs/ca.pem")  # a setting from the shell, made absolute
    monkeypatch.setenv("LINKD_RUN_ID", "r-1")  # not a setting: stays out
    result = run("service", "install", "--dry-run", "--upstream", UPSTREAM, "--", "--drain-timeout", "30")
    assert result.exit_code == 0, result.output
    program = linkd_program()[0]
    out = result.output
    assert f"Would write {unit_path(home)}:" in out
    assert f"ExecStart={program} up --upstream {UPSTREAM} --drain-timeout 30\n" in out
    assert "Restart=on-failure\n" in out and "WantedBy=default.target\n" in out
    assert "StandardOutput=journal\n" in out and "StandardError=journal\n" in out
    assert f"Environment=LINKD_CONFIG_DIR={tmp_path / 'linkd-config'}\n" in out
    assert (
        "Would run:\n  systemctl --user daemon-reload\n  systemctl --user enable --now linkd.service\n"
    ) in out
    assert f"Environment=LINKD_NATS_CA={tmp_path / 'certs' / 'ca.pem'}\n" in out
    assert "secret-token" not in out and "LINKD_TOKEN" not in out  # never a secret in the unit
    assert "LINKD_RUN_ID" not in out
    assert not unit_path(home).exists() and calls(tmp_path) == []


def test_install_status_uninstall_run_systemctl_in_order(home: Path, tmp_path: Path) -> None:
    result = run("service", "install", "--upstream", UPSTREAM, "--log-level", "warning")
    assert result.exit_code == 0, result.output
    unit = unit_path(home).read_text(encoding="utf-8")
    assert f"ExecStart={linkd_program()[0]} --log-level warning up --upstream {UPSTREAM}\n" in unit
    assert "secret-token" not in unit
    assert calls(tmp_path) == [
        "systemctl --user daemon-reload",
        "systemctl --user enable --now linkd.service",
    ]

    status = run("service", "status")
    assert status.exit_code == 0, status.output
    assert f"service:   installed ({unit_path(home)})" in status.output
    assert "enabled:   enabled\nactive:    active\n" in status.output
    assert "daemon:    not running (no status file at" in status.output
    assert calls(tmp_path)[2:] == [
        "systemctl --user is-enabled linkd.service",
        "systemctl --user is-active linkd.service",
    ]

    removed = run("service", "uninstall")
    assert removed.exit_code == 0, removed.output
    assert not unit_path(home).exists()
    assert calls(tmp_path)[4:] == [
        "systemctl --user disable --now linkd.service",
        "systemctl --user daemon-reload",
    ]
    after = run("service", "status", "--json")
    assert after.exit_code == 1
    assert '"installed": false' in after.output


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_generated_unit_passes_systemd_analyze_verify(home: Path, tmp_path: Path) -> None:
    """Odd characters (space, %, $, quotes) in an argument survive systemd's quoting rules."""
    events = tmp_path / "odd dir" / 'ev%s $HOME "q".jsonl'
    result = run("service", "install", "--upstream", UPSTREAM, "--", "--events-file", str(events))
    assert result.exit_code == 0, result.output
    runtime = tmp_path / "xdg-runtime"
    runtime.mkdir(mode=0o700)
    verify = subprocess.run(
        ["systemd-analyze", "verify", "--user", str(unit_path(home))],
        capture_output=True,
        text=True,
        env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)},
        timeout=60,
        check=False,
    )
    assert verify.returncode == 0, verify.stderr
    assert verify.stderr.strip() == "", verify.stderr  # warnings (unknown keys, bad values) too


def test_systemd_quote() -> None:
    assert systemd_quote("http://127.0.0.1:3000") == "http://127.0.0.1:3000"
    assert systemd_quote("a b") == '"a b"'
    assert systemd_quote("100%") == '"100%%"'
    assert systemd_quote("$HOME") == '"$$HOME"'
    assert systemd_quote('say "hi" \\') == '"say \\"hi\\" \\\\"'
    with pytest.raises(ValueError):
        systemd_quote("two\nlines")


def test_no_systemctl_leaves_the_unit_and_names_the_command(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    result = run("service", "install")
    assert result.exit_code == EXIT_MANAGER_UNAVAILABLE
    assert unit_path(home).exists()
    line = result.stderr.strip()
    assert "\n" not in line
    assert line.startswith("linkd: error: systemctl not found")
    assert "systemctl --user daemon-reload && systemctl --user enable --now linkd.service" in line


def test_user_bus_unreachable_is_its_own_status(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_MODE", "nobus")
    result = run("service", "install")
    assert result.exit_code == EXIT_MANAGER_UNAVAILABLE
    assert "cannot reach the user's service manager (Failed to connect to bus" in result.stderr
    assert "in a login session, run: systemctl --user daemon-reload" in result.stderr
    assert unit_path(home).exists()
    status = run("service", "status")
    assert status.exit_code == 1 and "active:    unknown (the user's service manager is unreachable)" in (
        status.output
    )


def test_a_failing_systemctl_is_one_line(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_MODE", "fail")
    result = run("service", "install")
    assert result.exit_code == EXIT_MANAGER_FAILED
    assert result.stderr == (
        "linkd: error: `systemctl --user daemon-reload` failed (status 1): "
        "Failed to enable unit: Access denied\n"
    )


def test_launchd_plist_parses_with_the_keys(home: Path, tmp_path: Path) -> None:
    result = run("service", "install", "--platform", "macos", "--upstream", UPSTREAM)
    assert result.exit_code == 0, result.output
    path = home / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist"
    with path.open("rb") as f:
        doc = plistlib.load(f)
    assert doc["Label"] == LAUNCHD_LABEL
    assert doc["ProgramArguments"] == [*linkd_program(), "up", "--upstream", UPSTREAM]
    assert doc["RunAtLoad"] is True
    assert doc["KeepAlive"] == {"SuccessfulExit": False}
    logs = home / "Library" / "Logs" / "linkd"
    assert doc["StandardOutPath"] == str(logs / "linkd.out.log")
    assert doc["StandardErrorPath"] == str(logs / "linkd.err.log")
    assert logs.is_dir()
    assert doc["EnvironmentVariables"]["LINKD_CONFIG_DIR"] == str(tmp_path / "linkd-config")
    assert "LINKD_TOKEN" not in doc["EnvironmentVariables"]
    uid = os.getuid()
    assert calls(tmp_path) == [
        f"launchctl bootout gui/{uid}/{LAUNCHD_LABEL}",
        f"launchctl bootstrap gui/{uid} {path}",
    ]
    status = run("service", "status", "--platform", "macos")
    assert status.exit_code == 0 and "enabled:   loaded\nactive:    active\n" in status.output
    removed = run("service", "uninstall", "--platform", "macos")
    assert removed.exit_code == 0 and not path.exists()
    assert calls(tmp_path)[-1] == f"launchctl bootout gui/{uid}/{LAUNCHD_LABEL}"


def test_windows_and_secrets_are_refused(home: Path) -> None:
    windows = run("service", "install", "--platform", "windows")
    assert windows.exit_code == EXIT_UNSUPPORTED
    assert windows.stderr.startswith("linkd: error: linkd service is not supported on Windows yet")
    secret = run("service", "install", "--dry-run", "--", "--gateway-token=abc")
    assert secret.exit_code == 2
    assert "--gateway-token would put a secret into the service file" in secret.stderr
    assert "abc" not in secret.output
    bad_url = run("service", "install", "--dry-run", "--upstream", "ftp://x")
    assert bad_url.exit_code == 2 and "must be an http:// or https:// URL" in bad_url.stderr


def test_the_real_command_prints_one_line_and_no_traceback(home: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    env = {**os.environ, "PATH": str(empty), "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "linkd.cli", "service", "install"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.returncode == EXIT_MANAGER_UNAVAILABLE, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert unit_path(home).exists()


def test_status_shows_the_daemons_status_file(home: Path, tmp_path: Path) -> None:
    assert run("service", "install").exit_code == 0
    write_status(
        tmp_path / "run" / "linkd-status.json",
        {"pid": os.getpid(), "version": "9.9", "state": "online", "message": "online as alice-x1"},
    )
    result = run("service", "status")
    assert result.exit_code == 0, result.output
    running = f"linkd is running (pid {os.getpid()}, version 9.9)\n  state:       online as alice-x1"
    assert running in result.output
    doc = json.loads(run("service", "status", "--json").output)
    assert doc["installed"] is True and doc["enabled"] == "enabled" and doc["active"] == "active"
    assert doc["daemon"]["running"] is True and doc["daemon"]["state"] == "online"
    assert doc["file"] == str(unit_path(home))


def test_uninstall_without_systemctl_keeps_the_unit_and_names_every_step(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run("service", "install").exit_code == 0
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    result = run("service", "uninstall")
    assert result.exit_code == EXIT_MANAGER_UNAVAILABLE
    assert unit_path(home).exists()  # a service that may still run keeps its file
    assert result.stderr == (
        f"linkd: error: systemctl not found; the file is {unit_path(home)}: run by hand: "
        f"systemctl --user disable --now linkd.service && rm -f {unit_path(home)} && "
        "systemctl --user daemon-reload\n"
    )


def test_tls_settings_are_checked_and_passed_on_as_absolute_paths(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    certs = make_certs(tmp_path / "tls")
    monkeypatch.chdir(tmp_path)
    result = run("service", "install", "--dry-run", "--nats-ca", "tls/ca.pem")
    assert result.exit_code == 0, result.output
    assert f"ExecStart={linkd_program()[0]} up --nats-ca {certs.ca}\n" in result.output
    missing = run("service", "install", "--dry-run", "--nats-ca", "nowhere.pem")
    assert missing.exit_code == 2
    assert missing.stderr.startswith("linkd: error: cannot read the TLS CA file nowhere.pem")


def test_an_unwritable_unit_directory_is_one_line(home: Path) -> None:
    blocker = home / "xdg-config"
    blocker.write_text("a file where a directory should be", encoding="utf-8")
    result = run("service", "install")
    assert result.exit_code == 2
    assert result.stderr.startswith(f"linkd: error: cannot write {blocker}")
    assert result.stderr.count("\n") == 1
