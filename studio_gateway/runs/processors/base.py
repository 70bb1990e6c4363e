"""The processor class API: what a processor over the run stream declares and implements.

A :class:`Processor` names itself (its durable checkpoint is named after it), says which
event types it consumes (JetStream filters on subjects only, so the type filter is applied
after parsing; the subject filter narrows what JetStream delivers at all), and handles one
:class:`RunEvent` at a time. Side effects go through ``ctx.once`` (:mod:`.anchors`), so a
replay, a redelivery or another gateway instance never fires an effect twice.
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Final

if TYPE_CHECKING:
    from .context import ProcessorContext

__all__ = ["NAME_PATTERN", "Processor", "RunEvent"]

# A processor's name goes into a consumer name and KV keys.
NAME_PATTERN: Final = re.compile(r"[a-z][a-z0-9_-]{0,47}")


@dataclass(frozen=True, slots=True)
class RunEvent:
    """One run event as a processor sees it; the host comes from the subject, never the payload."""

    host_token: str
    run_id: str
    fence: int
    seq: int
    type: str
    data: dict[str, Any] = field(repr=False)
    stream_seq: int
    stored_at: float | None  # when JetStream stored it (Unix seconds)

    @property
    def key(self) -> str:
        """The event's identity, the same on a replay or a re-published copy (KV-key safe)."""
        return f"{self.run_id}.{self.fence}.{self.seq}"


class Processor(abc.ABC):
    """Subclass, set :attr:`name` (and :attr:`event_types`), implement :meth:`handle`."""

    name: ClassVar[str]
    # The event types handled (``type`` of the event); None: every type.
    event_types: ClassVar[frozenset[str] | None] = None
    # The run subjects delivered, e.g. ``P.host.<token>.runs.*`` for one host; None: every host's.
    subject_filter: ClassVar[str | None] = None

    def wants(self, event_type: str) -> bool:
        return self.event_types is None or event_type in self.event_types

    def wants_host(self, host_token: str) -> bool:
        """Whether events of this host matter at all: False acknowledges them unread (cheap)."""
        return True

    def subject_filters(self, prefix: str) -> list[str] | None:
        """The run subjects wanted right now, when that changes while running (None: static,
        :attr:`subject_filter`). The runner keeps the consumer's filters in step (added at once,
        removed after a grace period), so JetStream does not even deliver the other hosts' events."""
        return None

    async def start(self, ctx: ProcessorContext) -> None:  # noqa: B027 - optional hook
        """Called once per feed before the first event (open buckets, warm caches)."""

    @abc.abstractmethod
    async def handle(self, event: RunEvent, ctx: ProcessorContext) -> None:
        """Handle one event; raise to have it redelivered later (effects already done stay done)."""


def check_name(name: str) -> str:
    if NAME_PATTERN.fullmatch(name) is None:
        raise ValueError(f"processor name {name!r}: 1..48 of a-z 0-9 _ -, starting with a letter")
    return name
