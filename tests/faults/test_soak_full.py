"""``scripts/soak.py`` for 60 s in CI: the whole link under mixed load and every fault.

The script does the checking (every tunnel request ends with success or a typed error within
its timeouts, bodies byte-exact, no gateway 500 or hang, every accepted run terminal and every
completed one exact, a request and a run succeed after the last fault) and exits 1 on any
breach. This test runs it as a user would and checks what it reports: no violation, every
fault injected at least once, runs finished and counted, memory measured for every process,
and nothing left running afterwards.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Final

import pytest

from tests.integration.linkctl_harness import live_pids_mentioning

SCRIPT: Final = Path(__file__).resolve().parents[2] / "scripts" / "soak.py"
SECONDS: Final = 60
FAULTS: Final = (
    "kill-9-nats-server",
    "kill-9-linkd",
    "kill-9-gateway",
    "pause-short",
    "pause-long",
    "throttle",
    "blackhole",
    "reset",
)

pytestmark = pytest.mark.timeout(SECONDS + 180)


def test_sixty_seconds_of_faults_under_load_break_no_invariant() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--seconds", str(SECONDS), "--seed", "11"],
        capture_output=True,
        text=True,
        timeout=SECONDS + 150,
        check=False,
    )
    report = proc.stdout
    print(report)
    assert proc.returncode == 0, f"soak failed:\n{report}\n--- stderr tail ---\n{proc.stderr[-4000:]}"
    assert "violations: 0" in report
    for fault in FAULTS:
        assert re.search(rf"fault {re.escape(fault)}\s+x[1-9]", report), f"{fault} never injected"
    runs = re.search(r"runs by terminal state \((\d+)\): (.*)", report)
    assert runs is not None and int(runs.group(1)) > 0 and "completed=" in runs.group(2)
    verified = re.search(r"bytes verified: ([\d.]+) MiB", report)
    assert verified is not None and float(verified.group(1)) > 0
    for kind in ("small", "download", "upload", "presence", "run_post"):
        assert re.search(rf"^  {kind}\s+\d+: ", report, re.MULTILINE), f"no {kind} requests"
    for role in ("nats-server", "gateway-0", "gateway-1", "linkd"):
        assert re.search(rf"{role} [1-9]\d* MiB", report), f"no memory figure for {role}"
    assert live_pids_mentioning("natslink-soak-") == [], "the soak left a process behind"
