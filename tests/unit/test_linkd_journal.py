"""The run journal (linkd.journal), its pure parts (linkd.resume, linkd.sleep) and the outbox's
use of it: order, bounds, removal on ack (batches too), reload, corruption handling."""

from __future__ import annotations

import logging
import sqlite3
import sys
from pathlib import Path

import pytest

from linkd.journal import JOURNAL_FILE_NAME, Journal, event_from_payload, open_journal
from linkd.resume import Progress, ResumeFilter
from linkd.run_events import RunEvent
from linkd.runners.base import Output, Stage
from linkd.sleep import SleepDetector
from linkd.uplink import JetStreamUplink, Outbox, encode_event

ITEM = {"runId": "r1", "threadId": "t1", "userId": "u", "fence": 1, "runner": "mock", "input": {"count": 3}}


def ev(seq: int, kind: str = "output", run_id: str = "r1", **data: object) -> RunEvent:
    if kind == "output" and not data:
        data = {"stream": "stdout", "data": f"chunk {seq}\n"}
    if kind == "stage" and not data:
        data = {"stage": f"s{seq}"}
    return RunEvent(run_id, 1, seq, kind, 1_700_000_000_000 + seq, data, "exec-" + run_id)  # type: ignore[arg-type]


def journal_at(tmp_path: Path) -> Journal:
    return Journal.open(tmp_path / JOURNAL_FILE_NAME)


# ------------------------------------------------------------------------------ pure parts


def test_progress_counts_runner_stages_and_output_chars_per_stream() -> None:
    progress = Progress()
    progress.advance(ev(1, "stage", stage="starting-run"))  # the daemon's own, not the runner's
    progress.advance(ev(2, "stage"))
    progress.advance(ev(3, "output", stream="stdout", data="héllo"))
    progress.advance(ev(4, "heartbeat", **{}))
    progress.advance(ev(5, "output", stream="stderr", data="x\n"))
    assert progress.stages == 1
    assert progress.chars == {"stdout": 5, "stderr": 2}
    assert Progress.from_json(progress.to_json()) == progress
    with pytest.raises(ValueError):
        Progress.from_json('{"stages": "x"}')


def test_resume_filter_drops_what_was_sent_and_cuts_a_half_sent_chunk() -> None:
    skip = ResumeFilter(Progress(stages=1, chars={"stdout": 7}))
    produced = [Stage("preparing"), Stage("running"), Output("abcd"), Output("efgh"), Output("ij")]
    kept = [skip.take(e) for e in produced]
    assert kept == [None, Stage("running"), None, Output("h"), Output("ij")]
    # Another stream is counted on its own.
    other = ResumeFilter(Progress(chars={"stderr": 2}))
    assert other.take(Output("out", "stdout")) == Output("out", "stdout")
    assert other.take(Output("err", "stderr")) == Output("r", "stderr")


def test_sleep_detector_sees_a_wall_clock_jump_not_ordinary_ticks() -> None:
    detector = SleepDetector(100.0, 1000.0, threshold=5.0)
    assert detector.check(102.0, 1002.0) is None  # both clocks moved together
    assert detector.check(104.0, 1005.0) is None  # 1 s of drift: NTP, not sleep
    assert detector.check(106.0, 1607.0) == pytest.approx(600.0)  # 600 s the monotonic clock missed
    assert detector.check(108.0, 1609.0) is None


# ------------------------------------------------------------------------------ the journal


def test_events_reload_in_order_with_their_execution(tmp_path: Path) -> None:
    journal = journal_at(tmp_path)
    journal.start_run(ITEM, 1, "exec-r1", resumable=True)
    ids = [journal.append(e, encode_event(e)) for e in (ev(1, "stage"), ev(2), ev(3))]
    assert ids == sorted(ids)
    journal.close()

    again = journal_at(tmp_path)
    restored = again.restored_events()
    assert [r.event.seq for r in restored] == [1, 2, 3]
    assert [r.id for r in restored] == ids
    assert all(r.event.execution == "exec-r1" for r in restored)
    assert restored[1].event == ev(2)
    assert restored[1].event.uplink_id == "r1:1:2:exec-r1"  # the same message id as before the restart
    assert [r.payload for r in restored] == [encode_event(e) for e in (ev(1, "stage"), ev(2), ev(3))]
    (run,) = again.unfinished_runs()
    assert (run.run_id, run.fence, run.execution, run.last_seq, run.resumable) == (
        "r1",
        1,
        "exec-r1",
        3,
        True,
    )
    assert run.item == ITEM
    assert run.progress == Progress(stages=0, chars={"stdout": len("chunk 2\n") + len("chunk 3\n")})
    again.close()


def test_acked_events_leave_and_a_delivered_run_is_forgotten(tmp_path: Path) -> None:
    journal = journal_at(tmp_path)
    journal.start_run(ITEM, 1, "exec-r1", resumable=False)
    ids = [journal.append(e, encode_event(e)) for e in (ev(1), ev(2))]
    done = ev(3, "done", finalSeq=3, status="completed")
    done_id = journal.append(done, encode_event(done))
    journal.remove(ids[:1])
    assert journal.counts()[0] == 2
    journal.remove([ids[1], done_id])
    assert journal.counts() == (0, 0)
    journal.close()
    again = journal_at(tmp_path)
    assert again.restored_events() == [] and again.unfinished_runs() == []
    assert again._db.execute("SELECT count(*) FROM runs").fetchone()[0] == 0  # the run is forgotten
    again.close()


def test_acks_out_of_order_keep_what_the_run_reached(tmp_path: Path) -> None:
    journal = journal_at(tmp_path)
    journal.start_run(ITEM, 1, "exec-r1", resumable=True)
    ids = [journal.append(e, encode_event(e)) for e in (ev(1, "stage"), ev(2, "stage"), ev(3), ev(4))]
    journal.remove(ids[2:])  # seq 3-4 acked before 1-2 (another batch)
    journal.close()
    again = journal_at(tmp_path)
    (run,) = again.unfinished_runs()
    assert run.last_seq == 4 and run.progress == Progress(stages=1, chars={"stdout": 16})
    assert [r.event.seq for r in again.restored_events()] == [1, 2]
    again.remove([r.id for r in again.restored_events()])  # the checkpoint does not move back
    again.close()
    third = journal_at(tmp_path)
    (run,) = third.unfinished_runs()
    assert run.last_seq == 4 and run.progress.stages == 1 and run.item == ITEM
    # A done acked before the events ahead of it: the run is over, never "unfinished".
    done = ev(5, "done", finalSeq=5, status="completed")
    third.remove([third.append(done, encode_event(done))])
    third.close()
    fourth = journal_at(tmp_path)
    assert fourth.unfinished_runs() == []
    fourth.close()


def test_a_run_with_its_done_journaled_is_not_unfinished(tmp_path: Path) -> None:
    journal = journal_at(tmp_path)
    done = ev(2, "done", finalSeq=2, status="completed")
    for e in (ev(1), done):
        journal.append(e, encode_event(e))
    journal.close()
    again = journal_at(tmp_path)
    assert again.unfinished_runs() == []
    assert [r.event.type for r in again.restored_events()] == ["output", "done"]
    again.close()


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda raw: b"this is not a database at all" * 10, id="garbage"),
        pytest.param(lambda raw: raw[: len(raw) // 3], id="truncated"),
    ],
)
def test_a_corrupt_journal_is_moved_aside_with_one_clear_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: object
) -> None:
    journal = journal_at(tmp_path)
    for seq in range(1, 400):
        e = ev(seq, data="x" * 200, stream="stdout")
        journal.append(e, encode_event(e))
    journal.close()
    path = tmp_path / JOURNAL_FILE_NAME
    for suffix in ("-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    path.write_bytes(damage(path.read_bytes()))  # type: ignore[operator]

    with caplog.at_level(logging.ERROR, logger="linkd.journal"):
        fresh = Journal.open(path)
    assert fresh.restored_events() == [] and fresh.unfinished_runs() == []
    assert fresh.moved_aside is not None and fresh.moved_aside.exists()
    assert fresh.moved_aside.name.startswith(f"{JOURNAL_FILE_NAME}.corrupt-")
    lines = [r for r in caplog.records if r.name == "linkd.journal"]
    assert len(lines) == 1 and "moved aside" in lines[0].getMessage(), lines
    e = ev(1)
    fresh.append(e, encode_event(e))  # the fresh journal works
    assert fresh.counts()[0] == 1
    fresh.close()


def test_rows_that_do_not_parse_count_as_corrupt(tmp_path: Path) -> None:
    journal = journal_at(tmp_path)
    e = ev(1)
    journal.append(e, encode_event(e))
    journal.close()
    db = sqlite3.connect(tmp_path / JOURNAL_FILE_NAME)
    db.execute("UPDATE events SET payload = x'7b7d'")  # "{}": no fields
    db.commit()
    db.close()
    fresh = Journal.open(tmp_path / JOURNAL_FILE_NAME)
    assert fresh.moved_aside is not None and fresh.restored_events() == []
    fresh.close()


def test_no_journal_where_none_can_be_made(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert open_journal(blocker / "state") is None  # a file where the directory should be


def test_event_from_payload_refuses_what_is_no_event() -> None:
    with pytest.raises(ValueError):
        event_from_payload(b"[1, 2]", "x")
    assert event_from_payload(encode_event(ev(4)), "exec-r1") == ev(4)


# ------------------------------------------------------------------------------ the outbox with it


def test_the_outbox_reports_every_entry_that_leaves_batches_too() -> None:
    gone: list[int] = []
    outbox = Outbox(
        max_events=10, max_bytes=10_000, window=4, on_removed=lambda es: gone.extend(e.event.seq for e in es)
    )
    for seq in range(1, 6):
        e = ev(seq)
        outbox.add(e, encode_event(e))
    batch = outbox.peek_batch(3, 10_000)
    outbox.sent_batch(batch, "t1", 10.0)
    single = outbox.next_to_send()
    assert single is not None
    outbox.sent(single, "t2", 10.0)
    outbox.acked("t2")  # out of order: seq 4 acked before 1-3
    assert gone == [4]
    outbox.failed("t1")  # a failure is no removal
    assert gone == [4]
    batch = outbox.peek_batch(3, 10_000)
    outbox.sent_batch(batch, "t3", 10.0)
    outbox.acked("t3")
    assert sorted(gone) == [1, 2, 3, 4]
    assert outbox.refuse_run("r1") == 1
    assert sorted(gone) == [1, 2, 3, 4, 5]


async def test_the_uplink_journals_before_emit_returns_and_bounds_hold(tmp_path: Path) -> None:
    journal = journal_at(tmp_path)
    uplink = JetStreamUplink(max_events=3, max_bytes=1_000_000, journal=journal)
    assert uplink.durable
    for seq in (1, 2, 3):
        await uplink.emit("r1", 1, ev(seq))
        assert journal.counts()[0] == seq  # on disk when emit returned
    assert not uplink.outbox.has_room(10)  # the same back-pressure as without a journal
    done = ev(4, "done", finalSeq=4, status="completed")
    await uplink.emit("r1", 1, done)  # done is always admitted
    assert journal.counts()[0] == 4
    # What a recorder persisted as it numbered the event is not journaled twice by emit.
    fifth = ev(1, "done", run_id="r2", finalSeq=1, status="completed")  # done: admitted though full
    uplink.persist(fifth)
    assert journal.counts()[0] == 5
    await uplink.emit("r2", 1, fifth)
    assert journal.counts()[0] == 5
    status = uplink.status()
    assert status["journal"] == str(tmp_path / JOURNAL_FILE_NAME)
    assert status["outbox"] == 5 and status["outboxBytes"] == uplink.outbox.nbytes > 0
    await uplink.aclose(0.05)  # nothing to deliver to: everything stays journaled

    again = journal_at(tmp_path)
    restarted = JetStreamUplink(journal=again)
    assert restarted.restore() == 5
    assert [e.event.seq for e in restarted.outbox._entries] == [1, 2, 3, 4, 1]
    assert all(e.journal_id is not None for e in restarted.outbox._entries)
    await restarted.aclose(0.05)


# ------------------------------------------------------------------------------ settings


def test_resumable_is_the_users_choice_per_command_template_and_http_runner(tmp_path: Path) -> None:
    from linkd.config import load_settings
    from linkd.runners import CommandRunner, HttpRunner
    from linkd.runners.base import WorkItem

    config = tmp_path / "linkd.toml"
    config.write_text(
        "journal = false\n"
        "[runners.command.build]\nargv = ['make']\nresumable = true\n"
        "[runners.command.deploy]\nargv = ['deploy']\n"
        "[runners.http]\nendpoint = 'http://127.0.0.1:1/x'\nresumable = true\n"
    )
    settings = load_settings({}, {"HOME": str(tmp_path)}, config_path=config)
    assert settings.journal is False
    commands = settings.runners.commands
    assert commands["build"].resumable and not commands["deploy"].resumable
    runner = CommandRunner(commands)

    def item(input: object) -> WorkItem:
        return WorkItem("r", "t", "u", 1, "command", input)

    assert runner.resumable(item({"template": "build"}))
    assert not runner.resumable(item({"template": "deploy"}))
    assert not runner.resumable(item({"template": "nope"}))
    assert settings.runners.http is not None and HttpRunner(settings.runners.http).resumable(item({}))
    config.write_text("[runners.command.x]\nargv = ['x']\nresumable = 'maybe'\n")
    with pytest.raises(Exception, match="resumable"):
        load_settings({}, {"HOME": str(tmp_path)}, config_path=config)


def test_the_state_dir_outlives_a_reboot_and_follows_a_profile(tmp_path: Path) -> None:
    from linkd.dirs import state_dir

    home = str(tmp_path)
    assert state_dir({"LINKD_STATE_DIR": "/srv/linkd"}) == Path("/srv/linkd")
    assert state_dir({"LINKD_CONFIG_DIR": "/p/conf", "HOME": home}) == Path("/p/conf/state")
    if sys.platform not in ("win32", "darwin"):
        assert (
            state_dir({"HOME": home, "XDG_RUNTIME_DIR": "/run/user/1"}) == tmp_path / ".local/state/natslink"
        )
        assert state_dir({"HOME": home, "XDG_STATE_HOME": "/xdg"}) == Path("/xdg/natslink")
