"""linkd settings: flags > LINKD_* environment > config file > defaults; every mistake names its source."""

from __future__ import annotations

from pathlib import Path

import pytest

from linkd.config import DEFAULT_DRAIN_TIMEOUT, load_settings
from linkd.errors import LinkdError

FULL = """
gateway = "https://file.example.com/"
upstream = "http://127.0.0.1:3000"
drain_timeout = 7
status_file = "~/st.json"
json_logs = true
nats_transport = "websocket"

[runners]
mock = false
heartbeat_interval = 2.5
max_concurrent = 3
kill_grace = 1

[runners.http]
endpoint = "http://127.0.0.1:11434/api/generate"
timeout = 0

[runners.command.build]
argv = ["make", "build"]
cwd = "~/src"
input = "env"
timeout = 60
env = { A = "b" }

[runners.command.say]
command = "printf '%s' hello"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "linkd.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_file_or_env(tmp_path: Path) -> None:
    env = {"LINKD_CONFIG_DIR": str(tmp_path), "LINKD_RUNTIME_DIR": str(tmp_path / "run")}
    settings = load_settings({}, env)
    assert settings.gateway_url is None and settings.upstream_url is None
    assert settings.drain_timeout == DEFAULT_DRAIN_TIMEOUT
    assert settings.status_file == tmp_path / "run" / "linkd-status.json"
    assert settings.runners.mock is True and settings.runners.commands == {} and settings.runners.http is None
    assert settings.config_file is None


def test_every_file_field_is_read(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    settings = load_settings({}, {"HOME": str(tmp_path)}, config_path=path)
    assert settings.gateway_url == "https://file.example.com"
    assert settings.upstream_url == "http://127.0.0.1:3000"
    assert settings.drain_timeout == 7
    assert settings.status_file == Path("~/st.json").expanduser()
    assert settings.json_logs is True
    assert settings.nats_transport == "websocket"
    runners = settings.runners
    assert (runners.mock, runners.heartbeat_interval, runners.max_concurrent, runners.kill_grace) == (
        False,
        2.5,
        3,
        1,
    )
    assert runners.http is not None and runners.http.timeout is None
    build = runners.commands["build"]
    assert build.argv == ("make", "build") and build.input_mode == "env" and build.timeout == 60
    assert build.cwd == Path("~/src").expanduser() and dict(build.env) == {"A": "b"}
    assert runners.commands["say"].argv == ("printf", "%s", "hello")
    assert settings.config_file == path


def test_flags_beat_env_beat_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'gateway = "https://file.example.com"\ndrain_timeout = 7\n')
    env = {"LINKD_GATEWAY": "https://env.example.com", "LINKD_DRAIN_TIMEOUT": "8", "LINKD_CONFIG": str(path)}
    settings = load_settings({"gateway": None, "drain_timeout": None}, env)
    assert (settings.gateway_url, settings.drain_timeout) == ("https://env.example.com", 8)
    settings = load_settings({"gateway": "https://flag.example.com", "drain_timeout": 9.5}, env)
    assert (settings.gateway_url, settings.drain_timeout) == ("https://flag.example.com", 9.5)
    assert load_settings({}, {"LINKD_CONFIG": str(path)}).gateway_url == "https://file.example.com"


def test_runner_env_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    env = {
        "HOME": str(tmp_path),
        "LINKD_MOCK_RUNNERS": "yes",
        "LINKD_HEARTBEAT_INTERVAL": "0.5",
        "LINKD_MAX_RUNS": "2",
        "LINKD_HTTP_RUNNER_URL": "http://127.0.0.1:9/x",
    }
    runners = load_settings({}, env, config_path=path).runners
    assert runners.mock is True and runners.heartbeat_interval == 0.5 and runners.max_concurrent == 2
    assert runners.http is not None and runners.http.endpoint == "http://127.0.0.1:9/x"


@pytest.mark.parametrize(
    ("flags", "env", "text", "fragment"),
    [
        ({"gateway": "ftp://x"}, {}, "", "--gateway"),
        ({}, {"LINKD_GATEWAY": "not a url"}, "", "LINKD_GATEWAY"),
        ({}, {"LINKD_DRAIN_TIMEOUT": "soon"}, "", "LINKD_DRAIN_TIMEOUT: 'soon' is not a number"),
        ({"drain_timeout": -1}, {}, "", "--drain-timeout: -1 is out of range"),
        ({}, {"LINKD_JSON_LOGS": "maybe"}, "", "LINKD_JSON_LOGS"),
        ({}, {}, "gatway = 'https://x'\n", "unknown setting 'gatway'"),
        ({}, {}, "gateway = \n", "not valid TOML"),
        ({}, {}, "upstream = 'http://u:p@127.0.0.1:1'\n", "user name or password"),
        ({}, {}, "[runners]\nmocks = true\n", "unknown setting 'mocks'"),
        ({}, {}, "[runners.command.x]\nargv = []\n", "non-empty list"),
        ({}, {}, "[runners.command.x]\nargv = ['a']\ncommand = 'a'\n", "exactly one of argv"),
        ({}, {}, "[runners.command.x]\nargv = ['a']\ninput = 'argv'\n", 'input must be "stdin" or "env"'),
        ({}, {}, "[runners.command.x]\nargv = ['a']\nshell = true\n", "unknown setting 'shell'"),
        ({}, {}, "[runners.command.'a b']\nargv = ['a']\n", "template names"),
        ({}, {}, "[runners.http]\ntimeout = 3\n", "needs an endpoint"),
        ({"nats_transport": "carrier-pigeon"}, {}, "", "--nats-transport"),
    ],
)
def test_mistakes_name_their_source(
    tmp_path: Path, flags: dict[str, object], env: dict[str, str], text: str, fragment: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(LinkdError, match=None) as info:
        load_settings(flags, {"HOME": str(tmp_path), **env}, config_path=path)
    assert fragment in str(info.value)


def test_an_explicit_config_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(LinkdError, match="does not exist"):
        load_settings({}, {}, config_path=tmp_path / "missing.toml")
    with pytest.raises(LinkdError, match="does not exist"):
        load_settings({}, {"LINKD_CONFIG": str(tmp_path / "missing.toml")})
