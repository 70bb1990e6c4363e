"""The projector as a processor: described through the same API, fed by its own host feeds.

The projector (:mod:`..projector`) keeps its feed machinery: one durable consumer per host with
active runs (``LINK_RUNS_H_*``), in turns for tenant fairness, hardened for cluster faults. It
is not run by :class:`~.runner.ProcessorRunner` (a single shared consumer would undo those
guarantees); it is registered here so that it is listed, and its lag measured, like any other
processor: its checkpoint is the set of host consumers, its lag their sum.
"""

from __future__ import annotations

import time
from typing import Final

from nats.js import JetStreamContext, api

from contract.run_protocol import RUN_STREAM

from ..store import HOST_CONSUMER_PREFIX

__all__ = ["PROJECTOR_NAME", "projector_lag"]

PROJECTOR_NAME: Final = "projector"
# nats-server lists at most this many consumers per request.
CONSUMERS_PAGE: Final = 256
CHECKPOINT: Final = f"{HOST_CONSUMER_PREFIX}<host hash>: one durable consumer per host with active runs"


async def projector_lag(js: JetStreamContext) -> tuple[int, float]:
    """(events not yet acknowledged on every host consumer, age in s of the oldest host's last ack).

    The age is how long ago the host consumer with a backlog last had an acknowledgement
    (0 without a backlog): a projector that stopped shows a growing age.
    """
    pending = 0
    age = 0.0
    now = time.time()
    infos: list[api.ConsumerInfo] = []
    while True:
        page = await js.consumers_info(RUN_STREAM, offset=len(infos))
        infos.extend(page)
        if len(page) < CONSUMERS_PAGE:
            break
    for info in infos:
        name = info.name or ""
        if not name.startswith(HOST_CONSUMER_PREFIX):
            continue
        backlog = int(info.num_pending or 0) + int(info.num_ack_pending or 0)
        pending += backlog
        floor = info.ack_floor
        last = getattr(floor, "last_active", None) if floor is not None else None
        if backlog and last is not None:
            age = max(age, now - last.timestamp())
    return pending, age
