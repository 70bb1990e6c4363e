"""Handlers start where the start frame is read (``tunnel._natsio.eager``), safely.

The first step of a handler runs inside nats-py's read loop. What must never happen: a
handler's ``asyncio.timeout`` (or anything else that remembers the current task) cancelling
nats-py's reading task, which would leave the server's connection deaf.
"""

from __future__ import annotations

import asyncio

import tunnel
from cli.nats_server import NatsServer
from tests.integration.tunnel_harness import connect_peers, serving

HOST = "eager.example"


async def test_a_quick_handler_answers_from_its_own_task_not_the_reading_one(nats_server: NatsServer) -> None:
    current: list[asyncio.Task[object] | None] = []

    async def handler(req: tunnel.Request) -> tunnel.Response:
        current.append(asyncio.current_task())
        return tunnel.Response(200, [], b"quick")

    async with connect_peers(nats_server) as p, serving(p.server_nc, HOST, handler):
        client = tunnel.TunnelClient(p.caller_nc)
        for _ in range(3):
            resp = await client.fetch(f"tunnel://{HOST}/")
            assert await resp.read() == b"quick"
        reading = p.server_nc._reading_task
        assert len(current) == 3
        assert all(task is not None and task is not reading for task in current)


async def test_a_handler_timeout_cancels_the_handler_and_never_the_connections_reader(
    nats_server: NatsServer,
) -> None:
    async def handler(req: tunnel.Request) -> tunnel.Response:
        if req.path == "/slow":
            try:
                async with asyncio.timeout(0.02):  # entered in the handler's first, inline step
                    await asyncio.get_running_loop().create_future()  # never done
            except TimeoutError:
                return tunnel.Response(504, [], b"gave up")
        return tunnel.Response(200, [], b"fine")

    async with connect_peers(nats_server) as p, serving(p.server_nc, HOST, handler):
        client = tunnel.TunnelClient(p.caller_nc)
        slow = [await client.fetch(f"tunnel://{HOST}/slow", timeout=5.0) for _ in range(5)]
        assert [r.status for r in slow] == [504] * 5
        reading = p.server_nc._reading_task
        assert reading is not None and not reading.done()
        resp = await client.fetch(f"tunnel://{HOST}/after", timeout=5.0)  # the server still hears starts
        assert (resp.status, await resp.read()) == (200, b"fine")
