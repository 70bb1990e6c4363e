"""Hostile and failing peers around linkd's upgrade proxy: real nats-server, raw sockets for the service.

Each test is about a resource that must be let go on an exit path nobody takes on purpose:
the local service's socket when the tunnel cannot deliver the service's 101.
"""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import AsyncIterator

import pytest

import tunnel
from linkd.upstream import UpstreamProxy
from tests.helpers import NatsServerFactory
from tests.integration.tunnel_harness import connect_peers, serving

HOST = "desk-hostile-ws"
TIMEOUT = 10.0


def handshake_headers() -> list[tuple[str, str]]:
    return [
        ("Connection", "Upgrade"),
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", base64.b64encode(os.urandom(16)).decode("ascii")),
    ]


async def nothing() -> AsyncIterator[bytes]:
    """A caller->service direction that never sends anything."""
    await asyncio.Event().wait()
    yield b""  # pragma: no cover


async def test_a_101_the_tunnel_cannot_deliver_closes_the_services_socket(
    nats_server_factory: NatsServerFactory,
) -> None:
    """The service answers 101 with a head larger than the NATS server takes in one message:
    the tunnel fails the request after linkd's handler returned. linkd must close the
    service's socket (an HMR server keeps a socket it was not told about open forever)."""
    server = nats_server_factory(max_payload=64 * 1024)
    closed = asyncio.Event()
    answered = asyncio.Event()

    async def service(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        big = "".join(f"X-Big-{i}: {'x' * 40 * 1024}\r\n" for i in range(3))  # each one may travel
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            + f"{big}\r\n".encode("ascii")
        )
        await writer.drain()
        answered.set()
        if not await reader.read():  # EOF: linkd closed its side
            closed.set()
        writer.close()

    listener = await asyncio.start_server(service, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    proxy = UpstreamProxy(f"http://127.0.0.1:{port}/")
    try:
        async with connect_peers(server) as peers, serving(peers.server_nc, HOST, proxy):
            with pytest.raises(tunnel.TunnelError):
                response = await tunnel.fetch(
                    peers.caller_nc,
                    f"tunnel://{HOST}/ws",
                    headers=handshake_headers(),
                    body=nothing(),
                    upgrade=True,
                    first_frame_timeout=TIMEOUT,
                    idle_timeout=TIMEOUT,
                )
                await response.aclose()
            assert answered.is_set()
            await asyncio.wait_for(closed.wait(), TIMEOUT)
    finally:
        listener.close()
        await proxy.aclose()
