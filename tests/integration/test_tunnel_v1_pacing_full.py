"""Slow tier: the issue's case as stated, with nats-server's and the server's defaults.

256 MiB to a plain v1 caller that reads at 10 MB/s: byte-exact, never cut as a slow consumer,
the handler's body pulled at the pace (bounded memory on the server), and the caller never
holding more than a burst (bounded memory on the caller). About 35 s.
"""

from __future__ import annotations

from cli.nats_server import NatsServer
from tests.integration.tunnel_harness import connect_peers, serving
from tests.integration.v1_pacing_harness import Transfer, big_body_handler, read_slowly

MiB = 1024 * 1024
HOST = "big.example"


async def test_256_mib_to_a_10_mb_per_s_v1_caller_with_the_defaults(nats_server: NatsServer) -> None:
    transfer = Transfer()
    total = 256 * MiB
    async with (
        connect_peers(nats_server) as peers,
        serving(peers.server_nc, HOST, big_body_handler(total, transfer)),
    ):
        await read_slowly(peers.caller_nc, f"tunnel://{HOST}/big", total, 10_000_000, transfer)
        assert transfer.digest_ok
        assert transfer.max_ahead <= 20 * MiB, transfer.max_ahead  # one 16 MiB burst and change
        assert "Slow Consumer" not in nats_server.log_text()
        assert peers.errors == []
