"""``linkctl fetch`` against a real nats-server and a ``tunnel.serve`` desktop.

Most tests run the CLI in-process (typer's CliRunner); exit statuses and the
"one line, no traceback" promise are also checked on a real subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from cli.main import app
from cli.nats_server import NatsServer, free_port
from tests.integration.linkctl_harness import HOSTNAME, Desktop, MiB, pattern_sha256

CLI = [sys.executable, "-m", "cli"]
RUN_TIMEOUT = 30.0


@pytest.fixture
def desktop(nats_server: NatsServer) -> Iterator[Desktop]:
    desk = Desktop(nats_server.url).start()
    yield desk
    desk.close()


def linkctl(desk: Desktop, *args: str, input: bytes | None = None) -> Result:
    """Run linkctl in-process against the desktop's NATS server."""
    return CliRunner().invoke(app, list(args), input=input, env={"LINKCTL_NATS_URL": desk.nats_url})


def linkctl_process(nats_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINKCTL_")}
    env["LINKCTL_NATS_URL"] = nats_url
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=RUN_TIMEOUT, env=env, check=False
    )


def assert_one_error_line(stderr: str, prefix: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(prefix), stderr
    assert "Traceback" not in stderr


URL = f"tunnel://{HOSTNAME}"


def test_get_sends_repeated_headers_in_order(desktop: Desktop) -> None:
    result = linkctl(
        desktop, "fetch", "-H", "X-Tag: one", "-H", "X-Other: z", "-H", "X-Tag: two", f"{URL}/echo?a=1&a=2"
    )
    assert result.exit_code == 0, result.output
    echo = json.loads(result.stdout)
    assert echo["method"] == "GET"
    assert echo["url"] == "/echo?a=1&a=2"
    sent = [(name, value) for name, value in echo["headers"] if name.lower().startswith("x-")]
    assert sent == [("X-Tag", "one"), ("X-Other", "z"), ("X-Tag", "two")]
    assert echo["bodyLength"] == 0
    assert result.stderr == ""


def test_post_with_data_defaults_to_form_content_type_as_curl(desktop: Desktop) -> None:
    result = linkctl(desktop, "fetch", "-d", "a=1", "-d", "b=2", f"{URL}/echo")
    assert result.exit_code == 0, result.output
    echo = json.loads(result.stdout)
    headers = {name.lower(): value for name, value in echo["headers"]}
    assert echo["method"] == "POST"
    assert echo["bodySha256"] == hashlib.sha256(b"a=1&b=2").hexdigest()
    assert headers["content-type"] == "application/x-www-form-urlencoded"
    assert headers["content-length"] == "7"

    body = '{"name": "x"}'
    result = linkctl(
        desktop, "fetch", "-X", "PUT", "-H", "Content-Type: application/json", "-d", body, f"{URL}/echo"
    )
    assert result.exit_code == 0, result.output
    echo = json.loads(result.stdout)
    assert echo["method"] == "PUT"
    assert [v for n, v in echo["headers"] if n.lower() == "content-type"] == ["application/json"]
    assert echo["bodySha256"] == hashlib.sha256(body.encode()).hexdigest()


def test_data_binary_file_upload_is_byte_exact(desktop: Desktop, tmp_path: Path) -> None:
    payload = os.urandom(3 * MiB + 12345)
    upload = tmp_path / "upload.bin"
    upload.write_bytes(payload)
    result = linkctl(desktop, "fetch", "--data-binary", f"@{upload}", f"{URL}/echo")
    assert result.exit_code == 0, result.output
    echo = json.loads(result.stdout)
    assert echo["bodyLength"] == len(payload)
    assert echo["bodySha256"] == hashlib.sha256(payload).hexdigest()
    assert ["Content-Length", str(len(payload))] in echo["headers"]


def test_data_binary_from_stdin_streams_without_a_length(desktop: Desktop) -> None:
    payload = os.urandom(MiB + 7)
    result = linkctl(desktop, "fetch", "--data-binary", "@-", f"{URL}/echo", input=payload)
    assert result.exit_code == 0, result.output
    echo = json.loads(result.stdout)
    assert echo["bodySha256"] == hashlib.sha256(payload).hexdigest()
    assert not any(name.lower() == "content-length" for name, _ in echo["headers"])


def test_output_file_download_of_20_mib_is_byte_exact(desktop: Desktop, tmp_path: Path) -> None:
    size = 20 * MiB
    target = tmp_path / "download.bin"
    result = linkctl(desktop, "fetch", "-o", str(target), f"{URL}/download?size={size}")
    assert result.exit_code == 0, result.output
    assert result.stdout_bytes == b""
    assert target.stat().st_size == size
    assert hashlib.sha256(target.read_bytes()).hexdigest() == pattern_sha256(size)


def test_body_without_content_length_streams_to_stdout_byte_exact(desktop: Desktop) -> None:
    size = 2 * MiB + 3
    result = linkctl(desktop, "fetch", f"{URL}/download?size={size}&chunked=1")
    assert result.exit_code == 0, result.stderr
    assert hashlib.sha256(result.stdout_bytes).hexdigest() == pattern_sha256(size)


def test_include_writes_status_line_and_headers_before_the_body(desktop: Desktop) -> None:
    result = linkctl(desktop, "fetch", "-i", f"{URL}/status/404")
    assert result.exit_code == 0, result.output  # a non-2xx response is still a successful fetch
    assert result.stdout_bytes == (
        b"HTTP/1.1 404 Not Found\r\n"
        b"content-type: text/plain\r\n"
        b"set-cookie: a=1\r\n"
        b"set-cookie: b=2\r\n"
        b"\r\n"
        b"status 404"
    )


def test_head_shows_only_the_response_head(desktop: Desktop) -> None:
    result = linkctl(desktop, "fetch", "-I", f"{URL}/download?size=10")
    assert result.exit_code == 0, result.output
    assert result.stdout_bytes.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"content-length: 10\r\n" in result.stdout_bytes
    assert result.stdout_bytes.endswith(b"\r\n\r\n")


def test_fail_exits_22_without_printing_the_body(desktop: Desktop) -> None:
    result = linkctl(desktop, "fetch", "--fail", f"{URL}/status/503")
    assert result.exit_code == 22
    assert result.stdout == ""
    assert_one_error_line(result.stderr, "linkctl: error: the desktop answered 503 Service Unavailable")


def test_handler_error_is_one_line_with_its_code(desktop: Desktop) -> None:
    result = linkctl(desktop, "fetch", f"{URL}/fail")
    assert result.exit_code == 16
    assert_one_error_line(result.stderr, "linkctl: tunnel_handler_error: ")


def test_overall_timeout_is_a_typed_error(desktop: Desktop) -> None:
    result = linkctl(desktop, "fetch", "--timeout", "0.3", f"{URL}/hang")
    assert result.exit_code == 13
    assert_one_error_line(result.stderr, "linkctl: tunnel_timeout: ")


def test_a_body_cut_mid_way_is_an_error_not_a_success(desktop: Desktop, tmp_path: Path) -> None:
    target = tmp_path / "partial.bin"
    result = linkctl(desktop, "fetch", "-o", str(target), f"{URL}/broken-download?size={MiB}")
    assert result.exit_code == 16, result.output
    assert_one_error_line(result.stderr, "linkctl: tunnel_handler_error: ")


# -- as a real process: exit statuses and one-line errors ----------------------------------


def test_unreachable_host_is_one_line_with_its_own_exit_status(desktop: Desktop) -> None:
    proc = linkctl_process(desktop.nats_url, "fetch", "tunnel://nobody.test/anything")
    assert proc.returncode == 10
    assert_one_error_line(proc.stderr, "linkctl: tunnel_unreachable: ")
    assert "nobody.test" in proc.stderr  # the host is named (by the tunnel, or by linkctl)
    assert proc.stdout == ""
    # The same command against the live desktop succeeds.
    proc = linkctl_process(desktop.nats_url, "fetch", f"{URL}/api/links/status")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["hostname"] == "test-desktop"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["fetch", "http://desk.test/x"], "bad URL"),
        (["fetch", "tunnel://"], "bad URL"),
        (["fetch", "-H", "no colon here", f"{URL}/x"], "-H"),
        (["fetch", "--data-binary", "@/no/such/file", f"{URL}/x"], "--data-binary"),
        (["fetch", "--no-such-flag", f"{URL}/x"], "--no-such-flag"),
        (["fetch", "--timeout", "soon", f"{URL}/x"], "--timeout"),
        (["fetch", "--timeout", "0", f"{URL}/x"], "--timeout"),
        (["fetch", "-o", "/no/such/dir/out.bin", f"{URL}/x"], "-o"),
        (["fetch", "--nats", "http://127.0.0.1:4222", f"{URL}/x"], "--nats"),
        (["fetch", "--prefix", "bad..prefix", f"{URL}/x"], "--prefix"),
        (["fetch"], "URL"),
    ],
)
def test_user_mistakes_exit_2_with_one_line_and_no_traceback(
    nats_server: NatsServer, args: list[str], needle: str
) -> None:
    proc = linkctl_process(nats_server.url, *args)
    assert proc.returncode == 2, proc.stderr
    assert_one_error_line(proc.stderr, "linkctl: error: ")
    assert needle in proc.stderr
    assert proc.stdout == ""


def test_unreachable_nats_exits_2_with_one_line() -> None:
    proc = linkctl_process(f"nats://127.0.0.1:{free_port()}", "fetch", f"{URL}/x")
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, "linkctl: error: cannot connect to NATS at nats://127.0.0.1:")
