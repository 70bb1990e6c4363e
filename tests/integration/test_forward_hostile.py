"""``linkctl forward`` against hostile HTTP clients: request smuggling, bad chunks, slowloris.

The forwarder (:class:`cli.local_proxy.Forwarder`) runs in-process with short timeouts, in
front of a real tunnel desktop on a real nats-server that records every request it sees.
Clients are raw sockets, since well-behaved HTTP libraries cannot send these requests.
``--header-timeout`` is checked once through the real ``linkctl forward`` process.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Final

import httpx
import nats
import pytest
from typer.testing import CliRunner

import tunnel
from cli.local_proxy import LINGER_TIME, Forwarder
from cli.main import app as linkctl_app
from cli.nats_server import NatsServer
from tests.integration.test_linkctl_forward import ForwardProcess

pytestmark = pytest.mark.timeout(60)

HOST: Final = "desk-hostile.test"
# Short enough to keep the tests quick, long enough for a loaded machine to send a head.
HEADER_TIMEOUT: Final = 0.5
# A raw client gives up after this long (only a hang hits it).
READ_TIMEOUT: Final = 10.0


@dataclass
class Desktop:
    """What reached the desktop: one path per request."""

    paths: list[str] = field(default_factory=list)

    async def handler(self, request: tunnel.Request) -> tunnel.Response:
        self.paths.append(request.path)
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
        return tunnel.Response(200, [("content-type", "text/plain")], f"{request.path} {size}")


@dataclass
class Rig:
    desktop: Desktop
    forwarder: Forwarder
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def raw(self, data: bytes) -> bytes:
        """Send ``data`` on a new connection and read until the forwarder closes it."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(data)
            await writer.drain()
            async with asyncio.timeout(READ_TIMEOUT):
                return await reader.read()  # to EOF: returns only once the connection is closed
        finally:
            writer.close()

    async def served_after(self) -> None:
        """A normal request afterwards is served (and is the only thing the desktop saw since)."""
        async with httpx.AsyncClient(base_url=self.url, timeout=READ_TIMEOUT) as client:
            response = await client.get("/after")
        assert response.status_code == 200, response.text
        assert response.text == "/after 0"


@pytest.fixture
async def rig(nats_server: NatsServer) -> AsyncIterator[Rig]:
    desktop = Desktop()
    server_nc = await nats.connect(nats_server.url)
    caller_nc = await nats.connect(nats_server.url)
    server = await tunnel.serve(server_nc, HOST, desktop.handler)
    client = tunnel.TunnelClient(caller_nc)
    forwarder = Forwarder(client, HOST, header_timeout=HEADER_TIMEOUT)
    listener = await forwarder.start("127.0.0.1", 0)
    try:
        yield Rig(desktop, forwarder, listener.sockets[0].getsockname()[1])
    finally:
        await forwarder.close()
        await client.aclose()
        await server.close(timeout=1.0)
        await caller_nc.close()
        await server_nc.close()


def responses(data: bytes) -> list[bytes]:
    """The status lines of every response in ``data``."""
    return [line for line in data.split(b"\r\n") if line.startswith(b"HTTP/1.")]


SMUGGLED: Final = b"GET /SMUGGLED1 HTTP/1.1\r\nHost: localhost\r\n\r\n"


@pytest.mark.parametrize(
    "head",
    [
        b"POST /front HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST /front HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
        b"POST /front HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST /front HTTP/1.0\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n",
    ],
    ids=["cl-then-te", "te-then-cl", "cl-0", "te-in-http-1.0"],
)
async def test_content_length_with_transfer_encoding_is_400_closes_and_nothing_reaches_the_desktop(
    rig: Rig, head: bytes
) -> None:
    # Chunked, the body ends at "0\r\n\r\n" and /SMUGGLED1 looks like a second request; by
    # Content-Length, it is part of the body. Either reading is an attack: refuse both.
    data = await rig.raw(head + b"0\r\n\r\n" + SMUGGLED)
    assert responses(data) == [b"HTTP/1.1 400 Bad Request"], data
    head_out, _, body = data.partition(b"\r\n\r\n")
    assert b"connection: close" in head_out.lower()
    assert b"RFC 9112" in body
    await rig.served_after()
    assert rig.desktop.paths == ["/after"]


@pytest.mark.parametrize(
    "body",
    [b"zz\r\nhello\r\n0\r\n\r\n", b"5\r\nhello\r\n-1\r\nx\r\n0\r\n\r\n"],
    ids=["first-chunk", "second-chunk"],
)
async def test_a_bad_chunk_size_is_400_not_502_and_the_connection_closes(rig: Rig, body: bytes) -> None:
    head = b"POST /upload HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
    data = await rig.raw(head + body + SMUGGLED)
    assert responses(data) == [b"HTTP/1.1 400 Bad Request"], data
    assert b"bad request body" in data
    assert b"x-tunnel-error" not in data.lower()
    await rig.served_after()
    assert "/SMUGGLED1" not in rig.desktop.paths


async def dribble(port: int, started: float) -> tuple[bytes, float]:
    """A slowloris client: a request head one byte at a time, never finished.

    Returns what it read and when the forwarder closed the connection (seconds after ``started``).
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = b"GET /slow HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"a" * 10_000
    read = asyncio.ensure_future(reader.read())  # to EOF

    try:
        for byte in head:
            if read.done():
                break
            writer.write(bytes([byte]))
            # A slow client's pace, not a synchronisation: the forwarder must cut it meanwhile.
            await asyncio.wait({read}, timeout=0.05)
        async with asyncio.timeout(READ_TIMEOUT):
            data = await read
        return data, time.monotonic() - started
    finally:
        read.cancel()
        writer.close()


async def test_slow_request_heads_are_cut_with_408_after_the_header_timeout_while_others_are_served(
    rig: Rig,
) -> None:
    started = time.monotonic()
    attackers = [asyncio.ensure_future(dribble(rig.port, started)) for _ in range(50)]
    try:
        # Meanwhile a normal client is served at once.
        async with httpx.AsyncClient(base_url=rig.url, timeout=READ_TIMEOUT) as client:
            response = await client.get("/during")
        assert response.status_code == 200
        assert not any(task.done() for task in attackers), "a normal request waited for the attackers"
        results = await asyncio.gather(*attackers)
    finally:
        for task in attackers:
            task.cancel()
    for data, closed_after in results:
        assert responses(data) == [b"HTTP/1.1 408 Request Timeout"], data
        assert b"connection: close" in data.lower()
        # Not before the timeout; and soon after it (the 408 and the close come together).
        assert HEADER_TIMEOUT <= closed_after < HEADER_TIMEOUT + LINGER_TIME, closed_after
    assert rig.desktop.paths == ["/during"]
    await rig.served_after()


async def test_a_connection_that_sends_nothing_is_closed_quietly_after_the_header_timeout(rig: Rig) -> None:
    started = time.monotonic()
    assert await rig.raw(b"") == b""
    assert time.monotonic() - started >= HEADER_TIMEOUT


async def test_an_idle_kept_alive_connection_is_not_cut_by_the_header_timeout(rig: Rig) -> None:
    async with httpx.AsyncClient(base_url=rig.url, timeout=READ_TIMEOUT) as client:
        first = await client.get("/one")
        # Idle on a kept-alive connection longer than the header timeout: that is the keep-alive
        # timeout's business (75 s), not the header timeout's.
        await asyncio.sleep(3 * HEADER_TIMEOUT)
        second = await client.get("/two")
        local = [r.extensions["network_stream"].get_extra_info("client_addr") for r in (first, second)]
    assert first.status_code == second.status_code == 200
    assert local[0] == local[1], "the kept-alive connection was closed"


def test_header_timeout_must_be_positive() -> None:
    result = CliRunner().invoke(linkctl_app, ["forward", "--header-timeout", "0", HOST])
    assert result.exit_code == 2, result.output
    assert "--header-timeout: must be more than 0 seconds" in result.output


def test_linkctl_forward_header_timeout_flag_cuts_a_slow_head_with_408(nats_server: NatsServer) -> None:
    forward = ForwardProcess.start(nats_server.url, HOST, "--header-timeout", "0.5")
    try:
        host, port = forward.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=READ_TIMEOUT) as sock:
            started = time.monotonic()
            sock.sendall(b"GET /slow HTTP/1.1\r\nHost: localhost\r\n")  # and nothing more
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        assert responses(data) == [b"HTTP/1.1 408 Request Timeout"], data
        assert time.monotonic() - started >= 0.5
    finally:
        assert forward.stop() == 0
    assert any("408 request head incomplete after 0.5 s" in line for line in forward.stderr_lines)


@pytest.mark.parametrize(
    "host",
    [b"evil.example", b"evil.example:8080", b"127.0.0.1.nip.io:9000"],
    ids=["name", "name-port", "rebind"],
)
async def test_a_host_name_that_is_not_loopback_is_refused_as_dns_rebinding(rig: Rig, host: bytes) -> None:
    """A page on evil.example whose name now resolves to 127.0.0.1 reaches this port; the
    desktop's dev server sees its own Host and could not refuse it, so the forwarder does."""
    data = await rig.raw(b"GET /secret HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    assert responses(data) == [b"HTTP/1.1 403 Forbidden"], data
    assert b"--allow-host" in data and b"DNS rebinding" in data
    await rig.served_after()
    assert rig.desktop.paths == ["/after"]


@pytest.mark.parametrize(
    "host", [b"localhost:8080", b"app.localhost", b"127.0.0.1:9", b"[::1]:9", b"192.168.1.20:8080"]
)
async def test_loopback_names_and_ip_addresses_pass(rig: Rig, host: bytes) -> None:
    data = await rig.raw(b"GET /ok HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
    assert responses(data) == [b"HTTP/1.1 200 OK"], data
