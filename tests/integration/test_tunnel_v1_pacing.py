"""A Python server answering a plain v1 caller paces the response, so NATS never cuts the caller.

A plain v1 caller grants no credit. Sent at full speed, a big body piles up in nats-server's
buffer for the caller until its slow-consumer limit cuts the caller's connection (and the
request waits forever). Here nats-server's limit is small (4 MB) so the effect shows in
seconds; the slow tier repeats it with the defaults and 256 MiB (test_tunnel_v1_pacing_full.py).
"""

from __future__ import annotations

import asyncio

import tunnel
from tests.helpers import NatsServerFactory, wait_until
from tests.integration.tunnel_harness import connect_peers, serving
from tests.integration.v1_pacing_harness import Transfer, big_body_handler, read_slowly

MiB = 1024 * 1024
HOST = "big.example"
SMALL_PENDING = "max_pending: 4MB\n"


async def test_a_slow_v1_caller_gets_a_big_body_byte_exact_without_being_cut(
    nats_server_factory: NatsServerFactory,
) -> None:
    server = nats_server_factory(extra_conf=SMALL_PENDING)
    transfer = Transfer()
    total = 12 * MiB
    config = tunnel.ServerConfig(v1_pace=3 * MiB, v1_burst=MiB)
    async with (
        connect_peers(server) as peers,
        serving(peers.server_nc, HOST, big_body_handler(total, transfer), config=config),
    ):
        await read_slowly(peers.caller_nc, f"tunnel://{HOST}/big", total, 4 * MiB, transfer)
        assert transfer.digest_ok
        # The handler's body was pulled at the pace: never far ahead of what the caller had.
        assert transfer.max_ahead <= 4 * MiB, transfer.max_ahead
        assert "Slow Consumer" not in server.log_text()
        assert peers.errors == []


async def test_unpaced_the_same_caller_is_cut_as_a_slow_consumer(
    nats_server_factory: NatsServerFactory,
) -> None:
    """The control: the setup above really does cut a caller that is sent too much."""
    server = nats_server_factory(extra_conf=SMALL_PENDING)
    transfer = Transfer()
    total = 24 * MiB
    config = tunnel.ServerConfig(v1_pace=None)
    async with (
        connect_peers(server) as peers,
        serving(peers.server_nc, HOST, big_body_handler(total, transfer), config=config),
    ):
        reader = asyncio.create_task(
            read_slowly(peers.caller_nc, f"tunnel://{HOST}/big", total, 4 * MiB, transfer)
        )
        await wait_until(lambda: "Slow Consumer" in server.log_text(), timeout=10.0)
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
