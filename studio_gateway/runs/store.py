"""Where runs live: the JetStream event stream and three key-value buckets (all created idempotently).

- stream ``LINK_RUNS`` (:data:`contract.run_protocol.RUN_STREAM`): every host's run events,
  ``P.host.*.runs.*``, file storage, ``max_age`` = ``RUNS_STREAM_MAX_AGE_SECONDS``,
  de-duplication window ``RUNS_DUPLICATE_WINDOW_SECONDS`` (message ids ``<runId>:<fence>:<seq>:<execution>``);
- bucket ``LINK_RUN_STATE``: one key per run id, the :class:`~.state.RunState` JSON,
  always written with compare-and-set on the revision;
- bucket ``LINK_RUN_OUTPUT``: the run's events kept for export after the stream's
  retention, one key ``<runId>.<seq>`` each (a retried write replaces itself, so keeping
  is idempotent), up to ``RUNS_OUTPUT_MAX_BYTES`` per run;
- bucket ``LINK_RUN_ACTIVE``: one key per run that is not terminal yet, so the reaper
  scans only those (removed with a subject purge: no tombstones pile up);
- bucket ``LINK_RUN_BY_USER``: the runs of each user, one key per run
  ``<user token>.<createdAt ms, 15 digits>.<runId>`` (user token: :func:`user_index_token`),
  written with the run, kept as long as the run state; ``GET /api/runs`` lists a user's
  keys (one stream-info request) newest first and reads the states of one page
  (runs created before this index existed are not in it);
- bucket ``LINK_RUN_DEAD_LETTERS``: run events the projector could not apply (its apply step
  raised on each of several deliveries), one key ``<runId>.<stream seq>`` each (two instances
  parking the same message write the same key), kept as long as run state; an operator lists
  them (``GET /api/admin/runs/dead-letters``);
- durable pull consumers ``LINK_RUNS_H_<hash of the host token>``, one per host with active
  runs, filtered to that host's subjects and shared by every gateway instance's projector,
  which takes turns between hosts (see :mod:`.projector`); created when a host gets a run,
  removed by JetStream after ``HOST_CONSUMER_INACTIVE`` without pulls.

Tenant limits on the stream (docs/runs.md, "Tenants"): a run's subject holds at most
``RUNS_MAX_EVENTS_PER_RUN`` (+ a little slack) events and an event at most
``RUNS_MAX_EVENT_BYTES``; JetStream refuses a publish beyond either (error 10077 / 10054)
instead of deleting anything accepted (``discard: new`` per subject).

Everything survives a gateway restart; gateway instances keep no run state of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue

from contract.run_protocol import RUN_STREAM, run_stream_subjects

from ..config import RunsConfig
from .pull_feed import PullFeed
from .state import RunState

__all__ = [
    "ACTIVE_BUCKET",
    "DEAD_LETTER_BUCKET",
    "HOST_CONSUMER_PREFIX",
    "OUTPUT_BUCKET",
    "PROJECTOR_DURABLE",
    "STATE_BUCKET",
    "USER_INDEX_BUCKET",
    "Conflict",
    "EventReader",
    "RunStore",
    "SnapshotIncomplete",
    "user_index_cursor",
    "user_index_token",
]

log = logging.getLogger("studio_gateway.run_store")

STATE_BUCKET: Final = "LINK_RUN_STATE"
OUTPUT_BUCKET: Final = "LINK_RUN_OUTPUT"
ACTIVE_BUCKET: Final = "LINK_RUN_ACTIVE"
USER_INDEX_BUCKET: Final = "LINK_RUN_BY_USER"
DEAD_LETTER_BUCKET: Final = "LINK_RUN_DEAD_LETTERS"
# The created-at part of an index key: ms since the epoch, zero-padded so keys sort by time.
_CREATED_DIGITS: Final = 15
# The single projector consumer of earlier versions (replaced by one per host; deleted at set-up).
PROJECTOR_DURABLE: Final = "LINK_RUNS_PROJECTOR"
HOST_CONSUMER_PREFIX: Final = "LINK_RUNS_H_"
# A host's consumer nobody pulled this long (no active runs) is removed by JetStream.
HOST_CONSUMER_INACTIVE: Final = 300.0
# A new host consumer starts this long before the host's oldest active run was created
# (clock skew between a gateway and the servers; older events are not the run's anyway).
HOST_CONSUMER_LOOKBACK: Final = 60.0
# Room above RUNS_MAX_EVENTS_PER_RUN in the stream's per-subject limit: duplicates stored after
# the duplicate window, and the projector's own verdict (event_limit) comes first.
EVENTS_PER_RUN_SLACK: Final = 64
# A projector that took a message and died: JetStream hands it to another instance after this.
# Short, because the run's later events wait for it; an instance holding an early event
# keeps it with in-progress acks, and applying twice is harmless (a duplicate).
PROJECTOR_ACK_WAIT: Final = 3.0
PROJECTOR_MAX_ACK_PENDING: Final = 4096
# Readers' ephemeral consumers disappear this long after their reader stopped pulling.
READER_INACTIVE_THRESHOLD: Final = 120.0
# Standing pull requests (see .pull_feed): size, and how long each lasts on the server
# (after a reconnect a lost request is replaced within about this long).
READER_BATCH: Final = 256
READER_EXPIRES: Final = 5.0
PROJECTOR_BATCH: Final = 64
PROJECTOR_EXPIRES: Final = 2.0
# A feed nobody served this long is given up: its owner checks or re-creates the consumer
# (a replicated consumer's leader election takes ~5-8 s; an R1 reader's node may be gone).
READER_GIVE_UP: Final = 2.0
PROJECTOR_GIVE_UP: Final = 3.0
JS_TIMEOUT: Final = 5.0
# Health checks and the host consumer check wait this long (a raft election leaves requests unanswered).
CHECK_TIMEOUT: Final = 1.0
# The JetStream API prefix of ``RunStore.js`` (no domain).
JS_API: Final = "$JS.API"
# JetStream API error codes.
_STREAM_NAME_IN_USE: Final = 10058
_CONSUMER_EXISTS: Final = 10148
_CONSUMER_NAME_EXISTS: Final = 10013


def host_consumer_name(host_token: str) -> str:
    """A consumer name for the host: fixed length, whatever the hostname's length."""
    return HOST_CONSUMER_PREFIX + hashlib.sha256(host_token.encode()).hexdigest()[:32]


def user_index_token(user_id: str) -> str:
    """A user's prefix in ``LINK_RUN_BY_USER``: user ids may hold characters KV keys may not."""
    return hashlib.sha256(user_id.encode()).hexdigest()[:32]


def user_index_cursor(state: RunState) -> str:
    """The part of the run's index key after the user token: ``<created ms>.<runId>`` (sorts by time)."""
    return f"{max(0, state.created_at):0{_CREATED_DIGITS}d}.{state.run_id}"


class Conflict(Exception):
    """A compare-and-set lost: somebody else wrote the key first (read again and retry)."""


class SnapshotIncomplete(TimeoutError):
    """A reader got fewer messages than its subject held: never a partial answer.

    A TimeoutError, so the HTTP layer answers 503 (try again) and the reaper retries its pass.
    """


def kv_stream_config(bucket: str, *, max_age: float | None, replicas: int) -> api.StreamConfig:
    """The stream behind a key-value bucket, as nats-py's ``create_key_value`` builds it."""
    return api.StreamConfig(
        name=f"KV_{bucket}",
        subjects=[f"$KV.{bucket}.>"],
        allow_direct=True,
        allow_rollup_hdrs=True,
        deny_delete=True,
        discard=api.DiscardPolicy.NEW,
        duplicate_window=min(120.0, max_age) if max_age else 120.0,
        max_age=max_age,
        max_bytes=-1,
        max_consumers=-1,
        max_msg_size=-1,
        max_msgs=-1,
        max_msgs_per_subject=1,
        num_replicas=replicas,
        storage=api.StorageType.FILE,
    )


async def bucket_keys(nc: NATS, bucket: str, pattern: str) -> list[str]:
    """The keys of ``bucket`` matching ``pattern``: its subjects, from stream info (no consumer
    needed; filtered by the server, unlike nats-py's ``KeyValue.keys``, which reads every key).

    Stream info lists at most a page of subjects per answer; the rest come with ``offset``.
    """
    head = f"$KV.{bucket}."
    request = f"{JS_API}.STREAM.INFO.KV_{bucket}"
    keys: list[str] = []
    while True:
        body = json.dumps({"subjects_filter": f"{head}{pattern}", "offset": len(keys)}).encode()
        answer = json.loads((await nc.request(request, body, timeout=JS_TIMEOUT)).data)
        if "error" in answer:
            raise nats.js.errors.APIError.from_error(answer["error"])
        subjects = (answer.get("state") or {}).get("subjects") or {}
        keys.extend(subject[len(head) :] for subject in subjects)
        if not subjects or len(keys) >= int(answer.get("total") or 0):
            return keys


def runs_stream_config(config: RunsConfig, prefix: str) -> api.StreamConfig:
    return api.StreamConfig(
        name=RUN_STREAM,
        description="Run events from desktop daemons (see docs/runs.md)",
        subjects=run_stream_subjects(prefix),
        retention=api.RetentionPolicy.LIMITS,
        storage=api.StorageType.FILE,
        max_age=config.stream_max_age,
        duplicate_window=config.duplicate_window,
        num_replicas=config.replicas,
        max_consumers=-1,
        max_msgs=-1,
        max_bytes=-1,
        max_msg_size=config.max_event_bytes,
        max_msgs_per_subject=config.max_events_per_run + EVENTS_PER_RUN_SLACK,
        discard=api.DiscardPolicy.NEW,
        discard_new_per_subject=True,
    )


_COMPARED: Final = (
    "subjects",
    "max_age",
    "duplicate_window",
    "num_replicas",
    "max_msgs_per_subject",
    "max_msg_size",
    "discard",
    "discard_new_per_subject",
)


async def ensure_stream(js: JetStreamContext, config: api.StreamConfig) -> str:
    """Create the stream, or bring an existing one to ``config``; returns what was done.

    Safe when several gateway instances start at once: a lost creation race reads the winner's.
    """
    assert config.name is not None
    try:
        info = await js.stream_info(config.name)
    except nats.js.errors.NotFoundError:
        try:
            await js.add_stream(config)
            return "created"
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != _STREAM_NAME_IN_USE:
                raise
            info = await js.stream_info(config.name)
    current = info.config
    differs = [
        name
        for name in _COMPARED
        if getattr(config, name) is not None
        and _normal(getattr(current, name)) != _normal(getattr(config, name))
    ]
    if not differs:
        return "unchanged"
    log.info("updating stream %s (%s changed)", config.name, ", ".join(differs))
    await js.update_stream(config)
    return "updated"


def _normal(value: Any) -> Any:
    if isinstance(value, list):
        return sorted(value)
    if isinstance(value, float):
        return round(value, 3)
    return value


@dataclass
class EventReader:
    """An ephemeral, unacknowledged pull consumer on one subject (replay, then live).

    R1 in memory, on purpose: a raft group per reader would cost every SSE client a
    replicated consumer, and a reader loses nothing with its consumer. When its node dies
    the feed gives up after ``READER_GIVE_UP`` and the reader's owner opens a new one from
    its checkpoint (``start_seq``: the stream sequence after the last message it took).
    """

    js: JetStreamContext
    stream: str
    name: str
    feed: PullFeed
    initial_pending: int

    @classmethod
    async def open(
        cls,
        nc: NATS,
        js: JetStreamContext,
        stream: str,
        subject: str,
        *,
        start_seq: int = 0,
    ) -> EventReader:
        name = f"reader_{uuid.uuid4().hex}"
        config = api.ConsumerConfig(
            name=name,
            ack_policy=api.AckPolicy.NONE,
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE if start_seq > 0 else api.DeliverPolicy.ALL,
            opt_start_seq=start_seq if start_seq > 0 else None,
            filter_subject=subject,
            inactive_threshold=READER_INACTIVE_THRESHOLD,
            mem_storage=True,
            num_replicas=1,
            max_waiting=4,
        )
        # The creation's answer already says how many messages match: no separate info request.
        info = await js.add_consumer(stream, config)
        feed = await PullFeed.open(
            nc, stream, name, batch=READER_BATCH, expires=READER_EXPIRES, give_up_after=READER_GIVE_UP
        )
        return cls(js, stream, name, feed, int(info.num_pending or 0))

    async def fetch(self, batch: int, timeout: float) -> list[Msg]:
        """Up to ``batch`` messages as soon as there is one; [] when none arrived within ``timeout``."""
        return await self.feed.fetch(batch, timeout)

    async def snapshot(self, timeout: float = JS_TIMEOUT) -> list[Msg]:
        """Everything the subject held when the reader was opened, or an exception.

        Never a part of it: a caller judging "the stream lacks event k" (the reaper) or
        exporting a run must not act on a read cut short by a fault. Raises
        :class:`SnapshotIncomplete` when nothing came for ``timeout`` before the end, and
        :class:`.pull_feed.ConsumerGone` (or its ``FeedUnavailable``) when the consumer failed.
        """
        msgs: list[Msg] = []
        if self.initial_pending == 0:
            return msgs
        while True:
            batch = await self.fetch(256, timeout)
            if not batch:
                raise SnapshotIncomplete(
                    f"read {len(msgs)} of {self.initial_pending} messages of {self.stream}, "
                    f"then nothing for {timeout:g} s"
                )
            msgs.extend(batch)
            if batch[-1].metadata.num_pending == 0 or len(msgs) >= self.initial_pending:
                return msgs

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.feed.unsubscribe()
        with contextlib.suppress(Exception):
            await self.js.delete_consumer(self.stream, self.name)


class RunStore:
    """Run state, kept events and the active index on one NATS connection."""

    def __init__(self, nc: NATS, config: RunsConfig, prefix: str) -> None:
        self.nc = nc
        self.config = config
        self.prefix = prefix
        self.js = nc.jetstream(timeout=JS_TIMEOUT)
        self._state: KeyValue | None = None
        self._output: KeyValue | None = None
        self._active: KeyValue | None = None
        self._by_user: KeyValue | None = None
        self._dead: KeyValue | None = None

    # ------------------------------------------------------------------ set-up

    async def setup(self) -> dict[str, str]:
        """Create (or update) the stream, the buckets and the projector's consumer; idempotent."""
        js = self.js
        config = self.config
        done = {RUN_STREAM: await ensure_stream(js, runs_stream_config(config, self.prefix))}
        for bucket, max_age in (
            (STATE_BUCKET, config.retention),
            (OUTPUT_BUCKET, config.retention),
            (ACTIVE_BUCKET, None),
            (USER_INDEX_BUCKET, config.retention),
            (DEAD_LETTER_BUCKET, config.retention),
        ):
            stream = kv_stream_config(bucket, max_age=max_age, replicas=config.replicas)
            done[bucket] = await ensure_stream(js, stream)
        self._state = await js.key_value(STATE_BUCKET)
        self._output = await js.key_value(OUTPUT_BUCKET)
        self._active = await js.key_value(ACTIVE_BUCKET)
        self._by_user = await js.key_value(USER_INDEX_BUCKET)
        self._dead = await js.key_value(DEAD_LETTER_BUCKET)
        if await self._drop_shared_projector_consumer():
            done[PROJECTOR_DURABLE] = "deleted"
        return done

    async def _drop_shared_projector_consumer(self) -> bool:
        """Earlier versions pulled every host's events through one consumer: it goes."""
        try:
            await self.js.delete_consumer(RUN_STREAM, PROJECTOR_DURABLE)
        except nats.js.errors.NotFoundError:
            return False
        log.info("deleted the shared projector consumer %s (one per host now)", PROJECTOR_DURABLE)
        return True

    def host_subject(self, host_token: str) -> str:
        """Every run event of one host (the filter of its consumer)."""
        return f"{self.prefix}.host.{host_token}.runs.*"

    async def ensure_host_consumer(self, host_token: str, *, since_ms: int) -> str:
        """The host's durable consumer (name), created starting ``since_ms`` if missing; idempotent.

        Replicated like the stream (``--runs-replicas``), so a node's death moves its leader
        instead of losing its acknowledgements. An existing one goes on from its ack floor.
        Re-created after it was removed (idle, or deleted): it then starts at the host's
        oldest active run, which is correct because applying is idempotent (the run state's
        seq is the real checkpoint: older events are duplicates).

        The check waits ``CHECK_TIMEOUT``, not the full JetStream timeout: nats-server leaves a
        consumer info request unanswered while the consumer has no leader (an election takes
        4-9 s), and then the consumer is there; so no answer counts as "exists", and the feed
        opened next finds out (it is served once the new leader is up, or gives up again).
        """
        name = host_consumer_name(host_token)
        try:
            await self.js.consumer_info(RUN_STREAM, name, timeout=CHECK_TIMEOUT)
            return name
        except nats.js.errors.NotFoundError:
            pass
        except (TimeoutError, nats.errors.TimeoutError, nats.errors.NoRespondersError):
            log.debug("host consumer %s: no answer (an election?); taking it as there", name)
            return name
        start = datetime.fromtimestamp(max(0.0, since_ms / 1000 - HOST_CONSUMER_LOOKBACK), tz=UTC)
        consumer = api.ConsumerConfig(
            name=name,
            durable_name=name,
            description=f"run events of host {host_token[:64]} for the projectors",
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=PROJECTOR_ACK_WAIT,
            deliver_policy=api.DeliverPolicy.BY_START_TIME,
            opt_start_time=start,
            filter_subject=self.host_subject(host_token),
            max_ack_pending=PROJECTOR_MAX_ACK_PENDING,
            max_deliver=-1,
            max_waiting=512,
            inactive_threshold=HOST_CONSUMER_INACTIVE,
            num_replicas=self.config.replicas,
        )
        try:
            await self.js.add_consumer(RUN_STREAM, consumer)
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code not in (_CONSUMER_EXISTS, _CONSUMER_NAME_EXISTS):
                raise
        return name

    async def host_feed(self, host_token: str, *, on_ready: Callable[[], None] | None = None) -> PullFeed:
        """A standing pull on the host's consumer: each of its events arrives as soon as it is stored."""
        return await PullFeed.open(
            self.nc,
            RUN_STREAM,
            host_consumer_name(host_token),
            batch=PROJECTOR_BATCH,
            expires=PROJECTOR_EXPIRES,
            give_up_after=PROJECTOR_GIVE_UP,
            on_ready=on_ready,
        )

    async def probe_streams(self) -> None:
        """Raise unless the run stream and the state bucket's stream answer now (each has a leader)."""
        for stream in (RUN_STREAM, f"KV_{STATE_BUCKET}"):
            answer = await self.nc.request(f"{JS_API}.STREAM.INFO.{stream}", b"", timeout=CHECK_TIMEOUT)
            body = json.loads(answer.data)
            if "error" in body:
                raise nats.js.errors.APIError.from_error(body["error"])

    async def purge_host_events(self, host_token: str) -> None:
        """Drop every stored event of the host (its quota is exceeded)."""
        await self.js.purge_stream(RUN_STREAM, subject=self.host_subject(host_token))

    @property
    def state_kv(self) -> KeyValue:
        if self._state is None:
            raise RuntimeError("RunStore.setup() has not run")
        return self._state

    # ------------------------------------------------------------------ run state

    def state_subject(self, run_id: str) -> str:
        """The subject every write of ``run_id``'s state is published on (for live watchers)."""
        return f"$KV.{STATE_BUCKET}.{run_id}"

    async def load(self, run_id: str) -> tuple[RunState, int] | None:
        try:
            entry = await self.state_kv.get(run_id)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.InvalidKeyError):
            return None
        if entry.value is None or entry.revision is None:
            return None
        return RunState.from_json(entry.value), entry.revision

    async def create(self, state: RunState) -> int:
        """Write a new run (Conflict when the id exists), list it as active and in its user's index.

        The writes go out together (one round trip, not three): an active entry without its
        run (the create lost, or failed) is dropped by the reaper's next scan; an index entry
        without its run is skipped by :meth:`list_user_runs` (and by its owner check).
        """
        created, listed, indexed = await asyncio.gather(
            self.state_kv.create(state.run_id, state.to_json()),
            self.mark_active(state.run_id, state.host_token),
            self._index_for_user(state),
            return_exceptions=True,
        )
        if isinstance(created, nats.js.errors.KeyWrongLastSequenceError):
            raise Conflict(state.run_id)
        if isinstance(created, BaseException):
            raise created
        if isinstance(listed, BaseException):
            raise listed
        if isinstance(indexed, BaseException):
            raise indexed
        return created

    async def write(self, state: RunState, revision: int) -> int:
        """Compare-and-set: only when the stored revision is still ``revision``."""
        try:
            return await self.state_kv.update(state.run_id, state.to_json(), last=revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            raise Conflict(state.run_id) from None

    async def modify(
        self,
        run_id: str,
        change: Callable[[RunState], RunState | None],
        *,
        attempts: int = 20,
    ) -> tuple[RunState | None, RunState | None]:
        """Apply ``change`` with compare-and-set, re-reading on conflict.

        Returns ``(written, current)``: the state written (None when ``change`` declined)
        and the state as last read. ``(None, None)`` when the run does not exist.
        """
        for _ in range(attempts):
            loaded = await self.load(run_id)
            if loaded is None:
                return None, None
            state, revision = loaded
            new = change(state)
            if new is None:
                return None, state
            try:
                await self.write(new, revision)
            except Conflict:
                continue
            if new.terminal:
                await self.mark_inactive(run_id)
            return new, state
        raise Conflict(f"{run_id}: too many concurrent writers")

    # ------------------------------------------------------------------ user index

    async def _index_for_user(self, state: RunState) -> None:
        assert self._by_user is not None
        key = f"{user_index_token(state.user_id)}.{user_index_cursor(state)}"
        await self._by_user.put(key, state.run_id.encode())

    async def user_run_cursors(self, user_id: str) -> list[str]:
        """The user's runs in the index as cursors (``<created ms>.<runId>``), newest first."""
        token = user_index_token(user_id)
        keys = await self._bucket_keys(USER_INDEX_BUCKET, f"{token}.>")
        return sorted((key[len(token) + 1 :] for key in keys), reverse=True)

    async def list_user_runs(
        self, user_id: str, *, limit: int, before: str | None = None
    ) -> tuple[list[RunState], str | None]:
        """Up to ``limit`` of the user's runs, newest first, older than the cursor ``before``;
        and the cursor of the next page (None: no more).

        An index entry whose run is gone (the state's retention, a lost create) or is not the
        user's is skipped; the page is filled from the next entries instead.
        """
        cursors = await self.user_run_cursors(user_id)
        if before is not None:
            cursors = [cursor for cursor in cursors if cursor < before]
        runs: list[RunState] = []
        seen: set[str] = set()
        taken = 0
        while taken < len(cursors) and len(runs) < limit:
            chunk = cursors[taken : taken + limit - len(runs)]
            taken += len(chunk)
            run_ids = [cursor.split(".", 1)[1] for cursor in chunk]
            loaded = await asyncio.gather(*(self.load(run_id) for run_id in run_ids))
            for run_id, found in zip(run_ids, loaded, strict=True):
                if found is not None and found[0].user_id == user_id and run_id not in seen:
                    seen.add(run_id)
                    runs.append(found[0])
        return runs, (cursors[taken - 1] if taken < len(cursors) else None)

    # ------------------------------------------------------------------ active index

    async def mark_active(self, run_id: str, host_token: str) -> None:
        """List the run as active; the value is its host (what every projector's index needs)."""
        assert self._active is not None
        await self._active.put(run_id, host_token.encode())

    async def mark_inactive(self, run_id: str) -> None:
        """Forget an ended run in the active index (a purge: no tombstone stays behind)."""
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self.js.purge_stream(f"KV_{ACTIVE_BUCKET}", subject=f"$KV.{ACTIVE_BUCKET}.{run_id}")

    async def active_ids(self) -> list[str]:
        """The runs listed as active: the bucket's keys."""
        return await self._bucket_keys(ACTIVE_BUCKET, ">")

    async def _bucket_keys(self, bucket: str, pattern: str) -> list[str]:
        return await bucket_keys(self.nc, bucket, pattern)

    # ------------------------------------------------------------------ events

    def event_subject(self, state: RunState) -> str:
        """Where the run owner's daemon publishes this run's events."""
        return f"{self.prefix}.host.{state.host_token}.runs.{state.run_id}"

    async def open_events(self, state: RunState, *, start_seq: int = 0) -> EventReader:
        """A reader of the run's events in the stream, from ``start_seq`` (0: the first one)."""
        return await EventReader.open(
            self.nc, self.js, RUN_STREAM, self.event_subject(state), start_seq=start_seq
        )

    async def keep_events(self, run_id: str, events: list[tuple[int, dict[str, Any]]]) -> None:
        """Keep a turn's events of one run for export after the stream's retention: one write.

        Key ``<runId>.<first seq>``, value a JSON list; a retried write of the same turn
        replaces itself, and a differently cut retry overlaps an older one harmlessly
        (readers take each seq once).
        """
        assert self._output is not None
        if not events:
            return
        body = json.dumps([event for _, event in events], separators=(",", ":")).encode()
        await self._output.put(f"{run_id}.{events[0][0]}", body)

    async def kept_events(self, run_id: str) -> list[dict[str, Any]]:
        """The kept events of ``run_id``, in seq order."""
        reader = await EventReader.open(
            self.nc, self.js, f"KV_{OUTPUT_BUCKET}", f"$KV.{OUTPUT_BUCKET}.{run_id}.*"
        )
        try:
            msgs = await reader.snapshot()
        finally:
            await reader.close()
        by_seq: dict[int, dict[str, Any]] = {}
        for msg in msgs:
            with contextlib.suppress(ValueError):
                value = json.loads(msg.data)
                # One event per key (earlier versions) or a list of a turn's events.
                for event in value if isinstance(value, list) else [value]:
                    if isinstance(event, dict) and isinstance(event.get("seq"), int):
                        by_seq.setdefault(int(event["seq"]), event)
        return [by_seq[seq] for seq in sorted(by_seq)]

    # ------------------------------------------------------------------ dead letters

    async def put_dead_letter(self, run_id: str, stream_seq: int, record: dict[str, Any]) -> None:
        """Park one message the projector could not apply (idempotent: one key per message)."""
        assert self._dead is not None
        body = json.dumps(record, separators=(",", ":"), default=repr).encode()
        await self._dead.put(f"{run_id}.{stream_seq}", body)

    async def dead_letters(self) -> list[dict[str, Any]]:
        """Every parked message's record, oldest first (by when it was parked)."""
        reader = await EventReader.open(
            self.nc, self.js, f"KV_{DEAD_LETTER_BUCKET}", f"$KV.{DEAD_LETTER_BUCKET}.>"
        )
        try:
            msgs = await reader.snapshot()
        finally:
            await reader.close()
        records: list[dict[str, Any]] = []
        for msg in msgs:
            with contextlib.suppress(ValueError):
                record = json.loads(msg.data)
                if isinstance(record, dict):
                    records.append(record)
        return records
