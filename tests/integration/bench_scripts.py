"""What the smoke tests of ``scripts/bench_*.py`` share: a ``--json`` run, checked.

The smoke tests assert no speeds (timing on a shared machine is noise), only the plumbing:
the run works, and stdout is exactly the one JSON object a dashboard would read.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def run_json(script: str, *args: str, timeout: float) -> dict[str, Any]:
    """``scripts/<script> *args --json``'s result; fails the test (with stderr) if the run did."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / script), *args, "--json"],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, f"{script} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    result = json.loads(proc.stdout)  # json.loads rejects anything printed around the object
    assert isinstance(result, dict)
    return result


def is_positive_number(value: object) -> bool:
    return (
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )
