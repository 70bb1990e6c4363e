"""Outbound messages of a run: what the gateway sent to the desktop, and what became of it.

Every message the gateway sends to a desktop for a run (``kickoff``: the work item,
``context``, ``signal``, ``cancel``) is a record in the bucket ``LINK_RUN_MESSAGES``
(same replicas and retention as the run state), key ``<runId>.m.<messageId>``::

    {"messageId": "msg_...", "runId": "run_...", "kind": "context", "status": "acknowledged",
     "createdAt": ms, "updatedAt": ms, "attempts": 1, "content": <what was sent>,
     "ack": {"at": ms, "duplicate": false}}

Its lifecycle: ``queued`` (recorded, not sent yet) -> ``sent`` (on its way; ``attempts``
counts the sends) -> ``acknowledged`` (the desktop took it), or ``failed`` with ``error``
``{code, message}`` and ``httpStatus`` (what the API answered). While a message is
``queued`` or ``sent`` the key ``<runId>.p.<messageId>`` marks it pending; a gateway that
finds a pending message nobody touched for a while (its sender was killed) sends it again
with the same message id (:mod:`.resend`): the desktop de-duplicates by that id.

An idempotency key of ``POST /api/runs/{id}/context|signals`` is the key
``<runId>.k.<sha256(key)>``, created once (``{"messageId", "digest"}``): a retried POST with
the same key finds it and answers from the message it names, without a second delivery.

Records are written with compare-and-set on the key's revision (:meth:`MessageStore.update`).
Pure parts (:func:`transition`, :func:`summarize`) are unit-tested without a server.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from .store import bucket_keys, ensure_stream, kv_stream_config

__all__ = [
    "ACKNOWLEDGED",
    "FAILED",
    "KINDS",
    "MESSAGES_BUCKET",
    "PENDING_STATUSES",
    "QUEUED",
    "SENT",
    "KeyClaim",
    "MessageStore",
    "content_digest",
    "new_record",
    "summarize",
    "transition",
]

MESSAGES_BUCKET: Final = "LINK_RUN_MESSAGES"
QUEUED: Final = "queued"
SENT: Final = "sent"
ACKNOWLEDGED: Final = "acknowledged"
FAILED: Final = "failed"
PENDING_STATUSES: Final = frozenset({QUEUED, SENT})
KINDS: Final = ("kickoff", "context", "signal", "cancel")
# A kickoff's input bigger than this is not kept in its record (it cannot be resent then).
MAX_KEPT_CONTENT: Final = 256 * 1024
_ORDER: Final = {QUEUED: 0, SENT: 1, ACKNOWLEDGED: 2, FAILED: 2}


def content_digest(kind: str, content: Any) -> str:
    """What a retried POST must repeat to reuse an idempotency key: kind and content."""
    text = json.dumps([kind, content], separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def new_record(
    run_id: str, message_id: str, kind: str, content: Any, *, now_ms: int, idempotency_key: bool = False
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "messageId": message_id,
        "runId": run_id,
        "kind": kind,
        "status": QUEUED,
        "createdAt": now_ms,
        "updatedAt": now_ms,
        "attempts": 0,
        "content": content,
    }
    if idempotency_key:
        record["idempotencyKey"] = True
    if len(json.dumps(content, separators=(",", ":"))) > MAX_KEPT_CONTENT:
        record["content"] = None
        record["contentDropped"] = True
    return record


def transition(
    record: dict[str, Any],
    status: str,
    *,
    now_ms: int,
    error: dict[str, Any] | None = None,
    http_status: int | None = None,
    duplicate: bool = False,
) -> dict[str, Any] | None:
    """The record after moving to ``status``; None when that is no move (never backwards, and
    ``acknowledged``/``failed`` are final: a late answer of an earlier send changes nothing)."""
    current = record.get("status")
    if current not in PENDING_STATUSES:
        return None
    if _ORDER[status] < _ORDER[str(current)]:
        return None
    new = {**record, "status": status, "updatedAt": now_ms}
    if status == SENT:
        new["attempts"] = int(record.get("attempts") or 0) + 1
    if status == ACKNOWLEDGED:
        new["ack"] = {"at": now_ms, "duplicate": duplicate}
        new.pop("error", None)
    if error is not None:
        new["error"] = error
    if http_status is not None:
        new["httpStatus"] = http_status
    return new


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The run state's ``messages`` summary: counts by status and the last message."""
    counts = {QUEUED: 0, SENT: 0, ACKNOWLEDGED: 0, FAILED: 0}
    for record in records:
        status = record.get("status")
        if status in counts:
            counts[str(status)] += 1
    last = max(records, key=lambda r: (r.get("createdAt") or 0, r.get("messageId") or ""), default=None)
    return {
        "total": len(records),
        "byStatus": counts,
        "last": None
        if last is None
        else {key: last.get(key) for key in ("messageId", "kind", "status", "createdAt", "updatedAt")},
    }


@dataclass(frozen=True)
class KeyClaim:
    """An idempotency key: the message it names; ``created`` when this request made it."""

    message_id: str
    digest: str
    created: bool


def _key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:48]


class MessageStore:
    """The messages bucket on one NATS connection."""

    def __init__(self, nc: NATS, js: JetStreamContext, *, replicas: int, retention: float) -> None:
        self.nc = nc
        self.js = js
        self.replicas = replicas
        self.retention = retention
        self._kv: KeyValue | None = None

    async def setup(self) -> str:
        config = kv_stream_config(MESSAGES_BUCKET, max_age=self.retention, replicas=self.replicas)
        done = await ensure_stream(self.js, config)
        self._kv = await self.js.key_value(MESSAGES_BUCKET)
        return done

    @property
    def kv(self) -> KeyValue:
        if self._kv is None:
            raise RuntimeError("MessageStore.setup() has not run")
        return self._kv

    # ------------------------------------------------------------------ records

    async def add(self, record: dict[str, Any]) -> None:
        """Record a new message (queued) and mark it pending; a retry after a crash replaces nothing."""
        run_id, message_id = record["runId"], record["messageId"]
        results = await asyncio.gather(
            self.kv.create(f"{run_id}.m.{message_id}", _encode(record)),
            self.kv.put(f"{run_id}.p.{message_id}", b"1"),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, nats.js.errors.KeyWrongLastSequenceError):
                continue  # written already (a resumed request): keep the first
            if isinstance(result, BaseException):
                raise result

    async def get(self, run_id: str, message_id: str) -> tuple[dict[str, Any], int] | None:
        try:
            entry = await self.kv.get(f"{run_id}.m.{message_id}")
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.InvalidKeyError):
            return None
        if entry.value is None or entry.revision is None:
            return None
        try:
            record = json.loads(entry.value)
        except ValueError:
            return None
        return (record, entry.revision) if isinstance(record, dict) else None

    async def update(
        self,
        run_id: str,
        message_id: str,
        change: Callable[[dict[str, Any]], dict[str, Any] | None],
        *,
        attempts: int = 10,
    ) -> dict[str, Any] | None:
        """Apply ``change`` with compare-and-set (re-reading on conflict); the record written or None."""
        for _ in range(attempts):
            loaded = await self.get(run_id, message_id)
            if loaded is None:
                return None
            record, revision = loaded
            new = change(record)
            if new is None:
                return None
            try:
                await self.kv.update(f"{run_id}.m.{message_id}", _encode(new), last=revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
            if new.get("status") not in (QUEUED, SENT):
                await self._unmark_pending(run_id, message_id)
            return new
        return None

    async def _unmark_pending(self, run_id: str, message_id: str) -> None:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self.js.purge_stream(
                f"KV_{MESSAGES_BUCKET}", subject=f"$KV.{MESSAGES_BUCKET}.{run_id}.p.{message_id}"
            )

    async def list_run(self, run_id: str) -> list[dict[str, Any]]:
        """The run's messages, oldest first."""
        keys = await self._keys(f"{run_id}.m.*")
        loaded = await asyncio.gather(*(self.get(run_id, key.rsplit(".", 1)[1]) for key in keys))
        records = [found[0] for found in loaded if found is not None]
        return sorted(records, key=lambda r: (r.get("createdAt") or 0, r.get("messageId") or ""))

    async def pending(self) -> list[tuple[str, str]]:
        """``(runId, messageId)`` of every message marked pending, on any gateway."""
        out = []
        for key in await self._keys("*.p.*"):
            run_id, _, message_id = key.split(".", 2)
            out.append((run_id, message_id))
        return out

    # ------------------------------------------------------------------ idempotency keys

    async def claim_key(self, run_id: str, key: str, message_id: str, digest: str) -> KeyClaim:
        """Create the idempotency key naming ``message_id``, or read the message it already names."""
        name = f"{run_id}.k.{_key_hash(key)}"
        body = _encode({"messageId": message_id, "digest": digest})
        for _ in range(3):
            try:
                await self.kv.create(name, body)
                return KeyClaim(message_id, digest, True)
            except nats.js.errors.KeyWrongLastSequenceError:
                pass
            try:
                entry = await self.kv.get(name)
            except nats.js.errors.KeyNotFoundError:
                continue
            data = json.loads(entry.value or b"{}")
            return KeyClaim(str(data.get("messageId")), str(data.get("digest")), False)
        raise nats.errors.Error(f"cannot claim the idempotency key of run {run_id}")

    # ------------------------------------------------------------------ helpers

    async def _keys(self, pattern: str) -> list[str]:
        """Keys matching ``pattern``, from stream info (filtered by the server; no consumer)."""
        return await bucket_keys(self.nc, MESSAGES_BUCKET, pattern)


def _encode(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode()  # ASCII: a lone surrogate cannot break it
