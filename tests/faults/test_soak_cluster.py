"""``scripts/soak.py --cluster 3`` in CI: the whole link on a real 3-node NATS cluster, under mixed
load, with each kind of node kill once.

The script does the checking (every tunnel request ends with success or a typed error within
its timeouts, bodies byte-exact, no gateway 500 or hang, every accepted run terminal, every
completed one exact, a request and a run succeed after the last fault) and exits 1 on any
breach. Here: kill -9 of a random node, of the node linkd is connected to, of the run stream's
leader and of the daemon host's consumer's leader, one each (``--max-faults 4``, each fault once
per round), every one followed by the restart of the node. This test checks what the script
reports: no violation, every node kill injected and timed both with the node down and after its
restart, runs finished, memory measured for every node, and nothing left running.
(``tests/faults/test_soak_full.py`` is the single-server form with the other faults.)
"""

from __future__ import annotations

import re
from typing import Final

import pytest

from tests.faults.soak_report import check_report, run_soak

NODE_FAULTS: Final = (
    "kill-9-node-random",
    "kill-9-node-linkd",
    "kill-9-stream-leader",
    "kill-9-consumer-leader",
)
# An upper bound: --max-faults ends it first (each kill ~5-15 s incl. the election and restart).
SECONDS: Final = 120

pytestmark = pytest.mark.timeout(SECONDS + 180)


def test_each_node_kill_on_a_three_node_cluster_breaks_no_invariant() -> None:
    args = ["--cluster", "3", "--seconds", str(SECONDS), "--max-faults", str(len(NODE_FAULTS))]
    args += ["--faults", ",".join(NODE_FAULTS), "--seed", "5"]
    report = run_soak(args, timeout=SECONDS + 150)
    for fault in NODE_FAULTS:
        line = re.search(rf"fault {re.escape(fault)}\s+x1 .*", report)
        assert line is not None, f"{fault} never injected"
        assert "with the node down, back within" in line.group(0), f"{fault}: no failover time"
    check_report(report, ("nats-n1", "nats-n2", "nats-n3", "gateway-0", "gateway-1", "linkd"))
