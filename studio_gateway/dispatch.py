"""Delivering work items and cancel requests to the user's desktop through the tunnel.

A run is accepted (``202``) before delivery; delivery runs in a background task
(:class:`Dispatcher`), and when it cannot deliver, the run becomes ``failed`` at
once with a failure kind saying why:

- ``desktop_unreachable``: nobody serves the user's host (NATS no-responders, known in ms);
- ``dispatch_timeout``: a daemon took the request but did not answer in time;
- ``desktop_rejected``: the daemon answered non-2xx; its error code is in the reason;
- ``dispatch_error``: anything else (the tunnel broke, the gateway stopped mid-delivery).

Shutdown drains: :meth:`Dispatcher.drain` waits for deliveries in flight and fails
the ones that cannot finish, so no accepted run is left ``dispatching`` by us.

Each work item is an outbound message of kind ``kickoff`` (:mod:`.runs.messages`): with a
:class:`KickoffTracker` set, the dispatcher records it ``queued``/``sent`` before the send and
``acknowledged``/``failed`` after; a resend after a gateway crash passes the message id again.
Messages to a running run (context, signals: :mod:`contract.run_messages`) and cancels go
through :func:`send_control_body` on the control route.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

import tunnel
from contract.routes import CONTROL_PATH, WORK_PATH

from .runs.metrics import RunMetrics
from .runs.state import RunState, mark_dispatched, terminate
from .runs.store import RunStore

__all__ = [
    "ControlResult",
    "DeliveryFailure",
    "Dispatcher",
    "KickoffTracker",
    "classify_error",
    "error_fields",
    "rejection",
    "send_control",
    "send_control_body",
]

log = logging.getLogger("studio_gateway.dispatch")

# A daemon's answer to a work item or a control request is a small JSON document.
MAX_ANSWER_BYTES: Final = 64 * 1024


@dataclass(frozen=True)
class DeliveryFailure:
    kind: str
    reason: str


def classify_error(exc: BaseException) -> DeliveryFailure:
    """The failure kind and human reason for a tunnel error while delivering."""
    if isinstance(exc, tunnel.TunnelUnreachable):
        return DeliveryFailure(
            "desktop_unreachable", "no desktop is connected for this account (is `linkd up` running?)"
        )
    if isinstance(exc, tunnel.TunnelTimeout):
        return DeliveryFailure("dispatch_timeout", f"the desktop did not answer in time ({exc.code})")
    if isinstance(exc, tunnel.TunnelError):
        return DeliveryFailure(
            "dispatch_error", f"the work could not be delivered ({exc.code}: {exc.message})"
        )
    return DeliveryFailure("dispatch_error", f"the work could not be delivered ({type(exc).__name__})")


def error_fields(body: bytes) -> tuple[str | None, str]:
    """``(code, message)`` of a daemon's ``{"error": {...}}`` answer (None, "" when it is not one)."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError, UnicodeDecodeError, RecursionError):
        return None, ""
    if not isinstance(error, dict):
        return None, ""
    code = error.get("code")
    return (str(code)[:100] if code else None), str(error.get("message") or "")[:500]


def rejection(status: int, body: bytes) -> DeliveryFailure:
    """A daemon's non-2xx answer to a work item, with its error code in the reason."""
    code, message = error_fields(body)
    code = code or f"http_{status}"
    detail = f": {message}" if message else ""
    return DeliveryFailure("desktop_rejected", f"the desktop refused the run ({code}, HTTP {status}){detail}")


async def _read_bounded(response: tunnel.FetchResponse) -> bytes:
    raw = bytearray()
    async for chunk in response.aiter_bytes():
        raw += chunk
        if len(raw) > MAX_ANSWER_BYTES:
            break
    return bytes(raw[:MAX_ANSWER_BYTES])


@dataclass(frozen=True)
class ControlResult:
    """How the desktop answered a control request: ``status`` None when it could not be asked.

    ``answer``: the desktop's JSON answer (an object; ``{}`` when it was not one); ``message``:
    its error message, for a non-2xx answer.
    """

    status: int | None
    code: str | None = None
    failure: DeliveryFailure | None = None
    answer: dict[str, Any] | None = None
    message: str = ""


async def send_control(
    client: tunnel.TunnelClient, hostname: str, run_id: str, reason: str, timeout: float
) -> ControlResult:
    body = {"runId": run_id, "action": "cancel", "reason": reason}
    return await send_control_body(client, hostname, body, timeout)


async def send_control_body(
    client: tunnel.TunnelClient, hostname: str, body: dict[str, Any], timeout: float
) -> ControlResult:
    """POST one control request (a cancel, a context, a signal) to the desktop serving ``hostname``."""
    try:
        async with await client.fetch(
            f"tunnel://{hostname}{CONTROL_PATH}",
            method="POST",
            headers=[("content-type", "application/json")],
            body=json.dumps(body, separators=(",", ":")).encode(),
            timeout=timeout,
            first_frame_timeout=timeout,
            idle_timeout=timeout,
        ) as response:
            raw = await _read_bounded(response)
            code, message = error_fields(raw) if response.status >= 300 else (None, "")
            return ControlResult(response.status, code, answer=_json_object(raw), message=message)
    except Exception as exc:
        return ControlResult(None, failure=classify_error(exc))


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


class KickoffTracker(Protocol):
    """Records a work item as an outbound message (see :mod:`.runs.outbound`); never raises."""

    async def kickoff_sending(self, state: RunState, work_input: Any, message_id: str | None) -> str | None:
        """Record the work item ``sent`` (creating it ``queued`` first when ``message_id`` is None)."""
        ...

    async def kickoff_answered(
        self, state: RunState, message_id: str, failure: DeliveryFailure | None
    ) -> None:
        """Record how the desktop answered (``failure`` None: it accepted the work item)."""
        ...


class Dispatcher:
    """Background deliveries of work items, tracked so shutdown can drain them."""

    def __init__(
        self,
        metrics: RunMetrics,
        timeout: float,
        *,
        now_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self.metrics = metrics
        self.timeout = timeout
        self.now_ms = now_ms
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self.tracker: KickoffTracker | None = None

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def submit(
        self,
        store: RunStore,
        client: tunnel.TunnelClient,
        state: RunState,
        work_input: Any,
        *,
        message_id: str | None = None,
    ) -> None:
        task = asyncio.get_running_loop().create_task(
            self.deliver(store, client, state, work_input, message_id=message_id),
            name=f"dispatch-{state.run_id}",
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def deliver(
        self,
        store: RunStore,
        client: tunnel.TunnelClient,
        state: RunState,
        work_input: Any,
        *,
        message_id: str | None = None,
    ) -> None:
        """Deliver one work item and record the outcome in the run state (and its message)."""
        tracker = self.tracker
        if tracker is not None:
            message_id = await tracker.kickoff_sending(state, work_input, message_id)
        item = {
            "runId": state.run_id,
            "threadId": state.thread_id,
            "userId": state.user_id,
            "runFenceToken": state.event_fence,
            "runner": state.runner,
            "input": work_input,
        }
        started = time.perf_counter()
        failure: DeliveryFailure | None = None
        try:
            async with await client.fetch(
                f"tunnel://{state.hostname}{WORK_PATH}",
                method="POST",
                headers=[("content-type", "application/json")],
                body=json.dumps(item, separators=(",", ":")).encode(),
                timeout=self.timeout,
                first_frame_timeout=self.timeout,
                idle_timeout=self.timeout,
            ) as response:
                answer = await _read_bounded(response)
                if not 200 <= response.status < 300:
                    failure = rejection(response.status, answer)
        except asyncio.CancelledError:
            failure = DeliveryFailure(
                "dispatch_error", "the gateway stopped before the work item was confirmed delivered"
            )
            await self._record(store, client, state, failure, started)
            if tracker is not None and message_id is not None:
                await tracker.kickoff_answered(state, message_id, failure)
            raise
        except Exception as exc:
            if not isinstance(exc, tunnel.TunnelError):
                log.exception("dispatch of run %s failed unexpectedly", state.run_id)
            failure = classify_error(exc)
        await self._record(store, client, state, failure, started)
        if tracker is not None and message_id is not None:
            await tracker.kickoff_answered(state, message_id, failure)

    async def _record(
        self,
        store: RunStore,
        client: tunnel.TunnelClient,
        state: RunState,
        failure: DeliveryFailure | None,
        started: float,
    ) -> None:
        elapsed = time.perf_counter() - started
        self.metrics.dispatch_seconds.observe(elapsed, outcome=failure.kind if failure else "accepted")
        now = self.now_ms()
        try:
            if failure is None:
                written, current = await store.modify(state.run_id, lambda s: mark_dispatched(s, now_ms=now))
                log.info("run %s delivered in %.1f ms", state.run_id, elapsed * 1000)
                if written is None and current is not None and current.status == "cancelled":
                    # Cancelled while the work item was on its way: stop it on the desktop too.
                    await send_control(
                        client,
                        state.hostname,
                        state.run_id,
                        current.failure_reason or "cancelled",
                        self.timeout,
                    )
                return
            written, current = await store.modify(
                state.run_id,
                lambda s: terminate(
                    s,
                    "failed",
                    now_ms=now,
                    failure_kind=failure.kind,
                    reason=failure.reason,
                    expected_fence=state.fence,
                ),
            )
        except Exception:
            log.exception("run %s: cannot record the dispatch outcome", state.run_id)
            return
        if written is not None:
            self.metrics.run_finished(written.status, written.failure_kind)
            log.info("run %s failed at dispatch: %s (%s)", state.run_id, failure.kind, failure.reason)
        elif current is not None:
            log.info("run %s already %s when its dispatch failed", state.run_id, current.status)

    async def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` for deliveries in flight; cancel (and so fail) the rest."""
        self._closing = True
        tasks = set(self._tasks)
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5.0)
