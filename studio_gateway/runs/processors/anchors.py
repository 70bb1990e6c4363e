"""Anchors: a record in JetStream KV that the side effect for one event happened.

``await anchors.once(key, action)`` (through ``ctx.once``):

1. *claim*: ``kv.create`` of ``<processor>.<key>`` with ``{"state": "pending", ...}``; only one
   caller can create a key, on any instance, ever (within the bucket's retention);
2. *act*: ``action()``;
3. *done*: the record becomes ``{"state": "done"}`` (compare-and-set on the claim's revision).

Another caller that finds the key ``done`` skips the effect; one that finds it ``pending`` and
younger than the lease raises :class:`AnchorBusy` (its event is redelivered later). An action
that raises releases its claim (the record is deleted with compare-and-set), so the event's next
delivery tries again.

The crash case: a claimer that dies between claim and done leaves ``pending``. After the lease
(``RUNS_PROCESSOR_LEASE_SECONDS``) the next delivery *takes the record over* (compare-and-set,
``attempts`` + 1) and, in the default ``at_least_once`` mode, first asks ``check()`` (when
given) whether the effect happened after all: True -> marked done without acting (exactly once
for effects that can be checked), else the action runs again (at least once). With
``at_most_once=True`` a stale claim is marked ``abandoned`` instead, and the action never runs
twice (it may then never run). A claimer that is merely slower than the lease can see its
``done`` write refused (another caller took over): it logs and goes on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import nats.js.errors
from nats.js.kv import KeyValue

__all__ = ["ANCHOR_BUCKET", "AnchorBusy", "AnchorOutcome", "Anchors", "RetryLater"]

log = logging.getLogger("studio_gateway.processors")

ANCHOR_BUCKET: Final = "LINK_RUN_ANCHORS"
_KEY_SAFE: Final = re.compile(r"[-/_=.a-zA-Z0-9]{1,200}")


class RetryLater(Exception):
    """Raised by ``handle``: not now (not an error, never counted towards dropping the event)."""

    def __init__(self, why: str, retry_in: float) -> None:
        super().__init__(why)
        self.retry_in = retry_in


class AnchorBusy(RetryLater):
    """Another caller holds a fresh claim on this effect: try the event again after ``retry_in``."""

    def __init__(self, key: str, retry_in: float) -> None:
        super().__init__(f"effect {key} is being performed elsewhere; retry in {retry_in:.1f} s", retry_in)


@dataclass(frozen=True, slots=True)
class AnchorOutcome:
    """What ``once`` did: ``ran`` (the action ran here), ``resumed`` (after a stale claim)."""

    ran: bool
    resumed: bool = False


def _now_ms() -> int:
    return int(time.time() * 1000)


def anchor_key(processor: str, effect_key: str) -> str:
    """``<processor>.<effect key>``; an effect key KV keys cannot hold is hashed."""
    if _KEY_SAFE.fullmatch(effect_key) is None or effect_key.startswith(".") or effect_key.endswith("."):
        effect_key = "h." + hashlib.sha256(effect_key.encode()).hexdigest()
    return f"{processor}.{effect_key}"


class Anchors:
    def __init__(self, kv: KeyValue, processor: str, *, owner: str, lease: float) -> None:
        self.kv = kv
        self.processor = processor
        self.owner = owner
        self.lease = lease

    def _record(self, state: str, attempts: int, **extra: Any) -> bytes:
        body = {"state": state, "owner": self.owner, "at": _now_ms(), "attempts": attempts, **extra}
        return json.dumps(body, separators=(",", ":")).encode()

    async def once(
        self,
        effect_key: str,
        action: Callable[[], Awaitable[None]],
        *,
        check: Callable[[], Awaitable[bool]] | None = None,
        at_most_once: bool = False,
    ) -> AnchorOutcome:
        key = anchor_key(self.processor, effect_key)
        resumed = False
        try:
            revision = await self.kv.create(key, self._record("pending", 1))
            attempts = 1
        except nats.js.errors.KeyWrongLastSequenceError:
            entry = await self.kv.get(key)
            record = json.loads(entry.value or b"{}")
            state = record.get("state")
            if state in ("done", "abandoned"):
                return AnchorOutcome(False)
            age = (_now_ms() - int(record.get("at", 0))) / 1000
            if age < self.lease:
                raise AnchorBusy(key, self.lease - age) from None
            attempts = int(record.get("attempts", 1)) + 1
            if at_most_once:
                await self.kv.update(key, self._record("abandoned", attempts), last=entry.revision)
                log.warning("anchor %s: a claimer died before its effect was recorded; abandoned", key)
                return AnchorOutcome(False)
            revision = await self.kv.update(
                key, self._record("pending", attempts, resumedFrom=record.get("owner")), last=entry.revision
            )
            resumed = True
            if check is not None and await check():
                await self._done(key, revision, attempts, resumed=True)
                return AnchorOutcome(False, resumed=True)
        try:
            await action()
        except BaseException:
            try:
                await self.kv.delete(key, last=revision)
            except Exception as exc:  # the lease frees it later
                log.warning("anchor %s: could not release the claim (%r)", key, exc)
            raise
        await self._done(key, revision, attempts, resumed=resumed)
        return AnchorOutcome(True, resumed)

    async def _done(self, key: str, revision: int, attempts: int, *, resumed: bool) -> None:
        try:
            await self.kv.update(key, self._record("done", attempts, resumed=resumed), last=revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            log.warning("anchor %s: taken over while its effect ran (slower than the lease)", key)
