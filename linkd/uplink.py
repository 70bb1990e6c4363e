"""The durable run uplink: every run event goes to JetStream, exactly once, in order, through an outbox.

``emit`` only queues the event in a bounded outbox (a producer waits while it is
full, so memory stays bounded; a run's final ``done`` is always admitted so a run
can end). One delivery task publishes the queued events, in emit order, to
``P.host.<token>.runs.<runId>`` (see :mod:`contract.run_protocol`) with the header
``Nats-Msg-Id: <runId>:<fence>:<seq>:<execution>`` (:attr:`RunEvent.uplink_id
<linkd.run_events.RunEvent.uplink_id>`; ``execution`` is random per run execution:
JetStream de-duplicates per stream, so predictable ids would let another host publish
them first, under its own subject, and have this daemon's real events dropped) and
waits for JetStream's publish ack:

- Pipelined: up to ``window`` events are in flight at once; acks come back on one
  wildcard subscription under the connection's inbox prefix (which the daemon's
  credential may subscribe to), so there is no round trip per event.
- Coalesced, like Nagle's algorithm: while events are in flight, new ones wait until
  ``COALESCE_EVENTS`` are ready or the oldest has waited ``COALESCE_DELAY``, so a
  runner streaming output costs one socket write per batch, not per event (a write per
  event was ~40% of the daemon's time); an event with nothing in flight goes at once.
- Batched: consecutive ready events of one run (up to ``BATCH_EVENTS`` or the message
  limit) go as one message, one per line, with id ``<runId>:<fence>:<first>-<last>:<execution>``
  (:mod:`contract.run_protocol`); a batch sent again is the same batch with the same id, so
  the stream still stores each event once.
- An event leaves the outbox only when its ack arrived. On an ack timeout, a
  no-responders answer (no stream captures the subject yet), a JetStream error,
  a disconnect or a connection swap (credential refresh), the unacked events are
  published again with the *same* message ids, after a backoff, with no give-up
  while the daemon runs: the stream's duplicate window stores each id once, so
  nothing is lost and nothing is applied twice. Retried events go out before
  newer ones (per-run order holds whenever there are no faults).
- Two refusals are final, not retried (docs/runs.md, "Tenants"): the run's subject is
  full (JetStream error 10077: the run published ``RUNS_MAX_EVENTS_PER_RUN`` events; the
  gateway fails it as ``event_limit``), so that run's events are dropped, now and later,
  instead of blocking every other run's events behind endless retries; and a message
  bigger than the stream stores (10054): from then on messages are at most half that size
  (batches cut smaller, a single bigger event cut to fit).
- :meth:`JetStreamUplink.aclose` flushes what it can within the shutdown budget
  and logs what is left.
- Durable with a :class:`~linkd.journal.Journal`: :meth:`JetStreamUplink.persist` journals
  an event on disk as the run's recorder numbers it (before the runner goes on; ``emit``
  journals what did not come that way). An event leaves the journal once its ack (of its
  batch) arrived, in groups (at most ``FORGET_EVENTS`` events or ``FORGET_DELAY`` after
  the ack, one transaction each; a crash in between re-sends a few acked events, which the
  stream's duplicate window drops). :meth:`JetStreamUplink.restore` queues what a previous
  daemon left unacknowledged, with the same message ids. The journal holds what the outbox
  holds plus what the runs' recorders queue for it (at most ``RECORDER_QUEUE_LIMIT`` per
  run), so the same bounds and back-pressure hold. A journal that fails to write (disk
  full) is dropped with one error line: delivery goes on from memory.

De-duplication holds within the stream's duplicate window (the gateway's
``RUNS_DUPLICATE_WINDOW_SECONDS``): an event stored whose ack was lost, and
re-sent only after an outage longer than that window, is stored twice, with the
same ``runId``/``fence``/``seq``, which the projector skips as already applied.

:class:`Outbox` is the pure bookkeeping (no I/O, unit-tested on its own);
:class:`JetStreamUplink` drives it over a nats-py connection that the daemon
hands over with :meth:`JetStreamUplink.attach`.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from sqlite3 import Error as SqliteError
from typing import Any, Final

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError

import tunnel
from contract.run_protocol import is_valid_run_id, run_event_subject
from tunnel.backoff import Backoff

from .journal import Journal
from .run_events import DONE, Fence, RunEvent

__all__ = [
    "DEFAULT_ACK_TIMEOUT",
    "DEFAULT_OUTBOX_BYTES",
    "DEFAULT_OUTBOX_EVENTS",
    "DEFAULT_WINDOW",
    "JetStreamUplink",
    "Outbox",
    "OutboxEntry",
    "UplinkClosed",
    "encode_event",
    "fit_event",
]

log = logging.getLogger("linkd.uplink")

MSG_ID_HEADER: Final = "Nats-Msg-Id"
# Events (and bytes) waiting in the outbox before a producer has to wait.
DEFAULT_OUTBOX_EVENTS: Final = 10_000
DEFAULT_OUTBOX_BYTES: Final = 32 * 1024 * 1024
# Events published and not yet acked at once: enough to hide the round trip, few enough that a
# failure re-sends little.
DEFAULT_WINDOW: Final = 256
# A publish ack slower than this counts as lost: the event is published again (same id).
DEFAULT_ACK_TIMEOUT: Final = 5.0
# After a failure the uplink waits (initial, doubling, capped) before publishing again; the cap
# keeps the delay after an outage short next to the gateway's liveness timeout (one probe event
# per cap is no load). A reconnect or a new connection starts again at the initial wait.
RETRY_INITIAL: Final = 0.05
RETRY_CAP: Final = 2.0
# While there is no usable connection, look again this often (nats-py reconnects by itself).
CONNECTION_POLL: Final = 0.1
# Room left in a message for the headers (the server counts them against max_payload).
HEADER_ROOM: Final = 512
# Coalescing (see the module doc): at most this many events or this long, while some are in flight.
COALESCE_EVENTS: Final = 32
COALESCE_DELAY: Final = 0.001
# Consecutive events of one run published as one message (contract.run_protocol), at most this many.
BATCH_EVENTS: Final = 64
# Smallest message limit learned from "too big" refusals (below it, a refusal is a failure).
MIN_MESSAGE_BYTES: Final = 256
# JetStream error codes that no retry can change (see the module doc).
SUBJECT_FULL: Final = 10077  # maximum messages per subject exceeded (the run's event limit)
TOO_BIG: Final = 10054  # message size exceeds maximum allowed
# Acked events leave the journal in groups, at most this many or this long after their ack.
FORGET_EVENTS: Final = 512
FORGET_DELAY: Final = 0.05
# Shutdown with nothing to deliver to: still try this long.
MIN_FLUSH: Final = 0.05


class UplinkClosed(RuntimeError):
    """The uplink was closed; it takes no more events."""


def encode_event(event: RunEvent) -> bytes:
    """The event's wire form (see :mod:`linkd.run_events`): compact JSON."""
    return json.dumps(event.as_dict(), separators=(",", ":")).encode("utf-8")


def batch_payload(batch: list[OutboxEntry]) -> bytes:
    """One message's body: the events' compact JSON, one per line (see contract.run_protocol)."""
    return batch[0].payload if len(batch) == 1 else b"\n".join(entry.payload for entry in batch)


def batch_msg_id(batch: list[OutboxEntry]) -> str:
    """``Nats-Msg-Id`` of one message: the event's own id, or ``<run>:<fence>:<first>-<last>:<execution>``."""
    first = batch[0].event
    if len(batch) == 1:
        return first.uplink_id
    seqs = f"{first.seq}-{batch[-1].event.seq}"
    base = f"{first.run_id}:{first.fence}:{seqs}"
    return f"{base}:{first.execution}" if first.execution else base


def fit_event(event: RunEvent, limit: int) -> bytes:
    """The event cut to at most ``limit`` bytes: its longest text field shortened, ``truncated`` set.

    ``truncated`` is the field's original length in characters. The recorder splits big output
    already, so this only triggers for odd events (a huge failure reason) or a tiny max_payload.
    ``ValueError`` when even an empty field does not fit.
    """
    payload = encode_event(event)
    if len(payload) <= limit:
        return payload
    texts = {k: v for k, v in event.data.items() if isinstance(v, str)}
    if not texts:
        raise ValueError(f"run event {event.message_id} ({len(payload)} bytes) does not fit in {limit} bytes")
    name = max(texts, key=lambda k: len(texts[k]))
    text = texts[name]
    keep = len(text)
    while keep > 0:
        keep //= 2
        data = {**event.data, name: text[:keep], "truncated": len(text)}
        payload = encode_event(replace(event, data=data))
        if len(payload) <= limit:
            return payload
    raise ValueError(f"run event {event.message_id} does not fit in {limit} bytes")


# ------------------------------------------------------------------------------ pure bookkeeping

_QUEUED: Final = 0
_IN_FLIGHT: Final = 1
_ACKED: Final = 2


@dataclass(eq=False, slots=True)
class OutboxEntry:
    """One event on its way: its payload, where it stands, how often it was sent."""

    order: int
    event: RunEvent
    payload: bytes
    state: int = _QUEUED
    token: str | None = None
    attempts: int = 0
    deadline: float = 0.0
    added: float = 0.0  # when it was queued (the uplink's clock), for coalescing
    # The message it went out in, with the entries after it (kept for retries: same batch, same id).
    batch: list[OutboxEntry] | None = None
    version: int = 0  # of its place in the ready heap (older places are stale)
    journal_id: int | None = None  # its row in the journal (durable uplinks)

    @property
    def msg_id(self) -> str:
        return self.event.uplink_id

    @property
    def size(self) -> int:
        return len(self.payload)


@dataclass
class Outbox:
    """Events not yet acked, in emit order; which to send next, which are overdue.

    ``add`` -> ``next_to_send`` (or ``peek_batch``) -> ``sent(token, deadline)`` /
    ``sent_batch`` -> ``acked(token)`` (or ``failed(token)`` / ``expire(now)`` /
    ``requeue_in_flight()``, which put the events back so they go out again before anything
    newer). One token is one message in flight, carrying one event or a batch of them; a
    batch sent again is the same batch (the same message id), so JetStream's
    de-duplication still stores each event once. An entry leaves the outbox when it and
    every entry before it are acked, so the outbox is never shorter than "unacked".
    """

    max_events: int = DEFAULT_OUTBOX_EVENTS
    max_bytes: int = DEFAULT_OUTBOX_BYTES
    window: int = DEFAULT_WINDOW
    _entries: deque[OutboxEntry] = field(default_factory=deque)
    # Ready entries by order; a place whose version is not the entry's current one is stale.
    _ready: list[tuple[int, int, OutboxEntry]] = field(default_factory=list)
    _queued: int = 0
    _in_flight: dict[str, list[OutboxEntry]] = field(default_factory=dict)
    _deadlines: deque[tuple[float, str]] = field(default_factory=deque)
    _order: itertools.count[int] = field(default_factory=itertools.count)
    nbytes: int = 0
    acked_total: int = 0
    # Called with the entries that leave for good (acked, discarded, refused): the journal forgets them.
    on_removed: Callable[[list[OutboxEntry]], None] | None = None

    def __post_init__(self) -> None:
        if self.max_events < 1 or self.max_bytes < 1 or self.window < 1:
            raise ValueError("outbox limits and window must be at least 1")

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def in_flight(self) -> int:
        """Messages in flight (each one event or a batch)."""
        return len(self._in_flight)

    @property
    def queued(self) -> int:
        return self._queued

    def has_room(self, size: int) -> bool:
        """Room for an event of ``size`` bytes (an empty outbox takes anything)."""
        if not self._entries:
            return True
        return len(self._entries) < self.max_events and self.nbytes + size <= self.max_bytes

    def add(self, event: RunEvent, payload: bytes) -> OutboxEntry:
        entry = OutboxEntry(next(self._order), event, payload)
        self._entries.append(entry)
        self.nbytes += entry.size
        self._push(entry)
        return entry

    def _push(self, entry: OutboxEntry) -> None:
        entry.state, entry.token = _QUEUED, None
        entry.version += 1
        self._queued += 1
        heapq.heappush(self._ready, (entry.order, entry.version, entry))

    def _unqueue(self, entry: OutboxEntry, state: int) -> None:
        """The entry leaves the ready queue (its heap place goes stale)."""
        if entry.state == _QUEUED:
            self._queued -= 1
        entry.state = state

    def _head(self) -> OutboxEntry | None:
        while self._ready:
            _, version, entry = self._ready[0]
            if entry.state == _QUEUED and version == entry.version:
                return entry
            heapq.heappop(self._ready)
        return None

    def next_to_send(self, window: int | None = None) -> OutboxEntry | None:
        """The oldest event waiting to be (re)sent, if the window (default: ``self.window``) has room."""
        head = self._head()
        if head is None or len(self._in_flight) >= (self.window if window is None else window):
            return None
        return head

    def peek_batch(self, max_events: int, max_bytes: int) -> list[OutboxEntry]:
        """What goes out next as one message: the batch the oldest ready event went out in
        before, if any, else it and the ready ones right after it of the same run, within
        ``max_events`` and ``max_bytes`` (payloads plus a line break between each); not taken."""
        head = self._head()
        if head is None:
            return []
        if head.batch is not None and all(e.state == _QUEUED for e in head.batch):
            return list(head.batch)
        taken: list[tuple[int, int, OutboxEntry]] = []
        batch: list[OutboxEntry] = []
        size = -1
        while self._ready and len(batch) < max_events:
            item = heapq.heappop(self._ready)
            taken.append(item)
            _, version, entry = item
            if entry.state != _QUEUED or version != entry.version:
                continue
            if batch and (
                entry.batch is not None
                or entry.event.run_id != batch[0].event.run_id
                or size + 1 + entry.size > max_bytes
            ):
                break
            batch.append(entry)
            size += 1 + entry.size
            if entry.batch is not None:
                break  # an entry of an earlier batch whose other members are not ready: alone
        for item in taken:
            heapq.heappush(self._ready, item)
        return batch

    def sent(self, entry: OutboxEntry, token: str, deadline: float) -> None:
        self.sent_batch([entry], token, deadline)

    def sent_batch(self, entries: list[OutboxEntry], token: str, deadline: float) -> None:
        """``entries`` (as offered by next_to_send()/peek_batch()) went out as one message."""
        if not entries or self._head() is not entries[0] or any(e.state != _QUEUED for e in entries):
            raise RuntimeError("only the entries from next_to_send()/peek_batch() can be sent")
        batch = list(entries) if len(entries) > 1 else None
        for entry in entries:
            self._unqueue(entry, _IN_FLIGHT)
            entry.token, entry.deadline = token, deadline
            entry.attempts += 1
            entry.batch = batch
        self._in_flight[token] = list(entries)
        self._deadlines.append((deadline, token))

    def acked(self, token: str) -> OutboxEntry | None:
        """Mark the events published under ``token`` delivered; the first of them, or None when
        that token is not in flight."""
        entries = self._in_flight.pop(token, None)
        if entries is None:
            return None
        for entry in entries:
            entry.state, entry.token = _ACKED, None
        self.acked_total += len(entries)
        self._trim()
        self._gone(entries)
        return entries[0]

    def _gone(self, entries: list[OutboxEntry]) -> None:
        if self.on_removed is not None and entries:
            self.on_removed(entries)

    def oldest(self) -> OutboxEntry | None:
        """The oldest entry not yet acked."""
        return next((e for e in self._entries if e.state != _ACKED), None)

    def _trim(self) -> None:
        while self._entries and self._entries[0].state == _ACKED:
            self.nbytes -= self._entries.popleft().size

    def discard(self, entry: OutboxEntry) -> None:
        """Give up on the entry from next_to_send() (it can never be sent); it counts as done."""
        if self._head() is not entry:
            raise RuntimeError("only the entry from next_to_send() can be discarded")
        self._unqueue(entry, _ACKED)
        self._trim()
        self._gone([entry])

    def failed(self, token: str) -> OutboxEntry | None:
        """The publish under ``token`` failed: send its events again (same ids) before newer ones."""
        entries = self._in_flight.pop(token, None)
        if entries is None:
            return None
        for entry in entries:
            self._push(entry)
        return entries[0]

    def unbatch(self, entries: list[OutboxEntry]) -> None:
        """Let these entries be cut into new messages (their batch was refused as too big)."""
        for entry in entries:
            entry.batch = None

    def in_flight_entry(self, token: str) -> OutboxEntry | None:
        entries = self._in_flight.get(token)
        return entries[0] if entries else None

    def in_flight_batch(self, token: str) -> list[OutboxEntry]:
        return list(self._in_flight.get(token, ()))

    def refuse_run(self, run_id: str) -> int:
        """Drop every event of ``run_id`` not delivered yet (the stream refuses the run for good)."""
        gone: list[OutboxEntry] = []
        for token, entries in list(self._in_flight.items()):
            if entries[0].event.run_id == run_id:  # a message carries one run's events only
                del self._in_flight[token]
                for entry in entries:
                    entry.state, entry.token = _ACKED, None
                gone.extend(entries)
        for entry in self._entries:
            if entry.event.run_id == run_id and entry.state == _QUEUED:
                self._unqueue(entry, _ACKED)
                gone.append(entry)
        self._trim()
        self._gone(gone)
        return len(gone)

    def expire(self, now: float) -> list[OutboxEntry]:
        """Events whose ack is overdue go back to the queue; returns them."""
        expired: list[OutboxEntry] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, token = self._deadlines.popleft()
            entries = self._in_flight.pop(token, None)
            for entry in entries or ():
                self._push(entry)
                expired.append(entry)
        return expired

    def requeue_in_flight(self) -> int:
        """Every in-flight event goes back to the queue (the connection is gone); returns how many."""
        entries = [entry for batch in self._in_flight.values() for entry in batch]
        self._in_flight.clear()
        self._deadlines.clear()
        for entry in entries:
            self._push(entry)
        return len(entries)

    def next_deadline(self) -> float | None:
        while self._deadlines and self._deadlines[0][1] not in self._in_flight:
            self._deadlines.popleft()
        return self._deadlines[0][0] if self._deadlines else None

    def runs(self) -> list[str]:
        """The runs with undelivered events (first seen first)."""
        return list(dict.fromkeys(e.event.run_id for e in self._entries if e.state != _ACKED))

    def undelivered(self) -> int:
        return sum(1 for e in self._entries if e.state != _ACKED)


# ------------------------------------------------------------------------------ I/O


@dataclass
class _Link:
    """One connection as the uplink uses it: where acks come back."""

    nc: NATS
    subjects: tunnel.HostSubjects
    ack_prefix: str = ""
    sub: Subscription | None = None
    down: bool = False  # seen disconnected (nats-py is reconnecting)


class JetStreamUplink:
    """An :class:`~linkd.run_events.EventSink` that delivers run events to JetStream (see the module doc)."""

    def __init__(
        self,
        *,
        max_events: int = DEFAULT_OUTBOX_EVENTS,
        max_bytes: int = DEFAULT_OUTBOX_BYTES,
        window: int = DEFAULT_WINDOW,
        ack_timeout: float = DEFAULT_ACK_TIMEOUT,
        retry: Backoff | None = None,
        clock: Callable[[], float] = time.monotonic,
        journal: Journal | None = None,
    ) -> None:
        if ack_timeout <= 0:
            raise ValueError("ack_timeout must be positive")
        self.outbox = Outbox(max_events, max_bytes, window, on_removed=self._forget)
        self.journal = journal
        self.journal_path: Path | None = journal.path if journal is not None else None
        self.restored = 0  # events a previous daemon left unacknowledged, queued again at start
        # Journaled by persist() and not yet emitted: message id -> (journal row, payload).
        self._journaled: dict[str, tuple[int, bytes]] = {}
        self._acked_rows: list[int] = []  # acked, to be deleted from the journal (see FORGET_DELAY)
        self._forget_timer: asyncio.TimerHandle | None = None
        self.ack_timeout = ack_timeout
        self.retry = retry if retry is not None else Backoff(initial=RETRY_INITIAL, cap=RETRY_CAP)
        self.clock = clock
        self.published = 0  # messages published (one event or a batch each), first tries and retries
        self.retries = 0  # messages published again
        self.duplicates = 0  # acks saying the stream already had the id (a retry of a stored event)
        self.dropped = 0  # events that can never be published (too big, or their run is refused)
        self._refused_runs: set[str] = set()  # runs the stream refuses for good (subject full)
        self._max_message = 1 << 62  # lowered when the stream refuses a message as too big
        self.last_error: str | None = None
        self._wanted: tuple[NATS, tunnel.HostSubjects] | None = None
        self._link: _Link | None = None
        self._tokens = itertools.count(1)
        self._pause_until = 0.0
        self._trouble: str | None = None  # the kind of failure being reported (warn once per kind)
        self._closed = False
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._empty = asyncio.Event()
        self._empty.set()
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ public

    @property
    def durable(self) -> bool:
        """Events are on disk when ``emit`` returns (a producer may wait for that)."""
        return self.journal is not None

    def restore(self) -> int:
        """Queue the events the journal held when opened (a previous daemon's unacked ones); how many."""
        journal = self.journal
        if journal is None:
            return 0
        now, wall = self.clock(), time.time()
        restored = journal.restored_events()
        for item in restored:
            entry = self.outbox.add(item.event, item.payload)
            entry.journal_id = item.id
            entry.added = now - max(0.0, wall - item.added)
        if restored:
            self.restored += len(restored)
            self._empty.clear()
            self._kick()
            log.info(
                "run uplink: %d event(s) of %d run(s) from the journal are published again",
                len(restored),
                len({item.event.run_id for item in restored}),
                extra={"event": "uplink_restored", "events": len(restored)},
            )
        return len(restored)

    def persist(self, event: RunEvent) -> None:
        """Journal ``event`` now (synchronously: it is on disk when this returns); ``emit`` follows."""
        if self.journal is None or event.run_id in self._refused_runs:
            return
        payload = encode_event(event)
        try:
            self._journaled[event.uplink_id] = (self.journal.append(event, payload), payload)
        except SqliteError as exc:
            self._journal_failed(exc)

    def wake(self) -> None:
        """Try again at once, whatever the backoff (the machine woke up, a new connection came)."""
        self._fresh_start(self.clock())
        self._kick()

    def _journal_failed(self, exc: BaseException) -> None:
        log.error(
            "the run journal %s cannot be written (%s); run events are kept in memory only from now on",
            self.journal_path,
            exc,
            extra={"event": "journal_failed"},
        )
        journal, self.journal = self.journal, None
        if journal is not None:
            with contextlib.suppress(Exception):
                journal.close()

    def _forget(self, entries: list[OutboxEntry]) -> None:
        """Entries left the outbox for good: they leave the journal too, soon, in a group."""
        if self.journal is None:
            return
        self._acked_rows.extend(e.journal_id for e in entries if e.journal_id is not None)
        if len(self._acked_rows) >= FORGET_EVENTS:
            self._forget_now()
        elif self._acked_rows and self._forget_timer is None:
            self._forget_timer = asyncio.get_running_loop().call_later(FORGET_DELAY, self._forget_now)

    def _forget_now(self) -> None:
        if self._forget_timer is not None:
            self._forget_timer.cancel()
            self._forget_timer = None
        rows, self._acked_rows = self._acked_rows, []
        if self.journal is None or not rows:
            return
        try:
            self.journal.remove(rows)
        except SqliteError as exc:
            self._journal_failed(exc)

    async def emit(self, run_id: str, fence: Fence, event: RunEvent) -> None:
        """Queue ``event``; waits while the outbox is full (except for ``done``)."""
        if not is_valid_run_id(run_id) or event.run_id != run_id:
            raise ValueError(f"invalid run id {run_id!r} for event {event.message_id}")
        journaled = self._journaled.pop(event.uplink_id, None)
        if run_id in self._refused_runs:
            self.dropped += 1  # the stream takes no more of this run's events
            if journaled is not None and self.journal is not None:
                with contextlib.suppress(SqliteError):
                    self.journal.remove([journaled[0]])
            return
        payload = journaled[1] if journaled is not None else encode_event(event)
        while not self._closed and event.type != DONE and not self.outbox.has_room(len(payload)):
            self._room.clear()
            await self._room.wait()
        if self._closed:
            raise UplinkClosed(f"the run uplink is closed; event {event.message_id} was not queued")
        journal_id = journaled[0] if journaled is not None else None
        if journal_id is None and self.journal is not None:
            try:
                journal_id = self.journal.append(event, payload)
            except SqliteError as exc:
                self._journal_failed(exc)
        entry = self.outbox.add(event, payload)
        entry.added, entry.journal_id = self.clock(), journal_id
        self._empty.clear()
        self._kick()

    def attach(self, nc: NATS | None, subjects: tunnel.HostSubjects | None = None) -> None:
        """Use ``nc`` (publishing as host ``subjects``) from now on; None: no connection for now."""
        if nc is not None and subjects is None:
            raise ValueError("attach(nc) needs the host's subjects")
        self._wanted = None if nc is None or subjects is None else (nc, subjects)
        self._kick()

    async def flush(self, timeout: float) -> bool:
        """Wait until every queued event is acked; False when ``timeout`` passed first."""
        if not self.outbox:
            return True
        self._kick()
        try:
            async with asyncio.timeout(timeout):
                await self._empty.wait()
        except TimeoutError:
            return False
        return True

    async def aclose(self, timeout: float = DEFAULT_ACK_TIMEOUT) -> None:
        """Flush for up to ``timeout`` seconds, log what could not be delivered, stop."""
        if self._closed and self._task is None:
            return
        self._pause_until = min(self._pause_until, self.clock())  # one last try, whatever the backoff
        delivered = await self.flush(max(timeout, MIN_FLUSH))
        self._closed = True
        self._room.set()  # producers waiting for room get UplinkClosed
        if not delivered:
            runs = self.outbox.runs()
            log.warning(
                "%d run event(s) of %d run(s) were not delivered before shutdown (%s): %s",
                self.outbox.undelivered(),
                len(runs),
                self.last_error or "no acknowledgement yet",
                ", ".join(runs[:10]) + (" ..." if len(runs) > 10 else ""),
                extra={"event": "uplink_undelivered", "events": self.outbox.undelivered(), "runs": runs},
            )
        task, self._task = self._task, None
        try:
            if task is not None:
                task.cancel()
                await asyncio.wait([task])  # (raises nothing of the task's, passes on our own cancel)
        finally:  # also when we are cancelled meanwhile: nothing calls aclose() twice
            await self._drop_link()
            self._forget_now()
            journal, self.journal = self.journal, None
            if journal is not None:  # what is left in it goes out after the next start
                with contextlib.suppress(SqliteError):
                    journal.close()

    def status(self) -> dict[str, Any]:
        """For the status file: how much waits and why."""
        oldest = self.outbox.oldest()
        return {
            "state": self._state(),
            "outbox": len(self.outbox),
            "outboxBytes": self.outbox.nbytes,
            "oldestUnackedSeconds": round(max(0.0, self.clock() - oldest.added), 3) if oldest else None,
            "journal": str(self.journal_path) if self.journal is not None else None,
            "restored": self.restored,
            "inFlight": self.outbox.in_flight,
            "delivered": self.outbox.acked_total,
            "retries": self.retries,
            "lastError": self.last_error,
        }

    # ------------------------------------------------------------------ delivery

    def _state(self) -> str:
        if self._closed:
            return "closed"
        if self._wanted is None:
            return "waiting for a connection"
        if self._link is not None and not self._link.nc.is_connected:
            return "waiting for NATS to reconnect"
        if self._trouble is not None:
            return f"retrying: {self.last_error}"
        return "delivering" if self.outbox else "idle"

    def _kick(self) -> None:
        self._wake.set()
        if self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(self._deliver(), name="linkd-uplink")

    def _is_closed(self) -> bool:
        """(A call, not the attribute: ``_closed`` changes while ``_deliver`` awaits.)"""
        return self._closed

    async def _deliver(self) -> None:
        # Not only cancel() ends it: nats-py can swallow a cancel that lands in a publish.
        while not self._is_closed():
            # One turn of the loop for the producers first: events emitted together go out together.
            await asyncio.sleep(0)
            self._wake.clear()
            try:
                timeout = await self._step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug must not stop the uplink: report it, go on after a pause
                log.exception("run uplink: unexpected error; retrying")
                self._failure("internal", f"internal error ({type(exc).__name__})")
                timeout = self._pause_until - self.clock()
            if self._is_closed():
                return
            if timeout is None or timeout > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()

    async def _step(self) -> float | None:
        """Publish what can go now; returns how long to wait at most before the next step."""
        link = await self._current_link()
        if link is None:
            return CONNECTION_POLL if self._wanted is not None else None
        now = self.clock()
        if self.outbox.expire(now):
            self._failure(
                "timeout",
                f"no publish acknowledgement within {self.ack_timeout:g}s "
                f"(is the daemon allowed to subscribe to {link.ack_prefix}*?)",
            )
        if not link.nc.is_connected:
            # nats-py reconnects by itself; what was in flight goes again afterwards (same ids).
            link.down = True
            self.outbox.requeue_in_flight()
            return CONNECTION_POLL if self.outbox else None
        if link.down:  # back: whatever we were backing off from may be over, try at once
            link.down = False
            self._fresh_start(now)
        hold_until = None
        if now >= self._pause_until:
            hold_until = self._coalesce_until(now)
            if hold_until is None:
                await self._publish_ready(link, now)
        waits = [
            t - now
            for t in (self.outbox.next_deadline(), self._pause_until, hold_until)
            if t is not None and t > now
        ]
        if waits:
            return min(waits)
        return CONNECTION_POLL if self.outbox.queued else None

    def _coalesce_until(self, now: float) -> float | None:
        """When to publish the ready events, if not now (see the module doc)."""
        head = self.outbox.next_to_send()
        if head is None or head.attempts or self.outbox.in_flight == 0 or self._trouble is not None:
            return None
        if self.outbox.queued >= COALESCE_EVENTS or now - head.added >= COALESCE_DELAY:
            return None
        return head.added + COALESCE_DELAY

    async def _publish_ready(self, link: _Link, now: float) -> None:
        limit = min(link.nc.max_payload - HEADER_ROOM, self._max_message)
        # After a failure one event probes until an ack comes back; then the whole window again.
        window = 1 if self._trouble is not None else None
        while (head := self.outbox.next_to_send(window)) is not None:
            if head.size > limit and not self._shrink(head, limit):
                continue
            batch = self.outbox.peek_batch(1 if window == 1 else BATCH_EVENTS, limit)
            token = str(next(self._tokens))
            try:
                await link.nc.publish(
                    run_event_subject(link.subjects, head.event.run_id),
                    batch_payload(batch),
                    reply=link.ack_prefix + token,
                    headers={MSG_ID_HEADER: batch_msg_id(batch)},
                )
            except NatsError as exc:  # closed, reconnecting with a full buffer, ...: try again soon
                self._failure("publish", f"publish failed ({type(exc).__name__})")
                return
            if batch[0].attempts:
                self.retries += 1
            self.outbox.sent_batch(batch, token, now + self.ack_timeout)
            self.published += 1

    def _shrink(self, entry: OutboxEntry, limit: int) -> bool:
        """Cut an event too big for one message; False when it cannot be sent at all (dropped)."""
        try:
            payload = fit_event(entry.event, limit)
        except ValueError as exc:
            # Never block every other run's events behind one that can never be published.
            log.error("run %s: %s; the event is dropped", entry.event.run_id, exc)
            self.outbox.discard(entry)
            self.dropped += 1
            self._removed()
            return False
        log.warning(
            "run %s: event seq %d is bigger than NATS max_payload allows; sent truncated",
            entry.event.run_id,
            entry.event.seq,
        )
        self.outbox.nbytes += len(payload) - entry.size
        entry.payload = payload
        return True

    async def _current_link(self) -> _Link | None:
        """The link for the wanted connection, set up (ack subscription) when it changed."""
        wanted = self._wanted
        link = self._link
        if link is not None and (wanted is None or wanted != (link.nc, link.subjects)):
            await self._drop_link()
            link = None
        if wanted is None or wanted[0].is_closed:
            return None
        if link is None:
            nc, subjects = wanted
            link = _Link(nc, subjects, ack_prefix=nc.new_inbox() + ".")
            try:
                link.sub = await nc.subscribe(link.ack_prefix + "*", cb=self._on_ack)
            except NatsError as exc:
                self._failure("subscribe", f"cannot subscribe for publish acks ({type(exc).__name__})")
                return None
            self._link = link
            self._fresh_start(self.clock())
        return link

    async def _drop_link(self) -> None:
        link, self._link = self._link, None
        if link is None:
            return
        self.outbox.requeue_in_flight()
        if link.sub is not None and not link.nc.is_closed:
            with contextlib.suppress(Exception):
                await link.sub.unsubscribe()

    async def _on_ack(self, msg: Msg) -> None:
        link = self._link
        if link is None or not msg.subject.startswith(link.ack_prefix):
            return  # a late ack from a connection we left: the event is re-sent, the stream dedups
        token = msg.subject[len(link.ack_prefix) :]
        ack, problem = _parse_ack(msg)
        if problem is None:
            if self.outbox.acked(token) is not None:
                if ack.get("duplicate"):
                    self.duplicates += 1
                self._recovered()
                self._removed()
            self._wake.set()
            return
        kind, text = problem
        if kind == f"api_{SUBJECT_FULL}":
            self._refuse_run(token, text)
        elif kind == f"api_{TOO_BIG}":
            self._shrink_refused(token, kind, text)
        elif self.outbox.failed(token) is not None:
            self._failure(kind, text)
        self._wake.set()

    def _refuse_run(self, token: str, text: str) -> None:
        entry = self.outbox.in_flight_entry(token)
        if entry is None:
            return
        run_id = entry.event.run_id
        self._refused_runs.add(run_id)
        dropped = self.outbox.refuse_run(run_id)
        if self.journal is not None:
            try:
                self.journal.forget_run(run_id)
            except SqliteError as exc:
                self._journal_failed(exc)
        self.dropped += dropped
        log.error(
            "run %s: %s; its %d undelivered event(s) are dropped and later ones will be",
            run_id,
            text,
            dropped,
            extra={"event": "uplink_run_refused", "run_id": run_id},
        )
        self._removed()

    def _shrink_refused(self, token: str, kind: str, text: str) -> None:
        """A message bigger than the stream stores: from now on send at most half its size.

        The limit is learned, not configured: batches are cut smaller and a single event
        bigger than that is cut (:meth:`_shrink`), down to a floor where it is retried as a failure.
        """
        batch = self.outbox.in_flight_batch(token)
        if not batch:
            return
        size = len(batch_payload(batch))
        self.outbox.failed(token)
        self.outbox.unbatch(batch)
        if size <= MIN_MESSAGE_BYTES:
            self._failure(kind, text)
            return
        self._max_message = max(MIN_MESSAGE_BYTES, size // 2)
        log.warning(
            "run %s: the stream refused a %d-byte message as too big; sending at most %d bytes per message",
            batch[0].event.run_id,
            size,
            self._max_message,
        )

    def _fresh_start(self, now: float) -> None:
        self.retry.reset()
        self._pause_until = min(self._pause_until, now)

    def _removed(self) -> None:
        """Events left the outbox: wake waiting producers and flushes."""
        if len(self.outbox) < self.outbox.max_events:
            self._room.set()
        if not self.outbox:
            self._empty.set()

    def _failure(self, kind: str, text: str) -> None:
        """Back off before publishing again; one warning per kind of trouble, not per event."""
        self.last_error = text
        now = self.clock()
        if now >= self._pause_until:  # a burst of failures (a whole window) is one backoff step
            self._pause_until = now + self.retry.next()
        if self._trouble != kind:
            self._trouble = kind
            log.warning(
                "run uplink: %s; %d event(s) wait in the outbox, retrying",
                text,
                len(self.outbox),
                extra={"event": "uplink_retrying", "reason": kind},
            )

    def _recovered(self) -> None:
        if self._trouble is not None:
            log.info(
                "run uplink: delivering again (%d event(s) waiting)",
                len(self.outbox),
                extra={"event": "uplink_recovered"},
            )
            self._trouble = None
            self.last_error = None
        self.retry.reset()


def _parse_ack(msg: Msg) -> tuple[dict[str, Any], tuple[str, str] | None]:
    """(the ack document, None) for a good publish ack, else ({}, (kind, description))."""
    headers = msg.headers or {}
    if headers.get("Status") == "503":
        return {}, (
            "no_stream",
            "no JetStream stream stores run events yet (no responders: does the gateway have runs "
            "and JetStream? without them, start linkd with --no-uplink)",
        )
    try:
        body = json.loads(msg.data)
    except ValueError:
        return {}, ("bad_ack", "JetStream answered with something that is not JSON")
    if not isinstance(body, dict):
        return {}, ("bad_ack", "JetStream answered with an unexpected document")
    error = body.get("error")
    if error is not None:
        if isinstance(error, dict):
            code = error.get("err_code") or error.get("code")
            return {}, (f"api_{code}", f"JetStream refused the event ({error.get('description', code)})")
        return {}, ("api", f"JetStream refused the event ({error})")
    if not isinstance(body.get("seq"), int):
        return {}, ("bad_ack", "JetStream answered without a sequence number")
    return body, None
