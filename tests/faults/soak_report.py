"""Running ``scripts/soak.py`` as a user would, and the checks every soak report must pass.

Shared by the CI forms of the soak (``test_soak_full.py``, ``test_soak_cluster.py``): the script
does the checking and exits non-zero on any breach; these read what it printed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from tests.integration.linkctl_harness import live_pids_mentioning

SCRIPT: Final = Path(__file__).resolve().parents[2] / "scripts" / "soak.py"
REQUEST_KINDS: Final = ("small", "download", "upload", "presence", "run_post")


def run_soak(args: Sequence[str], timeout: float) -> str:
    """Run the soak with ``args``; its report, once it exited 0 and reported no violation."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    report = proc.stdout
    print(report)
    assert proc.returncode == 0, f"soak failed:\n{report}\n--- stderr tail ---\n{proc.stderr[-4000:]}"
    assert "violations: 0" in report
    return report


def check_report(report: str, processes: Sequence[str]) -> None:
    """Runs finished and counted, every kind of request made, memory measured for each of
    ``processes``, and nothing of the soak left running."""
    runs = re.search(r"runs by terminal state \((\d+)\): (.*)", report)
    assert runs is not None and int(runs.group(1)) > 0 and "completed=" in runs.group(2)
    for kind in REQUEST_KINDS:
        assert re.search(rf"^  {kind}\s+\d+: ", report, re.MULTILINE), f"no {kind} requests"
    for role in processes:
        assert re.search(rf"{role} [1-9]\d* MiB", report), f"no memory figure for {role}"
    assert live_pids_mentioning("natslink-soak-") == [], "the soak left a process behind"
