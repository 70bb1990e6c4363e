"""The run outbox on disk: every run event is journaled before the runner goes on, and leaves
the journal once JetStream acknowledged it, so a daemon that crashed (SIGKILL, power cut,
reboot) publishes on its next start what was not acknowledged, with the same message ids.

Why SQLite (stdlib ``sqlite3``) in WAL mode with ``synchronous=NORMAL``: one commit per event
is an append to the write-ahead log with no fsync, so journaling costs tens of microseconds,
not a disk flush; a commit survives the death of the process at once (it is in the OS's page
cache), and a power cut can lose at most the last commits, never corrupt the file (WAL replays
or drops whole transactions). An append-only file of our own would need its own framing,
checksums, compaction and recovery of a torn tail: SQLite is all of that, tested. Calls are
synchronous on the event loop on purpose: each is short, and doing them in order is what keeps
the journal's order the emit order.

Tables: ``events`` (one row per unacknowledged event: its wire payload, ``run_id``, ``seq``,
``execution`` (the random part of the message ids, so a re-publish has the *same* ids), when
it was journaled, and the run's :class:`~linkd.resume.Progress` after it) and ``runs`` (one
row per run execution not yet fully delivered: the work item, whether its runner can resume,
and a checkpoint: the last seq, progress and ``done`` of its events already acknowledged).
One event is one ``INSERT`` (the run's state travels with it); the checkpoint moves when
acknowledged events are deleted (``DELETE ... RETURNING``, once per ack), and a run's row goes
when its ``done`` was acknowledged. What a run reached is its newest journaled event, else
its checkpoint.

A journal that cannot be read (not a database, truncated, a failed integrity check, rows
that do not parse) is moved aside as ``<name>.corrupt-<UTC timestamp>`` with one error line
and a fresh one is started: the daemon never refuses to start, or crash-loops, over it.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from .resume import Progress
from .run_events import DONE, Fence, RunEvent

__all__ = [
    "JOURNAL_FILE_NAME",
    "Journal",
    "JournaledEvent",
    "JournaledRun",
    "event_from_payload",
    "open_journal",
]

log = logging.getLogger("linkd.journal")

JOURNAL_FILE_NAME: Final = "run-journal.sqlite3"
SCHEMA_VERSION: Final = 1
_SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS events ("
    " id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL, seq INTEGER NOT NULL,"
    " execution TEXT NOT NULL, added REAL NOT NULL, done INTEGER NOT NULL, progress TEXT NOT NULL,"
    " payload BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS runs ("
    " run_id TEXT PRIMARY KEY, fence TEXT NOT NULL, execution TEXT NOT NULL, item TEXT,"
    " resumable INTEGER NOT NULL DEFAULT 0, last_seq INTEGER NOT NULL DEFAULT 0,"
    " progress TEXT, finished INTEGER NOT NULL DEFAULT 0)",
)
_FIELDS: Final = frozenset({"runId", "fence", "seq", "ts", "type"})


@dataclass(frozen=True)
class JournaledEvent:
    """An event waiting for its JetStream ack, as read back from the journal."""

    id: int
    event: RunEvent
    payload: bytes
    added: float  # unix time it was journaled


@dataclass(frozen=True)
class JournaledRun:
    """A run whose ``done`` was never journaled: the daemon stopped while it worked."""

    run_id: str
    fence: Fence
    execution: str
    item: Mapping[str, Any] | None  # the work item (runId, threadId, userId, fence, runner, input)
    resumable: bool
    last_seq: int
    progress: Progress


def event_from_payload(payload: bytes, execution: str) -> RunEvent:
    """The :class:`RunEvent` whose wire form is ``payload``; ``ValueError`` when it is not one."""
    data: Any = json.loads(payload)
    if not isinstance(data, dict) or not data.keys() >= _FIELDS:
        raise ValueError("a journaled event lacks its fields")
    seq, ts = data["seq"], data["ts"]
    if not isinstance(seq, int) or not isinstance(ts, int) or not isinstance(data["runId"], str):
        raise ValueError("a journaled event has bad fields")
    extra = {k: v for k, v in data.items() if k not in _FIELDS}
    return RunEvent(data["runId"], data["fence"], seq, data["type"], ts, extra, execution)


def _aside_name(path: Path, now: float) -> Path:
    stamp = datetime.fromtimestamp(now, UTC).strftime("%Y%m%dT%H%M%SZ")
    candidate = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    return candidate


class Journal:
    """The journal file: see the module doc. Open with :meth:`open`."""

    def __init__(
        self, path: Path, db: sqlite3.Connection, events: list[JournaledEvent], runs: list[JournaledRun]
    ):
        self.path = path
        self._db = db
        self._restored_events = events
        self._restored_runs = runs
        self._progress: dict[str, Progress] = {r.run_id: r.progress for r in runs}
        # Events journaled per run (so "none left" needs no index on events.run_id).
        self._live: dict[str, int] = {}
        for item in events:
            self._live[item.event.run_id] = self._live.get(item.event.run_id, 0) + 1
        self.moved_aside: Path | None = None

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: Path) -> Journal:
        """The journal at ``path`` with what it held; a corrupt one is moved aside (see the module doc)."""
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            return cls._load(path)
        except (sqlite3.DatabaseError, ValueError, KeyError, TypeError) as exc:
            aside = _aside_name(path, time.time())
            for suffix in ("", "-wal", "-shm"):
                src = path.with_name(path.name + suffix)
                if src.exists():
                    src.rename(aside.with_name(aside.name + suffix))
            log.error(
                "the run journal %s cannot be read (%s); moved aside to %s, starting with an empty one: "
                "events it held are not re-sent",
                path,
                exc,
                aside,
                extra={"event": "journal_corrupt", "path": str(path), "moved_to": str(aside)},
            )
            journal = cls._load(path)
            journal.moved_aside = aside
            return journal

    @classmethod
    def _load(cls, path: Path) -> Journal:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            # Small pages: a commit writes whole pages to the WAL, and an event is ~100-200 bytes
            # (only takes effect for a new file). No index besides the row id, for the same reason.
            db.execute("PRAGMA page_size=1024")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            check = db.execute("PRAGMA quick_check").fetchone()
            if check is None or check[0] != "ok":
                raise sqlite3.DatabaseError(f"integrity check: {check[0] if check else 'no answer'}")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise ValueError(f"unknown journal version {version}")
            for statement in _SCHEMA:
                db.execute(statement)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            events, runs = _read(db)
        except BaseException:
            db.close()
            raise
        return cls(path, db, events, runs)

    # ------------------------------------------------------------------ what the last daemon left

    def restored_events(self) -> list[JournaledEvent]:
        """The events not acknowledged when the journal was opened, in journal order."""
        return list(self._restored_events)

    def unfinished_runs(self) -> list[JournaledRun]:
        """The runs that had no ``done`` when the journal was opened."""
        return list(self._restored_runs)

    # ------------------------------------------------------------------ writing

    def start_run(self, item: Mapping[str, Any], fence: Fence, execution: str, *, resumable: bool) -> None:
        """A run execution begins (before its first event): what a restart needs to resume or end it."""
        run_id = str(item["runId"])
        self._progress[run_id] = Progress()
        self._db.execute(
            "INSERT INTO runs (run_id, fence, execution, item, resumable) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(run_id) DO UPDATE SET fence=excluded.fence, execution=excluded.execution, "
            "item=excluded.item, resumable=excluded.resumable, last_seq=0, progress=NULL, finished=0",
            (run_id, json.dumps(fence), execution, json.dumps(item, separators=(",", ":")), int(resumable)),
        )

    def append(self, event: RunEvent, payload: bytes) -> int:
        """Journal one event (committed when this returns: one INSERT, autocommit); its row id."""
        progress = self._progress.setdefault(event.run_id, Progress())
        progress.advance(event)
        done = event.type == DONE
        if done:
            self._progress.pop(event.run_id, None)
        cursor = self._db.execute(
            "INSERT INTO events (run_id, seq, execution, added, done, progress, payload) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (event.run_id, event.seq, event.execution, time.time(), int(done), progress.to_json(), payload),
        )
        row_id = cursor.lastrowid
        assert row_id is not None
        self._live[event.run_id] = self._live.get(event.run_id, 0) + 1
        return row_id

    def remove(self, ids: Iterable[int]) -> None:
        """These events were acknowledged (or given up): they go, their runs' checkpoints move on,
        and a run whose ``done`` went is forgotten."""
        id_list = list(ids)
        if not id_list:
            return
        db = self._db
        db.execute("BEGIN")
        try:
            reached: dict[str, tuple[int, str, str, int, str]] = {}
            done_runs: set[str] = set()
            for start in range(0, len(id_list), 500):
                chunk = id_list[start : start + 500]
                rows = db.execute(
                    f"DELETE FROM events WHERE id IN ({','.join('?' * len(chunk))}) "
                    "RETURNING run_id, seq, execution, progress, done, json_extract(payload, '$.fence')",
                    chunk,
                ).fetchall()
                for run_id, seq, execution, progress, done, fence in rows:
                    left = self._live.get(run_id, 1) - 1
                    if left > 0:
                        self._live[run_id] = left
                    else:
                        self._live.pop(run_id, None)
                    if done:
                        done_runs.add(run_id)
                    if run_id not in reached or seq > reached[run_id][0]:
                        reached[run_id] = (seq, execution, progress, done, json.dumps(fence))
            for run_id, (seq, execution, progress, _, fence) in reached.items():
                # Acks may come out of order: the checkpoint only moves forward, and "done" sticks.
                db.execute(
                    "INSERT INTO runs (run_id, fence, execution, last_seq, progress, finished) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(run_id) DO UPDATE SET "
                    "last_seq=max(runs.last_seq, excluded.last_seq), "
                    "progress=iif(excluded.last_seq > runs.last_seq, excluded.progress, runs.progress), "
                    "finished=max(runs.finished, excluded.finished)",
                    (run_id, fence, execution, seq, progress, int(run_id in done_runs)),
                )
                if run_id not in self._live:
                    db.execute("DELETE FROM runs WHERE run_id = ? AND finished = 1", (run_id,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def forget_run(self, run_id: str) -> None:
        """Nothing more of ``run_id`` will be journaled or resumed (its events are refused for good)."""
        self._progress.pop(run_id, None)
        self._live.pop(run_id, None)
        self._db.execute("DELETE FROM events WHERE run_id = ?", (run_id,))
        self._db.execute("DELETE FROM runs WHERE run_id = ?", (run_id,))

    # ------------------------------------------------------------------ reading

    def counts(self) -> tuple[int, int]:
        """(events, payload bytes) in the journal now."""
        row = self._db.execute("SELECT count(*), coalesce(sum(length(payload)), 0) FROM events").fetchone()
        return int(row[0]), int(row[1])

    def close(self) -> None:
        self._db.close()


def _read(db: sqlite3.Connection) -> tuple[list[JournaledEvent], list[JournaledRun]]:
    """Everything the journal holds: the events in order, and the runs without a ``done``."""
    checkpoints: dict[str, tuple[Any, ...]] = {}
    for row in db.execute(
        "SELECT run_id, fence, execution, item, resumable, last_seq, progress, finished FROM runs"
    ):
        checkpoints[row[0]] = row[1:]
    events: list[JournaledEvent] = []
    newest: dict[str, tuple[RunEvent, str, bool]] = {}  # run -> (its last event, progress, done)
    for row_id, run_id, execution, added, done, progress, payload in db.execute(
        "SELECT id, run_id, execution, added, done, progress, payload FROM events ORDER BY id"
    ):
        event = event_from_payload(payload, execution)
        if event.run_id != run_id:
            raise ValueError("a journaled event is filed under another run")
        events.append(JournaledEvent(row_id, event, payload, added))
        newest[run_id] = (event, progress, bool(done))
    runs: list[JournaledRun] = []
    for run_id in dict.fromkeys([*checkpoints, *newest]):
        fence_text, execution, item_text, resumable, last_seq, progress, finished = checkpoints.get(
            run_id, ("null", "", None, 0, 0, None, 0)
        )
        fence = json.loads(fence_text)
        if run_id in newest:
            event, newest_progress, newest_done = newest[run_id]
            fence, execution = event.fence, event.execution
            finished = finished or newest_done
            if event.seq > last_seq:
                last_seq, progress = event.seq, newest_progress
        if finished:
            continue
        item = json.loads(item_text) if item_text else None
        if item is not None and not isinstance(item, dict):
            raise ValueError("a journaled work item is not an object")
        if fence is None and item is not None:
            fence = item.get("fence")
        runs.append(
            JournaledRun(
                run_id, fence, execution, item, bool(resumable), int(last_seq), Progress.from_json(progress)
            )
        )
    return events, runs


def open_journal(directory: Path) -> Journal | None:
    """The journal in ``directory``; None (one error line, events in memory only) when even a
    fresh one cannot be made there (no permission, a read-only disk)."""
    path = directory / JOURNAL_FILE_NAME
    try:
        return Journal.open(path)
    except (OSError, sqlite3.Error, ValueError) as exc:
        log.error(
            "cannot keep a run journal at %s (%s); run events are kept in memory only",
            path,
            exc,
            extra={"event": "journal_unavailable", "path": str(path)},
        )
        return None
