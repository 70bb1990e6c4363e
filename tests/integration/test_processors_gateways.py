"""The processor framework across two real gateway processes sharing one durable consumer.

Both run a counting processor (``RUNS_PROCESSORS``) whose side effect is a line in a shared file,
through an anchor. 3,000 events; once about a third of them had their effect, one gateway is
SIGKILLed mid-batch. Every event's effect then happens exactly once: none twice (the anchors,
and their check on a claim taken over from the dead instance), none missed (its unacknowledged
messages go to the survivor after the ack wait), and both instances did part of the work.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import nats
import pytest

from cli.nats_server import NatsServer
from contract.run_protocol import RUN_STREAM
from studio_gateway.runs.processors.anchors import ANCHOR_BUCKET
from studio_gateway.runs.store import bucket_keys
from tests.faults.killable_processes import GatewayProcess
from tests.helpers import NatsServerFactory, wait_until
from tests.integration.counting_processor import effects
from tests.integration.runs_harness import SECRET
from tests.integration.test_processors import publish_runs

pytestmark = pytest.mark.timeout(180)

RUN_COUNT = 1000


async def test_sigkill_mid_batch_and_two_instances_each_effect_once(
    nats_server_factory: NatsServerFactory, tmp_path: Path
) -> None:
    server: NatsServer = nats_server_factory(jetstream=True)
    path = tmp_path / "effects.txt"
    env = {
        "GATEWAY_JWT_SECRET": SECRET,
        "NATS_URL": server.url,
        "RUNS_PROCESSORS": "tests.integration.counting_processor:CountingProcessor",
        "RUNS_PROCESSOR_LEASE_SECONDS": "2",
        "COUNTING_PROCESSOR_FILE": str(path),
    }
    first, second = GatewayProcess(env), GatewayProcess(env)
    try:
        await asyncio.gather(first.start(), second.start())
        nc = await nats.connect(server.url)
        try:
            js = nc.jetstream()

            async def both_running() -> bool:
                try:
                    info = await js.consumer_info(RUN_STREAM, "LINK_PROC_counting")
                except Exception:
                    return False
                return int(info.num_waiting or 0) >= 2  # a standing pull from each instance

            await wait_until(
                both_running, 30, interval=0.1, message="the counting processor never ran on both"
            )
            expected = await publish_runs(server.url, RUN_COUNT)
            await wait_until(lambda: len(effects(path)) >= len(expected) // 3, 60, interval=0.02)
            assert first.proc is not None
            killed_pid = first.proc.pid
            await first.kill()
            at_kill = len(effects(path))
            await wait_until(
                lambda: {key for key, _ in effects(path)} >= expected,
                90,
                interval=0.1,
                message=lambda: f"{len({k for k, _ in effects(path)})} of {len(expected)} effects",
            )

            async def drained() -> bool:
                info = await js.consumer_info(RUN_STREAM, "LINK_PROC_counting")
                return int(info.num_pending or 0) + int(info.num_ack_pending or 0) == 0

            await wait_until(drained, 30, interval=0.1)
            lines = effects(path)
            counts = Counter(key for key, _ in lines)
            twice = [key for key, n in counts.items() if n > 1]
            assert not twice, f"{len(twice)} effects happened twice, e.g. {twice[:5]}"
            assert set(counts) == expected
            by_pid = Counter(pid for _, pid in lines)
            assert by_pid[killed_pid] > 0 and len(by_pid) == 2, by_pid
            kv = await js.key_value(ANCHOR_BUCKET)
            # Listed by the server (as the gateway does): nats-py's KeyValue.keys() once answered
            # NoKeysError for ~3,000 present keys under load (test_processors.py).
            keys = await bucket_keys(nc, ANCHOR_BUCKET, ">")
            records = [json.loads((await kv.get(k)).value or b"{}") for k in keys]
            assert len(records) == len(expected) and all(r["state"] == "done" for r in records)
            taken_over = sum(1 for r in records if r.get("resumed"))
            print(
                f"effects: {len(lines)} for {len(expected)} events, {at_kill} before the kill, "
                f"per pid {dict(by_pid)}, claims taken over from the killed instance: {taken_over}"
            )
        finally:
            await nc.close()
    finally:
        await asyncio.gather(first.stop(), second.stop())
