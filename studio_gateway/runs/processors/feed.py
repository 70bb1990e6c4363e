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

__all__ = [
    "CONSUMER_PREFIX",
    "consumer_filters",
    "consumer_name",
    "ensure_consumer",
    "no_host_subject",
    "set_consumer_filters",
]

CONSUMER_PREFIX = "LINK_PROC_"
MAX_ACK_PENDING = 1024
_CONSUMER_EXISTS = (10148, 10013)
# The host token of :func:`no_host_subject` (never base64url of a host name: no padding there).
NO_HOST = "__none__"


def consumer_name(processor: str) -> str:
    return CONSUMER_PREFIX + processor


def no_host_subject(prefix: str) -> str:
    """A run subject no desktop publishes to (host tokens are base64url of a host name): the
    filter of a consumer that wants no host right now."""
    return f"{prefix}.host.{NO_HOST}.runs.{NO_HOST}"


def _filters(config: api.ConsumerConfig) -> list[str]:
    if config.filter_subjects:
        return list(config.filter_subjects)
    return [config.filter_subject] if config.filter_subject else []


async def consumer_filters(js: JetStreamContext, processor: str) -> list[str]:
    """The subjects the processor's consumer delivers now."""
    info = await js.consumer_info(RUN_STREAM, consumer_name(processor))
    return _filters(info.config)


async def set_consumer_filters(js: JetStreamContext, processor: str, subjects: list[str]) -> None:
    """Change what the consumer delivers (an update of the same durable: its position stays)."""
    info = await js.consumer_info(RUN_STREAM, consumer_name(processor))
    config = info.config
    if len(subjects) == 1:
        config.filter_subject, config.filter_subjects = subjects[0], None
    else:
        config.filter_subject, config.filter_subjects = None, list(subjects)
    await js.add_consumer(RUN_STREAM, config)


async def ensure_consumer(
    js: JetStreamContext,
    processor: str,
    subjects: list[str],
    *,
    replicas: int,
    ack_wait: float,
    description: str,
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
        filter_subject=subjects[0] if len(subjects) == 1 else None,
        filter_subjects=list(subjects) if len(subjects) > 1 else None,
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
