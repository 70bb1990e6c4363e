"""Smoke test of scripts/soak_tunnel.py: its help, its argument checks, and one short run.

The soak itself runs for minutes (by hand or in a dedicated job); this only proves the
plumbing: it starts its own nats-server, runs a fault with the chaos invariants, prints the
summary and exits 0 when nothing was violated.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Final

import pytest

SCRIPT: Final = Path(__file__).resolve().parents[2] / "scripts" / "soak_tunnel.py"
RUN_TIMEOUT: Final = 60.0


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False
    )


def test_help_lists_the_options_and_the_faults() -> None:
    proc = run("--help")
    assert proc.returncode == 0, proc.stderr
    for word in ("--minutes", "--faults", "--seed", "--max-faults", "kill-9-nats-server", "blackhole"):
        assert word in proc.stdout


def test_unknown_fault_is_a_usage_error() -> None:
    proc = run("--faults", "meteor-strike")
    assert proc.returncode == 2
    assert "unknown fault" in proc.stderr


@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_one_short_fault_runs_end_to_end_and_passes() -> None:
    proc = run("--minutes", "0", "--max-faults", "1", "--faults", "pause-shorter-than-idle", "--seed", "1")
    assert proc.returncode == 0, f"rc {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "pause-shorter-than-idle:" in proc.stdout
    assert "RESULT: PASS" in proc.stdout
    assert "faults: 1 (pause-shorter-than-idle=1)" in proc.stdout
