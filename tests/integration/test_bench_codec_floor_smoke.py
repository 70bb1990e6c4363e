"""Smoke test of scripts/bench_codec_floor.py: it runs end to end and reports every figure.

No assertion on speeds (timing on a shared machine is noise). What can fail is the plumbing:
the responder process, a variant answering wrong bytes (the script checks each answer and
fails), or stray output breaking ``--json``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_codec_floor.py"
RUN_TIMEOUT = 120.0
VARIANTS = ("raw", "json", "json_start", "binary")


def _positive(value: object) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_quick_json_run_reports_every_variant_against_raw() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, f"bench failed (rc {proc.returncode}):\n{proc.stderr}"
    result = json.loads(proc.stdout)  # stdout is exactly one JSON object
    for name in VARIANTS:
        assert _positive(result[f"{name}_p50_us"]), name
        assert _positive(result[f"{name}_rps"]), name
    for name in VARIANTS[1:]:
        assert result[f"{name}_p50_ratio"] == pytest.approx(result[f"{name}_p50_us"] / result["raw_p50_us"])
        assert result[f"{name}_rps_ratio"] == pytest.approx(result[f"{name}_rps"] / result["raw_rps"])
    assert result["rounds"] == 2 and result["quick"] is True
    assert all(len(values) == 2 for values in result["samples"].values())
