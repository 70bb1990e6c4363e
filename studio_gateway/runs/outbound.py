"""Sending messages to a run's desktop and tracking them (see :mod:`.messages` for the records).

:class:`Outbound` is what ``POST /api/runs/{id}/context|signals`` calls (:meth:`Outbound.post`),
what the dispatcher records work items through (the :class:`~..dispatch.KickoffTracker`
methods), what a cancel is recorded through, and what resends a message a killed gateway
left ``queued`` or ``sent`` (:meth:`Outbound.resend_pending`, run by :meth:`Outbound.run`
on every gateway instance: a compare-and-set on the record decides who sends it).

A context or signal answer is:

- ``202 {messageId, runId, kind, status: "acknowledged", duplicate}``: the desktop took it;
- ``202`` with ``status: "sent"``: the send's outcome is unknown (a timeout, a broken
  tunnel); it is resent with the same id until the desktop answers (it de-duplicates);
- ``409 message_not_accepted`` (the runner takes no such messages, with ``accepts``),
  ``409 run_finished``, ``503 desktop_unreachable``, ``502 delivery_failed``: the message
  is ``failed`` with that error.

A retried POST with the same idempotency key gets the answer its message's record gives
now (``idempotentReplay: true``), and nothing is sent again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import tunnel
from contract.run_messages import control_body, new_message_id

from ..dispatch import ControlResult, DeliveryFailure, Dispatcher, send_control_body
from .messages import (
    ACKNOWLEDGED,
    FAILED,
    PENDING_STATUSES,
    QUEUED,
    SENT,
    MessageStore,
    content_digest,
    new_record,
    transition,
)
from .state import RunState
from .store import RunStore

__all__ = ["MAX_ATTEMPTS", "Outbound", "PostOutcome"]

log = logging.getLogger("studio_gateway.runs.outbound")

# A message is sent at most this many times; then it is failed (``gave_up``).
MAX_ATTEMPTS: Final = 5
# How often each instance looks for messages left pending.
RESEND_SCAN_INTERVAL: Final = 1.0
# A pending message untouched this long beyond the dispatch timeout is resent.
RESEND_MARGIN: Final = 2.0


@dataclass(frozen=True)
class PostOutcome:
    http_status: int
    body: dict[str, Any]


def _now_ms() -> int:
    return int(time.time() * 1000)


def answer(record: dict[str, Any], *, replay: bool = False) -> PostOutcome:
    """The API answer for a message, from its record."""
    body: dict[str, Any] = {
        "messageId": record["messageId"],
        "runId": record["runId"],
        "kind": record["kind"],
        "status": record["status"],
    }
    if replay:
        body["idempotentReplay"] = True
    if record["status"] == ACKNOWLEDGED:
        body["duplicate"] = bool((record.get("ack") or {}).get("duplicate"))
        return PostOutcome(202, body)
    if record["status"] == FAILED:
        error = dict(record.get("error") or {"code": "delivery_failed", "message": "not delivered"})
        return PostOutcome(int(record.get("httpStatus") or 502), {"error": {**error, **body}})
    return PostOutcome(202, body)


def classify(result: ControlResult) -> tuple[str, dict[str, Any] | None, int | None, bool]:
    """``(status, error, httpStatus, duplicate)`` of a message after the desktop's answer."""
    if result.status is not None and 200 <= result.status < 300:
        duplicate = bool((result.answer or {}).get("duplicate"))
        return ACKNOWLEDGED, None, None, duplicate
    if result.status is None:
        failure = result.failure or DeliveryFailure("dispatch_error", "not delivered")
        if failure.kind == "desktop_unreachable":
            return FAILED, {"code": "desktop_unreachable", "message": failure.reason}, 503, False
        return SENT, {"code": failure.kind, "message": failure.reason}, None, False  # unknown: resend
    code = result.code or f"http_{result.status}"
    message = result.message or f"the desktop answered HTTP {result.status}"
    if result.status == 409 and code == "message_not_accepted":
        accepts = (result.answer or {}).get("error", {}).get("accepts")
        return FAILED, {"code": code, "message": message, "accepts": accepts}, 409, False
    if result.status in (404, 409):
        return (
            FAILED,
            {"code": "run_finished", "message": f"the run is not running on the desktop ({code})"},
            409,
            False,
        )
    if result.status == 422:
        return FAILED, {"code": "desktop_rejected", "message": message, "desktopCode": code}, 422, False
    if result.status >= 500:
        return SENT, {"code": code, "message": message}, None, False  # the desktop's trouble: resend
    return FAILED, {"code": "delivery_failed", "message": message, "desktopCode": code}, 502, False


class Outbound:
    """The outbound messages of one gateway instance, on one NATS connection."""

    def __init__(
        self,
        store: RunStore,
        messages: MessageStore,
        client: Callable[[], tunnel.TunnelClient | None],
        dispatcher: Dispatcher,
        timeout: float,
        *,
        on_result: Callable[[str, str, bool], None] | None = None,
    ) -> None:
        self.store = store
        self.messages = messages
        self.client = client
        self.dispatcher = dispatcher
        self.timeout = timeout
        self.resend_after_ms = int((timeout + RESEND_MARGIN) * 1000)
        # (kind, result, duplicate) of every send: the metrics hook.
        self.on_result = on_result or (lambda kind, result, duplicate: None)
        self.resent = 0

    # ------------------------------------------------------------------ context and signals

    async def post(
        self, state: RunState, kind: str, content: Any, idempotency_key: str | None
    ) -> PostOutcome:
        """Record, send and track one context or signal (once per idempotency key)."""
        if state.terminal:
            return PostOutcome(
                409,
                {"error": {"code": "run_finished", "message": f"the run already ended: {state.status}"}},
            )
        message_id = new_message_id()
        digest = content_digest(kind, content)
        if idempotency_key is not None:
            claim = await self.messages.claim_key(state.run_id, idempotency_key, message_id, digest)
            if claim.digest != digest:
                return PostOutcome(
                    422,
                    {
                        "error": {
                            "code": "idempotency_key_reused",
                            "message": "this idempotency key was used for another message on this run",
                            "messageId": claim.message_id,
                        }
                    },
                )
            if not claim.created:
                found = await self.messages.get(state.run_id, claim.message_id)
                if found is not None:
                    return answer(found[0], replay=True)
            message_id = claim.message_id  # the key's message (its record may be lost with a crash)
        record = new_record(
            state.run_id,
            message_id,
            kind,
            content,
            now_ms=_now_ms(),
            idempotency_key=idempotency_key is not None,
        )
        await self.messages.add(record)
        final = await self._send_message(state, message_id, stale_only=False)
        if final is None:
            found = await self.messages.get(state.run_id, message_id)
            final = found[0] if found is not None else record
        return answer(final)

    async def _send_message(
        self, state: RunState, message_id: str, *, stale_only: bool
    ) -> dict[str, Any] | None:
        """Claim the message (``sent``, one more attempt) and send it; the record written last."""
        now = _now_ms()
        claimed = await self.messages.update(
            state.run_id, message_id, lambda r: self._claim(r, now, stale_only=stale_only)
        )
        if claimed is None:
            return None
        kind = claimed["kind"]
        if claimed.get("attempts", 0) > MAX_ATTEMPTS:
            return await self._finish(
                state,
                message_id,
                FAILED,
                {"code": "gave_up", "message": f"not acknowledged after {MAX_ATTEMPTS} sends"},
                502,
                False,
                kind,
            )
        client = self.client()
        if client is None:
            return claimed  # NATS is down: it stays sent, and is resent later
        if kind == "cancel":
            body = {
                "runId": state.run_id,
                "action": "cancel",
                "reason": str(claimed.get("content") or "cancelled"),
            }
        else:
            body = control_body(state.run_id, kind, message_id, claimed.get("content"))
        result = await send_control_body(client, state.hostname, body, self.timeout)
        status, error, http_status, duplicate = classify(result)
        if kind == "cancel" and result.status == 200:
            status, error = ACKNOWLEDGED, None
        return await self._finish(state, message_id, status, error, http_status, duplicate, kind)

    def _claim(self, record: dict[str, Any], now: int, *, stale_only: bool) -> dict[str, Any] | None:
        """The record claimed for a send: a first send takes a queued one only (a concurrent POST
        with the same idempotency key finds it sent and sends nothing); a resend a stale one."""
        if record.get("status") not in PENDING_STATUSES:
            return None
        if not stale_only and record.get("status") != QUEUED:
            return None
        if stale_only and now - int(record.get("updatedAt") or 0) < self.resend_after_ms:
            return None
        return transition(record, SENT, now_ms=now)

    async def _finish(
        self,
        state: RunState,
        message_id: str,
        status: str,
        error: dict[str, Any] | None,
        http_status: int | None,
        duplicate: bool,
        kind: str,
    ) -> dict[str, Any] | None:
        now = _now_ms()
        if status == SENT:  # outcome unknown: note why, keep it pending for a resend
            self.on_result(kind, "unknown", False)
            return await self.messages.update(
                state.run_id,
                message_id,
                lambda r: {**r, "lastError": error} if r.get("status") == SENT else None,
            )
        written = await self.messages.update(
            state.run_id,
            message_id,
            lambda r: transition(
                r, status, now_ms=now, error=error, http_status=http_status, duplicate=duplicate
            ),
        )
        if written is not None:  # counted once, by the instance that recorded it
            self.on_result(kind, status, duplicate)
        return written

    # ------------------------------------------------------------------ cancels

    async def cancel_queued(self, state: RunState, reason: str) -> str | None:
        """Record a cancel about to be sent (``sent`` at once: the caller sends it)."""
        try:
            message_id = new_message_id()
            now = _now_ms()
            await self.messages.add(new_record(state.run_id, message_id, "cancel", reason, now_ms=now))
            await self.messages.update(state.run_id, message_id, lambda r: transition(r, SENT, now_ms=now))
            return message_id
        except Exception:
            log.exception("run %s: cannot record its cancel", state.run_id)
            return None

    async def cancel_answered(
        self, state: RunState, message_id: str | None, result: ControlResult | None
    ) -> None:
        if message_id is None:
            return
        try:
            if result is None:
                down = {"code": "nats_unavailable", "message": "the gateway had no NATS connection"}
                await self._finish(state, message_id, FAILED, down, 503, False, "cancel")
                return
            status, error, http_status, duplicate = classify(result)
            if status == SENT:  # a cancel is not resent: a second one escalates to SIGKILL on the desktop
                status, http_status = FAILED, 502
            await self._finish(state, message_id, status, error, http_status, duplicate, "cancel")
        except Exception:
            log.exception("run %s: cannot record its cancel's answer", state.run_id)

    # ------------------------------------------------------------------ kickoff (KickoffTracker)

    async def kickoff_sending(self, state: RunState, work_input: Any, message_id: str | None) -> str | None:
        try:
            if message_id is None:
                message_id = new_message_id()
                now = _now_ms()
                # Recorded as sent in one write (queued would last microseconds): one round trip
                # before the work item goes out, not three.
                queued = new_record(state.run_id, message_id, "kickoff", work_input, now_ms=now)
                record = transition(queued, SENT, now_ms=now)
                assert record is not None
                await self.messages.add(record)
            return message_id
        except Exception:
            log.exception("run %s: cannot record its work item", state.run_id)
            return None

    async def kickoff_answered(
        self, state: RunState, message_id: str, failure: DeliveryFailure | None
    ) -> None:
        try:
            if failure is None:
                await self._finish(state, message_id, ACKNOWLEDGED, None, None, False, "kickoff")
            else:
                error = {"code": failure.kind, "message": failure.reason}
                await self._finish(state, message_id, FAILED, error, 502, False, "kickoff")
        except Exception:
            log.exception("run %s: cannot record its work item's answer", state.run_id)

    # ------------------------------------------------------------------ resending

    async def resend_pending(self) -> int:
        """Send again each pending message nobody touched for a while; how many were claimed."""
        claimed = 0
        for run_id, message_id in await self.messages.pending():
            found = await self.messages.get(run_id, message_id)
            if found is None:
                continue
            record = found[0]
            if _now_ms() - int(record.get("updatedAt") or 0) < self.resend_after_ms:
                continue
            loaded = await self.store.load(run_id)
            if loaded is None or loaded[0].terminal:
                why = "the run ended before the message was acknowledged"
                await self._finish_if_pending(run_id, message_id, why)
                continue
            state = loaded[0]
            if record.get("kind") == "cancel" and record.get("status") == SENT:
                # Never resent: a second cancel escalates to SIGKILL on the desktop.
                await self._finish_if_pending(
                    run_id, message_id, "the gateway stopped before the desktop answered"
                )
                continue
            claimed += 1
            self.resent += 1
            self.on_result(str(record.get("kind")), "resent", False)
            log.info("run %s: resending %s message %s", run_id, record.get("kind"), message_id)
            if record.get("kind") == "kickoff":
                await self._resend_kickoff(state, record)
            else:
                await self._send_message(state, message_id, stale_only=True)
        return claimed

    async def _finish_if_pending(self, run_id: str, message_id: str, why: str) -> None:
        now = _now_ms()
        error = {"code": "not_acknowledged", "message": why}
        await self.messages.update(
            run_id, message_id, lambda r: transition(r, FAILED, now_ms=now, error=error, http_status=409)
        )

    async def _resend_kickoff(self, state: RunState, record: dict[str, Any]) -> None:
        message_id = record["messageId"]
        if state.status != "dispatching":  # events arrived or it was marked dispatched: it got there
            await self._finish(state, message_id, ACKNOWLEDGED, None, None, False, "kickoff")
            return
        now = _now_ms()
        claimed = await self.messages.update(
            state.run_id, message_id, lambda r: self._claim(r, now, stale_only=True)
        )
        client = self.client()
        if claimed is None or client is None:
            return
        if record.get("contentDropped"):
            error = {"code": "not_resendable", "message": "the work item was too large to keep for a resend"}
            await self._finish(state, message_id, FAILED, error, 502, False, "kickoff")
            return
        await self.dispatcher.deliver(self.store, client, state, record.get("content"), message_id=message_id)

    async def run(self) -> None:
        """Resend loop of this instance (every instance runs one; the records' CAS decides)."""
        while True:
            try:
                await self.resend_pending()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("resending pending messages failed: %r; retrying", exc)
            await asyncio.sleep(RESEND_SCAN_INTERVAL)
