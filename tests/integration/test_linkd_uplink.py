"""The run uplink against a real nats-server with JetStream and a real ``LINK_RUNS`` stream.

Every test reads the stream back message by message and checks that each event of a
run is stored exactly once (by its ``Nats-Msg-Id``), with the right subject and body.
Faults are real: a nats-server stopped and started again on the same port with its file
store, a TCP proxy that stalls the connection (publish acks arrive late), no stream at
all (no responders), an operator-mode credential with only the uplink grant.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client, RawCredentials
from nats.js import JetStreamContext

import tunnel
from cli.nats_server import NatsServer
from contract.run_protocol import (
    RUN_STREAM,
    run_event_subject,
    run_stream_subjects,
    split_events,
    uplink_inbox_prefix,
    uplink_publish_grant,
)
from linkd.run_events import RunEvent
from linkd.runners.base import WorkItem
from linkd.runners.mock import MockRunner, mock_chunk
from linkd.runs import RunManager
from linkd.uplink import JetStreamUplink
from studio_gateway.nats_jwt import KeyKind, OperatorSetup, creds_text, new_key
from tests.faultproxy import FaultProxy
from tests.helpers import NatsServerFactory, wait_until
from tunnel.backoff import Backoff
from tunnel.connect import connect

pytestmark = pytest.mark.timeout(60)

HOST = "desk-uplink"
SUBJECTS = tunnel.HostSubjects.for_host(HOST)
TIMEOUT = 20.0  # generous: the machine is shared


@dataclass(frozen=True)
class Stored:
    stream_seq: int
    subject: str
    msg_id: str
    event: dict[str, Any]


def js_server(factory: NatsServerFactory, tmp_path: Path, **kwargs: Any) -> NatsServer:
    return factory(jetstream=True, store_dir=str(tmp_path / "jetstream"), **kwargs)


async def create_stream(js: JetStreamContext, duplicate_window: float = 120.0) -> None:
    await js.add_stream(
        name=RUN_STREAM, subjects=run_stream_subjects(), duplicate_window=duplicate_window, storage="file"
    )


async def stored_events(js: JetStreamContext) -> list[Stored]:
    """Every message of the stream, in stream order."""
    info = await js.stream_info(RUN_STREAM)
    out: list[Stored] = []
    if info.state.messages == 0:
        return out
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg(RUN_STREAM, seq)
        assert msg.data is not None and msg.subject is not None
        headers = msg.headers or {}
        for line in split_events(msg.data):  # one event, or a batch of them (one per line)
            out.append(Stored(seq, msg.subject, headers.get("Nats-Msg-Id", ""), json.loads(line)))
    return out


async def stream_count(js: JetStreamContext) -> int:
    return int((await js.stream_info(RUN_STREAM)).state.messages)


def assert_exactly_once(stored: list[Stored], run_id: str, fence: int, final_seq: int) -> None:
    """Seqs 1..final_seq of the run, each once, with matching subject, msg id and body."""
    mine = [s for s in stored if s.event["runId"] == run_id]
    seqs = [s.event["seq"] for s in mine]
    assert sorted(seqs) == list(range(1, final_seq + 1)), f"{run_id}: {len(seqs)} stored, final {final_seq}"
    executions = set()
    for s in mine:
        assert s.subject == run_event_subject(SUBJECTS, run_id)
        # <run>:<fence>:<seq>:<execution>, or a batch's <run>:<fence>:<first>-<last>:<execution>
        match = re.fullmatch(rf"{re.escape(run_id)}:{fence}:(\d+)(?:-(\d+))?(:[0-9a-f]{{16}})?", s.msg_id)
        assert match is not None, s.msg_id
        first, last = int(match[1]), int(match[2] or match[1])
        assert first <= s.event["seq"] <= last, s.msg_id
        executions.add(match[3] or "")
        assert s.event["fence"] == fence
    assert len(executions) == 1  # one execution, one random id part, on every event and retry


def events(run_id: str, n: int, fence: int = 1) -> list[RunEvent]:
    return [
        RunEvent(
            run_id, fence, seq, "output", int(time.time() * 1000), {"stream": "stdout", "data": f"{seq}\n"}
        )
        for seq in range(1, n + 1)
    ]


@asynccontextmanager
async def admin(url: str, **kwargs: Any) -> AsyncIterator[tuple[Client, JetStreamContext]]:
    nc = await nats.connect(url, **kwargs)
    try:
        yield nc, nc.jetstream()
    finally:
        await nc.close()


@asynccontextmanager
async def daemon_connection(url: str, **kwargs: Any) -> AsyncIterator[Client]:
    """The daemon's side: tunnel.connect (reconnects forever) with the host's inbox prefix."""
    kwargs.setdefault("inbox_prefix", uplink_inbox_prefix(SUBJECTS))
    nc = await connect(url, **kwargs)
    try:
        yield nc
    finally:
        await nc.close()


@asynccontextmanager
async def attached(nc: Client | None, **kwargs: Any) -> AsyncIterator[JetStreamUplink]:
    uplink = JetStreamUplink(**kwargs)
    if nc is not None:
        uplink.attach(nc, SUBJECTS)
    try:
        yield uplink
    finally:
        await uplink.aclose(1.0)


def mock_item(run_id: str, fence: int = 1, **input: Any) -> WorkItem:
    return WorkItem(run_id, "thread-1", "user-1", fence, "mock", input)


# ------------------------------------------------------------------------------ throughput and order


async def test_a_1000_chunk_run_lands_in_the_stream_exactly_once_in_order_and_fast(
    nats_server_factory: NatsServerFactory, tmp_path: Path
) -> None:
    server = js_server(nats_server_factory, tmp_path)
    async with admin(server.url) as (_, js), daemon_connection(server.url) as nc:
        await create_stream(js)
        async with attached(nc) as uplink:
            runs = RunManager({"mock": MockRunner()}, uplink, heartbeat_interval=60)
            started = time.perf_counter()
            assert runs.submit(mock_item("run-1000", 3, count=1000)).outcome.value == "started"
            info = await runs.wait_finished("run-1000", TIMEOUT)
            assert await uplink.flush(TIMEOUT)
            took = time.perf_counter() - started
            assert info.status == "completed" and info.recorder is not None
            final_seq = info.recorder.seq
            assert uplink.status() == {
                "state": "idle",
                "outbox": 0,
                "inFlight": 0,
                "delivered": final_seq,
                "retries": 0,
                "lastError": None,
                "outboxBytes": 0,
                "oldestUnackedSeconds": None,
                "journal": None,
                "restored": 0,
            }

        # The same number of events as plain sequential js.publish calls (ack awaited each time).
        raw_js = nc.jetstream()
        raw_started = time.perf_counter()
        for seq in range(1, final_seq + 1):
            await raw_js.publish(
                run_event_subject(SUBJECTS, "raw"), b'{"x":1}', headers={"Nats-Msg-Id": f"raw:1:{seq}"}
            )
        raw_took = time.perf_counter() - raw_started

        stored = [s for s in await stored_events(js) if s.event.get("runId") == "run-1000"]
        assert_exactly_once(stored, "run-1000", 3, final_seq)
        assert [s.event["seq"] for s in stored] == list(range(1, final_seq + 1))  # no faults: in order
        outputs = [s.event["data"] for s in stored if s.event["type"] == "output"]
        assert outputs == [mock_chunk("chunk", i, None) for i in range(1000)]
        assert stored[-1].event["type"] == "done" and stored[-1].event["finalSeq"] == final_seq
        print(
            f"\nuplink: {final_seq} events in {took * 1000:.0f} ms ({final_seq / took:.0f} events/s, "
            f"whole run incl. runner); raw sequential js.publish: {raw_took * 1000:.0f} ms "
            f"({final_seq / raw_took:.0f} events/s)"
        )
        # "Well under a second" on an idle machine; the bound is generous for a shared CI box.
        assert took < 5.0


# ------------------------------------------------------------------------------ faults


async def test_nats_server_restart_mid_run_loses_nothing_and_stores_nothing_twice(
    nats_server_factory: NatsServerFactory, tmp_path: Path
) -> None:
    server = js_server(nats_server_factory, tmp_path)
    async with admin(server.url) as (_, js):
        await create_stream(js)
    async with daemon_connection(server.url) as nc, attached(nc, ack_timeout=1.0) as uplink:
        runs = RunManager({"mock": MockRunner()}, uplink, heartbeat_interval=60)
        runs.submit(mock_item("run-restart", 2, count=600, delayMs=4))
        info = runs.get("run-restart")
        assert info is not None

        async with admin(server.url) as (_, js):
            await wait_until(
                lambda: _count_at_least(js, 50), TIMEOUT, message="no events stored before the stop"
            )
        await asyncio.to_thread(server.stop)
        at_stop = info.recorder.seq if info.recorder is not None else 0
        # The run goes on while NATS is away: its events wait in the outbox.
        await wait_until(
            lambda: info.recorder is not None and info.recorder.seq >= at_stop + 100,
            TIMEOUT,
            message="the run made no progress while NATS was down",
        )
        assert len(uplink.outbox) >= 100
        assert uplink.status()["state"] == "waiting for NATS to reconnect"
        acked_before = uplink.outbox.acked_total
        await asyncio.to_thread(server.start)
        restarted = time.monotonic()
        await wait_until(
            lambda: uplink.outbox.acked_total >= acked_before + 100,
            TIMEOUT,
            message="no delivery after restart",
        )
        caught_up = time.monotonic() - restarted
        # Reconnect (nats-py waits up to ~1 s), JetStream recovery, then the backlog: seconds, not more.
        assert caught_up < 10.0
        print(f"\nthe uplink delivered 100 queued events {caught_up:.2f}s after the restart")

        finished = await runs.wait_finished("run-restart", TIMEOUT)
        assert finished.status == "completed" and finished.recorder is not None
        assert await uplink.flush(TIMEOUT), uplink.status()
        final_seq = finished.recorder.seq

    async with admin(server.url) as (_, js):
        stored = await stored_events(js)
        assert len(stored) == final_seq >= await stream_count(js)  # events; a message may hold several
        assert_exactly_once(stored, "run-restart", 2, final_seq)
        by_seq = {s.event["seq"]: s.event for s in stored}
        assert by_seq[final_seq]["type"] == "done" and by_seq[final_seq]["finalSeq"] == final_seq


async def _count_at_least(js: JetStreamContext, n: int) -> bool:
    return await stream_count(js) >= n


async def test_late_publish_acks_are_retried_with_the_same_id_and_stored_once(
    nats_server_factory: NatsServerFactory, tmp_path: Path
) -> None:
    server = js_server(nats_server_factory, tmp_path)
    async with admin(server.url) as (_, js), FaultProxy(server.port) as proxy:
        await create_stream(js)
        async with (
            daemon_connection(proxy.url) as nc,
            attached(nc, ack_timeout=0.3, retry=Backoff(initial=0.05, cap=0.2)) as uplink,
        ):
            batch = events("run-late", 100)
            await uplink.emit("run-late", 1, batch[0])
            assert await uplink.flush(TIMEOUT)
            proxy.pause()  # the link stalls: publishes and acks wait inside it, nothing is lost
            for event in batch[1:]:
                await uplink.emit("run-late", 1, event)
            await wait_until(lambda: uplink.retries >= 3, TIMEOUT, message="ack timeouts were not retried")
            assert "no publish acknowledgement within 0.3s" in str(uplink.status()["lastError"])
            proxy.resume()
            assert await uplink.flush(TIMEOUT), uplink.status()
            # The stalled first publishes arrive after all, and so do their retries: same ids, dropped.
            assert uplink.duplicates >= 1
            assert uplink.status()["lastError"] is None

        stored = await stored_events(js)
        assert len(stored) == 100 >= await stream_count(js)  # events; a message may hold several
        assert_exactly_once(stored, "run-late", 1, 100)


async def test_without_a_stream_it_warns_once_backs_off_keeps_the_bound_and_delivers_once_the_stream_exists(
    nats_server_factory: NatsServerFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = js_server(nats_server_factory, tmp_path)
    caplog.set_level(logging.INFO, logger="linkd.uplink")
    async with (
        admin(server.url) as (_, js),
        daemon_connection(server.url) as nc,
        attached(nc, max_events=50, retry=Backoff(initial=0.05, cap=0.2, jitter=0.0)) as uplink,
    ):
        batch = events("run-nostream", 60)
        for event in batch[:50]:
            await uplink.emit("run-nostream", 1, event)
        blocked = asyncio.ensure_future(_emit_all(uplink, batch[50:]))
        await wait_until(lambda: uplink.retries >= 1, TIMEOUT, message="never retried")
        first_retry = time.monotonic()
        await wait_until(lambda: uplink.retries >= 4, TIMEOUT, message="stopped retrying")
        # Backoff, not a hot loop: 0.1 + 0.2 + 0.2 s between the first and the fourth retry (less what
        # polling may lose), so retries trickle in one at a time; and one probe event at a time.
        assert time.monotonic() - first_retry >= 0.3
        assert uplink.retries <= 8
        assert uplink.outbox.in_flight <= 1  # probing with one event, not the whole window
        assert not blocked.done() and len(uplink.outbox) == 50  # the bound holds
        assert "no JetStream stream stores run events" in str(uplink.status()["state"])
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, warnings
        assert warnings[0].startswith("run uplink: no JetStream stream stores run events yet")

        await create_stream(js)
        await asyncio.wait_for(blocked, TIMEOUT)
        assert await uplink.flush(TIMEOUT)
        stored = await stored_events(js)
        assert_exactly_once(stored, "run-nostream", 1, 60)
        assert [s.event["seq"] for s in stored] == list(range(1, 61))
        assert any("delivering again" in r.getMessage() for r in caplog.records)


async def _emit_all(uplink: JetStreamUplink, batch: list[RunEvent]) -> None:
    for event in batch:
        await uplink.emit(event.run_id, event.fence, event)


async def test_connection_swap_mid_stream_delivers_everything_once_on_the_new_connection(
    nats_server_factory: NatsServerFactory, tmp_path: Path
) -> None:
    server = js_server(nats_server_factory, tmp_path)
    async with admin(server.url) as (_, js):
        await create_stream(js)
        async with daemon_connection(server.url) as first, attached(first) as uplink:
            batch = events("run-swap", 400)
            for event in batch[:200]:
                await uplink.emit("run-swap", 1, event)
            uplink.attach(None)  # the daemon discards the connection (e.g. credentials expired)
            await first.close()
            for event in batch[200:]:
                await uplink.emit("run-swap", 1, event)
            assert uplink.status()["state"] == "waiting for a connection"
            async with daemon_connection(server.url) as second:
                uplink.attach(second, SUBJECTS)
                assert await uplink.flush(TIMEOUT), uplink.status()
        stored = await stored_events(js)
        assert len(stored) == 400
        assert_exactly_once(stored, "run-swap", 1, 400)


async def test_an_event_bigger_than_max_payload_is_stored_truncated_and_the_run_goes_on(
    nats_server_factory: NatsServerFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = js_server(nats_server_factory, tmp_path, max_payload=8192)
    async with admin(server.url) as (_, js), daemon_connection(server.url) as nc:
        await create_stream(js)
        async with attached(nc) as uplink:
            batch = events("run-big", 3)
            big = RunEvent("run-big", 1, 2, "output", 0, {"stream": "stdout", "data": "y" * 20_000})
            with caplog.at_level(logging.WARNING, logger="linkd.uplink"):
                for event in (batch[0], big, batch[2]):
                    await uplink.emit("run-big", 1, event)
                assert await uplink.flush(TIMEOUT), uplink.status()
            assert uplink.dropped == 0
        stored = await stored_events(js)
        assert_exactly_once(stored, "run-big", 1, 3)
        cut = stored[1].event
        assert cut["truncated"] == 20_000 and 0 < len(cut["data"]) < 8192 and set(cut["data"]) == {"y"}
        assert any(
            "bigger than NATS max_payload allows; sent truncated" in r.getMessage() for r in caplog.records
        )


async def test_another_host_publishing_a_runs_predictable_ids_first_cannot_get_its_events_dropped(
    nats_server_factory: NatsServerFactory, tmp_path: Path
) -> None:
    server = js_server(nats_server_factory, tmp_path)
    mallory = tunnel.HostSubjects.for_host("mallory-desk")
    async with admin(server.url) as (_, js), daemon_connection(server.url) as own:
        await create_stream(js)
        # Mallory knows the run id and fence, and publishes under her own host with every id the
        # run would use if ids were just <runId>:<fence>:<seq> (she cannot know the random part).
        for seq in range(1, 40):
            await js.publish(
                run_event_subject(mallory, "run-target"),
                b"{}",
                headers={"Nats-Msg-Id": f"run-target:1:{seq}"},
            )
        async with attached(own) as uplink:
            runs = RunManager({"mock": MockRunner()}, uplink, heartbeat_interval=60)
            runs.submit(mock_item("run-target", 1, count=30))
            info = await runs.wait_finished("run-target", TIMEOUT)
            assert await uplink.flush(TIMEOUT)
            assert uplink.duplicates == 0
        assert info.recorder is not None
        stored = [
            s for s in await stored_events(js) if s.subject == run_event_subject(SUBJECTS, "run-target")
        ]
        assert_exactly_once(stored, "run-target", 1, info.recorder.seq)
        assert re.match(r"run-target:1:1(-\d+)?:[0-9a-f]{16}$", stored[0].msg_id), stored[0].msg_id


# ------------------------------------------------------------------------------ shutdown


async def test_close_flushes_the_outbox(nats_server_factory: NatsServerFactory, tmp_path: Path) -> None:
    server = js_server(nats_server_factory, tmp_path)
    async with admin(server.url) as (_, js), daemon_connection(server.url) as nc:
        await create_stream(js)
        uplink = JetStreamUplink()
        uplink.attach(nc, SUBJECTS)
        for run in ("a", "b"):
            for event in events(f"run-{run}", 1000):
                await uplink.emit(event.run_id, 1, event)
        await asyncio.wait_for(uplink.aclose(TIMEOUT), TIMEOUT + 1)
        assert uplink.status()["state"] == "closed" and len(uplink.outbox) == 0
        stored = await stored_events(js)
        assert len(stored) == 2000
        for run in ("run-a", "run-b"):
            assert_exactly_once(stored, run, 1, 1000)


async def test_close_with_nats_stalled_gives_up_within_its_budget_and_says_what_is_left(
    nats_server_factory: NatsServerFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = js_server(nats_server_factory, tmp_path)
    async with admin(server.url) as (_, js), FaultProxy(server.port) as proxy:
        await create_stream(js)
        async with daemon_connection(proxy.url) as nc:
            uplink = JetStreamUplink()
            uplink.attach(nc, SUBJECTS)
            proxy.pause()
            for event in events("run-stuck", 10):
                await uplink.emit("run-stuck", 1, event)
            started = time.monotonic()
            with caplog.at_level(logging.WARNING, logger="linkd.uplink"):
                await uplink.aclose(0.5)
            took = time.monotonic() - started
            assert 0.4 <= took < 3.0
            assert any(
                r.getMessage().startswith("10 run event(s) of 1 run(s) were not delivered before shutdown")
                and r.getMessage().endswith(": run-stuck")
                for r in caplog.records
            )
            proxy.resume()


# ------------------------------------------------------------------------------ operator mode


async def test_a_daemon_credential_with_only_the_uplink_grant_publishes_through_its_inbox_prefix(
    nats_server_factory: NatsServerFactory, tmp_path: Path
) -> None:
    setup = OperatorSetup.generate()
    server = nats_server_factory(
        extra_conf=setup.server_conf(), jetstream=True, store_dir=str(tmp_path / "js")
    )
    publish, subscribe = uplink_publish_grant(SUBJECTS)
    user = new_key(KeyKind.USER)
    daemon_creds = creds_text(
        setup.user_jwt(
            user.public_key,
            "daemon",
            permissions={"pub": {"allow": list(publish)}, "sub": {"allow": list(subscribe)}},
        ),
        user.seed,
    )
    async with admin(server.url, user_credentials=_raw(setup.user_creds("admin"))) as (_, js):
        await create_stream(js)
        async with daemon_connection(server.url, creds_text=daemon_creds) as nc, attached(nc) as uplink:
            for event in events("run-op", 20):
                await uplink.emit("run-op", 1, event)
            assert await uplink.flush(TIMEOUT), uplink.status()
            assert uplink.retries == 0
        # The same credential with nats-py's default _INBOX prefix: the acks are not allowed to reach
        # it, so nothing counts as delivered (the stream still stores each event once).
        async with (
            daemon_connection(server.url, creds_text=daemon_creds, inbox_prefix=None) as nc,
            attached(nc, ack_timeout=0.3) as uplink,
        ):
            for event in events("run-op2", 5):
                await uplink.emit("run-op2", 1, event)
            assert not await uplink.flush(1.5)
            assert "is the daemon allowed to subscribe to _INBOX." in str(uplink.status()["lastError"])
        stored = await stored_events(js)
        assert_exactly_once(stored, "run-op", 1, 20)
        assert_exactly_once(stored, "run-op2", 1, 5)


def _raw(text: str) -> RawCredentials:
    return RawCredentials(text)
