"""A desktop that goes silent mid-run (issue 15, "Must show"): its run is ``stalled``, not lost.

Real processes only (``runs_harness``): a JetStream nats-server, one ``studio-gateway serve``
and a ``linkd up`` daemon, which the test freezes with SIGSTOP, as a closed laptop lid would,
and thaws with SIGCONT. Short settings: liveness 1.5 s (linkd heartbeats every 0.5 s), resume
window 4 s.

- frozen for twice the liveness timeout: the run shows ``stalled`` (``GET`` and the SSE stream,
  with ``stalledSince`` and ``resumeDeadline``) and, thawed, completes with every event the
  daemon produced, byte-exact;
- frozen past the resume window: the run fails ``desktop_lost`` and stays failed while the
  thawed daemon's late events arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, Final

import httpx
import pytest

from linkd.runners.mock import mock_chunk
from tests.helpers import settled_value, wait_until
from tests.integration.runs_harness import LinkdProcess, RunsApi, RunsStack, SseMessage
from tests.prom import sample_value

pytestmark = [pytest.mark.timeout(120)]

LIVENESS: Final = 1.5
WINDOW: Final = 4.0
GATEWAY_ENV: Final = {
    "RUNS_LIVENESS_TIMEOUT_SECONDS": str(LIVENESS),
    "RUNS_RESUME_WINDOW_SECONDS": str(WINDOW),
    "RUNS_REAPER_INTERVAL_SECONDS": "0.1",
}
USER: Final = "sleepy@example.com"
TIMEOUT: Final = 30.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunsStack]:
    stack = RunsStack.start(tmp_path_factory.mktemp("runs-stalled"), gateways=1, gateway_env=GATEWAY_ENV)
    try:
        yield stack
    finally:
        stack.close()


@pytest.fixture(scope="module")
def desktop(stack: RunsStack) -> LinkdProcess:
    return stack.daemon(USER)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=15.0) as client:
        yield client


@contextlib.contextmanager
def frozen(daemon: LinkdProcess) -> Iterator[float]:
    """SIGSTOP the daemon (yields when), SIGCONT it on the way out whatever happens."""
    assert daemon.pid is not None
    os.kill(daemon.pid, signal.SIGSTOP)
    try:
        yield time.monotonic()
    finally:
        os.kill(daemon.pid, signal.SIGCONT)


async def metric(stack: RunsStack, http: httpx.AsyncClient, sample: str) -> float:
    text = (await http.get(f"{stack.gateways[0].url}/metrics")).text
    return sample_value(text, sample) or 0.0


async def settled_metric(stack: RunsStack, http: httpx.AsyncClient, sample: str, at_least: float) -> float:
    """The sample once it reaches ``at_least`` (see :func:`tests.helpers.settled_value`)."""
    return await settled_value(lambda: metric(stack, http, sample), at_least, TIMEOUT, what=sample)


def expected_output(count: int) -> str:
    return "".join(mock_chunk("chunk", i, None) for i in range(count))


async def read_stream(api: RunsApi, run_id: str, into: list[SseMessage]) -> None:
    async with asyncio.timeout(TIMEOUT * 2), api.sse(run_id) as stream:
        async for message in stream:
            into.append(message)
            if message.event == "end":
                return


async def test_a_frozen_desktop_stalls_its_run_which_resumes_byte_exact(
    stack: RunsStack, desktop: LinkdProcess, http: httpx.AsyncClient
) -> None:
    count = 40
    api = stack.api(USER, http)
    run_id = (await api.create("mock", {"count": count, "delayMs": 100}))["runId"]
    await api.wait_state(run_id, lambda s: (s["seq"] or 0) >= 5, TIMEOUT, "the run never got going")
    messages: list[SseMessage] = []
    reader = asyncio.ensure_future(read_stream(api, run_id, messages))
    try:
        with frozen(desktop) as since:
            stalled = await api.wait_state(
                run_id, lambda s: s["status"] != "in_progress", TIMEOUT, "the run never stalled"
            )
            assert stalled["status"] == "stalled", stalled
            assert stalled["failureKind"] is None and stalled["finishedAt"] is None, stalled
            # Since it went silent for the liveness timeout, until the window after that.
            assert stalled["stalledSince"] == stalled["lastEventAt"] + int(LIVENESS * 1000), stalled
            assert stalled["resumeDeadline"] == stalled["stalledSince"] + int(WINDOW * 1000), stalled
            await wait_until(
                lambda: any(m.event == "state" for m in messages), TIMEOUT, message="no state message"
            )

            async def one_stalled() -> bool:  # set at the end of the reaper's pass
                return await metric(stack, http, "studio_runs_stalled") == 1

            await wait_until(one_stalled, TIMEOUT, message="studio_runs_stalled never showed it")
            assert await metric(stack, http, "studio_runs_stalls_total") == 1
            # The outage lasts twice the liveness timeout (a duration, not a synchronisation).
            await asyncio.sleep(max(0.0, 2 * LIVENESS - (time.monotonic() - since)))
        await asyncio.wait_for(reader, TIMEOUT * 2)
    finally:
        reader.cancel()
    final = await api.get(run_id)
    assert final["status"] == "completed", final
    assert final["stalledSince"] is None and final["resumeDeadline"] is None, final

    # The SSE reader saw: events, `state` stalled, `state` resumed, the rest of the events, `end`.
    states = [m.data for m in messages if m.event == "state"]
    assert [s["status"] for s in states] == ["stalled", "in_progress"], states
    assert all(m.id is None for m in messages if m.event in ("state", "end"))
    assert states[0]["resumeDeadline"] == stalled["resumeDeadline"]
    events = [m.data for m in messages if m.event not in ("state", "end")]
    assert [m.id for m in messages if m.event not in ("state", "end")] == [str(e["seq"]) for e in events]
    first_state = next(i for i, m in enumerate(messages) if m.event == "state")
    assert 5 <= first_state < len(messages) - 2  # mid-run, as the run went on after it

    # Byte-exact: every event the daemon produced, once each, in order; the output exactly.
    truth = desktop.events(run_id)
    assert [e["seq"] for e in events] == list(range(1, len(truth) + 1))
    assert events == truth
    assert await api.export(run_id) == truth
    output = "".join(e["data"] for e in events if e["type"] == "output")
    assert output == expected_output(count)
    assert final["outputBytes"] == len(output.encode()) and final["seq"] == final["finalSeq"] == len(truth)
    assert await metric(stack, http, "studio_runs_resumed_total") == 1

    async def none_stalled() -> bool:  # the gauge follows the reaper's passes
        return await metric(stack, http, "studio_runs_stalled") == 0

    await wait_until(none_stalled, TIMEOUT, message="studio_runs_stalled stayed above 0")


async def test_past_the_resume_window_the_run_is_lost_and_late_events_do_not_revive_it(
    stack: RunsStack, desktop: LinkdProcess, http: httpx.AsyncClient
) -> None:
    api = stack.api(USER, http)
    run_id = (await api.create("mock", {"count": 400, "delayMs": 20}))["runId"]
    await api.wait_state(run_id, lambda s: (s["seq"] or 0) >= 5, TIMEOUT, "the run never got going")
    expired_before = await metric(stack, http, "studio_runs_resume_expired_total")
    terminal_before = await metric(stack, http, 'studio_runs_uplink_events_total{result="terminal"}')
    with frozen(desktop):
        stalled = await api.wait_state(
            run_id, lambda s: s["status"] != "in_progress", TIMEOUT, "the run never stalled"
        )
        assert stalled["status"] == "stalled", stalled
        failed = await api.wait_state(
            run_id, lambda s: s["status"] != "stalled", LIVENESS + WINDOW + TIMEOUT, "it stayed stalled"
        )
        produced = len(desktop.events(run_id))
    assert failed["status"] == "failed" and failed["failureKind"] == "desktop_lost", failed
    assert "resume window" in failed["failureReason"], failed
    assert failed["fence"] == 2 and failed["stalledSince"] is None, failed
    assert failed["finishedAt"] >= stalled["resumeDeadline"], (failed, stalled)
    expired = await settled_metric(stack, http, "studio_runs_resume_expired_total", expired_before + 1)
    assert expired == expired_before + 1
    lost = 'studio_runs_finished_total{status="failed",failure_kind="desktop_lost"}'
    assert await settled_metric(stack, http, lost, 1) >= 1

    # Thawed, the daemon goes on publishing the run's events: they arrive, and change nothing.
    await wait_until(
        lambda: len(desktop.events(run_id)) > produced + 5, TIMEOUT, message="the thawed daemon is silent"
    )

    async def late_events_seen() -> bool:
        seen = await metric(stack, http, 'studio_runs_uplink_events_total{result="terminal"}')
        return seen >= terminal_before + 5

    await wait_until(late_events_seen, TIMEOUT, message="the late events never reached the projector")
    after: dict[str, Any] = await api.get(run_id)
    assert after == failed
