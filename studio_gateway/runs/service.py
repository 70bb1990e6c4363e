"""Runs on the gateway: the service object behind ``/api/runs`` (see docs/runs.md).

:class:`RunsService` owns the run machinery of one gateway instance:

- start-up (in the background, after the gateway's NATS connection is up): create or
  update the stream, the buckets and the projector's consumer (:mod:`.store`);
  JetStream missing -> runs answer ``503 runs_unavailable`` and set-up is retried;
- the :class:`~.projector.Projector` and :class:`~.reaper.Reaper` loops (restarted
  when the NATS connection is replaced);
- the :class:`~..dispatch.Dispatcher` (drained on shutdown);
- the :class:`~.outbound.Outbound` messages (context, signals, the work item, cancels:
  tracked in ``LINK_RUN_MESSAGES``, resent by every instance's loop when a gateway died);
- the operations the HTTP handlers call: create, validate, read, cancel, message, rebuild,
  list events. :func:`parse_run_request` holds the checks ``POST /api/runs`` and
  ``POST /api/runs/validate`` share.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web

import tunnel
from contract.run_protocol import is_valid_run_id, parse_event, split_events
from contract.runner_inputs import InvalidRunInput, check_input

from ..config import GatewayConfig
from ..dispatch import Dispatcher, send_control
from ..hostnames import tunnel_hostname
from ..natsconn import GATEWAY_NATS, GatewayNats
from ..presence import probe_host
from ..tasks import stop_tasks
from .health import Health
from .messages import MESSAGES_BUCKET, MessageStore, summarize
from .metrics import RunMetrics
from .outbound import Outbound, PostOutcome
from .projector import Projector
from .reaper import Reaper
from .sse import ordered_events
from .state import RunState, terminate
from .store import RunStore

__all__ = [
    "MAX_TITLE_LENGTH",
    "RUNS",
    "CancelOutcome",
    "RequestRefused",
    "RunRequest",
    "RunsService",
    "parse_run_request",
    "parse_thread_id",
    "runs_lifetime",
]

log = logging.getLogger("studio_gateway.runs")

SETUP_RETRY_DELAY: Final = 1.0
MAX_SETUP_RETRY_DELAY: Final = 10.0
# How often the supervisor checks that its NATS connection is still the gateway's.
SUPERVISE_INTERVAL: Final = 0.5
# Deliveries in flight get this long on shutdown (beyond it, they fail as dispatch_error).
DRAIN_TIMEOUT: Final = 5.0
# Distinct signal types counted by name in /metrics; the rest count as "other".
MAX_SIGNAL_TYPE_LABELS: Final = 100


def _now_ms() -> int:
    return int(time.time() * 1000)


def new_id(kind: str) -> str:
    """``run_<32 hex>`` / ``thr_<32 hex>``: unguessable, and valid in subjects and KV keys."""
    return f"{kind}_{uuid.uuid4().hex}"


MAX_TITLE_LENGTH: Final = 200


class RequestRefused(Exception):
    """A run request (or validation) refused: the HTTP status, error code and details to answer."""

    def __init__(self, status: int, code: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details


def _field(field: str, message: str) -> RequestRefused:
    return RequestRefused(422, "invalid_field", f"{field}: {message}", field=field)


@dataclass(frozen=True)
class RunRequest:
    """A checked ``POST /api/runs`` body."""

    runner: str
    work_input: Any
    thread_id: str | None
    title: str | None


def parse_thread_id(value: object) -> str:
    if not isinstance(value, str) or not is_valid_run_id(value):
        raise _field("threadId", "1..128 characters of A-Z a-z 0-9 _ -")
    return value


def parse_run_request(
    payload: Mapping[str, Any], runners: Sequence[str], path_thread: str | None = None
) -> RunRequest:
    """The checks of ``POST /api/runs`` that need no desktop (validate runs them too)."""
    runner = payload.get("runner")
    if not isinstance(runner, str) or not runner.strip():
        raise _field("runner", "required, the name of a runner")
    if runner not in runners:
        raise RequestRefused(
            422,
            "unknown_runner",
            f"no runner {runner[:64]!r} on this gateway (available: {', '.join(runners)})",
            field="runner",
            runners=list(runners),
        )
    try:
        check_input(runner, payload.get("input"))  # the shape both ends know (mock); 422 now, not later
    except InvalidRunInput as exc:
        raise _field("input", str(exc)) from None
    thread = path_thread
    if thread is None and payload.get("threadId") is not None:
        thread = parse_thread_id(payload["threadId"])
    title = payload.get("title")
    if title is not None:
        if not isinstance(title, str) or len(title) > MAX_TITLE_LENGTH:
            raise _field("title", f"a string of at most {MAX_TITLE_LENGTH} characters")
        title = title.strip() or None
    return RunRequest(runner, payload.get("input"), thread, title)


@dataclass(frozen=True)
class CancelOutcome:
    """What ``POST /api/runs/{id}/cancel`` answers."""

    http_status: int
    body: dict[str, Any]


class RunsService:
    def __init__(self, config: GatewayConfig, nats: GatewayNats, metrics: RunMetrics | None = None) -> None:
        self.config = config
        self.runs = config.runs
        self.nats = nats
        self.metrics = metrics or RunMetrics()
        self.dispatcher = Dispatcher(self.metrics, self.runs.dispatch_timeout)
        self._store: RunStore | None = None
        self._outbound: Outbound | None = None
        self._signal_types: set[str] = set()
        self._projector: Projector | None = None
        self._task: asyncio.Task[None] | None = None
        self.reason = "runs are starting (waiting for NATS and JetStream)"
        self.setup_result: dict[str, str] = {}
        self._ready = asyncio.Event()
        # The projector's and the reaper's trouble (see .health): runs are "unavailable" meanwhile.
        self.health = Health(log)
        self.metrics.ready.source = lambda: 1.0 if self.working else 0.0
        self.metrics.dispatch_in_flight.source = lambda: float(self.dispatcher.in_flight)

    # ------------------------------------------------------------------ lifecycle

    @property
    def store(self) -> RunStore | None:
        """The store while runs work (None: see :attr:`reason`)."""
        store = self._store
        if store is None or not self.nats.available or store.nc is not self.nats.nc:
            return None
        return store

    @property
    def outbound(self) -> Outbound | None:
        """The outbound messages while runs work (None: see :attr:`reason`)."""
        outbound = self._outbound
        if outbound is None or self.store is None or outbound.store is not self.store:
            return None
        return outbound

    @property
    def working(self) -> bool:
        """Set up, connected, and the projector and reaper doing their job (``/healthz``'s "ready")."""
        return self.store is not None and self.health.ok

    def unavailable_reason(self) -> str:
        if self._store is not None and not self.nats.available:
            return "the gateway lost its NATS connection; runs are back when it reconnects"
        if self.store is not None:
            problem = self.health.problem
            if problem is not None:
                return f"runs are accepted but cannot progress: {problem}"
        return self.reason

    async def wait_ready(self, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), timeout)
        return self._ready.is_set()

    def disable(self) -> None:
        self.reason = "runs are disabled on this gateway (RUNS_ENABLED=false)"

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._supervise(), name="runs-supervisor")

    async def close(self) -> None:
        await self.dispatcher.drain(DRAIN_TIMEOUT)
        if self._task is not None:
            await stop_tasks([self._task])
            self._task = None
        self._store = None

    async def _supervise(self) -> None:
        delay = SETUP_RETRY_DELAY
        warned = False
        while True:
            nc = self.nats.nc
            if nc is None or not self.nats.available:
                await asyncio.sleep(0.05)
                continue
            store = RunStore(nc, self.runs, self.config.tunnel_prefix)
            messages = MessageStore(nc, store.js, replicas=self.runs.replicas, retention=self.runs.retention)
            try:
                self.setup_result = await store.setup()
                self.setup_result[MESSAGES_BUCKET] = await messages.setup()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.reason = f"runs need JetStream on the gateway's NATS server, and set-up failed ({exc!r})"
                log.log(logging.DEBUG if warned else logging.WARNING, "%s; retrying", self.reason)
                warned = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_SETUP_RETRY_DELAY)
                continue
            delay = SETUP_RETRY_DELAY
            log.info("runs ready", extra={"setup": self.setup_result})
            self._store = store
            self._outbound = outbound = Outbound(
                store,
                messages,
                lambda: self.nats.client,
                self.dispatcher,
                self.runs.dispatch_timeout,
                on_result=self._message_result,
            )
            self.dispatcher.tracker = outbound
            self.reason = "ready"
            self._ready.set()
            self._projector = projector = Projector(store, self.metrics, health=self.health)
            loops = [
                asyncio.get_running_loop().create_task(outbound.run(), name="runs-outbound"),
                asyncio.get_running_loop().create_task(projector.run(), name="runs-projector"),
                asyncio.get_running_loop().create_task(
                    Reaper(store, self.metrics, self.runs, health=self.health).run(), name="runs-reaper"
                ),
            ]
            try:
                while self.nats.nc is nc and not nc.is_closed:
                    finished, _ = await asyncio.wait(loops, timeout=SUPERVISE_INTERVAL)
                    if finished:
                        break
                for task in loops:
                    if task.done() and not task.cancelled() and task.exception() is not None:
                        log.warning("run loop %s stopped: %r; restarting", task.get_name(), task.exception())
            finally:
                await stop_tasks(loops)
                self._store = None
                self._outbound = None
                self.dispatcher.tracker = None
                self._ready.clear()
                self.health.clear()
            self.reason = "runs are restarting (the NATS connection changed)"
            await asyncio.sleep(SETUP_RETRY_DELAY)

    # ------------------------------------------------------------------ operations

    async def create_run(
        self,
        store: RunStore,
        user_id: str,
        *,
        runner: str,
        work_input: Any,
        thread_id: str | None,
        title: str | None,
    ) -> RunState:
        """Record a new run and start delivering it; returns at once (the run is ``dispatching``)."""
        hostname = tunnel_hostname(user_id)
        now = _now_ms()
        state = RunState(
            run_id=new_id("run"),
            thread_id=thread_id or new_id("thr"),
            user_id=user_id,
            hostname=hostname,
            host_token=tunnel.host_token(hostname),
            runner=runner,
            title=title,
            created_at=now,
            updated_at=now,
        )
        await store.create(state)
        if self._projector is not None:
            self._projector.run_created(state)
        self.metrics.created.inc()
        client = self.nats.client
        if client is None:  # pragma: no cover - the store implies a connection
            raise RuntimeError("no tunnel client")
        self.dispatcher.submit(store, client, state, work_input)
        log.info("run %s created (%s runner)", state.run_id, runner, extra={"run_id": state.run_id})
        return state

    async def get_owned(self, store: RunStore, run_id: str, user_id: str) -> RunState | None:
        """The run, when it exists and belongs to ``user_id`` (others' runs do not exist for them)."""
        loaded = await store.load(run_id)
        if loaded is None or loaded[0].user_id != user_id:
            return None
        return loaded[0]

    async def cancel(self, store: RunStore, state: RunState, reason: str) -> CancelOutcome:
        """Ask the desktop to cancel; end the run here when the desktop cannot or does not know it."""
        if state.terminal:
            self.metrics.cancels.inc(outcome="already_finished")
            return _finished(state)
        client = self.nats.client
        result = None
        outbound = self.outbound
        message_id = await outbound.cancel_queued(state, reason) if outbound is not None else None
        if client is not None:
            result = await send_control(
                client, state.hostname, state.run_id, reason, self.runs.dispatch_timeout
            )
        if outbound is not None:
            await outbound.cancel_answered(state, message_id, result)
        if result is not None and result.status in (200, 202):
            self.metrics.cancels.inc(outcome="requested")
            return CancelOutcome(202, {"runId": state.run_id, "status": state.status, "cancel": "requested"})
        if result is not None and result.status == 409:
            self.metrics.cancels.inc(outcome="already_finished")
            loaded = await store.load(state.run_id)
            return _finished(loaded[0] if loaded else state, "the run already ended on the desktop")
        gone = (
            result is None
            or result.status == 404
            or (
                result.failure is not None
                and result.failure.kind in ("desktop_unreachable", "dispatch_timeout")
            )
        )
        if not gone:
            self.metrics.cancels.inc(outcome="failed")
            assert result is not None
            code = result.code or (result.failure.kind if result.failure else "error")
            return CancelOutcome(
                502,
                {
                    "error": {
                        "code": "cancel_failed",
                        "message": f"the desktop did not accept the cancel ({code}); try again",
                        "desktopCode": code,
                    }
                },
            )
        why = (
            "it does not know the run"
            if result is not None and result.status == 404
            else "it is not reachable"
        )
        now = _now_ms()
        written, current = await store.modify(
            state.run_id,
            lambda s: terminate(s, "cancelled", now_ms=now, reason=f"{reason} (ended by the gateway: {why})"),
        )
        if written is None:
            self.metrics.cancels.inc(outcome="already_finished")
            return _finished(current or state)
        self.metrics.cancels.inc(outcome="gateway")
        self.metrics.run_finished(written.status, written.failure_kind)
        return CancelOutcome(202, {"runId": state.run_id, "status": written.status, "cancel": "gateway"})

    # ------------------------------------------------------------------ messages, validate

    def _message_result(self, kind: str, result: str, duplicate: bool) -> None:
        """Metrics hook of :class:`Outbound`: each send's outcome by message kind."""
        if result == "resent":
            self.metrics.messages_resent.inc()
            return
        self.metrics.messages_outbound.inc(kind=kind, result=result)
        if result == "acknowledged":
            self.metrics.messages_acks.inc(kind=kind, duplicate="true" if duplicate else "false")

    def signal_posted(self, signal_type: str, severity: str) -> None:
        """Metrics hook: a signal the desktop took (signal types are the user's: bounded label set)."""
        known = self._signal_types
        if signal_type not in known:
            if len(known) >= MAX_SIGNAL_TYPE_LABELS:
                signal_type = "other"
            else:
                known.add(signal_type)
        self.metrics.signals.inc(signal_type=signal_type, severity=severity)

    async def post_message(
        self, state: RunState, kind: str, content: Any, idempotency_key: str | None
    ) -> PostOutcome:
        outbound = self.outbound
        if outbound is None:
            raise RequestRefused(503, "runs_unavailable", self.unavailable_reason())
        return await outbound.post(state, kind, content, idempotency_key)

    async def messages(self, state: RunState) -> list[dict[str, Any]]:
        outbound = self.outbound
        if outbound is None:
            raise RequestRefused(503, "runs_unavailable", self.unavailable_reason())
        return await outbound.messages.list_run(state.run_id)

    async def message_summary(self, state: RunState) -> dict[str, Any] | None:
        """The run's ``messages`` summary (None while the messages bucket is not reachable)."""
        outbound = self.outbound
        if outbound is None:
            return None
        return summarize(await outbound.messages.list_run(state.run_id))

    async def validate(self, user_id: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        """What ``POST /api/runs`` with ``payload`` would do, without doing it (raises RequestRefused)."""
        request = parse_run_request(payload, self.runs.runners)
        hostname = tunnel_hostname(user_id)
        client = self.nats.client
        if client is None or not self.nats.available:
            raise RequestRefused(503, "runs_unavailable", self.unavailable_reason())
        found = await probe_host(client, hostname)
        if not found.online:
            if found.reason in ("not_connected", "timeout"):
                raise RequestRefused(
                    409,
                    "desktop_unreachable",
                    "no desktop is connected for this account (is `linkd up` running?)",
                    presence=found.as_json(),
                )
            raise RequestRefused(
                502,
                "presence_unknown",
                f"the desktop's presence is unknown ({found.reason})",
                presence=found.as_json(),
            )
        if request.runner not in found.capabilities:
            raise RequestRefused(
                422,
                "unknown_runner",
                f"the desktop has no runner {request.runner!r} "
                f"(it offers: {', '.join(found.capabilities) or 'none'})",
                field="runner",
                runners=list(found.capabilities),
            )
        return {
            "ok": True,
            "runner": request.runner,
            "threadId": request.thread_id,
            "title": request.title,
            "wouldDispatchTo": {
                "tunnelHostname": hostname,
                "hostname": found.hostname,
                "cliVersion": found.cli_version,
                "latencyMs": found.latency_ms,
            },
        }

    async def collect_events(self, store: RunStore, state: RunState) -> list[dict[str, Any]]:
        """Every applied event of the run, from the stream, or from the kept copy after retention."""
        reader = await store.open_events(state)
        try:
            msgs = await reader.snapshot()
        finally:
            await reader.close()
        upto = state.seq if state.terminal else None
        raw = []
        for line in (line for msg in msgs for line in split_events(msg.data)):
            event = _parse(line)
            if event is not None:
                raw.append(event)
        events = ordered_events(raw, state.event_fence, upto=upto)
        complete = bool(events) and events[-1]["seq"] >= state.seq
        if complete or state.seq == 0:
            return events
        kept = [
            e
            for e in await store.kept_events(state.run_id)
            if e.get("fence") == state.event_fence and int(e["seq"]) <= state.seq
        ]
        if kept and (not events or int(kept[-1]["seq"]) > int(events[-1]["seq"])):
            return kept
        return events


def _parse(data: bytes) -> dict[str, Any] | None:
    return parse_event(data)


def _finished(state: RunState, message: str | None = None) -> CancelOutcome:
    return CancelOutcome(
        409,
        {
            "error": {
                "code": "run_finished",
                "message": message or f"the run already ended: {state.status}",
                "runStatus": state.status,
            }
        },
    )


RUNS: Final = web.AppKey("studio_gateway.runs", RunsService)


async def runs_lifetime(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: start the run machinery; on shutdown drain deliveries before NATS closes."""
    service = app[RUNS]
    if service.runs.enabled:
        service.start()
    else:
        service.disable()
    yield
    await service.close()


def attach(app: web.Application, config: GatewayConfig) -> RunsService:
    service = RunsService(config, app[GATEWAY_NATS])
    app[RUNS] = service
    return service
