"""What a processor's ``handle`` gets besides the event: its anchors and where it runs."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from ..store import RunStore
from .anchors import AnchorOutcome, Anchors

__all__ = ["ProcessorContext"]


@dataclass
class ProcessorContext:
    processor: str
    instance: str  # this gateway instance (anchor owner)
    store: RunStore  # run state (read it; only the projector writes it)
    nc: NATS
    js: JetStreamContext
    anchors: Anchors

    async def once(
        self,
        effect_key: str,
        action: Callable[[], Awaitable[None]],
        *,
        check: Callable[[], Awaitable[bool]] | None = None,
        at_most_once: bool = False,
    ) -> AnchorOutcome:
        """Perform ``action`` for ``effect_key`` once (see :mod:`.anchors` for the exact semantics)."""
        return await self.anchors.once(effect_key, action, check=check, at_most_once=at_most_once)
