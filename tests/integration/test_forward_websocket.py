"""WebSockets through ``linkctl forward``: browser -> forward listener -> NATS -> linkd's proxy -> service.

The "browser" is aiohttp's WebSocket client (or a raw socket, for the byte-level cases), the
forwarder runs in-process (:class:`cli.local_proxy.Forwarder`, the engine of the command;
one test runs the real ``linkctl forward`` process), the desktop is linkd's routes with the
``--upstream`` proxy served over a real nats-server, the service an aiohttp WebSocket server.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp
import h11
import httpx
import nats
import pytest
from wsproto.connection import Connection, ConnectionType
from wsproto.events import Message, TextMessage

import tunnel
from cli.local_proxy import Forwarder
from cli.nats_server import NatsServer, free_port
from linkd.routes import LinkRoutes
from linkd.run_events import MemoryEventSink
from linkd.runs import RunManager
from linkd.upstream import UpstreamProxy
from tests.helpers import wait_until
from tests.integration.recording_upstream import WebSocketEchoService
from tests.integration.tunnel_harness import serving

HOST = "desk-forward-ws"
MiB = 1024 * 1024
TIMEOUT = 20.0
_READY_RE = re.compile(rb"forwarding (http://\S+) -> tunnel://")


@dataclass
class Chain:
    url: str  # the forward listener
    ws_url: str
    service: WebSocketEchoService
    log: list[str]


@asynccontextmanager
async def chain(
    server: NatsServer, *, upstream_url: str | None = None, **serve_options: object
) -> AsyncIterator[Chain]:
    """The whole path, in-process: forwarder, tunnel, linkd's proxy, the service."""
    async with WebSocketEchoService() as service:
        proxy = UpstreamProxy(upstream_url or service.url + "/")
        routes = LinkRoutes(RunManager({}, MemoryEventSink()), upstream=proxy)
        desk_nc = await nats.connect(server.url)
        caller_nc = await nats.connect(server.url)
        client = tunnel.TunnelClient(caller_nc)
        log: list[str] = []
        forwarder = Forwarder(client, HOST, log=log.append)
        try:
            async with serving(desk_nc, HOST, routes, **serve_options):
                listener = await forwarder.start("127.0.0.1", 0)
                url = f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}"
                yield Chain(url, url.replace("http://", "ws://"), service, log)
        finally:
            await forwarder.close()
            await client.aclose()
            await caller_nc.close()
            await desk_nc.close()
            await proxy.aclose()


async def test_messages_both_ways_through_the_forwarder(nats_server: NatsServer) -> None:
    async with chain(nats_server) as c, aiohttp.ClientSession() as session, asyncio.timeout(30):
        await exchange(session, c)
        # Logged once the stream ended (the service closed its socket after the close handshake).
        await wait_until(
            lambda: any('"GET /ws/hmr%2Fx?token=a%26b&x=1&x=2" 101 upgraded: ' in x for x in c.log)
        )


async def exchange(session: aiohttp.ClientSession, c: Chain) -> None:
    """The browser's part: handshake, text, 1 MiB binary, 1000 messages each way, its close."""
    target = "/ws/hmr%2Fx?token=a%26b&x=1&x=2"
    async with session.ws_connect(
        c.ws_url + target,
        protocols=("vite-hmr",),
        origin="http://127.0.0.1:5173",
        max_msg_size=4 * MiB,
        compress=15,  # offers permessage-deflate: compressed frames must pass unchanged too
    ) as ws:
        assert ws.protocol == "vite-hmr"  # negotiated end to end
        assert ws.compress == 15  # and the compression extension
        (seen,) = c.service.seen
        assert seen["path"] == target
        sent = seen["headers"]
        assert ("sec-websocket-protocol", "vite-hmr") in sent
        assert any(name == "sec-websocket-extensions" and "permessage-deflate" in v for name, v in sent)
        assert ("origin", "http://127.0.0.1:5173") in sent
        assert ("x-forwarded-host", c.url.removeprefix("http://")) in sent
        assert ("x-forwarded-proto", "http") in sent and ("x-forwarded-for", "127.0.0.1") in sent

        await ws.send_str("héllo")
        assert await ws.receive_str() == "héllo"
        blob = os.urandom(MiB)
        await ws.send_bytes(blob)
        assert hashlib.sha256(await ws.receive_bytes()).digest() == hashlib.sha256(blob).digest()
        for index in range(1000):
            await ws.send_str(f"m{index}")
        assert [await ws.receive_str() for _ in range(1000)] == [f"m{index}" for index in range(1000)]
        await ws.close(code=4002, message=b"client bye")
    await wait_until(lambda: c.service.close_codes, message="the service never saw the close")
    assert c.service.close_codes == [4002]  # the browser's close code reached the service


async def test_the_services_close_code_and_reason_reach_the_browser(nats_server: NatsServer) -> None:
    async with chain(nats_server) as c, aiohttp.ClientSession() as session, asyncio.timeout(20):
        async with session.ws_connect(c.ws_url + "/ws/a") as ws:
            await ws.send_str("close-me")
            msg = await ws.receive()
            assert msg.type == aiohttp.WSMsgType.CLOSE
            assert (msg.data, msg.extra) == (4001, "bye")
        assert ws.close_code == 4001


async def test_the_service_dying_mid_socket_closes_the_browsers_socket(nats_server: NatsServer) -> None:
    async with (
        chain(nats_server) as c,
        aiohttp.ClientSession() as session,
        asyncio.timeout(20),
        session.ws_connect(c.ws_url + "/ws/a", autoclose=False) as ws,
    ):
        await ws.send_str("first")
        assert await ws.receive_str() == "first"
        await ws.send_str("die")
        msg = await ws.receive()  # within the timeout: no hang
        assert msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSE), msg


@pytest.mark.parametrize(
    ("target", "status", "text"),
    [("/nothing", 404, "404: Not Found"), ("/forbidden", 403, "origin not allowed")],
)
async def test_refusals_arrive_as_the_status_the_service_gave(
    nats_server: NatsServer, target: str, status: int, text: str
) -> None:
    async with chain(nats_server) as c, aiohttp.ClientSession() as session, asyncio.timeout(20):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(c.ws_url + target)
        assert refused.value.status == status
        # The same refusal with its body, and the connection stays usable (kept alive).
        async with httpx.AsyncClient(base_url=c.url) as http:
            response = await http.get(target, headers=handshake_headers())
            assert (response.status_code, response.text) == (status, text)
            again = await http.get(target, headers=handshake_headers())
            assert again.status_code == status
        assert c.service.seen == []


async def test_a_service_not_listening_is_502(nats_server: NatsServer) -> None:
    async with (
        chain(nats_server, upstream_url=f"http://127.0.0.1:{free_port()}/") as c,
        aiohttp.ClientSession() as session,
        asyncio.timeout(20),
    ):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(c.ws_url + "/ws/a")
        assert refused.value.status == 502
        async with httpx.AsyncClient(base_url=c.url) as http:
            response = await http.get("/ws/a", headers=handshake_headers())
            assert response.status_code == 502
            assert response.json()["error"]["code"] == "upstream_unreachable"


async def test_a_desktop_without_upgrades_is_502_with_the_tunnel_code(nats_server: NatsServer) -> None:
    async with chain(nats_server, config=tunnel.ServerConfig(fast_path=False)) as c, asyncio.timeout(20):
        async with httpx.AsyncClient(base_url=c.url) as http:
            response = await http.get("/ws/a", headers=handshake_headers())
        assert response.status_code == 502
        assert response.headers["x-tunnel-error"] == "tunnel_upgrade_unsupported"
        # (Such a server may still run the request as a plain one, Upgrade stripped, before
        # the caller gives up on it: a v1 peer cannot know what was asked.)
        assert all(("upgrade", "websocket") not in seen["headers"] for seen in c.service.seen)


def handshake_headers() -> list[tuple[str, str]]:
    return [
        ("Connection", "Upgrade"),
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", base64.b64encode(os.urandom(16)).decode("ascii")),
    ]


def _raw_exchange(url: str, data: bytes, until: bytes) -> bytes:
    """Send ``data`` on a fresh connection; what comes back, up to ``until`` or the close."""
    host, port = url.removeprefix("http://").split(":")
    received = b""
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
        sock.sendall(data)
        while until not in received and (piece := sock.recv(65536)):
            received += piece
    return received


async def test_bytes_sent_behind_the_head_reach_the_service_first_and_in_order(
    nats_server: NatsServer,
) -> None:
    async with chain(nats_server) as c, asyncio.timeout(20):
        head = h11.Connection(h11.CLIENT).send(
            h11.Request(
                method="GET", target="/ws/early", headers=[("Host", "localhost"), *handshake_headers()]
            )
        )
        assert head is not None
        frames = Connection(ConnectionType.CLIENT)
        early = frames.send(Message(data="early-1")) + frames.send(Message(data="early-2"))
        # One write: the frames arrive with the head, before any 101 was sent.
        received = await asyncio.to_thread(_raw_exchange, c.url, head + early, b"early-2")
        status_line, _, rest = received.partition(b"\r\n")
        assert status_line == b"HTTP/1.1 101 Switching Protocols", received[:200]
        _, _, after = rest.partition(b"\r\n\r\n")
        frames.receive_data(after)
        texts = [event.data for event in frames.events() if isinstance(event, TextMessage)]
        assert texts == ["early-1", "early-2"]


async def test_the_browser_vanishing_closes_the_services_socket(nats_server: NatsServer) -> None:
    async with chain(nats_server) as c, asyncio.timeout(20):
        host, port = c.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        head = h11.Connection(h11.CLIENT).send(
            h11.Request(
                method="GET", target="/ws/gone", headers=[("Host", "localhost"), *handshake_headers()]
            )
        )
        assert head is not None
        writer.write(head)
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101 ")
        await wait_until(lambda: c.service.seen)
        writer.transport.abort()  # a tab killed: no close frame, a reset
        await wait_until(lambda: c.service.close_codes, message="the service's socket was left open")
        await wait_until(lambda: any('"GET /ws/gone" 101 upgraded: ' in line for line in c.log))


async def test_smuggling_rules_hold_for_upgrade_requests(nats_server: NatsServer) -> None:
    async with chain(nats_server) as c, asyncio.timeout(20):
        request = (
            b"GET /ws/a HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        )
        received = await asyncio.to_thread(_raw_exchange, c.url, request, b"\r\n\r\n")
        assert received.startswith(b"HTTP/1.1 400 "), received[:200]
        assert c.service.seen == []


async def test_the_linkctl_forward_process_carries_a_websocket(nats_server: NatsServer) -> None:
    async with WebSocketEchoService() as service:
        proxy = UpstreamProxy(service.url + "/")
        routes = LinkRoutes(RunManager({}, MemoryEventSink()), upstream=proxy)
        desk_nc = await nats.connect(nats_server.url)
        env = {k: v for k, v in os.environ.items() if not k.startswith("LINKCTL_")}
        proc = await asyncio.create_subprocess_exec(
            *[
                sys.executable,
                "-m",
                "cli",
                "forward",
                "--listen",
                "127.0.0.1:0",
                "--nats",
                nats_server.url,
                HOST,
            ],
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        try:
            async with serving(desk_nc, HOST, routes), asyncio.timeout(30):
                assert proc.stderr is not None
                url = None
                while url is None:
                    line = await proc.stderr.readline()
                    assert line, "linkctl forward exited before it was ready"
                    if match := _READY_RE.search(line):
                        url = match.group(1).decode()
                c = Chain(url, url.replace("http://", "ws://"), service, [])
                async with aiohttp.ClientSession() as session:
                    await exchange(session, c)
                # The line is logged once the stream ended (the service closed its socket after
                # the close handshake): wait for it before Ctrl-C, which would cut the stream.
                seen = b""
                while b'"GET /ws/hmr%2Fx?token=a%26b&x=1&x=2" 101 upgraded: ' not in seen:
                    line = await proc.stderr.readline()
                    assert line, f"linkctl forward exited: {seen.decode()}"
                    seen += line
                proc.send_signal(2)  # Ctrl-C
                rest = seen.decode() + (await proc.stderr.read()).decode()
                assert await proc.wait() == 0, rest
                assert "Traceback" not in rest, rest
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await desk_nc.close()
            await proxy.aclose()
