"""Smoke test of scripts/bench_gateway.py: it runs end to end and reports every figure.

No assertion on speed (timing on a shared machine is noise); what can fail here is the
plumbing: the gateway and daemon processes, a measurement that produced nothing, or
stray output breaking ``--json``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.bench_scripts import is_positive_number, run_json

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_gateway.py"
RUN_TIMEOUT = 120.0
FIGURE_KEYS = (
    "sessions_per_s",
    "sessions_daemon_key_per_s",
    "me_online_p50_ms",
    "me_online_p99_ms",
    "me_offline_p50_ms",
    "me_offline_p99_ms",
)


@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_quick_json_run_reports_every_figure_as_one_json_object() -> None:
    result = run_json("bench_gateway.py", "--quick", timeout=RUN_TIMEOUT)
    assert result["quick"] is True
    rounds = result["rounds"]
    assert isinstance(rounds, int) and rounds >= 2
    for key in FIGURE_KEYS:
        assert is_positive_number(result[key]), f"{key} = {result[key]!r}"
        samples = result["samples"][key]
        assert len(samples) == rounds and all(is_positive_number(v) for v in samples), key
    # Offline is answered by the no-responders fast path, well under a second.
    assert result["me_offline_p99_ms"] < 1000


def test_help_describes_the_benchmark_without_starting_anything() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=30, check=False
    )
    assert proc.returncode == 0
    assert "--quick" in proc.stdout and "--json" in proc.stdout
    assert "--role" not in proc.stdout
