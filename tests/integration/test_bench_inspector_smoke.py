"""Smoke test of scripts/bench_inspector.py: it runs end to end and prints every figure.

No assertion on the cost itself (timing on a shared machine is noise, see the script): what can
fail here is the plumbing (the four child processes, the viewer's stream, the CPU accounting).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_inspector.py"

pytestmark = [pytest.mark.timeout(120), pytest.mark.skipif(sys.platform != "linux", reason="/proc CPU times")]


def test_the_bench_runs_and_reports_each_host_and_the_cost() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--rounds", "2", "--requests", "64", "--micro", "500"],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()[1:5]}
    assert set(rows) == {"off", "control", "on", "viewed"}, result.stdout
    assert all(float(value) > 0 for values in rows.values() for value in values), result.stdout
    assert rows["off"][1] == "1.000" and rows["off"][3] == "1.000"
    end_to_end = r"^end to end .*: inspector on [-+][\d.]+%, page open [-+][\d.]+%; noise floor"
    assert re.search(end_to_end, result.stdout, re.M), result.stdout
    cost = r"^inspector cost: \+-?[\d.]+ us per request .* = -?[\d.]+% \(-?[\d.]+%\) of its throughput"
    assert re.search(cost, result.stdout, re.M), result.stdout
    assert "round 2/2" in result.stderr
