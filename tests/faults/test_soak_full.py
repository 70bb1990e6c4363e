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
from typing import Final

import pytest

from tests.faults.soak_report import check_report, run_soak

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
    report = run_soak(["--seconds", str(SECONDS), "--seed", "11"], timeout=SECONDS + 150)
    for fault in FAULTS:
        assert re.search(rf"fault {re.escape(fault)}\s+x[1-9]", report), f"{fault} never injected"
    verified = re.search(r"bytes verified: ([\d.]+) MiB", report)
    assert verified is not None and float(verified.group(1)) > 0
    check_report(report, ("nats-server", "gateway-0", "gateway-1", "linkd"))
