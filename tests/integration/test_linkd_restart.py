"""A daemon restarted mid-run (issue 15, "Must show"): real nats-server with JetStream, the real
gateway and real ``linkd up`` processes, SIGKILLed and started again (see ``runs_harness``).

- a ``mock`` run resumes from its journal: the gateway sees seq 1..k once each, byte-exact;
- a non-resumable ``command`` run ends ``failed``/``daemon_restarted`` within 2 s of the daemon
  being back, after every event it had journaled (here: while NATS could not ack them);
- a corrupt journal at start is moved aside with one clear log line, and the daemon serves.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Final

import httpx
import pytest

from contract.run_protocol import DAEMON_RESTARTED
from linkd.journal import JOURNAL_FILE_NAME
from linkd.runners.mock import mock_chunk
from tests.conftest import _test_failed
from tests.helpers import wait_until
from tests.integration.runs_harness import DEFAULT_LINKD_TOML, LinkdProcess, RunsStack

pytestmark = [pytest.mark.timeout(120)]

GATEWAY_ENV: Final = {
    # Long enough that a restart (a cold Python start on a loaded machine) is never a lost desktop.
    "RUNS_LIVENESS_TIMEOUT_SECONDS": "20",
    "RUNS_REAPER_INTERVAL_SECONDS": "0.25",
}
RUN_TIMEOUT: Final = 45.0
# The command runner's program: a numbered line every 20 ms, for a long time.
TICKER: Final = (
    "import time\nfor i in range(100000):\n    print(f'line {i}', flush=True)\n    time.sleep(0.02)\n"
)
COMMAND_TOML: Final = DEFAULT_LINKD_TOML + (
    f'[runners.command.ticker]\nargv = [{json.dumps(sys.executable)}, "-c", {json.dumps(TICKER)}]\n'
)
# An idempotent command the user marked resumable: 150 numbered lines, the same every time.
COUNTER: Final = (
    "import time\nfor i in range(150):\n    print(f'line {i}', flush=True)\n    time.sleep(0.02)\n"
)
RESUMABLE_TOML: Final = DEFAULT_LINKD_TOML + (
    f'[runners.command.counter]\nargv = [{json.dumps(sys.executable)}, "-c", {json.dumps(COUNTER)}]\n'
    "resumable = true\n"
)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunsStack]:
    stack = RunsStack.start(tmp_path_factory.mktemp("linkd-restart"), gateways=1, gateway_env=GATEWAY_ENV)
    try:
        yield stack
    finally:
        stack.close()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=15.0) as client:
        yield client


@pytest.fixture(autouse=True)
def _diagnostics(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every process's log tail when a test of this module failed."""
    yield
    if _test_failed(request) and "stack" in request.fixturenames:
        print(request.getfixturevalue("stack").diagnostics())


def journal_path(daemon: LinkdProcess) -> Path:
    # LINKD_CONFIG_DIR names the daemon's own profile, so its state dir is <config dir>/state.
    return daemon.home / "config" / "state" / JOURNAL_FILE_NAME


def journaled_seqs(daemon: LinkdProcess, run_id: str) -> list[int]:
    """The seqs of ``run_id`` waiting in the daemon's journal (read-only, beside the daemon)."""
    path = journal_path(daemon)
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
    try:
        return [
            row[0] for row in db.execute("SELECT seq FROM events WHERE run_id = ? ORDER BY seq", (run_id,))
        ]
    except sqlite3.OperationalError:  # the daemon is creating it right now
        return []
    finally:
        db.close()


def assert_contiguous(events: list[dict[str, Any]]) -> None:
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(events) + 1)), f"seqs not 1..N once each: {seqs}"
    assert events[-1]["type"] == "done" and events[-1]["finalSeq"] == len(events)
    assert sum(e["type"] == "done" for e in events) == 1
    assert len({e.get("fence") for e in events}) == 1


def records(daemon: LinkdProcess, event: str) -> list[dict[str, Any]]:
    return [r for r in daemon.log_records() if r.get("event") == event]


async def test_sigkill_mid_mock_run_resumes_byte_exact(stack: RunsStack, http: httpx.AsyncClient) -> None:
    user = "resume-mock@example.com"
    daemon = await asyncio.to_thread(stack.daemon, user)
    api = stack.api(user, http)
    count = 60
    run_id = (await api.create("mock", {"count": count, "delayMs": 40}))["runId"]
    before = await api.wait_state(
        run_id, lambda s: (s["seq"] or 0) >= 12, RUN_TIMEOUT, "the run never got going"
    )
    assert before["status"] == "in_progress", before

    daemon.kill()
    await daemon.astart()

    state = await api.wait_terminal(run_id, RUN_TIMEOUT)
    events = await api.export(run_id)
    assert state["status"] == "completed", state
    assert_contiguous(events)
    output = "".join(e["data"] for e in events if e["type"] == "output")
    assert output == "".join(
        mock_chunk("chunk", i, None) for i in range(count)
    )  # byte-exact, each chunk once
    stages = [e["stage"] for e in events if e["type"] == "stage"]
    assert stages == ["starting-run", "preparing", "running"], stages
    assert state["seq"] == state["finalSeq"] == len(events) and state["outputBytes"] == len(output.encode())
    (resumed,) = records(daemon, "run_resumed")
    assert resumed["run_id"] == run_id and resumed["seq"] >= 12
    status = json.loads((daemon.home / "run" / "linkd-status.json").read_text())
    assert status["runsResumed"] == 1 and status["runsEndedDaemonRestarted"] == 0
    await wait_until(lambda: not journaled_seqs(daemon, run_id), 10.0, message="acked events stay journaled")
    daemon.stop()


async def test_sigkill_mid_command_run_fails_daemon_restarted_after_its_events(
    stack: RunsStack, http: httpx.AsyncClient
) -> None:
    user = "restart-command@example.com"
    daemon = await asyncio.to_thread(stack.daemon, user, config_toml=COMMAND_TOML)
    api = stack.api(user, http)
    run_id = (await api.create("command", {"template": "ticker"}))["runId"]
    await api.wait_state(run_id, lambda s: (s["seq"] or 0) >= 5, RUN_TIMEOUT, "the run never got going")

    # NATS stops answering: the runner goes on, its events are journaled but never acked.
    nats_pid = stack.nats.server.pid
    assert nats_pid is not None
    os.kill(nats_pid, signal.SIGSTOP)
    try:
        await wait_until(
            lambda: len(journaled_seqs(daemon, run_id)) >= 10,
            15.0,
            message="no events journaled while NATS hung",
        )
        daemon.kill()
    finally:
        os.kill(nats_pid, signal.SIGCONT)
    journaled = journaled_seqs(daemon, run_id)  # the daemon is dead: this is final
    assert journaled == list(range(journaled[0], journaled[-1] + 1)), journaled
    produced = journaled[-1]

    await daemon.astart()
    online_at = time.monotonic()
    state = await api.wait_terminal(run_id, RUN_TIMEOUT)
    took = time.monotonic() - online_at
    print(f"daemon back online -> run failed/{state.get('failureKind')} after {took:.2f}s")
    assert state["status"] == "failed" and state["failureKind"] == DAEMON_RESTARTED, state
    assert took <= 2.0, f"the run ended {took:.2f}s after the daemon was back"
    events = await api.export(run_id)
    assert_contiguous(events)
    assert len(events) == produced + 1, (
        "an event journaled before the kill is missing"
    )  # every one, then done
    done = events[-1]
    assert done["status"] == "failed" and done["failureKind"] == DAEMON_RESTARTED and done["reason"]
    lines = "".join(e["data"] for e in events if e["type"] == "output").splitlines()
    assert lines == [f"line {i}" for i in range(len(lines))], "output lines lost or repeated"
    status = json.loads((daemon.home / "run" / "linkd-status.json").read_text())
    assert status["runsEndedDaemonRestarted"] == 1 and status["runsResumed"] == 0
    daemon.stop()


async def test_a_corrupt_journal_is_moved_aside_and_the_daemon_serves(
    stack: RunsStack, http: httpx.AsyncClient
) -> None:
    user = "corrupt-journal@example.com"
    daemon = await asyncio.to_thread(stack.daemon, user)
    api = stack.api(user, http)
    first = (await api.create("mock", {"count": 3}))["runId"]
    assert (await api.wait_terminal(first, RUN_TIMEOUT))["status"] == "completed"
    daemon.stop()

    path = journal_path(daemon)
    raw = path.read_bytes()
    assert raw, "the journal was not written"
    for suffix in ("-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    path.write_bytes(raw[: len(raw) // 2] + b"\x00garbage" * 64)  # a torn, scribbled file

    await daemon.astart()  # no crash loop: online
    (line,) = records(daemon, "journal_corrupt")
    assert "moved aside" in line["message"], line
    aside = Path(line["moved_to"])
    assert aside.name.startswith(f"{JOURNAL_FILE_NAME}.corrupt-")
    assert await asyncio.to_thread(aside.exists)
    assert await asyncio.to_thread(path.exists)  # a fresh journal

    second = (await api.create("mock", {"count": 5}))["runId"]
    state = await api.wait_terminal(second, RUN_TIMEOUT)
    assert state["status"] == "completed", state
    assert "".join(e["data"] for e in await api.export(second) if e["type"] == "output") == "".join(
        mock_chunk("chunk", i, None) for i in range(5)
    )
    assert (await api.get(first))["status"] == "completed"  # nothing else lost
    daemon.stop()


async def test_sigkill_mid_resumable_command_run_continues_after_what_it_sent(
    stack: RunsStack, http: httpx.AsyncClient
) -> None:
    user = "resume-command@example.com"
    daemon = await asyncio.to_thread(stack.daemon, user, config_toml=RESUMABLE_TOML)
    api = stack.api(user, http)
    run_id = (await api.create("command", {"template": "counter"}))["runId"]
    await api.wait_state(run_id, lambda s: (s["seq"] or 0) >= 20, RUN_TIMEOUT, "the run never got going")
    daemon.kill()
    await daemon.astart()

    state = await api.wait_terminal(run_id, RUN_TIMEOUT)
    assert state["status"] == "completed", state
    events = await api.export(run_id)
    assert_contiguous(events)
    output = "".join(e["data"] for e in events if e["type"] == "output")
    assert output == "".join(f"line {i}\n" for i in range(150))  # each line once, in order
    stages = [e["stage"] for e in events if e["type"] == "stage"]
    assert stages == ["starting-run", "preparing", "running"], stages
    (resumed,) = records(daemon, "run_resumed")
    assert resumed["run_id"] == run_id
    daemon.stop()
