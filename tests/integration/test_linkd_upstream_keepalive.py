"""Requests with a body reuse their connection to the local service, and never a spoilt one.

linkd.upstream_upload opens its own connections (it reads the answer while the body goes
up); they are kept alive between requests, as httpx's were, and an idle one that the
service closed or wrote to (a late 408) is dropped, not used for the next request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import h11

import tunnel
from cli.nats_server import NatsServer
from linkd.routes import LinkRoutes
from linkd.run_events import MemoryEventSink
from linkd.runs import RunManager
from linkd.upstream import UpstreamProxy
from tests.helpers import wait_until
from tests.integration.tunnel_harness import connect_peers, serving

HOST = "desk-keepalive"
TIMEOUT = 10.0


@dataclass
class Service:
    """An h11 service answering each POST with its body's size; counts its connections.

    ``after_answer``: bytes written on the connection after the first answer, then closed
    (a service timing out an idle keep-alive connection with a 408); whether those bytes
    come in the same read as the answer or after it, the connection must not serve again.
    """

    after_answer: bytes | None = None
    connections: int = 0
    answered: int = 0
    port: int = 0
    server: asyncio.Server | None = None
    spoilt: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        size = 0
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(65536)
                    conn.receive_data(data)
                    if not data and conn.their_state is h11.IDLE:
                        return
                    continue
                if isinstance(event, h11.Data):
                    size += len(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    body = str(size).encode()
                    writer.write(
                        conn.send(h11.Response(status_code=200, headers=[("content-length", str(len(body)))]))
                        or b""
                    )
                    writer.write(conn.send(h11.Data(data=body)) or b"")
                    writer.write(conn.send(h11.EndOfMessage()) or b"")
                    await writer.drain()
                    self.answered += 1
                    if self.after_answer is not None:
                        writer.write(self.after_answer)
                        await writer.drain()
                        self.spoilt.set()
                        return
                    conn.start_next_cycle()
                    size = 0
                elif isinstance(event, h11.ConnectionClosed):
                    return
        except (OSError, h11.ProtocolError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def proxied(
    nats_server: NatsServer, service: Service
) -> AsyncIterator[tuple[tunnel.TunnelClient, UpstreamProxy]]:
    await service.start()
    proxy = UpstreamProxy(f"http://127.0.0.1:{service.port}")
    routes = LinkRoutes(RunManager({}, MemoryEventSink()), upstream=proxy)
    try:
        async with connect_peers(nats_server) as peers, serving(peers.server_nc, HOST, routes):
            yield tunnel.client_for(peers.caller_nc), proxy
    finally:
        await proxy.aclose()
        assert service.server is not None
        service.server.close()


async def post(client: tunnel.TunnelClient, size: int) -> tuple[int, bytes]:
    async with await client.fetch(f"tunnel://{HOST}/p", method="POST", body=b"z" * size) as resp:
        return resp.status, await resp.read()


async def test_sequential_posts_share_one_connection(nats_server: NatsServer) -> None:
    service = Service()
    async with proxied(nats_server, service) as (client, proxy):
        for size in (10, 70_000, 5, 1):  # (an empty body goes by httpx, on its own connection)
            assert await post(client, size) == (200, str(size).encode())
    assert service.connections == 1 and proxy.upload_pool.reused == 3


async def test_an_idle_connection_the_service_spoilt_is_not_reused(nats_server: NatsServer) -> None:
    service = Service(after_answer=b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")
    async with proxied(nats_server, service) as (client, proxy):
        assert await post(client, 3) == (200, b"3")
        await asyncio.wait_for(service.spoilt.wait(), TIMEOUT)
        # The stray 408 (and the close behind it) reach the idle connection's watcher...
        await wait_until(
            lambda: all(link.watcher is None or link.watcher.done() for link in proxy.upload_pool._idle),
            TIMEOUT,
        )
        # ...so the next request takes a new connection and gets its own answer, not the 408.
        assert await post(client, 4) == (200, b"4")
    assert service.connections == 2 and proxy.upload_pool.reused == 0
