"""``linkctl``, ``linkd`` and ``studio-gateway`` as one family: the same help, version, completion,
placeholder and log-level conventions on every command (no server needed)."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest
import typer
from typer.main import get_command
from typer.testing import CliRunner

from cli.main import app as linkctl_app
from linkd.cli import app as linkd_app
from studio_gateway.cli import app as gateway_app

APPS: dict[str, typer.Typer] = {"linkctl": linkctl_app, "linkd": linkd_app, "studio-gateway": gateway_app}
LEVELS = ("debug", "info", "warning", "error")
# A placeholder names what to give, in upper case (URL, FILE, SECONDS, JWT|FILE, [SECONDS],
# [HOST:]PORT, 'NAME: VALUE', @FILE|@-|TEXT), never typer's lower-case type (<str>, <int range>).
PLACEHOLDER = re.compile(r"[A-Z0-9_\[\]|@:.,' -]*[A-Z][A-Z0-9_\[\]|@:.,' -]*")


def _paths(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _paths(sub, (*path, name))


def every_command() -> list[tuple[str, tuple[str, ...], Any]]:
    return [(name, path, cmd) for name, app in APPS.items() for path, cmd in _paths(get_command(app))]


def invoke(name: str, *args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(APPS[name], list(args), prog_name=name, env=env)


@pytest.mark.parametrize(
    ("name", "path"),
    [(name, path) for name, path, _ in every_command()],
    ids=[" ".join((name, *path)) for name, path, _ in every_command()],
)
def test_every_command_of_all_three_answers_dash_h_and_dash_dash_help(
    name: str, path: tuple[str, ...]
) -> None:
    for flag in ("-h", "--help"):
        result = invoke(name, *path, flag)
        assert result.exit_code == 0, result.output
        assert result.stdout.startswith(f"Usage: {' '.join((name, *path))}"), result.stdout[:200]
        assert not re.search(r"<[a-z]+>", result.stdout), f"a typer-style placeholder in {name} {path}"


@pytest.mark.parametrize("name", APPS)
def test_all_three_print_their_version(name: str) -> None:
    result = invoke(name, "--version")
    assert result.exit_code == 0, result.output
    assert re.fullmatch(rf"{name} \d+\.\d+\.\d+\S*\n", result.stdout), result.stdout


def test_every_option_that_takes_a_value_shows_an_upper_case_placeholder() -> None:
    wrong = []
    for name, path, command in every_command():
        for param in command.params:
            if param.param_type_name != "option" or param.is_flag or param.hidden:
                continue
            if param.metavar is None or not PLACEHOLDER.fullmatch(param.metavar):
                wrong.append(f"{name} {' '.join(path)} {param.opts[0]}: {param.metavar!r}")
        for param in command.params:
            if param.param_type_name == "argument" and not PLACEHOLDER.fullmatch(param.metavar or ""):
                wrong.append(f"{name} {' '.join(path)} argument {param.name}: {param.metavar!r}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize(
    ("name", "line", "expected"),
    [
        ("linkctl", "linkctl ru", "runs"),
        ("linkctl", "linkctl runs se", "send"),
        ("linkd", "linkd u", "up"),
        ("studio-gateway", "studio-gateway se", "serve"),
    ],
)
def test_shell_completion_is_on_for_all_three(name: str, line: str, expected: str) -> None:
    var = "_" + name.upper().replace("-", "_") + "_COMPLETE"
    words = line.split(" ")
    env = {var: "complete_bash", "COMP_WORDS": line, "COMP_CWORD": str(len(words) - 1)}
    result = invoke(name, env=env)
    assert result.exit_code == 0, result.output
    assert expected in result.stdout.split()
    assert "--install-completion" in invoke(name, "--help").stdout


@pytest.mark.parametrize(
    ("name", "then"),
    [
        ("linkctl", ("session", "--help")),
        ("linkd", ("status", "--help")),
        ("studio-gateway", ("serve", "--help")),
    ],
)
def test_log_level_is_one_flag_with_the_same_levels_before_the_command(
    name: str, then: tuple[str, ...]
) -> None:
    for level in (*LEVELS, "WARNING"):
        result = invoke(name, "--log-level", level, *then)
        assert result.exit_code == 0, result.output
    bad = invoke(name, "--log-level", "loud", *then)
    assert bad.exit_code == 2
    assert "'loud' is not one of debug, info, warning, error" in bad.output
    assert "--log-level LEVEL" in invoke(name, "--help").stdout


@pytest.mark.parametrize(("name", "command"), [("linkd", "up"), ("studio-gateway", "serve")])
def test_the_long_running_commands_also_take_log_level_after_the_command(name: str, command: str) -> None:
    help_text = invoke(name, command, "--help").stdout
    assert "--log-level LEVEL" in help_text
    bad = invoke(name, command, "--log-level", "loud")
    assert bad.exit_code == 2 and "is not one of debug, info, warning, error" in bad.output


def test_the_old_log_flags_stay_as_aliases() -> None:
    assert "Same as --log-level debug" in invoke("linkctl", "--help").stdout
    assert "-v, --verbose" in invoke("linkd", "up", "--help").stdout


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    named = {n: logging.getLogger(n).level for n in ("tunnel", "tunnel.connect", "nats", "httpx", "asyncio")}
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        for n, lvl in named.items():
            logging.getLogger(n).setLevel(lvl)


@pytest.mark.usefixtures("restore_logging")
def test_linkd_log_levels_choose_what_is_written() -> None:
    import io
    import json

    from linkd.logs import STATE_LOGGER, configure_logging

    def lines(level: str) -> list[dict[str, Any]]:
        out = io.StringIO()
        configure_logging(json_logs=True, level=level, stream=out)
        logging.getLogger("tunnel.session").debug("library detail")
        logging.getLogger(STATE_LOGGER).info("online as desk")
        logging.getLogger("linkd").warning("something to look at")
        logging.getLogger("linkd").error("something broke")
        return [json.loads(line) for line in out.getvalue().splitlines()]

    assert [r["message"] for r in lines("debug")] == [
        "library detail",
        "online as desk",
        "something to look at",
        "something broke",
    ]
    assert [r["level"] for r in lines("info")] == ["info", "warning", "error"]
    assert [r["level"] for r in lines("warning")] == ["warning", "error"]
    assert [r["level"] for r in lines("error")] == ["error"]
    record = lines("error")[0]
    assert list(record)[:4] == ["ts", "level", "logger", "message"] and record["ts"].endswith("Z")


@pytest.mark.parametrize(
    ("name", "module"), [("linkctl", "cli"), ("linkd", "linkd.cli"), ("studio-gateway", "studio_gateway")]
)
def test_the_entry_points_name_themselves_in_help_and_version(name: str, module: str) -> None:
    import subprocess
    import sys

    for flag, expected in (("-h", f"Usage: {name} [OPTIONS] COMMAND"), ("--version", f"{name} ")):
        proc = subprocess.run(
            [sys.executable, "-m", module, flag], capture_output=True, text=True, timeout=60, check=False
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith(expected), proc.stdout[:100]
