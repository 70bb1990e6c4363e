"""``linkctl`` without a server: help texts, argument parsing, exit-status table, colour rules."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from typer.testing import CliRunner

import tunnel
from cli import exitcodes
from cli.common import CliError, NatsOptions, TunnelFailure, check_host
from cli.fetch import parse_header
from cli.forward import parse_listen
from cli.main import app
from cli.status import _default_watch
from cli.term import Painter, color_enabled, human_bytes


@pytest.mark.parametrize("command", [[], ["fetch"], ["status"], ["forward"]])
def test_every_command_has_help_with_examples(command: list[str]) -> None:
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Examples:" in result.stdout
    assert "Usage: linkctl" in result.stdout or "Usage: root" in result.stdout


def test_no_arguments_shows_help_not_a_traceback() -> None:
    result = CliRunner().invoke(app, [])
    assert result.exit_code == 2
    assert "Commands:" in result.output
    assert len(result.output.splitlines()) > 10  # the help as it is, not squashed into a line
    assert "linkctl: error" not in result.output
    assert "Traceback" not in result.output


def test_unknown_command_is_one_line_exit_2() -> None:
    result = CliRunner().invoke(app, ["fetchh"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("linkctl: error: "), result.stderr


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Accept: text/html", ("Accept", "text/html")),
        ("X-Empty:", ("X-Empty", "")),
        ("X-Colon: a:b:c", ("X-Colon", "a:b:c")),
        ("  X-Space  :   v  ", ("X-Space", "v")),
    ],
)
def test_parse_header(raw: str, expected: tuple[str, str]) -> None:
    assert parse_header(raw) == expected


@pytest.mark.parametrize("raw", ["no colon", ": value", "bad name: v", "X-A: a\x00b"])
def test_parse_header_rejects(raw: str) -> None:
    with pytest.raises(CliError):
        parse_header(raw)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("8080", ("127.0.0.1", 8080)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("0.0.0.0:80", ("0.0.0.0", 80)),
        ("localhost:9000", ("localhost", 9000)),
        ("[::1]:8080", ("::1", 8080)),
    ],
)
def test_parse_listen(raw: str, expected: tuple[str, int]) -> None:
    assert parse_listen(raw) == expected


@pytest.mark.parametrize("raw", ["", "host", ":80", "h:port", "h:70000", "[::1]8080"])
def test_parse_listen_rejects(raw: str) -> None:
    with pytest.raises(CliError):
        parse_listen(raw)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["h", "--watch"], ["h", "--watch=2"]),
        (["--watch", "h"], ["--watch=2", "h"]),
        (["h", "--watch", "5"], ["h", "--watch", "5"]),
        (["h", "-w", "0.5", "--json"], ["h", "-w", "0.5", "--json"]),
        (["h", "-w", "--json"], ["h", "--watch=2", "--json"]),
        (["h", "--watch=7"], ["h", "--watch=7"]),
        (["--", "--watch"], ["--", "--watch"]),
    ],
)
def test_watch_takes_an_optional_value(args: list[str], expected: list[str]) -> None:
    assert _default_watch(args, ("--watch", "-w")) == expected


def test_every_tunnel_code_has_its_own_exit_status() -> None:
    codes = [value for name, value in vars(tunnel.ErrorCode).items() if name.isupper()]
    statuses = [exitcodes.for_tunnel_code(code) for code in codes if code != tunnel.ErrorCode.BAD_REQUEST]
    assert len(set(statuses)) == len(statuses)
    reserved = {exitcodes.OK, exitcodes.OFFLINE, exitcodes.USAGE, exitcodes.HTTP_ERROR, exitcodes.WRITE_ERROR}
    reserved |= {
        exitcodes.UNKNOWN_TUNNEL_ERROR,
        exitcodes.INTERRUPTED,
        *range(3, 10),
    }  # gateway/stack commands
    assert not reserved & set(statuses)
    assert exitcodes.for_tunnel_code("tunnel_from_the_future") == exitcodes.UNKNOWN_TUNNEL_ERROR
    assert exitcodes.for_tunnel_code(tunnel.ErrorCode.BAD_REQUEST) == exitcodes.USAGE


def test_tunnel_failure_line_names_the_code_and_host() -> None:
    failure = TunnelFailure(tunnel.TunnelUnreachable("no server for the host"), "desk.example")
    assert failure.line() == "linkctl: tunnel_unreachable: no server for the host (tunnel://desk.example)"
    assert failure.exit_code == 10
    assert TunnelFailure(tunnel.LocalProtocolError("bad header")).exit_code == exitcodes.USAGE


def test_nats_options_validation(tmp_path: Path) -> None:
    options = NatsOptions.from_flags("127.0.0.1:4222, tls://a.example", None, None)
    assert options.urls == ("nats://127.0.0.1:4222", "tls://a.example")
    creds = tmp_path / "user.creds"
    creds.write_text("x")
    with pytest.raises(CliError, match="not both"):
        NatsOptions.from_flags("nats://h", creds, "tok", tunnel.DEFAULT_PREFIX)
    with pytest.raises(CliError, match="not a file"):
        NatsOptions.from_flags("nats://h", tmp_path / "missing.creds", None)
    for bad in ("http://h:4222", "nats://h:notaport", ",", "nats://"):
        with pytest.raises(CliError):
            NatsOptions.from_flags(bad, None, None)


def test_check_host() -> None:
    assert check_host("Desk.Example") == "desk.example"
    assert check_host("tunnel://desk.example/ignored") == "desk.example"
    for bad in ("", "a b", "tunnel://"):
        with pytest.raises(CliError):
            check_host(bad)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_colour_only_on_a_tty_and_never_with_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert color_enabled(_Tty())
    assert not color_enabled(io.StringIO())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not color_enabled(_Tty())
    assert Painter(False)("x", "red") == "x"
    assert Painter(True)("x", "bold", "red") == "\033[1;31mx\033[0m"


def test_human_bytes() -> None:
    assert human_bytes(0) == "0 B"
    assert human_bytes(1023) == "1023 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(20 * 1024 * 1024) == "20.0 MiB"
