"""Large and slow transfers through the tunnel against a real nats-server.

Bodies are generated and hashed chunk by chunk on both ends (never held whole in
memory); flow control is checked from the inside: the bytes a receiver holds but has
not handed to its application never exceed the window it granted (which grows while
the reader keeps up, never past its ``max_window``).
"""

from __future__ import annotations

import asyncio

import pytest

import tunnel
from cli.nats_server import NatsServer
from tests.helpers import NatsServerFactory, wait_until
from tests.integration.tunnel_harness import (
    KiB,
    MiB,
    WireLog,
    connect_peers,
    hashed_body,
    serving,
    sha256,
)
from tunnel._flow import ReceiveWindow

HOST = "bulk.example"
BIG = 100 * MiB
# Small windows make the bound meaningful: far below the body size, a few frames deep.
WINDOW = MiB
MAX_WINDOW = 4 * MiB
# Points (bytes consumed) where the reader stops until the sender has used all its credit.
PAUSE_AT = (10 * MiB, 50 * MiB, 90 * MiB)
# Whole-transfer budget: ~0.5 s locally; generous for a loaded 2-core machine.
BIG_TIMEOUT = 30.0


async def test_100mib_download_is_byte_exact_and_caller_buffer_stays_within_its_window(
    nats_server: NatsServer,
) -> None:
    sent = sha256()

    async def handler(req: tunnel.Request) -> tunnel.Response:
        return tunnel.Response(200, [("content-length", str(BIG))], hashed_body(BIG, sent))

    received = sha256()
    total = 0
    max_queued = 0
    held_at_pauses: list[tuple[int, int]] = []  # (bytes held, the window they were granted under)
    async with connect_peers(nats_server) as p, serving(p.server_nc, HOST, handler):
        client = tunnel.TunnelClient(p.caller_nc, limits=tunnel.Limits(window=WINDOW, max_window=MAX_WINDOW))
        async with asyncio.timeout(BIG_TIMEOUT):
            async with await client.fetch(f"tunnel://{HOST}/download") as resp:
                request = resp._request
                window = request.stream.receive_window
                pauses = list(PAUSE_AT)
                async for chunk in resp.aiter_bytes():
                    received.update(chunk)
                    total += len(chunk)
                    queued = sum(len(c) for c in request.chunks)
                    assert queued == window.buffered
                    max_queued = max(max_queued, queued)
                    if pauses and total >= pauses[0]:
                        pauses.pop(0)
                        # Stop reading until the server has spent every byte of credit we granted:
                        # from here on it cannot send more, so this is the most we can ever hold.
                        await wait_until(
                            lambda: window.received_bytes == window.granted,
                            message="server did not use its credit",
                        )
                        held = sum(len(c) for c in request.chunks)
                        held_at_pauses.append((held, window.window))
                        max_queued = max(max_queued, held)
    assert total == BIG
    assert received.hexdigest() == sent.hexdigest()
    assert max_queued <= MAX_WINDOW
    assert len(held_at_pauses) == len(PAUSE_AT)
    # The window really filled while the reader was paused: the bound, not luck, held the data
    # back (at least half of it: a grant is due once half the window was read).
    assert all(w // 2 <= held <= w <= MAX_WINDOW for held, w in held_at_pauses), held_at_pauses
    # Between the pauses the reader kept up, and the window grew for it; at the end the
    # growth went back to the client's budget.
    assert window.window > WINDOW
    assert client._growth_budget.used == 0
    assert p.errors == []


async def test_100mib_upload_is_byte_exact_and_server_buffer_stays_within_its_window(
    nats_server: NatsServer,
) -> None:
    servers: list[tunnel.TunnelServer] = []
    max_queued = 0
    held_at_pauses: list[tuple[int, int]] = []  # (bytes held, the window they were granted under)
    problems: list[BaseException] = []

    async def handler(req: tunnel.Request) -> tunnel.Response:
        nonlocal max_queued
        digest = sha256()
        total = 0
        try:
            window = servers[0].dispatch.active[req.request_id].stream.receive_window
            pauses = list(PAUSE_AT)
            async for chunk in req.stream():
                digest.update(chunk)
                total += len(chunk)
                queued = sum(len(c) for c in req._chunks)
                max_queued = max(max_queued, queued)
                if pauses and total >= pauses[0]:
                    pauses.pop(0)
                    # The handler stops reading until the caller has spent all the credit we granted.
                    await wait_until(
                        lambda: window.received_bytes == window.granted,
                        message="caller did not use its credit",
                    )
                    held = sum(len(c) for c in req._chunks)
                    held_at_pauses.append((held, window.window))
                    max_queued = max(max_queued, held)
        except BaseException as exc:
            problems.append(exc)
            raise
        return tunnel.Response(200, [("x-sha256", digest.hexdigest()), ("x-length", str(total))])

    sent = sha256()
    async with (
        connect_peers(nats_server) as p,
        serving(
            p.server_nc, HOST, handler, config=tunnel.ServerConfig(window=WINDOW, max_window=MAX_WINDOW)
        ) as server,
    ):
        servers.append(server)
        client = tunnel.TunnelClient(p.caller_nc)
        async with asyncio.timeout(BIG_TIMEOUT):
            async with await client.fetch(
                f"tunnel://{HOST}/upload", method="PUT", body=hashed_body(BIG, sent)
            ) as resp:
                assert await resp.read() == b""
    assert problems == []
    assert resp.status == 200
    assert resp.header("x-length") == str(BIG)
    assert resp.header("x-sha256") == sent.hexdigest()
    assert max_queued <= MAX_WINDOW
    assert len(held_at_pauses) == len(PAUSE_AT)
    assert all(w // 2 <= held <= w <= MAX_WINDOW for held, w in held_at_pauses), held_at_pauses
    budget = servers[0].dispatch.options.growth_budget
    assert budget is not None and budget.used == 0  # every request's growth came back
    assert p.errors == []


@pytest.mark.parametrize("budget", [0, WINDOW])
async def test_concurrent_downloads_grow_their_windows_within_the_clients_budget(
    nats_server: NatsServer, budget: int
) -> None:
    size = 32 * MiB

    async def handler(req: tunnel.Request) -> tunnel.Response:
        return tunnel.Response(200, [], hashed_body(size, sha256()))

    limits = tunnel.Limits(window=WINDOW, max_window=MAX_WINDOW, window_budget=budget)
    windows: list[ReceiveWindow] = []
    peak_used = 0
    async with connect_peers(nats_server) as p, serving(p.server_nc, HOST, handler):
        client = tunnel.TunnelClient(p.caller_nc, limits=limits)

        async def download() -> int:
            nonlocal peak_used
            total = 0
            async with await client.fetch(f"tunnel://{HOST}/download") as resp:
                windows.append(resp._request.stream.receive_window)
                async for chunk in resp.aiter_bytes():
                    total += len(chunk)
                    # What the windows in flight have grown by, together, right now.
                    peak_used = max(peak_used, sum(w.grown for w in windows))
            return total

        async with asyncio.timeout(BIG_TIMEOUT):
            totals = await asyncio.gather(*(download() for _ in range(3)))
        assert client._growth_budget.used == 0
        await client.aclose()
    assert totals == [size] * 3
    # Together the windows in flight grew by no more than the budget, and a budget of 0
    # kept every window at its initial size.
    assert peak_used <= budget
    assert peak_used > 0 if budget else all(w.window == WINDOW for w in windows)
    assert p.errors == []


async def test_slow_reader_gets_every_byte_without_slow_consumers(nats_server: NatsServer) -> None:
    """A reader slower than the sender throttles it through credit; NATS never drops anything."""
    size = 8 * MiB
    window = 256 * KiB
    sent = sha256()

    async def handler(req: tunnel.Request) -> tunnel.Response:
        return tunnel.Response(200, [], hashed_body(size, sent, chunk_size=MiB))

    received = sha256()
    total = 0
    chunks = 0
    max_queued = 0
    async with (
        connect_peers(nats_server) as p,
        serving(p.server_nc, HOST, handler, config=tunnel.ServerConfig(max_chunk=64 * KiB)),
    ):
        # A window chosen without a max_window stays fixed.
        client = tunnel.TunnelClient(p.caller_nc, limits=tunnel.Limits(window=window))
        assert client.limits.effective_max_window == window
        async with asyncio.timeout(BIG_TIMEOUT):
            async with await client.fetch(f"tunnel://{HOST}/slow") as resp:
                request = resp._request
                async for chunk in resp.aiter_bytes():
                    received.update(chunk)
                    total += len(chunk)
                    chunks += 1
                    max_queued = max(max_queued, sum(len(c) for c in request.chunks))
                    await asyncio.sleep(0.003)  # the slow reader itself, not synchronisation
        varz = nats_server.varz()
    assert total == size
    assert received.hexdigest() == sent.hexdigest()
    assert chunks >= size // (64 * KiB)
    assert max_queued <= window
    assert max_queued >= window // 2, "the sender was never ahead of the reader: nothing was tested"
    assert varz["slow_consumers"] == 0
    assert p.errors == []


async def test_small_max_payload_server_still_moves_10mib_both_ways(
    nats_server_factory: NatsServerFactory,
) -> None:
    """With max_payload=64 KiB every frame must fit; a 10 MiB body streams up and straight back."""
    max_payload = 64 * KiB
    size = 10 * MiB
    server_process = nats_server_factory(max_payload=max_payload)

    async def echo_stream(req: tunnel.Request) -> tunnel.Response:
        return tunnel.Response(200, [], req.stream())

    caller_wire, server_wire = WireLog(), WireLog()
    sent, received = sha256(), sha256()
    total = 0
    async with (
        connect_peers(server_process) as p,
        serving(p.server_nc, HOST, echo_stream, wire_tap=server_wire),
    ):
        assert p.caller_nc.max_payload == p.server_nc.max_payload == max_payload
        client = tunnel.TunnelClient(p.caller_nc, wire_tap=caller_wire)
        async with asyncio.timeout(BIG_TIMEOUT):
            async with await client.fetch(
                f"tunnel://{HOST}/echo", method="POST", body=hashed_body(size, sent)
            ) as resp:
                async for chunk in resp.aiter_bytes():
                    received.update(chunk)
                    total += len(chunk)
    assert total == size
    assert received.hexdigest() == sent.hexdigest()
    for wire in (caller_wire, server_wire):
        assert wire.max_payload() <= max_payload
        # Frames are sized to the limit, not tiny: 10 MiB in a few hundred messages, not thousands.
        data_frames = [pub for pub in wire.published if pub.payload[:1] == b"\x00"]
        assert len(data_frames) <= 2 * size // (max_payload // 2)
    assert p.errors == []


async def test_growth_comes_back_when_a_response_is_read_whole_or_closed_unread(
    nats_server: NatsServer,
) -> None:
    """The budget counts bytes that arrived under a grown window until they are read or dropped."""
    size = 16 * MiB

    async def handler(req: tunnel.Request) -> tunnel.Response:
        return tunnel.Response(200, [], hashed_body(size, sha256()))

    async with connect_peers(nats_server) as p, serving(p.server_nc, HOST, handler):
        limits = tunnel.Limits(window=WINDOW, max_window=MAX_WINDOW)
        client = tunnel.TunnelClient(p.caller_nc, limits=limits)
        budget = client._growth_budget
        async with asyncio.timeout(BIG_TIMEOUT):
            # Read half, then stop: what is held (grown or not) is returned when we close.
            resp = await client.fetch(f"tunnel://{HOST}/half")
            window = resp._request.stream.receive_window
            read = 0
            async for chunk in resp.aiter_bytes():
                read += len(chunk)
                if read >= size // 2:
                    break
            assert budget.used == window.grown  # this request's growth, still counted
            await resp.aclose()
            assert budget.used == 0
            # Read whole at once: the same.
            resp = await client.fetch(f"tunnel://{HOST}/whole")
            assert len(await resp.read()) == size
            assert budget.used == 0
        await client.aclose()
    assert p.errors == []
