"""Faults and liveness against a real nats-server: dead servers, slow handlers, early exits, lost frames.

The promises checked (DESIGN.md, "The tunnel protocol: what it must guarantee"):

- liveness: a caller whose server process dies (SIGKILL, no goodbye) gets ``IdleTimeout``
  within the idle timeout, before or after the response started; a server that is slow but
  alive keeps the request going with heartbeats;
- cancellation: a caller that leaves early stops the handler and frees the server's slot;
- no silent loss: a lost or duplicated data frame, in either direction, ends the request with
  ``RemoteProtocolError`` and never hands wrong bytes to anyone as a success; a lost end frame
  is an ``IdleTimeout``, not a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Final

import nats
import pytest
from nats.aio.client import Client

import tunnel
from cli.nats_server import NatsServer
from tests.helpers import wait_until
from tests.integration.tunnel_server_proc import started_subject
from tunnel._events import Publish
from tunnel._natsio.common import flush_everything

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
# Generous bound for "something that takes milliseconds locally" on a busy 2-core machine.
EVENT_TIMEOUT: Final = 5.0
# How much later than the idle timeout the caller may notice a dead server (the promise).
DEAD_PEER_SLACK: Final = 1.0
# A caller that left must see its handler stopped this fast (the promise).
CANCEL_WITHIN: Final = 1.0


async def _ignore_error(_: Exception) -> None:
    """nats-py logs connection errors by default; nothing here provokes any on our side."""


@contextlib.asynccontextmanager
async def connected(url: str, **options: object) -> AsyncIterator[Client]:
    nc = await nats.connect(url, error_cb=_ignore_error, connect_timeout=EVENT_TIMEOUT, **options)  # type: ignore[arg-type]
    try:
        yield nc
    finally:
        await nc.close()


@pytest.fixture
async def server_nc(nats_server: NatsServer) -> AsyncIterator[Client]:
    async with connected(nats_server.url) as nc:
        yield nc


@pytest.fixture
async def client_nc(nats_server: NatsServer) -> AsyncIterator[Client]:
    async with connected(nats_server.url) as nc:
        yield nc


@contextlib.asynccontextmanager
async def serving(
    nc: Client, hostname: str, handler: tunnel.Handler, **kwargs: object
) -> AsyncIterator[tunnel.TunnelServer]:
    server = await tunnel.serve(nc, hostname, handler, **kwargs)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        await server.close(timeout=1.0)


@contextlib.asynccontextmanager
async def server_process(url: str, hostname: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """tunnel_server_proc.py in a child process; yields once it printed ``ready``."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.integration.tunnel_server_proc",
        url,
        hostname,
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=15.0)
        assert line.strip() == b"ready", f"server process did not start (said {line!r})"
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


def _sigkill(proc: asyncio.subprocess.Process) -> None:
    assert proc.returncode is None, "the server process died before the test killed it"
    proc.kill()


# --------------------------------------------------------------------------- dead server (SIGKILL)


async def test_server_killed_after_ack_before_response_gives_idle_timeout_not_hang(
    nats_server: NatsServer, client_nc: Client
) -> None:
    hostname = "killed-before-start.test"
    idle = 1.0
    loop = asyncio.get_running_loop()
    async with server_process(nats_server.url, hostname) as proc:
        started = await client_nc.subscribe(started_subject(hostname))
        await flush_everything(client_nc)
        client = tunnel.TunnelClient(client_nc, timeouts=tunnel.Timeouts(idle=idle, first_frame=30.0))
        # Frames to the client, seen on its own connection: once the spy has the ack, so has the client.
        spy = await client_nc.subscribe(tunnel.HostSubjects.for_host(hostname).base + ".req.*.reply.>")
        fetch = asyncio.create_task(client.fetch(f"tunnel://{hostname}/hang-before-start"))
        await started.next_msg(timeout=EVENT_TIMEOUT)
        # A body-less request is acked only once the handler has been busy a little while.
        while json.loads((await spy.next_msg(timeout=EVENT_TIMEOUT)).data)["type"] != "response.ack":
            pass
        assert not fetch.done()
        _sigkill(proc)
        await proc.wait()
        killed_at = loop.time()
        with pytest.raises(tunnel.IdleTimeout) as info:
            await asyncio.wait_for(fetch, timeout=idle + DEAD_PEER_SLACK + EVENT_TIMEOUT)
        noticed_after = loop.time() - killed_at
    assert info.value.code == tunnel.ErrorCode.IDLE_TIMEOUT == "tunnel_idle_timeout"
    assert noticed_after <= idle + DEAD_PEER_SLACK, f"noticed the dead server after {noticed_after:.2f} s"
    assert client.in_flight == 0


async def test_server_killed_mid_body_gives_idle_timeout_to_the_reader(
    nats_server: NatsServer, client_nc: Client
) -> None:
    hostname = "killed-mid-body.test"
    idle = 1.0
    loop = asyncio.get_running_loop()
    async with server_process(nats_server.url, hostname) as proc:
        started = await client_nc.subscribe(started_subject(hostname))
        await flush_everything(client_nc)
        client = tunnel.TunnelClient(client_nc, timeouts=tunnel.Timeouts(idle=idle, first_frame=30.0))
        resp = await client.fetch(f"tunnel://{hostname}/stream-forever")
        assert resp.status == 200
        chunks = resp.aiter_bytes()
        assert await anext(chunks)
        await started.next_msg(timeout=EVENT_TIMEOUT)
        _sigkill(proc)
        await proc.wait()
        killed_at = loop.time()

        async def drain() -> None:
            async for _ in chunks:  # chunks already in flight are fine; then silence
                pass

        with pytest.raises(tunnel.IdleTimeout) as info:
            await asyncio.wait_for(drain(), timeout=idle + DEAD_PEER_SLACK + EVENT_TIMEOUT)
        noticed_after = loop.time() - killed_at
    assert info.value.code == "tunnel_idle_timeout"
    assert noticed_after <= idle + DEAD_PEER_SLACK, f"noticed the dead server after {noticed_after:.2f} s"
    assert client.in_flight == 0


# --------------------------------------------------------------------------- slow but alive


async def test_handler_slower_than_idle_timeout_succeeds_thanks_to_heartbeats(
    server_nc: Client, client_nc: Client
) -> None:
    # Heartbeats come every idle / 3: a stall of a loaded machine (caller and server share this
    # process) up to ~0.6 s costs nothing; 0.6 s of idle left room for ~0.4 s only.
    handler_time = 3.5
    idle = 1.0

    async def handler(req: tunnel.Request) -> tunnel.Response:
        await asyncio.sleep(handler_time)  # the slow work under test
        return tunnel.Response(200, [], b"worth the wait")

    loop = asyncio.get_running_loop()
    async with serving(server_nc, "slow-handler.test", handler):
        client = tunnel.TunnelClient(client_nc, timeouts=tunnel.Timeouts(idle=idle, first_frame=idle))
        began = loop.time()
        resp = await client.fetch("tunnel://slow-handler.test/slow")
        body = await resp.read()
        took = loop.time() - began
    assert (resp.status, body) == (200, b"worth the wait")
    assert took >= handler_time > 3 * idle  # the silence really was longer than the idle timeout


async def test_body_pausing_longer_than_idle_timeout_succeeds(server_nc: Client, client_nc: Client) -> None:
    pause = 3.5
    idle = 1.0  # heartbeats every ~0.33 s: see the test above

    async def body() -> AsyncIterator[bytes]:
        yield b"before the pause;"
        await asyncio.sleep(pause)  # the quiet stretch under test
        yield b"after the pause"

    async def handler(req: tunnel.Request) -> tunnel.Response:
        return tunnel.Response(200, [], body())

    loop = asyncio.get_running_loop()
    async with serving(server_nc, "pausing-body.test", handler):
        client = tunnel.TunnelClient(client_nc, timeouts=tunnel.Timeouts(idle=idle))
        resp = await client.fetch("tunnel://pausing-body.test/pause")
        received: list[tuple[float, bytes]] = []
        async for chunk in resp.aiter_bytes():
            received.append((loop.time(), chunk))
    assert b"".join(c for _, c in received) == b"before the pause;after the pause"
    assert received[-1][0] - received[0][0] >= pause - 0.1  # the pause did happen mid-stream


# --------------------------------------------------------------------------- caller leaves early


class HandlerProbe:
    """What the handler saw: that it started, its request, and whether it was cancelled."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.saw_cancelled_error = asyncio.Event()
        self.request: tunnel.Request | None = None

    def handler(self) -> tunnel.Handler:
        async def wait_forever() -> None:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.saw_cancelled_error.set()
                raise

        async def endless_body() -> AsyncIterator[bytes]:
            yield b"first chunk"
            await wait_forever()
            yield b"never sent"

        async def handler(req: tunnel.Request) -> tunnel.Response:
            self.request = req
            self.started.set()
            if req.path == "/hang":
                await wait_forever()
            return tunnel.Response(200, [], endless_body())

        return handler

    def cancelled(self) -> bool:
        return self.request is not None and self.request.is_cancelled and self.saw_cancelled_error.is_set()


async def _aclose_after_first_chunk(client: tunnel.TunnelClient, url: str, probe: HandlerProbe) -> None:
    resp = await client.fetch(url)
    assert await anext(resp.aiter_bytes()) == b"first chunk"
    await resp.aclose()


async def _leave_async_with_after_first_chunk(
    client: tunnel.TunnelClient, url: str, probe: HandlerProbe
) -> None:
    async with await client.fetch(url) as resp:
        async for chunk in resp.aiter_bytes():
            assert chunk == b"first chunk"
            break


async def _cancel_fetch_waiting_for_head(client: tunnel.TunnelClient, url: str, probe: HandlerProbe) -> None:
    task = asyncio.create_task(client.fetch(url.replace("/stream", "/hang")))
    await asyncio.wait_for(probe.started.wait(), EVENT_TIMEOUT)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def _cancel_task_reading_body(client: tunnel.TunnelClient, url: str, probe: HandlerProbe) -> None:
    first = asyncio.Event()

    async def reader() -> None:
        resp = await client.fetch(url)
        async for _ in resp.aiter_bytes():
            first.set()

    task = asyncio.create_task(reader())
    await asyncio.wait_for(first.wait(), EVENT_TIMEOUT)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


LeaveEarly = Callable[[tunnel.TunnelClient, str, HandlerProbe], Awaitable[None]]


@pytest.mark.parametrize(
    "leave",
    [
        _aclose_after_first_chunk,
        _leave_async_with_after_first_chunk,
        _cancel_fetch_waiting_for_head,
        _cancel_task_reading_body,
    ],
    ids=["aclose-after-first-chunk", "leave-async-with", "cancel-fetch-before-head", "cancel-reader-task"],
)
async def test_caller_leaving_early_cancels_the_handler_and_frees_the_slot(
    server_nc: Client, client_nc: Client, leave: LeaveEarly
) -> None:
    probe = HandlerProbe()
    async with serving(server_nc, "leaves-early.test", probe.handler()) as server:
        client = tunnel.TunnelClient(client_nc, timeouts=tunnel.Timeouts(idle=5.0))
        await leave(client, "tunnel://leaves-early.test/stream", probe)
        await wait_until(probe.cancelled, timeout=CANCEL_WITHIN, message="handler never saw the cancellation")
        await wait_until(lambda: server.in_flight == 0, timeout=CANCEL_WITHIN, message="server slot kept")
        assert client.in_flight == 0
        assert server.stats.aborted == 1
        assert server.stats.completed == 0


async def test_an_answer_that_ends_while_the_upload_waits_in_nats_py_is_the_answer(
    nats_server: NatsServer, server_nc: Client
) -> None:
    """The response ends mid-upload: the caller gets that response, not a protocol error.

    Ending the response cancels the upload, but nats-py swallows a cancellation that lands
    while a publish waits for its flusher (``_flush_pending``); the upload went on and tried
    to send body in phase ``done`` (CI: ``LocalProtocolError`` instead of the service's 501).
    ``pending_size=1`` and a pass-through tap make every upload publish wait there.
    """
    refusal = b'{"error":"too large"}'

    async def refuse_unread(req: tunnel.Request) -> tunnel.Response:
        return tunnel.Response(413, [("Content-Type", "application/json")], refusal)

    async def endless() -> AsyncIterator[bytes]:
        while True:
            yield b"u" * (64 * 1024)

    async with (
        connected(nats_server.url, pending_size=1) as nc,
        serving(server_nc, "refuses-early.test", refuse_unread),
    ):
        client = tunnel.TunnelClient(nc, wire_tap=lambda pub: [pub])
        for _ in range(20):
            async with asyncio.timeout(EVENT_TIMEOUT):
                resp = await client.fetch("tunnel://refuses-early.test/up", method="PUT", body=endless())
                assert (resp.status, await resp.read()) == (413, refusal)
        assert client.in_flight == 0
        assert dict(client.stats.outcomes) == {"ok": 20}


async def test_handlers_of_callers_that_left_mid_download_end_and_close_their_bodies(
    nats_server: NatsServer, client_nc: Client
) -> None:
    """A caller leaving fails the request and cancels its handler, which may be waiting inside
    nats-py's publish (its buffer full: ``pending_size=1`` and a pass-through tap make every
    body frame wait there), where the cancel is swallowed. The handler went on to wait for
    credit that could never come: its task and its body (an upstream response) were kept."""
    leaves = 40
    closed = 0

    class Body:
        """A response body (4 MiB) with a cleanup, like an upstream response's."""

        def __init__(self) -> None:
            self.left = 4

        def __iter__(self) -> Iterator[bytes]:
            return self

        def __next__(self) -> bytes:
            if not self.left:
                raise StopIteration
            self.left -= 1
            return b"d" * (1024 * 1024)

        def close(self) -> None:
            nonlocal closed
            closed += 1

    async def download(req: tunnel.Request) -> tunnel.Response:
        return tunnel.Response(200, [], Body())

    async with (
        connected(nats_server.url, pending_size=1) as nc,
        serving(
            nc,
            "leaves-mid-download.test",
            download,
            wire_tap=lambda pub: [pub],
            config=tunnel.ServerConfig(max_chunk=16 * 1024),
        ) as server,
    ):
        window = 64 * 1024
        client = tunnel.TunnelClient(client_nc, limits=tunnel.Limits(window=window, max_window=window))
        for _ in range(leaves):
            resp = await client.fetch("tunnel://leaves-mid-download.test/big")
            assert len(await anext(resp.aiter_bytes())) > 0
            await resp.aclose()
        await wait_until(
            lambda: closed == leaves, timeout=EVENT_TIMEOUT, message=lambda: f"{closed} of {leaves} closed"
        )
        await wait_until(lambda: server.in_flight == 0, timeout=EVENT_TIMEOUT)
        assert server.stats.aborted == leaves


# --------------------------------------------------------------------------- lost and duplicated frames

BODY_FRAMES: Final = 16
FRAME_SIZE: Final = 1024
BODY: Final = random.Random(20240601).randbytes(BODY_FRAMES * FRAME_SIZE)


def is_data_frame(pub: Publish) -> bool:
    """A binary request.chunk or response.chunk (kind 1 or 2); not a response.whole (kind 3)."""
    return pub.payload[:1] == b"\x00" and pub.payload[1:2] in (b"\x01", b"\x02")


async def chunked(data: bytes, size: int = FRAME_SIZE) -> AsyncIterator[bytes]:
    """A streamed response body (so the server sends chunk frames, never one response.whole)."""
    for i in range(0, len(data), size):
        yield data[i : i + size]


class NthDataFrameTap:
    """A wire tap that drops or duplicates the n-th (1-based) data frame; everything else passes."""

    def __init__(self, n: int, action: str) -> None:
        assert action in ("drop", "duplicate", "pass")
        self.n = n
        self.action = action
        self.seen = 0
        self.acted = False

    def __call__(self, pub: Publish) -> Iterable[Publish]:
        if is_data_frame(pub):
            self.seen += 1
            if self.seen == self.n and self.action != "pass":
                self.acted = True
                return [] if self.action == "drop" else [pub, pub]
        return [pub]


FAULTS: Final = [(action, n) for action in ("drop", "duplicate") for n in (1, BODY_FRAMES // 2, BODY_FRAMES)]
FAULT_IDS: Final = [f"{action}-frame-{n}-of-{BODY_FRAMES}" for action, n in FAULTS]


@pytest.mark.parametrize(("action", "n"), FAULTS, ids=FAULT_IDS)
async def test_lost_or_duplicated_response_frame_is_protocol_error_never_wrong_bytes(
    server_nc: Client, client_nc: Client, action: str, n: int
) -> None:
    async def handler(req: tunnel.Request) -> tunnel.Response:
        return tunnel.Response(200, [], chunked(BODY))

    tap = NthDataFrameTap(n, action)
    async with serving(
        server_nc,
        "lossy-response.test",
        handler,
        config=tunnel.ServerConfig(max_chunk=FRAME_SIZE),
        wire_tap=tap,
    ):
        client = tunnel.TunnelClient(client_nc, timeouts=tunnel.Timeouts(idle=5.0))
        received: list[bytes] = []
        with pytest.raises(tunnel.RemoteProtocolError) as info:
            resp = await client.fetch("tunnel://lossy-response.test/body")
            async for chunk in resp.aiter_bytes():
                received.append(chunk)
    assert tap.acted
    assert info.value.code == "tunnel_protocol_error"
    got = b"".join(received)
    # Frames before the fault may be delivered; nothing after it, and never as a complete success.
    assert BODY.startswith(got), "wrong bytes reached the reader"
    if action == "drop":
        assert len(got) < len(BODY)
    assert client.in_flight == 0


async def test_response_tap_without_fault_passes_the_body_intact(
    server_nc: Client, client_nc: Client
) -> None:
    """Control for the test above: same body and frame size, the tap only counts."""

    async def handler(req: tunnel.Request) -> tunnel.Response:
        return tunnel.Response(200, [], chunked(BODY))

    tap = NthDataFrameTap(0, "pass")
    async with serving(
        server_nc,
        "intact-response.test",
        handler,
        config=tunnel.ServerConfig(max_chunk=FRAME_SIZE),
        wire_tap=tap,
    ):
        client = tunnel.TunnelClient(client_nc, timeouts=tunnel.Timeouts(idle=5.0))
        resp = await client.fetch("tunnel://intact-response.test/body")
        assert await resp.read() == BODY
    assert tap.seen == BODY_FRAMES


@pytest.mark.parametrize(("action", "n"), FAULTS, ids=FAULT_IDS)
async def test_lost_or_duplicated_request_body_frame_is_rejected_by_the_server(
    server_nc: Client, client_nc: Client, action: str, n: int
) -> None:
    handler_results: list[bytes] = []

    async def handler(req: tunnel.Request) -> tunnel.Response:
        data = await req.read()
        handler_results.append(data)  # only reached if the server accepted a body
        return tunnel.Response(200, [], hashlib.sha256(data).hexdigest())

    tap = NthDataFrameTap(n, action)
    async with serving(server_nc, "lossy-request.test", handler) as server:
        client = tunnel.TunnelClient(
            client_nc,
            timeouts=tunnel.Timeouts(idle=5.0),
            limits=tunnel.Limits(max_chunk=FRAME_SIZE),
            wire_tap=tap,
        )
        with pytest.raises(tunnel.RemoteProtocolError) as info:
            resp = await client.fetch("tunnel://lossy-request.test/upload", method="POST", body=BODY)
            await resp.read()
        await wait_until(lambda: server.in_flight == 0, message="server kept the broken request")
    assert tap.acted
    assert info.value.code == "tunnel_protocol_error"
    assert handler_results == [], "the handler read a body with a lost or duplicated frame"
    assert server.stats.protocol_errors >= 1
    assert server.stats.completed == 0
    assert client.in_flight == 0


async def test_request_tap_without_fault_passes_the_body_intact(server_nc: Client, client_nc: Client) -> None:
    """Control for the test above: same body and frame size, the tap only counts."""

    async def handler(req: tunnel.Request) -> tunnel.Response:
        return tunnel.Response(200, [], hashlib.sha256(await req.read()).hexdigest())

    tap = NthDataFrameTap(0, "pass")
    async with serving(server_nc, "intact-request.test", handler):
        client = tunnel.TunnelClient(
            client_nc,
            timeouts=tunnel.Timeouts(idle=5.0),
            limits=tunnel.Limits(max_chunk=FRAME_SIZE),
            wire_tap=tap,
        )
        resp = await client.fetch("tunnel://intact-request.test/upload", method="POST", body=BODY)
        assert await resp.text() == hashlib.sha256(BODY).hexdigest()
    assert tap.seen == BODY_FRAMES


def json_type(pub: Publish) -> str | None:
    if pub.payload[:1] != b"{":
        return None
    kind = json.loads(pub.payload).get("type")
    return kind if isinstance(kind, str) else None


def drop_response_end(pub: Publish) -> Iterable[Publish]:
    return [] if json_type(pub) == "response.end" else [pub]


async def test_lost_response_end_gives_idle_timeout_not_hang(server_nc: Client, client_nc: Client) -> None:
    idle = 0.5

    async def handler(req: tunnel.Request) -> tunnel.Response:
        return tunnel.Response(200, [], chunked(BODY))

    loop = asyncio.get_running_loop()
    async with serving(
        server_nc,
        "lost-end.test",
        handler,
        config=tunnel.ServerConfig(max_chunk=FRAME_SIZE),
        wire_tap=drop_response_end,
    ) as server:
        client = tunnel.TunnelClient(client_nc, timeouts=tunnel.Timeouts(idle=idle))
        resp = await client.fetch("tunnel://lost-end.test/body")
        received: list[bytes] = []
        began = loop.time()
        with pytest.raises(tunnel.IdleTimeout) as info:
            async for chunk in resp.aiter_bytes():
                received.append(chunk)
        waited = loop.time() - began
        assert server.stats.completed == 1  # the server did finish: only the end frame was lost
    assert info.value.code == "tunnel_idle_timeout"
    assert b"".join(received) == BODY  # every byte arrived, yet without the end it is no success
    assert waited <= idle + DEAD_PEER_SLACK
    assert client.in_flight == 0


def drop_whole_responses(pub: Publish) -> Iterable[Publish]:
    return [] if pub.payload[:2] in (b"\x00\x03", b"\x00\x05") else [pub]  # JSON or compact head


async def test_lost_one_message_response_is_reported_at_the_first_republish_not_a_hang(
    server_nc: Client, client_nc: Client
) -> None:
    """A small answer travels as one response.whole frame (no ack first); if it is lost, the
    caller's republished start is answered with a typed error at once, not after the
    first-frame timeout."""
    first_frame = 10.0
    republish = 0.3

    async def handler(req: tunnel.Request) -> tunnel.Response:
        if req.path == "/warm-up":

            async def streamed() -> AsyncIterator[bytes]:
                yield b"streamed"  # not a one-message answer: the tap lets it through

            return tunnel.Response(200, [], streamed())
        return tunnel.Response(200, [], b"small")

    loop = asyncio.get_running_loop()
    async with serving(server_nc, "lost-whole.test", handler, wire_tap=drop_whole_responses) as server:
        client = tunnel.TunnelClient(
            client_nc,
            timeouts=tunnel.Timeouts(idle=0.5, first_frame=first_frame, republish_interval=republish),
        )
        # Not a first contact (whose start asks for an ack at once): the host answered lately.
        async with await client.fetch("tunnel://lost-whole.test/warm-up") as warm:
            assert await warm.read() == b"streamed"
        began = loop.time()
        with pytest.raises(tunnel.RemoteProtocolError) as caught:
            await client.fetch("tunnel://lost-whole.test/small")
        waited = loop.time() - began
        assert caught.value.code == "tunnel_protocol_error"
        assert server.stats.completed == 2  # the warm-up, and the answer that was produced and lost
        assert server.stats.repeated_starts >= 1
    assert waited <= republish + DEAD_PEER_SLACK
    assert client.in_flight == 0
