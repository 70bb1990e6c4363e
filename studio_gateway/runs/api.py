"""The runs HTTP API (bearer-authenticated; a run belongs to the token's user).

- ``POST /api/runs`` ``{runner, input?, threadId?, title?}`` -> ``202 {runId, threadId, status}``,
  also when the desktop is offline (the run then fails at once, readable via GET);
- ``POST /api/threads/{threadId}/messages``: the same, in that thread;
- ``GET /api/runs?limit=N&before=CURSOR``: the caller's own runs, newest first,
  ``{runs: [<run state>...], next: <cursor> | null}`` (limit 1..100, default 20);
- ``GET /api/runs/{id}``: the run state (``?include=messages``: with its outbound messages' summary);
- ``GET /api/runs/{id}/events?after=N`` (or ``Last-Event-ID``): SSE, or NDJSON with
  ``Accept: application/x-ndjson`` (see :mod:`.sse`); replay, then live until the run
  ends, always closing with one ``end`` message carrying the final state;
- ``GET /api/runs/{id}/export``: NDJSON of every event;
- ``POST /api/runs/{id}/cancel`` -> ``202``; ``409 run_finished`` when it already ended;
- ``POST /api/runs/validate``, ``POST /api/runs/{id}/context``, ``POST /api/runs/{id}/signals``,
  ``GET /api/runs/{id}/messages``, ``POST /api/runs/{id}/projection/rebuild``: see
  :mod:`.message_api`;
- ``GET /metrics`` (the run series among the gateway's): see :mod:`studio_gateway.telemetry`.

Errors: ``400 invalid_json`` (also for JSON nested deeper than 64 levels), ``400 invalid_body``
(a malformed chunked body), ``413 payload_too_large`` (at once when the declared length is over
the limit; bodies are read by :mod:`..bodies`), ``422 invalid_field`` (with ``field``),
``422 unknown_runner`` (with ``runners``), ``404 run_not_found`` (also for another user's run),
``503 runs_unavailable`` (no JetStream / NATS down).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final

import nats.errors
from aiohttp import web
from nats.aio.msg import Msg

from contract.run_protocol import is_valid_run_id, parse_event, split_events

from ..auth import User, authenticated
from ..bodies import BodyError, ExpectHandler, read_json_object
from ..errors import json_error
from ..tasks import stop_tasks
from .pull_feed import ConsumerGone
from .service import RUNS, RequestRefused, RunsService, parse_run_request, parse_thread_id
from .sse import NDJSON, EventFormat, choose_format, ordered_events, parse_after
from .state import RunState
from .store import EventReader, RunStore

__all__ = ["add_routes"]

log = logging.getLogger("studio_gateway.runs_api")

LIST_DEFAULT_LIMIT: Final = 20
LIST_MAX_LIMIT: Final = 100
# A list cursor: ``<createdAt ms, 15 digits>.<runId>`` (see RunStore.list_user_runs).
_CURSOR: Final = re.compile(r"[0-9]{15}\.[A-Za-z0-9_-]{1,128}")
MAX_REASON_LENGTH: Final = 500
# Events read per pull while streaming to one reader.
READ_BATCH: Final = 256
READ_POLL: Final = 5.0
READER_RETRY: Final = 0.5
# After the run ended, wait at most this long for its last events to arrive in the stream.
END_GRACE: Final = 2.0
# A reader that saw `done` waits this long for the projector to make the state terminal.
DONE_GRACE: Final = 5.0
# A live reader reads the run state at least this often (besides on write notifications).
STATE_POLL: Final = 1.0
# ... and this often once the run is ending.
FINISH_POLL: Final = 0.05
# A write notification can come before JetStream stored the write: read again this soon.
RECHECK_DELAY: Final = 0.005
_NO_STORE: Final = {"Cache-Control": "no-store"}
# Replays and exports are written in chunks of about this size.
WRITE_CHUNK: Final = 64 * 1024


class _Invalid(Exception):
    def __init__(self, response: web.Response) -> None:
        self.response = response


def _unavailable(service: RunsService) -> web.Response:
    return json_error(503, "runs_unavailable", service.unavailable_reason())


def _store(request: web.Request) -> tuple[RunsService, RunStore]:
    service = request.app[RUNS]
    store = service.store
    if store is None:
        raise _Invalid(_unavailable(service))
    return service, store


def _field(field: str, message: str) -> _Invalid:
    return _Invalid(json_error(422, "invalid_field", f"{field}: {message}", field=field))


async def _json_body(request: web.Request, limit: int, *, optional: bool = False) -> dict[str, Any]:
    try:
        return await read_json_object(request, limit, optional=optional)
    except BodyError as exc:
        raise _Invalid(exc.response()) from None


def _thread_id(value: object) -> str:
    try:
        return parse_thread_id(value)
    except RequestRefused as exc:
        raise _refused(exc) from None


def _refused(exc: RequestRefused) -> _Invalid:
    return _Invalid(json_error(exc.status, exc.code, exc.message, **exc.details))


async def _create(request: web.Request, user: User, path_thread: str | None) -> web.StreamResponse:
    try:
        service, store = _store(request)
        payload = await _json_body(request, service.runs.max_body_bytes)
        try:
            checked = parse_run_request(payload, service.runs.runners, path_thread)
        except RequestRefused as exc:
            raise _refused(exc) from None
        state = await service.create_run(
            store,
            user.id,
            runner=checked.runner,
            work_input=checked.work_input,
            thread_id=checked.thread_id,
            title=checked.title,
        )
    except _Invalid as exc:
        return exc.response
    return web.json_response(
        {"runId": state.run_id, "threadId": state.thread_id, "status": state.status},
        status=202,
        headers={**_NO_STORE, "Location": f"/api/runs/{state.run_id}"},
    )


UserHandler = Callable[[web.Request, User], Awaitable[web.StreamResponse]]


def _nats_errors(handler: UserHandler) -> UserHandler:
    """A JetStream/NATS failure before the response started is a 503, not a 500 with a trace."""

    @functools.wraps(handler)
    async def wrapper(request: web.Request, user: User) -> web.StreamResponse:
        try:
            return await handler(request, user)
        except (nats.errors.Error, TimeoutError, ConsumerGone) as exc:
            log.warning("%s %s: NATS failed: %r", request.method, request.path, exc)
            return json_error(
                503, "runs_unavailable", "the gateway could not reach JetStream just now; try again"
            )

    return wrapper


@authenticated
@_nats_errors
async def post_run(request: web.Request, user: User) -> web.StreamResponse:
    return await _create(request, user, None)


@authenticated
@_nats_errors
async def post_thread_message(request: web.Request, user: User) -> web.StreamResponse:
    try:
        thread = _thread_id(request.match_info["threadId"])
    except _Invalid as exc:
        return exc.response
    return await _create(request, user, thread)


def _list_query(request: web.Request) -> tuple[int, str | None]:
    raw_limit = request.query.get("limit")
    limit = LIST_DEFAULT_LIMIT
    if raw_limit is not None:
        text = raw_limit.strip()
        if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= LIST_MAX_LIMIT:
            raise _field("limit", f"a whole number from 1 to {LIST_MAX_LIMIT}")
        limit = int(text)
    before = request.query.get("before")
    if before is not None and not _CURSOR.fullmatch(before):
        raise _field("before", "the `next` cursor of an earlier page")
    return limit, before


@authenticated
@_nats_errors
async def list_runs(request: web.Request, user: User) -> web.StreamResponse:
    try:
        _, store = _store(request)
        limit, before = _list_query(request)
    except _Invalid as exc:
        return exc.response
    runs, cursor = await store.list_user_runs(user.id, limit=limit, before=before)
    return web.json_response({"runs": [run.public() for run in runs], "next": cursor}, headers=_NO_STORE)


async def _owned(request: web.Request, user: User) -> tuple[RunsService, RunStore, RunState]:
    service, store = _store(request)
    run_id = request.match_info["runId"]
    state = await service.get_owned(store, run_id, user.id) if is_valid_run_id(run_id) else None
    if state is None:
        raise _Invalid(json_error(404, "run_not_found", f"no run {run_id[:140]!r}"))
    return service, store, state


@authenticated
@_nats_errors
async def get_run(request: web.Request, user: User) -> web.StreamResponse:
    try:
        service, _, state = await _owned(request, user)
    except _Invalid as exc:
        return exc.response
    document = state.public()
    if "messages" in request.query.getall("include", []):
        # Opt-in: the plain document stays the one the event stream's `end` carries.
        summary = await service.message_summary(state)
        if summary is not None:
            document["messages"] = summary
    return web.json_response(document, headers=_NO_STORE)


@authenticated
@_nats_errors
async def cancel_run(request: web.Request, user: User) -> web.StreamResponse:
    try:
        service, store, state = await _owned(request, user)
        payload = await _json_body(request, 16 * 1024, optional=True)
    except _Invalid as exc:
        return exc.response
    reason = payload.get("reason")
    text = reason.strip()[:MAX_REASON_LENGTH] if isinstance(reason, str) and reason.strip() else None
    outcome = await service.cancel(store, state, text or "cancelled by the user")
    return web.json_response(outcome.body, status=outcome.http_status, headers=_NO_STORE)


@authenticated
@_nats_errors
async def export_run(request: web.Request, user: User) -> web.StreamResponse:
    try:
        service, store, state = await _owned(request, user)
    except _Invalid as exc:
        return exc.response
    events = await service.collect_events(store, state)
    response = web.StreamResponse(
        headers={
            "Content-Type": f"{NDJSON}; charset=utf-8",
            "Content-Disposition": f'attachment; filename="{state.run_id}.jsonl"',
            **_NO_STORE,
        }
    )
    await response.prepare(request)
    fmt = EventFormat(NDJSON)
    await _write_events(response, fmt, events)
    await response.write_eof()
    return response


@authenticated
@_nats_errors
async def run_events(request: web.Request, user: User) -> web.StreamResponse:
    try:
        service, store, state = await _owned(request, user)
    except _Invalid as exc:
        return exc.response
    try:
        after = parse_after(request.query.get("after"), request.headers.get("Last-Event-ID"))
    except ValueError as exc:
        return json_error(400, "invalid_after", str(exc))
    fmt = choose_format(request.headers.get("Accept"))
    response = web.StreamResponse(
        headers={"Content-Type": fmt.content_type, "X-Accel-Buffering": "no", **_NO_STORE}
    )
    await response.prepare(request)
    final = state
    try:
        if state.terminal:
            events = await service.collect_events(store, state)
            await _write_events(response, fmt, [e for e in events if e["seq"] > after])
        else:
            final = await _stream_live(response, fmt, service, store, state, after)
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception:
        log.exception("run %s: event stream failed", state.run_id)
    with contextlib.suppress(ConnectionResetError):
        await response.write(fmt.end(final.public()))
        await response.write_eof()
    return response


async def _write_events(response: web.StreamResponse, fmt: EventFormat, events: list[dict[str, Any]]) -> None:
    """Write events in chunks of up to ``WRITE_CHUNK`` bytes (not one write each)."""
    chunk: list[bytes] = []
    size = 0
    for event in events:
        data = fmt.event(event)
        chunk.append(data)
        size += len(data)
        if size >= WRITE_CHUNK:
            await response.write(b"".join(chunk))
            chunk, size = [], 0
    if chunk:
        await response.write(b"".join(chunk))


class _StateWatch:
    """Wakes a reader when the run's state key is written; the reader then reads the state.

    The message itself is not trusted: a compare-and-set that JetStream refuses is
    published on the key's subject all the same, so only a read shows committed state.
    """

    def __init__(self, state: RunState) -> None:
        self.state = state
        self.changed = asyncio.Event()

    async def on_message(self, msg: Msg) -> None:
        self.changed.set()

    async def refresh(self, store: RunStore) -> None:
        self.changed.clear()
        loaded = await store.load(self.state.run_id)
        if loaded is not None:
            self.state = loaded[0]


async def _stream_live(
    response: web.StreamResponse,
    fmt: EventFormat,
    service: RunsService,
    store: RunStore,
    state: RunState,
    after: int,
) -> RunState:
    """Replay and follow one running run until it ends; returns its final state."""
    watch = _StateWatch(state)
    watch_sub = await store.nc.subscribe(store.state_subject(state.run_id), cb=watch.on_message)
    batches: asyncio.Queue[list[Msg]] = asyncio.Queue(maxsize=4)
    readers: list[EventReader] = []

    async def pump() -> None:
        # Reads the run's subject from the start; after a failure (NATS reconnecting, the
        # consumer's node gone) it opens a new reader after the last message it took (the
        # checkpoint), so nothing is read twice or skipped.
        resume_at = 0
        while True:
            try:
                reader = await store.open_events(state, start_seq=resume_at)
            except Exception as exc:
                log.warning("run %s: cannot open its events (%r); retrying", state.run_id, exc)
                await asyncio.sleep(READER_RETRY)
                continue
            readers.append(reader)
            try:
                while True:
                    msgs = await reader.fetch(READ_BATCH, READ_POLL)
                    if msgs:
                        resume_at = msgs[-1].metadata.sequence.stream + 1
                    await batches.put(msgs)
            except Exception as exc:
                log.warning("run %s: reading its events failed (%r); reopening", state.run_id, exc)
                await asyncio.sleep(READER_RETRY)
            finally:
                readers.remove(reader)
                await reader.close()

    pump_task = asyncio.get_running_loop().create_task(pump(), name=f"run-reader-{state.run_id}")
    keepalive = service.runs.keepalive
    loop = asyncio.get_running_loop()
    next_seq = 1
    pending: list[dict[str, Any]] = []
    raw: dict[tuple[int | str, int], bytes] = {}  # (fence, seq) -> the stored JSON, sent as it is
    ended_at: float | None = None
    done_at: float | None = None
    last_write = last_refresh = loop.time()
    recheck_at = math.inf
    stalled_shown = False  # whether the reader was last told the run is stalled
    try:
        # The state may have moved between the first read and the subscription.
        await watch.refresh(store)
        while True:
            current = watch.state
            if current.terminal and next_seq > current.seq:
                return current
            if not current.terminal and (current.status == "stalled") != stalled_shown:
                stalled_shown = current.status == "stalled"
                await response.write(fmt.state(current.public()))
                last_write = loop.time()
            now = loop.time()
            if current.terminal:
                ended_at = ended_at or now
                if now - ended_at > END_GRACE:
                    return current  # the stream lost the rest (retention); end anyway
            elif done_at is not None and now - done_at > DONE_GRACE:
                return current  # the projector is behind: end with what the state says
            if ended_at or done_at:
                wait = max(0.0, min(FINISH_POLL, recheck_at - now))
            else:
                wait = max(
                    0.0,
                    min(STATE_POLL - (now - last_refresh), keepalive - (now - last_write), recheck_at - now),
                )
            got = loop.create_task(batches.get())
            changed = loop.create_task(watch.changed.wait())
            try:
                done, _ = await asyncio.wait(
                    {got, changed}, timeout=wait, return_when=asyncio.FIRST_COMPLETED
                )
            except BaseException:
                got.cancel()
                changed.cancel()
                raise
            changed.cancel()
            if got in done:
                msgs = got.result()
                while not batches.empty():  # whatever else arrived meanwhile, in one pass
                    msgs += batches.get_nowait()
            else:
                got.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await got
                msgs = []
            now = loop.time()
            # Notified of a write, or polling now and then: a notification can be missed when the
            # write raced the subscription, so the state is also read on a timer.
            notified = watch.changed.is_set()
            if notified or done_at is not None or now >= recheck_at or now - last_refresh >= STATE_POLL:
                await watch.refresh(store)
                last_refresh = now
                # The notification can arrive before JetStream stored the write: read once more soon.
                recheck_at = now + RECHECK_DELAY if notified else math.inf
            for line in (line for msg in msgs for line in split_events(msg.data)):
                event = parse_event(line)
                if event is not None:
                    pending.append(event)
                    fence, seq = event.get("fence"), event.get("seq")
                    if isinstance(fence, int | str) and isinstance(seq, int):  # hashable ones only
                        raw.setdefault((fence, seq), line)
            if next_seq == 1 and pending and _expired_start(state, service, pending):
                # The run is older than the stream's retention and its first events are gone from
                # the stream: replay what was kept of them, then continue from the stream.
                first = min(e["seq"] for e in pending if e.get("fence") == state.event_fence)
                for event in await store.kept_events(state.run_id):
                    if event.get("fence") == state.event_fence and after < event["seq"] < first:
                        await response.write(fmt.event(event))
                        last_write = now
                next_seq = first
            ready = ordered_events(pending, state.event_fence, start=next_seq, upto=_limit(watch.state))
            # One write for all of them: a write per event was a third of the gateway's time.
            out = b"".join(
                fmt.event(event, raw.get((state.event_fence, event["seq"])))
                for event in ready
                if event["seq"] > after
            )
            if out:
                await response.write(out)
                last_write = now
            if any(event.get("type") == "done" for event in ready):
                done_at = loop.time()
            if ready:
                next_seq = ready[-1]["seq"] + 1
            pending = [e for e in pending if isinstance(e.get("seq"), int) and e["seq"] >= next_seq]
            if ready:
                raw = {key: data for key, data in raw.items() if key[1] >= next_seq}
            alive = fmt.keepalive()
            if alive is not None and now - last_write >= keepalive:
                await response.write(alive)
                last_write = now
    finally:
        # The reader's consumer and tasks go away after the response: the client's `end`
        # need not wait for a consumer deletion round trip.
        _detach(_close_live(pump_task, readers, watch_sub), f"run-reader-close-{state.run_id}")


async def _close_live(pump_task: asyncio.Task[None], readers: list[EventReader], watch_sub: Any) -> None:
    await stop_tasks([pump_task])
    for reader in list(readers):
        await reader.close()
    with contextlib.suppress(Exception):
        await watch_sub.unsubscribe()


# Clean-ups in flight (referenced, so they are not garbage-collected half way).
_DETACHED: set[asyncio.Task[None]] = set()


def _detach(work: Coroutine[Any, Any, None], name: str) -> None:
    task = asyncio.get_running_loop().create_task(work, name=name)
    _DETACHED.add(task)
    task.add_done_callback(_DETACHED.discard)


def _expired_start(state: RunState, service: RunsService, events: list[dict[str, Any]]) -> bool:
    """True when the stream no longer has the run's first events (it outlived the retention)."""
    seqs = [e["seq"] for e in events if e.get("fence") == state.event_fence and isinstance(e.get("seq"), int)]
    if not seqs or min(seqs) <= 1:
        return False
    age = time.time() - state.created_at / 1000
    return age > service.runs.stream_max_age


def _limit(state: RunState) -> int | None:
    """Once a run ended, nothing beyond what was applied to it is part of it."""
    return state.seq if state.terminal else None


def add_routes(app: web.Application, *, expect_handler: ExpectHandler | None = None) -> None:
    """The runs routes; ``expect_handler`` answers ``Expect: 100-continue`` on those with a body."""
    app.router.add_post("/api/runs", post_run, expect_handler=expect_handler)
    app.router.add_get("/api/runs", list_runs)
    app.router.add_post(
        "/api/threads/{threadId}/messages", post_thread_message, expect_handler=expect_handler
    )
    app.router.add_get("/api/runs/{runId}", get_run)
    app.router.add_get("/api/runs/{runId}/events", run_events)
    app.router.add_get("/api/runs/{runId}/export", export_run)
    app.router.add_post("/api/runs/{runId}/cancel", cancel_run, expect_handler=expect_handler)
    from .message_api import add_routes as add_message_routes  # its handlers use this module's helpers

    add_message_routes(app, expect_handler=expect_handler)
