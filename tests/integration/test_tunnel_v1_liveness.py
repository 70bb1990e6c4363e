"""A Python caller and a plain v1 server (no heartbeats), through a real nats-server.

Silence from a plain v1 server proves nothing (an SSE stream may be quiet for minutes), so the
caller does not cut it at the idle timeout: each idle period it checks that the host still has
a server (an abort probe with a reply inbox: NATS says no-responders only when none is left).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable

import pytest

import tunnel
from cli.nats_server import NatsServer
from tests.helpers import wait_until
from tests.integration.tunnel_harness import EVENT_TIMEOUT, connect_peers
from tunnel._events import Publish

HOST = "sse.example"
V1_SERVER = tunnel.ServerConfig(fast_path=False)


class AbortProbes:
    """A caller wire tap counting the liveness probes (aborts of ids it never started)."""

    def __init__(self) -> None:
        self.started: set[str] = set()
        self.probes = 0

    def __call__(self, pub: Publish) -> Iterable[Publish]:
        if pub.subject.endswith(".request"):
            self.started.add(pub.payload.split(b'"requestId":"', 1)[1].split(b'"', 1)[0].decode())
        elif pub.subject.endswith(".abort"):
            rid = pub.subject.rsplit(".", 2)[-2]
            if rid not in self.started:
                self.probes += 1
        return [pub]


async def test_a_quiet_v1_stream_outlives_many_idle_timeouts_and_a_vanished_server_still_ends_it(
    nats_server: NatsServer,
) -> None:
    more = asyncio.Event()

    async def sse(request: tunnel.Request) -> tunnel.Response:
        async def events() -> AsyncIterator[bytes]:
            yield b"data: hello\n\n"
            await more.wait()  # quiet: no data, and a v1 server sends no heartbeats
            yield b"data: later\n\n"
            await asyncio.Event().wait()

        return tunnel.Response(200, [("content-type", "text/event-stream")], events())

    async with connect_peers(nats_server) as peers:
        desktop = await peers.connect(nats_server.url, "v1-desktop")
        await tunnel.serve(desktop, HOST, sse, config=V1_SERVER)
        probes = AbortProbes()
        client = tunnel.TunnelClient(peers.caller_nc, timeouts=tunnel.Timeouts(idle=0.2), wire_tap=probes)
        resp = await client.fetch(f"tunnel://{HOST}/events")
        chunks = resp.aiter_bytes()
        assert await anext(chunks) == b"data: hello\n\n"
        reading = asyncio.ensure_future(anext(chunks))
        # Ten idle timeouts of silence, each answered by a liveness check instead of a failure.
        await wait_until(lambda: probes.probes >= 10, timeout=EVENT_TIMEOUT, message="no liveness probes")
        assert not reading.done()
        more.set()
        assert await asyncio.wait_for(reading, EVENT_TIMEOUT) == b"data: later\n\n"
        # The desktop goes away without a word: the next check finds no server and ends the stream.
        await desktop.close()
        with pytest.raises(tunnel.IdleTimeout, match="has no server any more"):
            await asyncio.wait_for(anext(chunks), EVENT_TIMEOUT)
        await client.aclose()
