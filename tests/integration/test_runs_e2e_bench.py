"""Smoke test of scripts/bench_runs.py: it runs end to end and reports every figure with its baseline.

No assertion on speed (timing on a shared machine is noise): what can fail is the plumbing
(the processes, a measurement that produced nothing, stray output breaking ``--json``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.bench_scripts import is_positive_number, run_json

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_runs.py"
RUN_TIMEOUT = 150.0
FIGURES = ("runs_per_s_c1", "runs_per_s_c16", "events_per_s", "latency_p50_ms", "latency_p99_ms")


@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_quick_json_run_reports_every_figure_next_to_its_raw_baseline() -> None:
    result = run_json("bench_runs.py", "--quick", timeout=RUN_TIMEOUT)
    for key in FIGURES:
        for name in (key, f"raw_{key}", f"ratio_{key}"):
            assert is_positive_number(result[name]), (name, result[name])
    assert result["rounds"] == 1 and result["quick"] is True
    assert result["latency_p99_ms"] >= result["latency_p50_ms"]


def test_help_describes_the_options() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0
    for option in ("--quick", "--json", "--rounds", "--events"):
        assert option in proc.stdout


def test_bad_option_values_are_usage_errors() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--rounds", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2 and "--rounds must be at least 1" in proc.stderr
