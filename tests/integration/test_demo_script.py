"""scripts/demo_tunnel.py (the README's main job) works end to end and fails politely.

Runs the script as a user would, in a subprocess, and checks what it promises: exit
status 0, one line per step with the facts that matter, nothing left running; and for
an expected failure (no nats-server binary) a one-line message without a traceback.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "demo_tunnel.py"
RUN_TIMEOUT = 60.0


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )


def _is_running_nats_server(pid: int) -> bool:
    """True if ``pid`` is a live (not zombie) nats-server process."""
    proc = Path(f"/proc/{pid}")
    try:
        cmdline = (proc / "cmdline").read_bytes()
        state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return b"nats-server" in cmdline and state != "Z"


def test_demo_runs_every_step_prints_one_line_each_and_exits_zero() -> None:
    proc = _run()
    assert proc.returncode == 0, f"demo failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    out = proc.stdout
    assert "Traceback" not in proc.stderr

    started = re.search(r"^nats-server started on nats://127\.0\.0\.1:(\d+) \(pid (\d+)\)$", out, re.M)
    assert started, out
    assert re.search(r"^serving tunnel://demo\.local\b", out, re.M), out
    hello = re.search(r"^GET /hello -> 200 OK in [\d.]+ ms: (\{.*\})$", out, re.M)
    assert hello and '"greeting": "hello from demo.local"' in hello.group(1), out
    assert re.search(r"^GET /stream -> 200, streamed 5 chunks \(\d+ bytes\)", out, re.M), out
    assert re.search(
        r"^POST /echo of 1\.0 MiB -> 200, echoed back and verified by sha256 .* in [\d.]+ ms$", out, re.M
    ), out
    assert re.search(r"^GET tunnel://offline\.local/ -> tunnel_unreachable in \d+ ms", out, re.M), out
    assert re.search(r"^tunnel server stopped: 3 requests, 3 completed, 0 handler errors", out, re.M), out
    assert out.rstrip().endswith("demo finished: every step worked"), out

    # Torn down: the nats-server it started is gone.
    assert not _is_running_nats_server(int(started.group(2)))


def test_demo_without_a_nats_server_binary_fails_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "nats-server"
    proc = _run("--nats-server", str(missing))
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("demo failed:") and str(missing) in lines[0]
    assert "GET /hello" not in proc.stdout  # nothing pretended to work


def test_help_lists_the_options() -> None:
    proc = _run("--help")
    assert proc.returncode == 0
    assert "--nats-server" in proc.stdout
