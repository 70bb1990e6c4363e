"""``linkd`` CLI without a network: login/logout against an in-memory keyring, status, user mistakes."""

from __future__ import annotations

import io
import json
import os
import stat
from pathlib import Path

import keyring
import keyring.backends.fail
import pytest

from linkd.cli import main
from linkd.credentials_store import SEED_KEY, SERVICE_NAME, TOKEN_KEY
from linkd.status_file import write_status
from tests.linkd_support import MemoryKeyring, isolated_env

__all__ = ["isolated_env"]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(list(argv))
    out, err = capsys.readouterr()
    code = info.value.code
    return (code if isinstance(code, int) else 0), out, err


def test_login_from_stdin_then_logout(
    isolated_env: MemoryKeyring,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("tok-123\n"))
    code, out, err = run(capsys, "login", "--gateway", "http://gw.example:8080/", "--no-verify")
    assert code == 0, err
    assert "Logged in to http://gw.example:8080" in out and "tok-123" not in out + err
    assert isolated_env.data[(SERVICE_NAME, TOKEN_KEY)] == "tok-123"
    assert isolated_env.data[(SERVICE_NAME, SEED_KEY)].startswith("SU")
    login = json.loads((tmp_path / "config" / "login.json").read_text())
    assert login == {"gateway": "http://gw.example:8080"}

    code, out, _ = run(capsys, "logout")
    assert code == 0 and "removed the gateway token" in out
    assert (SERVICE_NAME, TOKEN_KEY) not in isolated_env.data
    assert (SERVICE_NAME, SEED_KEY) in isolated_env.data  # the desktop keeps its identity
    assert not (tmp_path / "config" / "login.json").exists()
    code, out, _ = run(capsys, "logout", "--forget-key")
    assert code == 0 and "Not logged in" in out
    assert (SERVICE_NAME, SEED_KEY) not in isolated_env.data


def test_login_with_token_flag_and_mistakes(
    isolated_env: MemoryKeyring, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "login", "--gateway-token", "abc", "--no-verify")
    assert (
        code == 2 and err.strip() == "linkd: error: which gateway? pass --gateway URL (or set LINKD_GATEWAY)"
    )
    code, _, err = run(capsys, "login", "--gateway", "gw.example", "--gateway-token", "abc")
    assert code == 2 and err.count("\n") == 1 and "--gateway" in err and "Traceback" not in err
    code, _, err = run(capsys, "login", "--gateway", "http://gw", "--gateway-token", "a b", "--no-verify")
    assert code == 2 and "must not contain spaces" in err
    code, _, err = run(capsys, "login", "--gateway", "http://gw", "--tokn", "abc")
    assert code == 2 and err.count("\n") == 1 and "No such option: --tokn" in err
    code, _, _ = run(capsys, "login", "--gateway", "http://gw", "--gateway-token", "abc", "--no-verify")
    assert code == 0 and isolated_env.data[(SERVICE_NAME, TOKEN_KEY)] == "abc"


def test_no_keyring_is_one_clear_line_and_the_file_store_is_opt_in(
    isolated_env: MemoryKeyring, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    keyring.set_keyring(keyring.backends.fail.Keyring())
    code, _, err = run(capsys, "login", "--gateway", "http://gw", "--gateway-token", "abc", "--no-verify")
    assert code == 2 and err.count("\n") == 1
    assert "no OS keyring backend" in err and "--insecure-file-store" in err
    code, _, err = run(
        capsys, "login", "--gateway", "http://gw", "--token", "abc", "--no-verify", "--insecure-file-store"
    )
    assert code == 0, err
    token_file = tmp_path / "config" / "secrets" / TOKEN_KEY
    assert token_file.read_text().strip() == "abc"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert "plain files" in err
    code, _, _ = run(capsys, "logout")  # the file store exists: found without the flag
    assert code == 0 and not token_file.exists()


def test_up_without_login_is_a_clear_error(
    isolated_env: MemoryKeyring, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "up")
    assert (
        code == 2
        and err.strip()
        == "linkd: error: no gateway: run 'linkd login --gateway URL' first (or pass --gateway)"
    )
    code, _, err = run(capsys, "up", "--gateway", "http://gw.example")
    assert code == 2 and "not logged in: run 'linkd login --gateway http://gw.example'" in err
    code, _, err = run(capsys, "up", "--gateway", "http://gw.example", "--drain-timeout", "-3")
    assert code == 2 and "--drain-timeout" in err


def test_status_not_running_stale_and_running(
    isolated_env: MemoryKeyring, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "run" / "linkd-status.json"
    code, out, _ = run(capsys, "status")
    assert code == 1 and "not running (no status file" in out
    write_status(path, {"pid": 2**22 + 12345, "state": "online", "message": "online as x"})
    code, out, _ = run(capsys, "status")
    assert code == 1 and "stale status file" in out
    doc = {
        "pid": os.getpid(),
        "version": "1.0",
        "state": "online",
        "message": "online as alice-abc",
        "since": "2030-01-01T00:00:00Z",
        "tunnelHostname": "alice-abc",
        "gateway": "http://gw",
        "natsUrl": "nats://127.0.0.1:4222",
        "credentialsExpireAt": "2030-01-01T01:00:00Z",
        "credentialRefreshes": 2,
        "inFlightRequests": 1,
        "runs": [{"runId": "r1", "runner": "mock", "status": "running", "events": 5}],
    }
    write_status(path, doc)
    code, out, _ = run(capsys, "status")
    assert code == 0
    for fragment in (
        "linkd is running",
        "online as alice-abc",
        "alice-abc",
        "2030-01-01T01:00:00Z",
        "run r1 (mock)",
    ):
        assert fragment in out
    code, out, _ = run(capsys, "status", "--json")
    assert (
        code == 0 and json.loads(out)["running"] is True and json.loads(out)["tunnelHostname"] == "alice-abc"
    )


def test_help_has_examples_everywhere(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ([], ["login"], ["logout"], ["up"], ["status"]):
        code, out, _ = run(capsys, *command, "--help")
        assert code == 0 and "linkd" in out
        assert "Examples:" in out or "Quick start:" in out, command
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith("linkd ")


def test_the_config_file_accepts_insecure_file_store_and_login_remembers_it(
    isolated_env: MemoryKeyring,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    keyring.set_keyring(keyring.backends.fail.Keyring())
    config = tmp_path / "linkd.toml"
    config.write_text("insecure_file_store = true\n", encoding="utf-8")
    monkeypatch.setenv("LINKD_CONFIG", str(config))
    code, _, err = run(capsys, "login", "--gateway", "http://gw", "--gateway-token", "abc", "--no-verify")
    assert code == 0, err
    assert (tmp_path / "config" / "secrets" / TOKEN_KEY).read_text().strip() == "abc"
    login = json.loads((tmp_path / "config" / "login.json").read_text())
    assert login == {"gateway": "http://gw", "secretStore": "file"}  # `linkd up` uses it without the flag
    config.write_text('insecure_file_store = "maybe"\n', encoding="utf-8")
    code, _, err = run(capsys, "login", "--gateway", "http://gw", "--gateway-token", "abc", "--no-verify")
    assert code == 2 and "insecure_file_store: 'maybe' is not a boolean" in err


@pytest.mark.parametrize(
    "environ",
    [
        {"HOME": "/home/u"},
        {"HOME": "/home/u", "XDG_DATA_HOME": "/data"},
        {"HOME": "/home/u", "XDG_DATA_HOME": "relative/ignored"},
        {"HOME": "/home/u", "LINKCTL_STATE_DIR": "/srv/stack"},
    ],
)
def test_linkd_looks_for_the_dev_stack_where_linkctl_dev_puts_it(
    environ: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from cli.stack import default_state_dir
    from linkd.config import dev_stack_status_file

    monkeypatch.setenv("HOME", environ["HOME"])
    assert dev_stack_status_file(environ) == default_state_dir(environ) / "linkd" / "linkd-status.json"


def test_linkd_status_finds_the_dev_stacks_daemon(
    isolated_env: MemoryKeyring, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    stack = tmp_path / "dev-stack"  # LINKCTL_STATE_DIR of isolated_env
    doc = {"pid": os.getpid(), "version": "1.0", "state": "online", "message": "online as dev-abc"}
    write_status(stack / "linkd" / "linkd-status.json", doc)
    code, out, _ = run(capsys, "status")
    assert code == 0, out
    assert out.splitlines()[:2] == [
        f"linkd is running (pid {os.getpid()}, version 1.0)",
        f"  stack:       the `linkctl dev` stack in {stack}",
    ]
    code, out, _ = run(capsys, "status", "--json")
    assert code == 0 and json.loads(out)["devStack"] == str(stack)
    assert json.loads(out)["statusFile"] == str(stack / "linkd" / "linkd-status.json")
    # Told where to look: only there.
    code, out, _ = run(capsys, "status", "--status-file", str(tmp_path / "elsewhere.json"))
    assert code == 1 and "not running" in out
