"""Smoke test of scripts/bench_codec_floor.py: it runs end to end and reports every figure.

No assertion on speeds (timing on a shared machine is noise). What can fail is the plumbing:
the responder process, a variant answering wrong bytes (the script checks each answer and
fails), or stray output breaking ``--json``.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.integration.bench_scripts import SCRIPTS, is_positive_number, run_json

RUN_TIMEOUT = 120.0
VARIANTS = ("raw", "json", "json_start", "compact")


@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_quick_json_run_reports_every_variant_against_raw() -> None:
    result = run_json("bench_codec_floor.py", "--quick", timeout=RUN_TIMEOUT)
    for name in VARIANTS:
        assert is_positive_number(result[f"{name}_p50_us"]), name
        assert is_positive_number(result[f"{name}_rps"]), name
    for name in VARIANTS[1:]:
        assert result[f"{name}_p50_ratio"] == pytest.approx(result[f"{name}_p50_us"] / result["raw_p50_us"])
        assert result[f"{name}_rps_ratio"] == pytest.approx(result[f"{name}_rps"] / result["raw_rps"])
    assert result["rounds"] == 2 and result["quick"] is True
    assert all(len(values) == 2 for values in result["samples"].values())


def test_zero_rounds_is_a_usage_error_not_a_silent_default() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench_codec_floor.py"), "--rounds", "0"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2
    assert "--rounds must be at least 1" in proc.stderr
