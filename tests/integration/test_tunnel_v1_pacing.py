"""A Python server answering a plain v1 caller paces the response, so NATS never cuts the caller.

A plain v1 caller grants no credit. Sent at full speed, a big body piles up in nats-server's
buffer for the caller until its slow-consumer limit cuts the caller's connection (and the
request waits forever). Here nats-server's limit is small (4 MB) so the effect shows in
seconds; the slow tier repeats it with the defaults and 256 MiB (test_tunnel_v1_pacing_full.py).
"""

from __future__ import annotations

import asyncio
import json

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


async def test_unpaced_a_caller_that_falls_behind_is_cut_as_a_slow_consumer(
    nats_server_factory: NatsServerFactory,
) -> None:
    """The control: unpaced, a plain v1 caller that does not keep up is cut by nats-server.

    The caller is a raw NATS connection that sends a reference v1 start and then reads nothing
    (a stand-in for any caller slower than the sender): deterministic, unlike a slow reader
    sharing this process's event loop with the sender."""
    server = nats_server_factory(extra_conf=SMALL_PENDING)
    transfer = Transfer()
    config = tunnel.ServerConfig(v1_pace=None)
    subjects = tunnel.HostSubjects.for_host(HOST)
    rid = "0123456789abcdef0123456789abcdef"
    reply = subjects.reply(rid)
    start = json.dumps(
        {
            "type": "request.start",
            "protocol": "tunnel.v1",
            "requestId": rid,
            "method": "GET",
            "url": "/big",
            "headers": [],
            "replySubject": reply,
            "abortSubject": subjects.abort(rid),
        }
    ).encode()
    async with (
        connect_peers(server) as peers,
        serving(peers.server_nc, HOST, big_body_handler(24 * MiB, transfer), config=config),
    ):
        reader, writer = await asyncio.open_connection(server.host, server.port)
        try:
            await reader.readline()  # INFO
            writer.write(
                b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"no_responders":true}\r\n'
                + f"SUB {reply} 1\r\n".encode()
                + f"PUB {subjects.request} {reply} {len(start)}\r\n".encode()
                + start
                + b"\r\n"
            )
            await writer.drain()
            # ... and never read again: NATS holds what the server sends until its limit.
            await wait_until(lambda: "Slow Consumer" in server.log_text(), timeout=10.0)
        finally:
            writer.close()
