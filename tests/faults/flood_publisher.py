"""A desktop that floods its own run subjects, as a separate process (for test_tenant_flood.py).

Publishes ``count`` JetStream events as fast as it can, pipelined (acks come back on one
wildcard subscription), to ``P.host.<host>.runs.<runId>``: either one run's subject with
consecutive seqs (``--run``) or a new made-up run id per event. Prints one JSON line when
done: acks by outcome (``ok``, ``refused_<err_code>``, ``lost``) and the seconds it took.

    python -m tests.faults.flood_publisher URL HOST_TOKEN COUNT [--run RUN_ID] [--prefix P]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
import uuid
from collections import Counter

import nats
from nats.aio.msg import Msg

import tunnel

ACK_WAIT = 30.0
FLUSH_EVERY = 2000


async def flood(url: str, host: str, count: int, run: str | None, prefix: str) -> dict[str, object]:
    nc = await nats.connect(url, pending_size=256 * 1024 * 1024, max_reconnect_attempts=0)
    outcomes: Counter[str] = Counter()
    answered = 0
    done = asyncio.Event()

    async def on_ack(msg: Msg) -> None:
        nonlocal answered
        answered += 1
        try:
            body = json.loads(msg.data)
            error = body.get("error")
            outcomes["ok" if error is None else f"refused_{error.get('err_code')}"] += 1
        except ValueError:
            outcomes["status_" + str((msg.headers or {}).get("Status"))] += 1
        if answered >= count:
            done.set()

    inbox = nc.new_inbox()
    await nc.subscribe(inbox + ".*", cb=on_ack, pending_msgs_limit=-1, pending_bytes_limit=-1)
    started = time.monotonic()
    print(json.dumps({"started": True}), flush=True)
    for i in range(count):
        run_id = run or f"run_{uuid.uuid4().hex}"
        seq = i + 1 if run else 1
        event = {"runId": run_id, "fence": 1, "seq": seq, "ts": 0, "type": "output", "data": "x" * 40}
        await nc.publish(
            f"{prefix}.host.{host}.runs.{run_id}",
            json.dumps(event).encode(),
            reply=f"{inbox}.{i}",
            headers={"Nats-Msg-Id": f"{run_id}:1:{seq}:flood"},
        )
        if i % FLUSH_EVERY == 0:
            await nc.flush()
    published = time.monotonic() - started
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), ACK_WAIT)
    outcomes["lost"] = count - answered
    await nc.close()
    return {
        "outcomes": dict(outcomes),
        "published_s": round(published, 3),
        "total_s": round(time.monotonic() - started, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("host")
    parser.add_argument("count", type=int)
    parser.add_argument("--run")
    parser.add_argument("--prefix", default=tunnel.DEFAULT_PREFIX)
    args = parser.parse_args()
    result = asyncio.run(flood(args.url, args.host, args.count, args.run, args.prefix))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
