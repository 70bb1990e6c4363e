"""The run uplink's pure parts: outbox bookkeeping, encoding, the bound, close without a server; wiring."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest

from linkd.cli import _describe
from linkd.config import Settings, load_settings
from linkd.errors import LinkdError
from linkd.run_events import MAX_OUTPUT_CHARS, MemoryEventSink, RunEvent, RunRecorder, TeeSink
from linkd.uplink import JetStreamUplink, Outbox, UplinkClosed, encode_event, fit_event


def ev(seq: int, run_id: str = "r1", kind: str = "output", **data: object) -> RunEvent:
    return RunEvent(
        run_id, 7, seq, kind, 1700000000000 + seq, data or {"stream": "stdout", "data": f"{seq}\n"}
    )  # type: ignore[arg-type]


def fill(box: Outbox, n: int, run_id: str = "r1") -> None:
    for seq in range(1, n + 1):
        event = ev(seq, run_id)
        box.add(event, encode_event(event))


def send_all(box: Outbox, now: float = 0.0, timeout: float = 5.0) -> list[str]:
    """Send what the window allows; tokens are the message ids (unique here)."""
    tokens = []
    while (entry := box.next_to_send()) is not None:
        box.sent(entry, entry.msg_id, now + timeout)
        tokens.append(entry.msg_id)
    return tokens


# ------------------------------------------------------------------------------ Outbox


def test_outbox_sends_in_order_within_the_window_and_frees_only_a_fully_acked_head() -> None:
    box = Outbox(window=3)
    fill(box, 5)
    assert send_all(box) == ["r1:7:1", "r1:7:2", "r1:7:3"]
    assert (box.in_flight, box.queued, len(box)) == (3, 2, 5)
    # The second ack first: nothing leaves (the head is still unacked), but the window has room again.
    assert box.acked("r1:7:2") is not None
    assert len(box) == 5 and box.in_flight == 2
    assert send_all(box) == ["r1:7:4"]
    assert box.acked("r1:7:1") is not None
    assert len(box) == 3  # 1 and 2 left together
    assert box.acked("r1:7:1") is None  # a late duplicate ack is ignored
    for token in ("r1:7:3", "r1:7:4"):
        box.acked(token)
    assert send_all(box) == ["r1:7:5"]
    box.acked("r1:7:5")
    assert len(box) == 0 and box.nbytes == 0 and box.acked_total == 5


def test_a_failed_event_goes_again_with_the_same_id_before_anything_newer() -> None:
    box = Outbox(window=2)
    fill(box, 4)
    send_all(box)
    failed = box.failed("r1:7:1")
    assert failed is not None and failed.attempts == 1
    entry = box.next_to_send()
    assert entry is not None and entry.msg_id == "r1:7:1"  # not r1:7:3
    box.sent(entry, "retry-token", 1.0)
    assert entry.attempts == 2 and entry.msg_id == "r1:7:1"
    assert box.failed("unknown-token") is None


def test_overdue_acks_expire_into_the_queue_in_order() -> None:
    box = Outbox(window=10)
    fill(box, 3)
    for entry_token, at in (("r1:7:1", 0.0), ("r1:7:2", 1.0), ("r1:7:3", 2.0)):
        entry = box.next_to_send()
        assert entry is not None and entry.msg_id == entry_token
        box.sent(entry, entry_token, at + 5.0)
    box.acked("r1:7:2")
    assert box.next_deadline() == 5.0
    assert box.expire(4.9) == []
    assert [e.msg_id for e in box.expire(5.0)] == ["r1:7:1"]
    assert box.next_deadline() == 7.0  # r1:7:2's deadline is skipped: it was acked
    assert [e.msg_id for e in box.expire(100)] == ["r1:7:3"]
    assert box.next_deadline() is None
    assert send_all(box, now=100) == ["r1:7:1", "r1:7:3"]
    assert box.next_deadline() == 105.0


def test_requeue_in_flight_resends_everything_unacked_in_order() -> None:
    box = Outbox(window=4)
    fill(box, 6)
    send_all(box)
    box.acked("r1:7:3")
    assert box.requeue_in_flight() == 3
    assert box.in_flight == 0 and box.next_deadline() is None
    assert send_all(box) == ["r1:7:1", "r1:7:2", "r1:7:4", "r1:7:5"]
    assert box.runs() == ["r1"] and box.undelivered() == 5


def test_only_the_entry_offered_may_be_sent() -> None:
    box = Outbox()
    fill(box, 2)
    second = list(box._entries)[1]
    with pytest.raises(RuntimeError):
        box.sent(second, "t", 1.0)


def test_the_bound_counts_events_and_bytes_and_an_empty_outbox_takes_anything() -> None:
    box = Outbox(max_events=3, max_bytes=10_000)
    assert box.has_room(10**9)
    fill(box, 3)
    assert not box.has_room(1)
    box2 = Outbox(max_events=100, max_bytes=300)
    fill(box2, 2)
    assert box2.nbytes > 0
    assert box2.has_room(300 - box2.nbytes) and not box2.has_room(301 - box2.nbytes)
    with pytest.raises(ValueError):
        Outbox(window=0)


def test_a_smaller_window_is_honoured_for_probing() -> None:
    box = Outbox(window=10)
    fill(box, 3)
    entry = box.next_to_send(1)
    assert entry is not None
    box.sent(entry, "a", 1.0)
    assert box.next_to_send(1) is None and box.next_to_send() is not None


# ------------------------------------------------------------------------------ encoding


def test_events_are_encoded_as_the_documented_compact_json() -> None:
    event = ev(3, kind="done", finalSeq=3, status="completed")
    assert json.loads(encode_event(event)) == {
        "runId": "r1",
        "fence": 7,
        "seq": 3,
        "ts": 1700000000003,
        "type": "done",
        "finalSeq": 3,
        "status": "completed",
    }
    assert b" " not in encode_event(event)
    assert event.message_id == "r1:7:3"


def test_an_oversized_event_is_cut_to_fit_and_says_how_long_its_text_was() -> None:
    event = ev(1, data="\u00e9" * 10_000, stream="stdout")
    assert fit_event(event, 10**6) == encode_event(event)  # fits: unchanged
    payload = fit_event(event, 2_000)
    doc = json.loads(payload)
    assert len(payload) <= 2_000
    assert doc["truncated"] == 10_000 and doc["data"] == "\u00e9" * len(doc["data"]) and doc["seq"] == 1
    assert doc["stream"] == "stdout" and len(doc["data"]) > 0
    done = ev(9, kind="done", finalSeq=9, status="failed", reason="boom " * 5_000)
    cut = json.loads(fit_event(done, 1_000))
    assert cut["truncated"] == 25_000 and cut["reason"].startswith("boom") and cut["status"] == "failed"
    with pytest.raises(ValueError):
        fit_event(event, 10)
    with pytest.raises(ValueError):
        fit_event(ev(2, kind="heartbeat", n=1), 10)


def test_an_event_that_can_never_be_sent_is_discarded_so_the_rest_go_on() -> None:
    box = Outbox()
    fill(box, 3)
    first = box.next_to_send()
    assert first is not None
    box.discard(first)
    assert len(box) == 2 and box.next_to_send() is not None
    assert box.next_to_send().msg_id == "r1:7:2"  # type: ignore[union-attr]
    with pytest.raises(RuntimeError):
        box.discard(first)


async def test_the_recorder_splits_big_output_so_every_event_fits_a_message() -> None:
    sink = MemoryEventSink()
    recorder = RunRecorder(sink, "big", 1)
    text = "x" * (MAX_OUTPUT_CHARS * 2 + 5)
    await recorder.output(text)
    await recorder.output("")
    await recorder.done("completed")
    events = sink.events("big")
    outputs = [e for e in events if e.type == "output"]
    assert [len(e.data["data"]) for e in outputs] == [MAX_OUTPUT_CHARS, MAX_OUTPUT_CHARS, 5, 0]
    assert "".join(e.data["data"] for e in outputs) == text
    assert [e.seq for e in events] == [1, 2, 3, 4, 5]


async def test_message_ids_carry_a_random_part_per_execution_that_other_hosts_cannot_guess() -> None:
    sink = MemoryEventSink()
    first, second = RunRecorder(sink, "r", 1), RunRecorder(sink, "r", 2)
    for recorder in (first, second):
        await recorder.output("a")
        await recorder.done("completed")
    one, two = sink.events("r", 1), sink.events("r", 2)
    assert [e.uplink_id for e in one] == [f"r:1:{seq}:{first.execution}" for seq in (1, 2)]
    assert [e.uplink_id for e in two] == [f"r:2:{seq}:{second.execution}" for seq in (1, 2)]
    assert one[0].message_id == "r:1:1" and ev(3).uplink_id == ev(3).message_id == "r1:7:3"
    assert len(first.execution) == 16 and first.execution != second.execution
    assert "execution" not in json.loads(encode_event(one[0]))  # not part of the event's JSON
    cut = json.loads(fit_event(replace(one[0], data={"stream": "stdout", "data": "z" * 5000}), 1000))
    assert cut["truncated"] == 5000


# ------------------------------------------------------------------------------ the uplink without a server


async def test_a_producer_waits_when_the_outbox_is_full_but_done_always_gets_in() -> None:
    uplink = JetStreamUplink(max_events=5)
    for seq in range(1, 6):
        await uplink.emit("r1", 7, ev(seq))
    blocked = asyncio.ensure_future(uplink.emit("r1", 7, ev(6)))
    await asyncio.sleep(0)  # let it run up to its wait (no timing: it cannot finish without room)
    await asyncio.sleep(0)
    assert not blocked.done()
    assert len(uplink.outbox) == 5
    await asyncio.wait_for(uplink.emit("r2", 1, ev(1, "r2", "done", finalSeq=1, status="completed")), 1.0)
    assert len(uplink.outbox) == 6 and not blocked.done()
    await uplink.aclose(0.05)
    with pytest.raises(UplinkClosed):
        await asyncio.wait_for(blocked, 1.0)
    with pytest.raises(UplinkClosed):
        await uplink.emit("r1", 7, ev(7))
    with pytest.raises(ValueError, match="invalid run id"):
        await JetStreamUplink().emit("bad.id", 1, ev(1, "bad.id"))


async def test_close_without_a_connection_reports_what_is_left(caplog: pytest.LogCaptureFixture) -> None:
    uplink = JetStreamUplink()
    for seq in range(1, 4):
        await uplink.emit("run-a", 1, ev(seq, "run-a"))
    await uplink.emit("run-b", 1, ev(1, "run-b"))
    assert uplink.status()["state"] == "waiting for a connection"
    with caplog.at_level(logging.WARNING, logger="linkd.uplink"):
        await asyncio.wait_for(uplink.aclose(0.05), 2.0)
    lines = [r.getMessage() for r in caplog.records if r.name == "linkd.uplink"]
    assert lines == [
        "4 run event(s) of 2 run(s) were not delivered before shutdown (no acknowledgement yet): run-a, run-b"
    ]
    assert uplink.status()["state"] == "closed"
    await uplink.aclose(0.05)  # twice is fine


async def test_an_empty_uplink_flushes_at_once_and_attach_needs_subjects() -> None:
    uplink = JetStreamUplink()
    assert await uplink.flush(0) is True
    with pytest.raises(ValueError):
        uplink.attach(object(), None)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        JetStreamUplink(ack_timeout=0)
    await uplink.aclose(0)


async def test_tee_closes_the_sinks_that_can_be_closed() -> None:
    uplink = JetStreamUplink()
    tee = TeeSink(MemoryEventSink(), uplink)
    await tee.aclose()
    assert uplink.status()["state"] == "closed"


# ------------------------------------------------------------------------------ settings and status


def test_uplink_and_heartbeat_settings_from_flags_env_and_file(tmp_path: Path) -> None:
    config = tmp_path / "linkd.toml"
    config.write_text("uplink = false\n[runners]\nheartbeat_interval = 4\n", encoding="utf-8")
    from_file = load_settings({}, {}, config_path=config)
    assert from_file.uplink is False and from_file.runners.heartbeat_interval == 4
    from_env = load_settings({}, {"LINKD_UPLINK": "yes", "LINKD_HEARTBEAT_INTERVAL": "2"}, config_path=config)
    assert from_env.uplink is True and from_env.runners.heartbeat_interval == 2
    flags = {"uplink": False, "heartbeat_interval": 0.25}
    from_flags = load_settings(
        flags, {"LINKD_UPLINK": "1", "LINKD_HEARTBEAT_INTERVAL": "2"}, config_path=config
    )
    assert from_flags.uplink is False and from_flags.runners.heartbeat_interval == 0.25
    assert Settings().uplink is True

    with pytest.raises(LinkdError, match="--heartbeat-interval"):
        load_settings({"heartbeat_interval": 0}, {}, config_path=config)
    with pytest.raises(LinkdError, match="LINKD_UPLINK"):
        load_settings({}, {"LINKD_UPLINK": "maybe"}, config_path=config)


def test_status_shows_the_uplink_line() -> None:
    doc = {
        "pid": 1,
        "state": "online",
        "message": "online as h",
        "uplink": {"state": "retrying: no stream", "outbox": 12, "delivered": 30},
    }
    assert "  run uplink:  retrying: no stream, 12 event(s) waiting, 30 delivered" in _describe(doc)
    assert not any("run uplink" in line for line in _describe({"pid": 1, "uplink": None}))


def test_a_refused_run_drops_its_undelivered_events_and_the_other_runs_go_on() -> None:
    box = Outbox(window=4)
    for seq in range(1, 4):
        for run_id in ("full", "other"):
            event = ev(seq, run_id)
            box.add(event, encode_event(event))
    tokens = send_all(box)  # full:1, other:1, full:2, other:2 in flight
    assert len(tokens) == 4
    assert box.refuse_run("full") == 3  # two in flight and one queued
    sent_next = []
    for token in tokens:
        box.acked(token)  # acks of dropped events are ignored (None)
    while (entry := box.next_to_send()) is not None:
        sent_next.append(entry.event.run_id)
        box.sent(entry, entry.msg_id, 5.0)
    assert sent_next == ["other"]
    assert box.runs() == ["other"]


async def test_streamed_events_wait_to_go_out_together_but_a_lone_one_goes_at_once() -> None:
    from linkd.uplink import COALESCE_DELAY, COALESCE_EVENTS

    now = [100.0]
    uplink = JetStreamUplink(clock=lambda: now[0])
    box = uplink.outbox

    def queue(seq: int) -> None:
        event = ev(seq)
        box.add(event, encode_event(event)).added = now[0]

    queue(1)
    assert uplink._coalesce_until(now[0]) is None  # nothing in flight: no reason to wait
    first = box.next_to_send()
    assert first is not None
    box.sent(first, "t1", now[0] + 5)
    queue(2)
    assert uplink._coalesce_until(now[0]) == pytest.approx(now[0] + COALESCE_DELAY)
    now[0] += COALESCE_DELAY
    assert uplink._coalesce_until(now[0]) is None  # the oldest waited long enough
    for seq in range(3, COALESCE_EVENTS + 2):
        queue(seq)
    assert box.queued >= COALESCE_EVENTS
    assert uplink._coalesce_until(now[0] - COALESCE_DELAY / 2) is None  # a full batch goes now
    await uplink.aclose(0.1)


def test_consecutive_events_of_one_run_go_as_one_batch_within_its_limits() -> None:
    from linkd.uplink import batch_msg_id, batch_payload

    box = Outbox(window=8)
    for seq in range(1, 6):
        event = ev(seq, "a")
        box.add(event, encode_event(event))
    other = ev(1, "b")
    box.add(other, encode_event(other))
    batch = box.peek_batch(64, 10_000)
    assert [e.event.seq for e in batch] == [1, 2, 3, 4, 5]  # stops before another run's event
    assert batch_payload(batch).count(b"\n") == 4
    assert all(json.loads(line)["runId"] == "a" for line in batch_payload(batch).split(b"\n"))
    assert batch_msg_id(batch).startswith("a:7:1-5")
    assert [e.event.seq for e in box.peek_batch(2, 10_000)] == [1, 2]  # the count limit
    one = len(batch[0].payload)
    assert len(box.peek_batch(64, 2 * one + 1)) == 2  # the byte limit (with the line break)
    box.sent_batch(batch, "t1", 5.0)
    assert box.in_flight == 1 and box.queued == 1
    assert box.failed("t1") is batch[0]  # the whole batch goes back, in order
    again = box.peek_batch(64, 10_000)
    assert [e.event.seq for e in again] == [1, 2, 3, 4, 5]
    box.sent_batch(again, "t2", 5.0)
    assert box.acked("t2") is again[0]
    assert box.acked_total == 5 and box.runs() == ["b"]


def test_a_batch_sent_again_is_the_same_batch_so_its_id_deduplicates() -> None:
    from linkd.uplink import batch_msg_id

    box = Outbox(window=8)
    fill(box, 3, "a")
    first = box.peek_batch(64, 10_000)
    box.sent_batch(first, "t1", 5.0)
    fill_more = [ev(seq, "a") for seq in (4, 5)]
    for event in fill_more:
        box.add(event, encode_event(event))
    box.requeue_in_flight()  # the connection went away with the batch in flight
    again = box.peek_batch(64, 10_000)
    assert again == first and batch_msg_id(again) == batch_msg_id(first)  # not 1-5
    box.sent_batch(again, "t2", 5.0)
    rest = box.peek_batch(64, 10_000)
    assert [e.event.seq for e in rest] == [4, 5]
    box.unbatch(first)  # refused as too big: may be cut anew
    box.failed("t2")
    assert [e.event.seq for e in box.peek_batch(2, 10_000)] == [1, 2]
