"""Runs end to end, with real processes only (issue 7, "Must show").

One operator-mode nats-server with JetStream on a file store, two ``studio-gateway serve``
processes and ``linkd up`` daemons, all separate OS processes (see ``runs_harness``). The
module shares one stack; a test that destroys a piece (a daemon, a gateway, the server)
brings it back or uses a piece of its own. Every run's truth on the desktop side is the
daemon's ``--events-file``: what the API shows must equal it, event for event.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, Final

import httpx
import nats
import pytest
from nats.aio.client import Client, RawCredentials
from nats.errors import Error as NatsError

import tunnel
from contract.run_protocol import run_event_subject, uplink_inbox_prefix
from linkd.runners.mock import mock_chunk
from studio_gateway.nats_jwt import KeyKind, creds_text, new_key
from tests.helpers import wait_until
from tests.integration.runs_harness import (
    LinkdProcess,
    RunsApi,
    RunsStack,
    SseMessage,
)
from tests.prom import sample_value

pytestmark = [pytest.mark.timeout(120)]

# The gateway's liveness timeout (reaper) for this module: short, so a lost desktop is seen fast;
# well above the daemons' 0.5 s heartbeat interval, so a busy machine never reaps a live run.
LIVENESS_SECONDS: Final = 3.0
GATEWAY_ENV: Final = {
    "RUNS_LIVENESS_TIMEOUT_SECONDS": str(LIVENESS_SECONDS),
    "RUNS_REAPER_INTERVAL_SECONDS": "0.25",
    # No resume window: a silent desktop's run fails desktop_lost at the liveness timeout (the
    # stalled state in between: test_gateway_runs_stalled.py).
    "RUNS_RESUME_WINDOW_SECONDS": "0",
}
ALICE: Final = "alice@example.com"  # the shared desktop
BOB: Final = "bob@example.com"  # a desktop that gets SIGKILLed
MALLORY: Final = "mallory@example.com"  # another user's desktop, trying to meddle
OFFLINE: Final = "nobody-home@example.com"  # never has a desktop
HOLEY: Final = "holey@example.com"  # a buggy desktop that loses an event for good
TERMINAL: Final = ("completed", "failed", "cancelled")
# Generous bounds: the machine is shared by many agents; these only catch hangs.
RUN_TIMEOUT: Final = 45.0
STREAM_TIMEOUT: Final = 45.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunsStack]:
    stack = RunsStack.start(tmp_path_factory.mktemp("runs-e2e"), gateways=2, gateway_env=GATEWAY_ENV)
    try:
        yield stack
    finally:
        stack.close()


@pytest.fixture(autouse=True)
def _diagnostics(request: pytest.FixtureRequest) -> Iterator[None]:
    """Print every process's log tail when a test of this module fails."""
    yield
    failed = False
    with_stash = getattr(request.node, "stash", None)
    try:
        from tests.conftest import _REPORT_KEY

        reports = with_stash.get(_REPORT_KEY, {}) if with_stash is not None else {}
        failed = any(r.failed for r in reports.values())
    except ImportError:
        failed = True
    if failed and "stack" in request.fixturenames:
        print(request.getfixturevalue("stack").diagnostics())


@pytest.fixture(scope="module")
def alice(stack: RunsStack) -> LinkdProcess:
    return stack.daemon(ALICE)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=15.0) as client:
        yield client


# ------------------------------------------------------------------------------ helpers


def expected_output(count: int, prefix: str = "chunk") -> str:
    return "".join(mock_chunk(prefix, i, None) for i in range(count))


def outputs(events: list[dict[str, Any]]) -> str:
    return "".join(e["data"] for e in events if e["type"] == "output")


def assert_same_events(seen: list[dict[str, Any]], daemon: list[dict[str, Any]]) -> None:
    """Each event the API returned equals the daemon's event with that seq, field for field."""
    assert [e["seq"] for e in seen] == [e["seq"] for e in daemon]
    for got, want in zip(seen, daemon, strict=True):
        for key, value in want.items():
            assert got.get(key) == value, (
                f"seq {want['seq']}: {key} is {got.get(key)!r}, daemon said {value!r}"
            )


def assert_complete_run(state: dict[str, Any], events: list[dict[str, Any]], output: str) -> None:
    """A completed run: state and events agree, seq 1..N each once, the output byte-exact."""
    seqs = [e["seq"] for e in events]
    assert state["status"] == "completed", f"the run did not complete: {json.dumps(state, sort_keys=True)}"
    assert seqs == list(range(1, len(events) + 1)), f"seqs not contiguous/unique: {seqs[:20]}..."
    done = events[-1]
    assert done["type"] == "done" and done["status"] == "completed" and done["finalSeq"] == len(events)
    assert sum(e["type"] == "done" for e in events) == 1
    assert state["seq"] == state["finalSeq"] == len(events), state
    assert state["failureKind"] is None, state
    assert state["outputBytes"] == len(output.encode()), state
    assert outputs(events) == output
    assert {e["fence"] for e in events} == {state["fence"]}


async def collect_sse(
    api: RunsApi,
    run_id: str,
    *,
    after: int | None = None,
    last_event_id: int | None = None,
    on_message: Any = None,
) -> tuple[list[SseMessage], dict[str, Any]]:
    """Every message of the run's event stream until ``end``; returns (events, final state)."""
    messages: list[SseMessage] = []
    async with (
        asyncio.timeout(STREAM_TIMEOUT),
        api.sse(run_id, after=after, last_event_id=last_event_id) as stream,
    ):
        async for message in stream:
            if message.event == "end":
                assert message.id is None, "the end message has no id"
                assert isinstance(message.data, dict), message
                return messages, message.data
            messages.append(message)
            if on_message is not None:
                await on_message(message)
    raise AssertionError(f"the event stream closed without an end message after {len(messages)} events")


async def settled_end(
    api: RunsApi, run_id: str, final: dict[str, Any], events: list[dict[str, Any]]
) -> dict[str, Any]:
    """The ``end`` message's state; in docs/runs.md's one exception, the state once projected.

    The exception: the projector more than 5 s behind a ``done`` the reader already got (the
    gateway's DONE_GRACE) ends the stream with the state as it is, not yet terminal. A burst
    of 600-1000 events on a loaded 2-core machine does that (seen: the projector at seq 847 of
    1004 when the stream ended). Only that case is let through: the stream did end with the
    ``done`` and the state was behind it; the state it then reaches is checked like any other.
    """
    if final["status"] in TERMINAL:
        return final
    assert events and events[-1]["type"] == "done", f"non-terminal end without a done: {final}"
    assert final["status"] == "in_progress" and (final["seq"] or 0) < events[-1]["seq"], final
    print(f"the end came with the state at seq {final['seq']} of {events[-1]['seq']}: projector behind")
    return await api.wait_terminal(run_id, RUN_TIMEOUT)


def check_sse_framing(messages: list[SseMessage]) -> list[dict[str, Any]]:
    """``id`` is the event's seq and ``event`` its type; returns the event payloads."""
    events: list[dict[str, Any]] = []
    for message in messages:
        assert isinstance(message.data, dict), message
        assert message.id == str(message.data["seq"]), message
        assert message.event == message.data["type"], message
        events.append(message.data)
    return events


async def uplink_events(
    stack: RunsStack, http: httpx.AsyncClient, result: str, *, at_least: float | None = None
) -> Any:
    """``studio_runs_uplink_events_total{result=...}`` summed over the gateway instances.

    With ``at_least``: whether the sum reached it (for polling).
    """
    total = 0.0
    sample = f'studio_runs_uplink_events_total{{result="{result}"}}'
    for gateway in stack.gateways:
        text = (await http.get(f"{gateway.url}/metrics")).text
        total += sample_value(text, sample) or 0.0
    return total if at_least is None else total >= at_least


def host_subjects(hostname: str) -> tunnel.HostSubjects:
    return tunnel.HostSubjects.for_host(hostname)


def event(run_id: str, fence: Any, seq: int, kind: str, **data: Any) -> dict[str, Any]:
    return {"runId": run_id, "fence": fence, "seq": seq, "ts": int(time.time() * 1000), "type": kind, **data}


async def js_publish(nc: Client, subject: str, payload: dict[str, Any], msg_id: str | None = None) -> None:
    """A JetStream publish, stored (not dropped as a duplicate); ``<runId>:<fence>:<seq>`` by default."""
    msg_id = msg_id or f"{payload['runId']}:{payload['fence']}:{payload['seq']}"
    ack = await nc.jetstream().publish(
        subject, json.dumps(payload).encode(), headers={"Nats-Msg-Id": msg_id}, timeout=10
    )
    assert not ack.duplicate, ack


class ForeignDaemon:
    """A desktop's NATS connection as the gateway grants it (its own key, the JWT the gateway signs
    for that user's host), without linkd: to publish what a buggy, old or hostile daemon would."""

    def __init__(self, nc: Client, hostname: str, errors: list[str], event: asyncio.Event) -> None:
        self.nc = nc
        self.hostname = hostname
        self.subjects = host_subjects(hostname)
        self.errors = errors
        self.error_event = event

    @classmethod
    async def connect(cls, stack: RunsStack, http: httpx.AsyncClient, user: str) -> ForeignDaemon:
        key = new_key(KeyKind.USER)
        resp = await http.post(
            f"{stack.gateways[0].url}/api/links/session",
            json={"publicKey": key.public_key},
            headers={"Authorization": f"Bearer {stack.token(user)}"},
        )
        assert resp.status_code == 200, resp.text
        session = resp.json()
        subjects = host_subjects(session["tunnelHostname"])
        errors: list[str] = []
        got_error = asyncio.Event()

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))
            got_error.set()

        nc = await nats.connect(
            stack.nats.url,
            user_credentials=RawCredentials(creds_text(session["credentials"]["jwt"], key.seed)),
            inbox_prefix=uplink_inbox_prefix(subjects).encode(),  # where its JetStream acks may arrive
            error_cb=on_error,
            allow_reconnect=False,
            connect_timeout=10,
        )
        return cls(nc, session["tunnelHostname"], errors, got_error)


# ------------------------------------------------------------------------------ the tests


async def test_offline_desktop_fails_within_a_second(stack: RunsStack, http: httpx.AsyncClient) -> None:
    api = stack.api(OFFLINE, http)
    started = time.monotonic()
    created = await api.create("mock", {"count": 5})
    assert created["status"] in ("dispatching", "failed"), created
    run_id = created["runId"]
    state = await api.wait_state(run_id, lambda s: s["status"] in TERMINAL, 5.0, "offline run never failed")
    took = time.monotonic() - started
    assert state["status"] == "failed" and state["failureKind"] == "desktop_unreachable", state
    assert isinstance(state["failureReason"], str) and state["failureReason"], state
    assert state["finishedAt"] is not None and state["userId"] == OFFLINE, state
    failed_after_ms = state["finishedAt"] - state["createdAt"]
    print(f"offline desktop: failed/desktop_unreachable {failed_after_ms} ms after creation ({took:.2f} s)")
    # Within a second by the gateway's own clock (creation to failure). Seen from here it adds the
    # POST, the 50 ms polls and a loaded machine's delays, so that bound only has to stay under the
    # dispatch timeout (10 s), the slow path of a run nobody answers.
    assert failed_after_ms <= 1000, f"the gateway took {failed_after_ms} ms to fail an offline run"
    assert took < 5.0, f"took {took:.2f}s to see an offline run failed"
    # Any gateway instance tells the same story.
    assert (await api.with_base(stack.gateways[1].url).get(run_id))["failureKind"] == "desktop_unreachable"


async def test_thousand_chunks_attach_mid_run_on_second_gateway(
    stack: RunsStack, alice: LinkdProcess, http: httpx.AsyncClient
) -> None:
    count = 1000
    api0 = stack.api(ALICE, http, gateway=0)
    api1 = api0.with_base(stack.gateways[1].url)
    run_id = (await api0.create("mock", {"count": count, "delayMs": 3}, title="thousand"))["runId"]
    # Mid-run, seen through the *other* instance.
    at_attach = await api1.wait_state(
        run_id, lambda s: (s["seq"] or 0) >= 100, RUN_TIMEOUT, "the run never got going"
    )
    assert at_attach["status"] == "in_progress", f"attach was not mid-run: {at_attach}"

    messages, end = await collect_sse(api1, run_id)
    events = check_sse_framing(messages)
    final = await settled_end(api1, run_id, end, events)
    expected = expected_output(count)
    assert_complete_run(final, events, expected)
    assert final["title"] == "thousand" and final["runner"] == "mock" and final["hostname"] == alice.hostname
    daemon_events = alice.events(run_id)
    assert_same_events(events, daemon_events)
    total = len(events)
    assert total >= count + 3  # starting-run, preparing, running, 1000 outputs, done (+ heartbeats)

    # Reattach after k: exactly k+1.. on; by query and by Last-Event-ID, on both instances.
    for k, api, by_header in ((500, api1, False), (total - 1, api0, False), (737, api0, True)):
        again, end = await collect_sse(
            api, run_id, after=None if by_header else k, last_event_id=k if by_header else None
        )
        resumed = check_sse_framing(again)
        assert [e["seq"] for e in resumed] == list(range(k + 1, total + 1)), f"after={k}"
        assert resumed == events[k:]
        assert end["status"] == "completed" and end["seq"] == total
    nothing, end = await collect_sse(api1, run_id, after=total)
    assert nothing == [] and end["status"] == "completed"

    # NDJSON flavour and the export agree.
    lines = [line async for line in api1.ndjson(run_id, after=total - 5)]
    assert [e["seq"] for e in lines[:-1]] == list(range(total - 4, total + 1))
    assert lines[-1]["type"] == "end" and lines[-1]["run"]["status"] == "completed"
    exported = await api0.export(run_id)
    assert exported == events


async def test_daemon_sigkill_mid_run_is_desktop_lost(
    stack: RunsStack, alice: LinkdProcess, http: httpx.AsyncClient
) -> None:
    bob = stack.daemon(BOB)
    api = stack.api(BOB, http, gateway=1)
    run_id = (await api.create("mock", {"count": 100000, "delayMs": 10}))["runId"]
    before = await api.wait_state(
        run_id, lambda s: (s["seq"] or 0) >= 5, RUN_TIMEOUT, "bob's run never got going"
    )
    assert before["status"] == "in_progress", before
    bob.kill()
    killed_at = time.monotonic()
    state = await api.wait_state(
        run_id, lambda s: s["status"] in TERMINAL, LIVENESS_SECONDS + 10, "the lost run was never reaped"
    )
    took = time.monotonic() - killed_at
    assert state["status"] == "failed" and state["failureKind"] == "desktop_lost", state
    assert state["failureReason"], state
    print(f"daemon SIGKILL -> failed/desktop_lost after {took:.2f}s (liveness {LIVENESS_SECONDS}s)")
    assert took <= LIVENESS_SECONDS + 2.0, f"reaped after {took:.2f}s"

    # A late event cannot resurrect it: a fenced done arriving now (as a daemon would send after
    # reconnecting) is ignored. Alice's next run goes through the same projector after it.
    produced = bob.events(run_id)  # written before the uplink gets each event: nothing later exists
    late = produced[-1]["seq"] + 1
    revived = await ForeignDaemon.connect(stack, http, BOB)  # bob's desktop, back with a fresh session
    try:
        subject = run_event_subject(host_subjects(bob.hostname), run_id)
        late_done = event(run_id, produced[-1]["fence"], late, "done", finalSeq=late, status="completed")
        await js_publish(revived.nc, subject, late_done)
    finally:
        await revived.nc.close()
    alice_api = stack.api(ALICE, http)
    marker = (await alice_api.create("mock", {"count": 2}))["runId"]
    assert (await alice_api.wait_terminal(marker, RUN_TIMEOUT))["status"] == "completed"
    after = await api.get(run_id)
    assert after["status"] == "failed" and after["failureKind"] == "desktop_lost", after
    assert after["seq"] == state["seq"], after


@pytest.mark.parametrize("how", ["graceful", "sigkill"])
async def test_nats_server_restart_mid_run(
    stack: RunsStack, alice: LinkdProcess, http: httpx.AsyncClient, how: str
) -> None:
    count = 600
    api = stack.api(ALICE, http, gateway=0)
    run_id = (await api.create("mock", {"count": count, "delayMs": 5}))["runId"]
    await api.wait_state(run_id, lambda s: (s["seq"] or 0) >= 50, RUN_TIMEOUT, "the run never got going")
    if how == "sigkill":
        stack.nats.kill()  # a crash: no goodbye to clients (acked data is in the store's files)
    # Same port, same file store (a graceful stop first, when still running).
    await asyncio.to_thread(stack.nats.restart)
    for gateway in stack.gateways:
        await gateway.wait_ready()
    state = await api.wait_terminal(run_id, RUN_TIMEOUT)
    exported = await api.export(run_id)
    assert_complete_run(state, exported, expected_output(count))
    assert_same_events(exported, alice.events(run_id))
    # The other instance reads the same.
    assert await api.with_base(stack.gateways[1].url).get(run_id) == await api.get(run_id)


async def test_gateway_sigkill_mid_run_other_instance_completes_it(
    stack: RunsStack, alice: LinkdProcess, http: httpx.AsyncClient
) -> None:
    count = 600
    victim, survivor = stack.gateways[0], stack.gateways[1]
    api0 = stack.api(ALICE, http, gateway=0)
    api1 = api0.with_base(survivor.url)
    run_id = (await api0.create("mock", {"count": count, "delayMs": 5}))["runId"]
    seen: list[SseMessage] = []
    killed = asyncio.Event()

    async def kill_mid_stream(message: SseMessage) -> None:
        seen.append(message)
        if len(seen) == 60 and not killed.is_set():
            victim.kill()
            killed.set()

    try:
        # A client attached to the survivor watches the whole run across the crash.
        messages, end = await collect_sse(api1, run_id, on_message=kill_mid_stream)
        assert killed.is_set() and not victim.running
        events = check_sse_framing(messages)
        final = await settled_end(api1, run_id, end, events)
        assert_complete_run(final, events, expected_output(count))
        assert_same_events(events, alice.events(run_id))
        assert await api1.export(run_id) == events
        assert await api1.get(run_id) == final
    finally:
        if not victim.running:
            await victim.astart()
    # The restarted instance agrees.
    assert (await api0.get(run_id))["status"] == "completed"


async def test_stale_fence_and_foreign_host_events_are_ignored(
    stack: RunsStack, alice: LinkdProcess, http: httpx.AsyncClient
) -> None:
    count = 300
    api = stack.api(ALICE, http)
    run_id = (await api.create("mock", {"count": count, "delayMs": 10}))["runId"]
    state = await api.wait_state(
        run_id, lambda s: (s["seq"] or 0) >= 10, RUN_TIMEOUT, "the run never got going"
    )
    fence = alice.events(run_id)[0]["fence"]  # the execution's fence, as the daemon stamps it
    stale: Any = fence - 1 if isinstance(fence, int) and fence > 0 else f"stale-{fence}"
    next_seq = state["seq"] + 1
    alice_subject = run_event_subject(host_subjects(alice.hostname), run_id)
    counted_before = {
        result: await uplink_events(stack, http, result) for result in ("stale_fence", "wrong_host")
    }

    # 1. Stale fence, on alice's own subject, with a credential of alice's host (what an older
    # execution of her daemon holds): output, and a done that would end the run early.
    old_daemon = await ForeignDaemon.connect(stack, http, ALICE)
    try:
        await js_publish(
            old_daemon.nc,
            alice_subject,
            event(run_id, stale, next_seq, "output", stream="stdout", data="BAD"),
        )
        await js_publish(
            old_daemon.nc,
            alice_subject,
            event(run_id, stale, next_seq + 1, "done", finalSeq=next_seq + 1, status="completed"),
        )
        assert old_daemon.errors == []
    finally:
        await old_daemon.nc.close()

    # 2. Another host's daemon, with its own operator-mode credentials (its key, the gateway's JWT).
    mallory = await ForeignDaemon.connect(stack, http, MALLORY)
    try:
        # Under its own host (NATS allows it): events that would apply to alice's run were the
        # host not checked (right fence, the next seq); its own message ids, so JetStream keeps them.
        own_subject = run_event_subject(mallory.subjects, run_id)
        evil = event(run_id, fence, next_seq, "output", stream="stdout", data="EVIL")
        await js_publish(mallory.nc, own_subject, evil, msg_id=f"mallory-{run_id}-1")
        evil_done = event(run_id, fence, next_seq + 1, "done", finalSeq=next_seq + 1, status="failed")
        await js_publish(mallory.nc, own_subject, evil_done, msg_id=f"mallory-{run_id}-2")
        # Under alice's host: refused by NATS itself.
        await mallory.nc.publish(alice_subject, json.dumps(evil_done).encode())
        await mallory.nc.flush(timeout=10)
        await asyncio.wait_for(mallory.error_event.wait(), 10)
        assert any(
            "permissions violation" in e.lower() and alice_subject.lower() in e.lower()
            for e in mallory.errors
        ), mallory.errors
        with pytest.raises((NatsError, asyncio.TimeoutError)):
            await mallory.nc.jetstream().publish(alice_subject, b"{}", timeout=1.0)
    finally:
        await mallory.nc.close()

    # The run goes on untouched and ends exactly as the daemon produced it.
    final = await api.wait_terminal(run_id, RUN_TIMEOUT)
    exported = await api.export(run_id)
    assert_complete_run(final, exported, expected_output(count))
    assert_same_events(exported, alice.events(run_id))
    assert "BAD" not in outputs(exported) and "EVIL" not in outputs(exported)
    # The stale ones did reach the projector, which looked at them and ignored them (counted on
    # /metrics); mallory's host has no runs, so no consumer: its events never reach a projector.
    for result, before in counted_before.items():
        if result == "wrong_host":
            assert await uplink_events(stack, http, result) == before
            continue
        await wait_until(
            functools.partial(uplink_events, stack, http, result, at_least=before + 2),
            RUN_TIMEOUT,
            message=f"the projector never counted the two {result} events",
        )


async def test_cancel_stops_the_runner_on_the_desktop(
    stack: RunsStack, alice: LinkdProcess, http: httpx.AsyncClient
) -> None:
    api = stack.api(ALICE, http, gateway=0)
    run_id = (await api.create("mock", {"count": 100000, "delayMs": 10}))["runId"]
    await api.wait_state(run_id, lambda s: (s["seq"] or 0) >= 10, RUN_TIMEOUT, "the run never got going")
    resp = await api.with_base(stack.gateways[1].url).cancel(run_id)
    assert resp.status_code == 202, resp.text
    assert resp.json()["runId"] == run_id
    state = await api.wait_terminal(run_id, RUN_TIMEOUT)
    assert state["status"] == "cancelled", state
    # On the desktop: the runner stopped and the run ended cancelled, its done is the last event.
    daemon_events = await wait_until(
        lambda: (evs := alice.events(run_id)) and evs[-1]["type"] == "done" and evs,
        RUN_TIMEOUT,
        message="the daemon never ended the run",
    )
    assert daemon_events[-1]["status"] == "cancelled", daemon_events[-1]
    produced = sum(e["type"] == "output" for e in daemon_events)
    assert produced < 100000
    ended = [r for r in alice.log_records() if r.get("event") == "run_ended" and r.get("run_id") == run_id]
    assert ended and ended[-1]["status"] == "cancelled", ended
    exported = await api.export(run_id)
    assert_same_events(exported, daemon_events)
    assert state["seq"] == state["finalSeq"] == len(daemon_events), state
    again = await api.cancel(run_id)
    assert again.status_code == 409 and again.json()["error"]["code"] == "run_finished", again.text


async def test_another_host_cannot_preempt_a_runs_message_ids(
    stack: RunsStack, alice: LinkdProcess, http: httpx.AsyncClient
) -> None:
    """A foreign daemon that knows a run id publishes, under its own host, with the message ids
    alice's daemon is about to use (``<runId>:<fence>:<seq>``): the run must still complete intact.

    JetStream's duplicate window is per stream, not per subject: if the ids do not name the host,
    the foreign message is stored first and alice's real event is dropped as its duplicate.
    """
    count = 200
    api = stack.api(ALICE, http)
    run_id = (await api.create("mock", {"count": count, "delayMs": 10}))["runId"]
    await api.wait_state(run_id, lambda s: (s["seq"] or 0) >= 5, RUN_TIMEOUT, "the run never got going")
    fence = alice.events(run_id)[0]["fence"]
    ahead = alice.events(run_id)[-1]["seq"] + 60  # well ahead of the daemon: it has not sent it yet
    mallory = await ForeignDaemon.connect(stack, http, MALLORY)
    try:
        subject = run_event_subject(mallory.subjects, run_id)
        for seq in (ahead, ahead + 1):
            await js_publish(
                mallory.nc, subject, event(run_id, fence, seq, "output", stream="stdout", data="X")
            )
    finally:
        await mallory.nc.close()
    # The daemon needs about 2 s for the rest; a run stuck on a missing event must not hang either.
    final = await api.wait_terminal(run_id, 20.0)
    exported = await api.export(run_id)
    assert_complete_run(final, exported, expected_output(count))
    assert_same_events(exported, alice.events(run_id))


async def test_a_run_missing_an_event_for_good_does_not_hang(
    stack: RunsStack, http: httpx.AsyncClient
) -> None:
    """A buggy desktop accepts the work, then sends seq 1, 2, 4 and a done (seq 5): seq 3 never
    comes. The run cannot complete (its output has a hole) and must not stay in progress forever:
    it fails within the liveness timeout (plus slack) after the desktop went quiet.
    """
    desktop = await ForeignDaemon.connect(stack, http, HOLEY)
    work: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    async def handler(request: tunnel.Request) -> tunnel.Response:
        if request.path == "/api/links/work":
            item = json.loads(await request.read())
            if not work.done():
                work.set_result(item)
            body = {"accepted": True, "runId": item["runId"], "fence": item["runFenceToken"]}
            return tunnel.Response(202, [("content-type", "application/json")], json.dumps(body))
        status = {"hostname": "holey-desk", "capabilities": ["mock"], "cliVersion": "0"}
        return tunnel.Response(200, [("content-type", "application/json")], json.dumps(status))

    server = await tunnel.serve(desktop.nc, desktop.hostname, handler)
    try:
        api = stack.api(HOLEY, http)
        run_id = (await api.create("mock", {"count": 3}))["runId"]
        item = await asyncio.wait_for(work, 15)
        fence = item["runFenceToken"]
        subject = run_event_subject(desktop.subjects, run_id)
        for payload in (
            event(run_id, fence, 1, "stage", stage="starting-run"),
            event(run_id, fence, 2, "output", stream="stdout", data="a"),
            event(run_id, fence, 4, "output", stream="stdout", data="c"),
            event(run_id, fence, 5, "done", finalSeq=5, status="completed"),
        ):
            await js_publish(desktop.nc, subject, payload)
        quiet_since = time.monotonic()
        state = await api.wait_terminal(run_id, LIVENESS_SECONDS + 8)
        took = time.monotonic() - quiet_since
        assert state["status"] == "failed", state
        assert state["seq"] == 2 and state["outputBytes"] == 1, state
        print(f"run with a hole: {state['status']}/{state['failureKind']} {took:.1f}s after the last event")
        assert took <= LIVENESS_SECONDS + 5, f"ended {took:.1f}s after the desktop went quiet"
    finally:
        await server.close(timeout=1.0)
        await desktop.nc.close()
