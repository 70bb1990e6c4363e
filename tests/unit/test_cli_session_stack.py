"""linkctl session helpers (masking, relative times) and the dev stack's pure parts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli.common import CliError
from cli.dev import stack_options
from cli.session import MASK, mask, masked_session, relative
from cli.stack import Keys, default_state_dir


def test_secrets_are_masked_and_the_jwt_is_kept() -> None:
    session = {
        "credentials": {"jwt": "eyJ.jwt", "creds": "-----BEGIN NATS USER JWT----- SUSEED"},
        "token": "s3cret",
        "tunnelHostname": "h",
    }
    shown = masked_session(session)
    assert shown["credentials"]["jwt"] == "eyJ.jwt"
    assert shown["credentials"]["creds"].startswith(MASK) and "SUSEED" not in json.dumps(shown)
    assert shown["token"] == mask("s3cret") and "s3cret" not in json.dumps(shown)
    assert session["token"] == "s3cret"  # the original is untouched


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (3599, "in 59 min 59 s"),
        (-62, "1 min 2 s ago"),
        (7200 + 60, "in 2 h 1 min"),
        (90000, "in 1 d 1 h"),
        (0, "in 0 s"),
    ],
)
def test_relative_times(seconds: float, text: str) -> None:
    assert relative(seconds) == text


def test_state_dir_precedence(tmp_path: Path) -> None:
    assert default_state_dir({"LINKCTL_STATE_DIR": str(tmp_path)}) == tmp_path
    assert default_state_dir({"XDG_DATA_HOME": "/data"}) == Path("/data/natslink/linkctl-dev")
    assert default_state_dir({"XDG_DATA_HOME": "relative"}).parts[-3:] == ("share", "natslink", "linkctl-dev")


def test_keys_are_created_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    first = Keys.load_or_create(path)
    assert path.stat().st_mode & 0o777 == 0o600
    again = Keys.load_or_create(path)
    assert again.jwt_secret == first.jwt_secret
    assert again.setup.operator_jwt == first.setup.operator_jwt
    assert again.setup.account_signing.seed == first.setup.account_signing.seed


def test_corrupt_keys_are_replaced(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text("{not json")
    keys = Keys.load_or_create(path)
    assert len(keys.jwt_secret) == 64 and json.loads(path.read_text())["jwt_secret"] == keys.jwt_secret


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"nats_port": 70000}, "--nats-port"),
        ({"gateway_port": -1}, "--gateway-port"),
        ({"ready_timeout": 0}, "--ready-timeout"),
        ({"user": " "}, "--user"),
    ],
)
def test_dev_options_are_checked(tmp_path: Path, kwargs: dict[str, object], fragment: str) -> None:
    args: dict[str, object] = {
        "state_dir": tmp_path,
        "user": "u",
        "nats_port": 0,
        "websocket_port": 0,
        "gateway_port": 0,
        "ready_timeout": 5.0,
    }
    args.update(kwargs)
    with pytest.raises(CliError, match=fragment):
        stack_options(**args)  # type: ignore[arg-type]


def test_children_get_no_foreign_settings_and_bypass_proxies_for_loopback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cli.stack import child_env

    monkeypatch.setenv("LINKD_TOKEN", "someone-elses")
    monkeypatch.setenv("NATS_URL", "nats://prod:4222")
    monkeypatch.setenv("NO_PROXY", "corp.example")
    monkeypatch.setenv("HOME", "/home/me")
    env = child_env({"NATS_URL": "nats://127.0.0.1:1"})
    assert "LINKD_TOKEN" not in env and env["NATS_URL"] == "nats://127.0.0.1:1"
    assert env["NO_PROXY"].split(",") == ["corp.example", "127.0.0.1", "localhost", "::1"]
    assert env["HOME"] == "/home/me"
