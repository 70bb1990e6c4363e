"""``linkctl runs`` and ``status``/``session`` against the real stack started by ``linkctl dev``.

Real nats-server (JetStream), real studio-gateway and a real linkd, as processes. The attach
resume is checked by resetting the TCP connection between linkctl and the gateway (a proxy we
control) twice in the middle of the stream: the output must still arrive exactly once.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cli import exitcodes
from tests.faultproxy import FaultProxy
from tests.helpers import wait_until
from tests.integration.linkctl_harness import LINKCTL, DevStack, dev_stack

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="scans /proc for leftovers"),
    pytest.mark.skipif(
        importlib.util.find_spec("studio_gateway.runs.api") is None,
        reason="the gateway runs API (studio_gateway/runs/api.py) is not in this tree yet",
    ),
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    with dev_stack(tmp_path_factory.mktemp("stack") / "state") as running:
        yield running


def _env(stack: DevStack, gateway: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINKCTL_")}
    env.update(NO_COLOR="1", LINKCTL_GATEWAY=gateway or stack.gateway, LINKCTL_TOKEN=stack.token)
    return env


async def linkctl(stack: DevStack, *args: str, gateway: str | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *LINKCTL,
        *args,
        env=_env(stack, gateway),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def chunks(count: int) -> list[str]:
    return [f"chunk {i}\n" for i in range(count)]


async def test_attach_through_two_connection_resets_gets_every_chunk_once(stack: DevStack) -> None:
    count = 500  # 10 s of events: both cuts land while the run is still live
    port = int(stack.gateway.rsplit(":", 1)[1])
    async with FaultProxy(port) as proxy:
        via = f"http://127.0.0.1:{proxy.port}"
        code, out, err = await linkctl(
            stack, "runs", "send", "mock", json.dumps({"count": count, "delayMs": 20}), "--json", gateway=via
        )
        assert code == 0, err
        run_id = json.loads(out)["runId"]
        proc = await asyncio.create_subprocess_exec(
            *LINKCTL, "runs", "attach", run_id, env=_env(stack, via),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None and proc.stderr is not None
        lines: list[str] = []
        for cut_after in (40, 120):
            while len(lines) < cut_after:
                line = await asyncio.wait_for(proc.stdout.readline(), 60)
                assert line, "attach ended early"
                lines.append(line.decode())
            proxy.reset_all()
        rest, err_b = await asyncio.wait_for(proc.communicate(), 90)
    lines += rest.decode().splitlines(keepends=True)
    assert proc.returncode == 0, err_b.decode()
    assert lines == chunks(count)
    assert err_b.decode().count("connection lost") >= 2
    code, out, _ = await linkctl(stack, "runs", "show", run_id, "--json")
    state = json.loads(out)
    assert code == 0 and state["status"] == "completed" and state["finalSeq"] == state["seq"]


async def test_send_attach_json_then_show_cancel_and_errors(stack: DevStack) -> None:
    code, out, err = await linkctl(stack, "runs", "send", "mock", '{"count": 3}', "--attach", "--json")
    assert code == 0, err
    docs = [json.loads(line) for line in out.splitlines()]
    events = docs[1:-1]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert [e["data"] for e in events if e["type"] == "output"] == chunks(3)
    assert docs[-1]["type"] == "end" and docs[-1]["run"]["status"] == "completed"

    code, out, _ = await linkctl(stack, "runs", "send", "mock", '{"count": 10000, "delayMs": 50}', "--json")
    run_id = json.loads(out)["runId"]
    attach = asyncio.ensure_future(linkctl(stack, "runs", "attach", run_id, "--quiet"))
    async with httpx.AsyncClient(trust_env=False, timeout=10) as http:

        async def progressed() -> bool:
            resp = await http.get(
                f"{stack.gateway}/api/runs/{run_id}", headers={"Authorization": f"Bearer {stack.token}"}
            )
            return int(resp.json().get("seq") or 0) >= 5

        await wait_until(progressed, 60, interval=0.1, message="the run never produced 5 events")
    code, out, err = await linkctl(stack, "runs", "cancel", run_id)
    assert code == 0, err
    code, out, err = await attach
    assert code == exitcodes.RUN_CANCELLED, err
    assert out.startswith("chunk 0\nchunk 1\n")
    code, _, err = await linkctl(stack, "runs", "cancel", run_id)
    assert code == exitcodes.CONFLICT and "run_finished" in err

    code, _, err = await linkctl(stack, "runs", "show", "run_doesnotexist")
    assert code == exitcodes.NOT_FOUND
    code, _, err = await linkctl(stack, "runs", "send", "teleport")
    assert code == exitcodes.USAGE and "unknown_runner" in err and "Traceback" not in err


async def test_status_and_session_through_the_dev_gateway(stack: DevStack) -> None:
    code, out, err = await linkctl(stack, "status", "--json")  # LINKCTL_GATEWAY, no HOST
    assert code == 0, err
    assert json.loads(out)["tunnelHostname"] == stack.hostname
    code, out, _ = await linkctl(stack, "session", "--json")
    assert code == 0 and json.loads(out)["tunnelHostname"] == stack.hostname
    # The direct NATS probe with the creds dev wrote.
    creds = Path(stack.info["nats"]["creds"])
    code, out, err = await linkctl(
        stack, "status", stack.hostname, "--nats", stack.info["nats"]["url"], "--creds", str(creds), "--json"
    )
    assert code == 0 and json.loads(out)["online"] is True, err


async def test_send_without_json_prints_the_run_id_on_stdout(stack: DevStack) -> None:
    code, out, err = await linkctl(stack, "runs", "send", "echo", '"hello"')
    assert code == 0, err
    run_id = out.strip()
    assert out == run_id + "\n" and run_id  # the id alone: RUN=$(linkctl runs send ...)
    assert f"run {run_id} accepted" in err and f"linkctl runs attach {run_id}" in err
    code, out, err = await linkctl(stack, "runs", "show", run_id, "--json")
    assert code == 0 and json.loads(out)["runId"] == run_id, err
    code, out, err = await linkctl(stack, "runs", "send", "echo", '"quiet"', "--quiet")
    assert code == 0 and out.strip() and err == "", err  # --quiet drops the status lines, not the id


async def test_show_of_a_completed_and_a_cancelled_run_reads_cleanly(stack: DevStack) -> None:
    code, out, err = await linkctl(stack, "runs", "send", "mock", '{"count": 2}', "--attach", "--quiet")
    assert code == 0, err
    code, out, err = await linkctl(stack, "runs", "send", "mock", '{"count": 1}')
    run_id = out.strip()
    code, _, err = await linkctl(stack, "runs", "attach", run_id, "--quiet")
    assert code == 0, err
    code, out, err = await linkctl(stack, "runs", "show", run_id)
    assert code == 0, err
    assert out.splitlines()[0] == f"run {run_id}  completed"
    assert "stage" not in out and "running" not in out and "failure" not in out

    code, out, _ = await linkctl(stack, "runs", "send", "mock", '{"count": 10000, "delayMs": 50}')
    run_id = out.strip()
    attach = asyncio.ensure_future(linkctl(stack, "runs", "attach", run_id, "--quiet"))
    async with httpx.AsyncClient(trust_env=False, timeout=10) as http:

        async def started() -> bool:
            resp = await http.get(
                f"{stack.gateway}/api/runs/{run_id}", headers={"Authorization": f"Bearer {stack.token}"}
            )
            return int(resp.json().get("seq") or 0) >= 2

        await wait_until(started, 60, interval=0.1, message="the run never started")
    code, _, err = await linkctl(stack, "runs", "cancel", run_id)
    assert code == 0, err
    assert (await attach)[0] == exitcodes.RUN_CANCELLED
    code, out, err = await linkctl(stack, "runs", "show", run_id)
    assert code == 0, err
    rows = out.splitlines()
    assert rows[0] == f"run {run_id}  cancelled"
    assert "  reason      cancelled by the user" in rows, out
    assert "-:" not in out and "failure" not in out and "stage" not in out
