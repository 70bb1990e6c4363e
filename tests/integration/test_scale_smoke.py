"""Smoke test of scripts/scale.py at N=20: the plumbing works and every figure is there.

The script starts a real operator-mode nats-server, a real gateway and two desktop
processes of real LinkDaemons, so this is an end-to-end run at small N. No assertion on
latency or memory (a shared 2-core machine): what can fail is a figure that silently came
out empty, a broken invariant (a probe unanswered, a request failing untyped, a run that
never ended), credentials that never refreshed, or a process left behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "scale.py"
RUN_TIMEOUT = 180.0

STEP_FIGURES = (
    ("online_seconds",),
    ("probe", "p50_ms"),
    ("probe", "p99_ms"),
    ("probe", "gateway_probe_p99_ms"),
    ("request", "p50_ms"),
    ("request", "p99_ms"),
    ("runs", "per_s"),
    ("runs", "dispatch_p99_ms"),
    ("runs", "end_to_end_p99_ms"),
    ("refreshes", "per_s"),
    ("cpu_percent", "gateway"),
    ("resources", "gateway_rss_bytes"),
    ("resources", "gateway_bytes_per_desktop"),
    ("resources", "desktop_bytes_per_desktop"),
    ("resources", "nats_bytes_per_desktop"),
    ("resources", "nats", "connections"),
    ("resources", "nats", "subscriptions"),
    ("resources", "nats", "jetstream_storage_bytes"),
    ("load_average",),
    ("desktop_loop_lag_p99_ms",),
    ("online_cpu_percent", "gateway"),
)


def _dig(doc: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = doc
    for key in path:
        value = value[key]
    return value


def _processes_tagged(tag: str) -> list[int]:
    """Pids whose environment holds ``SCALE_TEST_TAG=<tag>`` (inherited from the script: ours only)."""
    marker = f"SCALE_TEST_TAG={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in environ:
            found.append(int(entry.name))
    return found


@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_scale_script_at_twenty_desktops() -> None:
    tag = uuid.uuid4().hex
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--desktops",
            "20",
            "--steps",
            "10,20",
            "--per-process",
            "10",
            "--duration-per-step",
            "3",
            "--session-ttl",
            "10",
            "--hold",
            "1",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        env={**os.environ, "SCALE_TEST_TAG": tag},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout)
    assert result["completed"] is True and result["stopped_reason"] is None
    assert result["config"]["desktop_processes"] == 2
    # The two steps, then N=20 again after holding it (--hold).
    assert [s["desktops"] for s in result["steps"]] == [10, 20, 20]
    assert result["steps"][-1]["held_seconds"] == 1
    for step in result["steps"]:
        assert step["online"] == step["desktops"], step["not_online"]
        for path in STEP_FIGURES:
            assert _dig(step, path) is not None, f"N={step['desktops']}: {'.'.join(path)} is missing"
        assert step["invariants"] == {
            "every_probe_answered": True,
            "every_request_answered_or_typed": True,
            "every_run_terminal": True,
        }, (step["probe"], step["request"], step["runs"])
        assert step["probe"]["ok"] == step["probe"]["count"] > 0
        assert step["runs"]["completed"] == step["runs"]["created"] > 0
        assert step["resources"]["nats"]["connections"] >= step["desktops"]
        assert len(step["resources"]["desktop_process_rss_bytes"]) == 2
        assert all(lag is not None for lag in step["desktop_loop_lag_p99_ms"])
    # Ten-second credentials: every desktop refreshed at least once, none failed.
    last = result["steps"][-1]
    assert last["refreshes"]["total_so_far"] >= 20
    assert all(s["refreshes"]["failed"] == 0 for s in result["steps"])
    assert result["goals"]["at_desktops"] == 20 and result["goals"]["invariants_held"] is True
    assert result["goals"]["after_hold"]["desktops"] == 20
    # Nothing left behind: no process of this run (desktops, gateway, nats-server) outlives it.
    assert _processes_tagged(tag) == []
