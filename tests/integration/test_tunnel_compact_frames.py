"""Compact frames against a real nats-server (docs/protocol.md section 2).

- After a first contact (a JSON start, whose ack says the server takes compact starts), a
  client sends compact starts to that host, and small answers come back with compact heads;
  method, target, headers, body and deadline arrive as sent.
- An older server in the host's queue group (``compact_frames=False``, as the versions before
  compact frames) drops a compact start: the caller republishes it as JSON after the republish
  interval and gets its answer, then sends that host JSON starts (no second wait).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Iterable
from typing import Final

import nats
import pytest
from nats.aio.client import Client

import tunnel
from cli.nats_server import NatsServer
from tunnel._events import Publish

EVENT_TIMEOUT: Final = 5.0
REPUBLISH: Final = 0.3
COMPACT_START: Final = b"\x00\x04"
COMPACT_WHOLE: Final = b"\x00\x05"


@contextlib.asynccontextmanager
async def connected(url: str) -> AsyncIterator[Client]:
    nc = await nats.connect(url, connect_timeout=EVENT_TIMEOUT)
    try:
        yield nc
    finally:
        await nc.close()


class Tap:
    """A wire tap that keeps the first two bytes of every payload published (the frame kind)."""

    def __init__(self) -> None:
        self.kinds: list[tuple[str, bytes]] = []

    def __call__(self, pub: Publish) -> Iterable[Publish]:
        self.kinds.append((pub.subject, pub.payload[:2]))
        return [pub]

    def starts(self, subjects: tunnel.HostSubjects) -> list[bytes]:
        return [kind for subject, kind in self.kinds if subject == subjects.request]


async def echo(req: tunnel.Request) -> tunnel.Response:
    body = await req.read()
    seen = {
        "method": req.method,
        "url": req.url,
        "headers": [[n, v] for n, v in req.headers if n.startswith("x-")],
        "body": body.decode(),
        "deadline": req.deadline is not None,
    }
    return tunnel.Response(200, [("content-type", "application/json")], json.dumps(seen).encode())


async def test_after_first_contact_starts_and_small_answers_are_compact(nats_server: NatsServer) -> None:
    host = "compact.test"
    subjects = tunnel.HostSubjects.for_host(host)
    client_tap, server_tap = Tap(), Tap()
    async with connected(nats_server.url) as server_nc, connected(nats_server.url) as client_nc:
        server = await tunnel.serve(server_nc, host, echo, wire_tap=server_tap)
        try:
            client = tunnel.TunnelClient(client_nc, wire_tap=client_tap)
            answers = []
            for i in range(3):
                resp = await client.fetch(
                    f"tunnel://{host}/echo/{i}?q=caf%C3%A9",
                    method="POST",
                    headers=[("x-one", "1"), ("x-empty", ""), ("x-text", "caf\u00e9")],
                    body=f"body {i}".encode(),
                    timeout=20.0,
                )
                answers.append(json.loads(await resp.read()))
        finally:
            await server.close(timeout=1.0)
    assert client_tap.starts(subjects) == [b'{"', COMPACT_START, COMPACT_START]
    for i, seen in enumerate(answers):
        assert seen == {
            "method": "POST",
            "url": f"/echo/{i}?q=caf%C3%A9",
            "headers": [["x-one", "1"], ["x-empty", ""], ["x-text", "caf\u00e9"]],
            "body": f"body {i}",
            "deadline": True,
        }
    answered = [kind for subject, kind in server_tap.kinds if kind[:1] == b"\x00" and "reply" in subject]
    assert answered.count(COMPACT_WHOLE) == 3
    assert server.stats.malformed_frames == 0


async def test_an_older_server_costs_one_republish_and_then_the_host_gets_json(
    nats_server: NatsServer,
) -> None:
    host = "mixed.test"
    subjects = tunnel.HostSubjects.for_host(host)
    client_tap = Tap()

    async def hello(req: tunnel.Request) -> tunnel.Response:
        return tunnel.Response(200, [], b"hello from " + req.url.encode())

    loop = asyncio.get_running_loop()
    async with (
        connected(nats_server.url) as new_nc,
        connected(nats_server.url) as old_nc,
        connected(nats_server.url) as client_nc,
    ):
        client = tunnel.TunnelClient(
            client_nc, wire_tap=client_tap, timeouts=tunnel.Timeouts(republish_interval=REPUBLISH)
        )
        newer = await tunnel.serve(new_nc, host, hello)
        resp = await client.fetch(f"tunnel://{host}/first")  # first contact: learns compact starts
        assert await resp.read() == b"hello from /first"
        older = await tunnel.serve(old_nc, host, hello)
        older.dispatch.options = dataclasses.replace(older.dispatch.options, compact_frames=False)
        await newer.close(timeout=1.0)  # the older one alone serves the host now
        try:
            began = loop.time()
            resp = await client.fetch(f"tunnel://{host}/second")
            assert await resp.read() == b"hello from /second"
            fallback = loop.time() - began
            began = loop.time()
            resp = await client.fetch(f"tunnel://{host}/third")
            assert await resp.read() == b"hello from /third"
            then = loop.time() - began
        finally:
            await older.close(timeout=1.0)
    # first contact JSON; the compact start the older server dropped; its JSON repeat; JSON after.
    assert client_tap.starts(subjects) == [b'{"', COMPACT_START, b'{"', b'{"']
    assert older.stats.malformed_frames == 1 and older.stats.requests == 2
    assert fallback >= REPUBLISH
    assert then < REPUBLISH


@pytest.mark.parametrize("compact_frames", [True, False])
async def test_a_v1_caller_is_answered_the_same_whatever_the_server(
    nats_server: NatsServer, compact_frames: bool
) -> None:
    """A caller without extensions never sees a compact frame, and its JSON start works."""
    host = "v1-compact.test"
    async with connected(nats_server.url) as server_nc, connected(nats_server.url) as client_nc:
        server = await tunnel.serve(server_nc, host, echo)
        server.dispatch.options = dataclasses.replace(server.dispatch.options, compact_frames=compact_frames)
        try:
            client = tunnel.TunnelClient(client_nc, fast_path=False)
            for _ in range(2):
                resp = await client.fetch(f"tunnel://{host}/v1", headers=[("x-v", "1")])
                assert json.loads(await resp.read())["headers"] == [["x-v", "1"]]
        finally:
            await server.close(timeout=1.0)
