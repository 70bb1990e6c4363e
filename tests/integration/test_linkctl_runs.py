"""``linkctl runs`` as a process against a server that speaks the gateway runs API contract.

The resume promise: a connection cut mid-stream (RST through a TCP proxy we control) is
resumed with ``after``/``Last-Event-ID`` and the output arrives exactly once, in order. The
stand-in (``ContractGateway``) lets us cut at a chosen event; the same commands against the
real gateway run in the demo and end-to-end tests.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator

import pytest

from cli import exitcodes
from tests.faultproxy import FaultProxy
from tests.helpers import wait_until
from tests.integration.linkctl_harness import CONTRACT_TOKEN, LINKCTL, ContractGateway

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def gateway() -> AsyncIterator[ContractGateway]:
    gw = ContractGateway()
    await gw.start()
    try:
        yield gw
    finally:
        await gw.close()


def _env(gateway_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINKCTL_")}
    env.update(NO_COLOR="1", LINKCTL_GATEWAY=gateway_url, LINKCTL_TOKEN=CONTRACT_TOKEN)
    return env


async def linkctl(gateway_url: str, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *LINKCTL, *args, env=_env(gateway_url), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def chunks(count: int) -> str:
    return "".join(f"chunk {i}\n" for i in range(count))


async def test_attach_resumes_after_cut_connections_without_loss_or_duplicates(
    gateway: ContractGateway,
) -> None:
    count = 400  # 8 s of events: both cuts land while the run is still live, even on a loaded machine
    async with FaultProxy(gateway.port) as proxy:
        url = f"http://127.0.0.1:{proxy.port}"
        code, out, err = await linkctl(
            url, "runs", "send", "mock", json.dumps({"count": count, "delayMs": 20}), "--json"
        )
        assert code == 0, err
        run_id = json.loads(out)["runId"]
        proc = await asyncio.create_subprocess_exec(
            *LINKCTL, "runs", "attach", run_id, env=_env(url),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None
        lines: list[str] = []
        for cut_after in (40, 120):  # cut once the client has *printed* this many chunks
            while len(lines) < cut_after:
                line = await asyncio.wait_for(proc.stdout.readline(), 30)
                assert line, "attach ended early"
                lines.append(line.decode())
            proxy.reset_all()
        rest, err_b = await asyncio.wait_for(proc.communicate(), 60)
    lines += rest.decode().splitlines(keepends=True)
    assert proc.returncode == 0, err_b.decode()
    assert "".join(lines) == chunks(count)  # every chunk exactly once, in order
    assert err_b.decode().count("connection lost") >= 2
    resumed = gateway.requests[1:]
    assert len(resumed) >= 2
    for request in resumed:
        assert request.after is not None and request.after == request.last_event_id
    # The client had printed 40 (then 120) chunks, i.e. seen events 1..41 (the stage first):
    # it must resume after at least those, never from the start.
    assert int(resumed[0].after or 0) >= 41 and int(resumed[-1].after or 0) >= 121
    assert "completed" in err_b.decode()


async def test_attach_json_lines_are_every_event_then_the_final_state(gateway: ContractGateway) -> None:
    code, out, err = await linkctl(gateway.url, "runs", "send", "mock", '{"count": 4}', "--attach", "--json")
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines[0]["type"] == "accepted"
    events = lines[1:-1]
    assert [e["seq"] for e in events] == list(range(1, 7))
    assert lines[-1]["type"] == "end" and lines[-1]["run"]["status"] == "completed"
    # --after skips what was already seen
    code, out, _ = await linkctl(gateway.url, "runs", "attach", lines[0]["runId"], "--after", "3", "--quiet")
    assert code == 0 and out == "chunk 2\nchunk 3\n"


async def test_failed_cancelled_unknown_and_finished_runs_have_their_exit_statuses(
    gateway: ContractGateway,
) -> None:
    code, out, err = await linkctl(gateway.url, "runs", "send", "mock", '{"count": 1, "fail": "boom"}', "-a")
    assert code == exitcodes.RUN_FAILED
    assert out == "chunk 0\n" and "failed: boom" in err

    # The stream ended before the gateway recorded the desktop's done: its status still counts.
    code, out, err = await linkctl(
        gateway.url, "runs", "send", "mock", '{"count": 1, "fail": "late", "stateLags": true}', "-a"
    )
    assert code == exitcodes.RUN_FAILED, err
    assert "had not recorded the end yet (state in_progress)" in err and "failed: late" in err

    code, out, _ = await linkctl(
        gateway.url, "runs", "send", "mock", '{"count": 1000, "delayMs": 50}', "--json"
    )
    run_id = json.loads(out)["runId"]
    attach = asyncio.ensure_future(linkctl(gateway.url, "runs", "attach", run_id))
    await wait_until(lambda: gateway.runs[run_id].state["seq"] >= 3, 30)
    code, out, err = await linkctl(gateway.url, "runs", "cancel", run_id)
    assert code == 0 and f"cancel requested for run {run_id}" in out, err
    code, _, err = await attach
    assert code == exitcodes.RUN_CANCELLED and "cancelled" in err
    code, _, err = await linkctl(gateway.url, "runs", "cancel", run_id)
    assert code == exitcodes.CONFLICT and "run_finished" in err

    code, out, _ = await linkctl(gateway.url, "runs", "show", run_id, "--json")
    assert code == 0 and json.loads(out)["status"] == "cancelled"
    code, out, _ = await linkctl(gateway.url, "runs", "show", run_id)
    assert code == 0 and out.startswith(f"run {run_id}  cancelled")

    code, _, err = await linkctl(gateway.url, "runs", "show", "nope")
    assert code == exitcodes.NOT_FOUND and err.startswith("linkctl: error: GET /api/runs/nope: not found")
    code, _, err = await linkctl(gateway.url, "runs", "send", "teleport")
    assert code == exitcodes.USAGE and "unknown_runner" in err
    code, _, err = await linkctl(gateway.url, "runs", "send", "mock", "{oops")
    assert code == exitcodes.USAGE and "not valid JSON" in err and "Traceback" not in err
