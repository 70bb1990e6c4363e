"""One processor's durable checkpoint and feed: a shared durable pull consumer on the run stream.

Why a durable consumer and not a checkpoint in KV: JetStream then keeps the position (the ack
floor) per processor, redelivers what an instance took and never acknowledged (it crashed) after
the ack wait, and shares the messages between every gateway instance pulling the same durable,
with no leader election of our own. A KV checkpoint would need one reader (or a lock) per
processor and would redo a whole batch after a crash anyway. The cost: no order across
instances (each processor must accept events in any order, the anchors make redelivery
harmless), and a consumer per processor on the stream (replicated like the stream).

A new processor's consumer starts at the beginning of the stream's retention
(``DeliverPolicy.ALL``): added to a running system, it catches up. Renaming a processor starts
it over (its anchors keep it from firing effects twice).
"""

from __future__ import annotations

import nats.js.errors
from nats.js import JetStreamContext, api

from contract.run_protocol import RUN_STREAM

__all__ = ["CONSUMER_PREFIX", "consumer_name", "ensure_consumer"]

CONSUMER_PREFIX = "LINK_PROC_"
MAX_ACK_PENDING = 1024
_CONSUMER_EXISTS = (10148, 10013)


def consumer_name(processor: str) -> str:
    return CONSUMER_PREFIX + processor


async def ensure_consumer(
    js: JetStreamContext, processor: str, subject: str, *, replicas: int, ack_wait: float, description: str
) -> str:
    """The processor's durable consumer (created from the start of retention if missing).

    ``ack_wait`` (the anchors' lease, ``RUNS_PROCESSOR_LEASE_SECONDS``): an instance that took a
    message and died has it handed to another after this. Set when the consumer is created.
    """
    name = consumer_name(processor)
    try:
        await js.consumer_info(RUN_STREAM, name)
        return name
    except nats.js.errors.NotFoundError:
        pass
    config = api.ConsumerConfig(
        name=name,
        durable_name=name,
        description=description[:200],
        ack_policy=api.AckPolicy.EXPLICIT,
        ack_wait=ack_wait,
        deliver_policy=api.DeliverPolicy.ALL,
        filter_subject=subject,
        max_ack_pending=MAX_ACK_PENDING,
        max_deliver=-1,
        max_waiting=512,
        num_replicas=replicas,
    )
    try:
        await js.add_consumer(RUN_STREAM, config)
    except nats.js.errors.BadRequestError as exc:
        if exc.err_code not in _CONSUMER_EXISTS:
            raise
    return name
