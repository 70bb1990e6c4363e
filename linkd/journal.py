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
when it was journaled) and ``runs`` (one row per run not yet fully delivered: fence,
``execution`` (the random part of the message ids, so a re-publish has the *same* ids), the
work item, the last seq, the runner's :class:`~linkd.resume.Progress`, whether ``done`` was
journaled, whether the runner can resume). A run's row goes when its ``done`` was journaled
and none of its events is left.

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
    " added REAL NOT NULL, payload BLOB NOT NULL)",
    "CREATE INDEX IF NOT EXISTS events_run ON events (run_id)",
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
            executions: dict[str, str] = {}
            runs: list[JournaledRun] = []
            for run_id, fence, execution, item, resumable, last_seq, progress, finished in db.execute(
                "SELECT run_id, fence, execution, item, resumable, last_seq, progress, finished FROM runs"
            ):
                executions[run_id] = execution
                if finished:
                    continue
                parsed_item = json.loads(item) if item else None
                if parsed_item is not None and not isinstance(parsed_item, dict):
                    raise ValueError("a journaled work item is not an object")
                runs.append(
                    JournaledRun(
                        run_id,
                        json.loads(fence),
                        execution,
                        parsed_item,
                        bool(resumable),
                        int(last_seq),
                        Progress.from_json(progress),
                    )
                )
            events = [
                JournaledEvent(
                    row_id, event_from_payload(payload, executions.get(run_id, "")), payload, added
                )
                for row_id, run_id, payload, added in db.execute(
                    "SELECT id, run_id, payload, added FROM events ORDER BY id"
                )
            ]
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
        """Journal one event (committed when this returns); its row id."""
        progress = self._progress.setdefault(event.run_id, Progress())
        progress.advance(event)
        finished = int(event.type == DONE)
        db = self._db
        db.execute("BEGIN")
        try:
            cursor = db.execute(
                "INSERT INTO events (run_id, seq, added, payload) VALUES (?, ?, ?, ?)",
                (event.run_id, event.seq, time.time(), payload),
            )
            db.execute(
                "INSERT INTO runs (run_id, fence, execution, last_seq, progress, finished) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(run_id) DO UPDATE SET "
                "last_seq=excluded.last_seq, progress=excluded.progress, finished=excluded.finished",
                (
                    event.run_id,
                    json.dumps(event.fence),
                    event.execution,
                    event.seq,
                    progress.to_json(),
                    finished,
                ),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        if finished:
            self._progress.pop(event.run_id, None)
        row_id = cursor.lastrowid
        assert row_id is not None
        return row_id

    def remove(self, ids: Iterable[int], run_ids: Iterable[str] = ()) -> None:
        """These events were acknowledged (or given up); runs in ``run_ids`` that are over go too."""
        id_list = list(ids)
        db = self._db
        db.execute("BEGIN")
        try:
            for start in range(0, len(id_list), 500):
                chunk = id_list[start : start + 500]
                db.execute(f"DELETE FROM events WHERE id IN ({','.join('?' * len(chunk))})", chunk)
            for run_id in set(run_ids):
                db.execute(
                    "DELETE FROM runs WHERE run_id = ? AND finished = 1 "
                    "AND NOT EXISTS (SELECT 1 FROM events WHERE run_id = ?)",
                    (run_id, run_id),
                )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def forget_run(self, run_id: str) -> None:
        """Nothing more of ``run_id`` will be journaled or resumed (its events are refused for good)."""
        self._progress.pop(run_id, None)
        self._db.execute("DELETE FROM events WHERE run_id = ?", (run_id,))
        self._db.execute("DELETE FROM runs WHERE run_id = ?", (run_id,))

    # ------------------------------------------------------------------ reading

    def counts(self) -> tuple[int, int]:
        """(events, payload bytes) in the journal now."""
        row = self._db.execute("SELECT count(*), coalesce(sum(length(payload)), 0) FROM events").fetchone()
        return int(row[0]), int(row[1])

    def close(self) -> None:
        self._db.close()


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
