"""Each handler runs in a task of its own, and whatever cancels it, the caller hears.

The start frame is read in nats-py's reading task (direct delivery), so what must never
happen is a handler's ``asyncio.timeout`` (or anything else that remembers the current task)
cancelling that reading task, which would leave the server's connection deaf. A guard for
any future attempt to run handlers inline: an eager start on 3.11 was tried and measured
(see docs/tunnel.md), and a shared stand-in task broke the rule this file checks first.
A handler cancelled by its own code (not by an abort, a deadline or the server closing)
fails the request at once, instead of leaving the caller to wait out its timeouts.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

import tunnel
from cli.nats_server import NatsServer
from tests.integration.tunnel_harness import connect_peers, serving

HOST = "tasks.example"


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
        assert len(set(current)) == 3  # one each: never a task shared by several requests


async def test_a_handler_timeout_cancels_the_handler_and_never_the_connections_reader(
    nats_server: NatsServer,
) -> None:
    async def handler(req: tunnel.Request) -> tunnel.Response:
        if req.path == "/slow":
            try:
                async with asyncio.timeout(0.02):  # remembers the current task: the handler's own
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


async def _cancelled_by_itself() -> None:
    task = asyncio.current_task()
    assert task is not None
    task.cancel()  # as a leftover watchdog, or a library the handler uses, might
    await asyncio.get_running_loop().create_future()  # never done: the cancel lands here


async def cancelling_handler(req: tunnel.Request) -> tunnel.Response:
    if req.path == "/head":
        await _cancelled_by_itself()
    if req.path == "/body":

        async def body() -> AsyncIterator[bytes]:
            yield b"first piece"
            await _cancelled_by_itself()
            yield b"never"

        return tunnel.Response(200, [], body())
    return tunnel.Response(200, [], b"fine")


async def test_a_handler_cancelled_by_its_own_code_fails_the_request_at_once(nats_server: NatsServer) -> None:
    async with connect_peers(nats_server) as p, serving(p.server_nc, HOST, cancelling_handler) as server:
        client = tunnel.TunnelClient(p.caller_nc)
        with pytest.raises(tunnel.TunnelError) as caught:
            await client.fetch(f"tunnel://{HOST}/head", timeout=10.0)
        assert caught.value.code == "tunnel_handler_error"  # not a timeout 10 s later
        assert server.stats.handler_errors == 1
        resp = await client.fetch(f"tunnel://{HOST}/after", timeout=10.0)
        assert await resp.read() == b"fine"


async def test_a_body_cancelled_by_its_own_code_fails_the_stream_at_once(nats_server: NatsServer) -> None:
    async with connect_peers(nats_server) as p, serving(p.server_nc, HOST, cancelling_handler):
        client = tunnel.TunnelClient(p.caller_nc)
        resp = await client.fetch(f"tunnel://{HOST}/body", timeout=10.0)
        pieces = resp.aiter_bytes()
        assert await anext(pieces) == b"first piece"
        with pytest.raises(tunnel.TunnelError) as caught:
            await anext(pieces)
        assert caught.value.code == "tunnel_handler_error"  # the body did not look complete
        await resp.aclose()
