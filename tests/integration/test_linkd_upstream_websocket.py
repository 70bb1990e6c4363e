"""WebSocket upgrades through linkd's ``--upstream`` proxy: real nats-server, real aiohttp service.

The caller is ``tunnel.fetch(upgrade=True)`` with wsproto framing the raw bytes on our side
(the proxy itself never parses frames), the local service an aiohttp WebSocket echo server
that records what reached it: path and query, headers, the close code it was sent.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import ssl
import subprocess
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Ping,
    TextMessage,
)

import tunnel
from cli.nats_server import NatsServer, free_port
from linkd import upstream_socket
from linkd.routes import LinkRoutes
from linkd.run_events import MemoryEventSink
from linkd.runs import RunManager
from linkd.upstream import UpstreamProxy
from tests.helpers import wait_until
from tests.integration.recording_upstream import WebSocketEchoService
from tests.integration.tunnel_harness import connect_peers, serving

HOST = "desk-upstream-ws"
MiB = 1024 * 1024
TIMEOUT = 10.0
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


@asynccontextmanager
async def proxied(
    server: NatsServer, upstream_url: str | None = None, tls: ssl.SSLContext | None = None
) -> AsyncIterator[tuple[Client, WebSocketEchoService]]:
    async with WebSocketEchoService(tls=tls) as service:
        proxy = UpstreamProxy(upstream_url or service.url + "/")
        routes = LinkRoutes(RunManager({}, MemoryEventSink()), upstream=proxy)
        try:
            async with connect_peers(server) as peers, serving(peers.server_nc, HOST, routes):
                yield peers.caller_nc, service
                assert peers.errors == []
        finally:
            await proxy.aclose()


def handshake_headers(key: str, *, extra: list[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    return [
        ("Connection", "Upgrade"),
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", key),
        ("Sec-WebSocket-Protocol", "vite-hmr"),
        ("Origin", "http://127.0.0.1:5173"),
        ("Cookie", "session=abc"),
        *(extra or []),
    ]


class TunnelSocket:
    """A WebSocket client over ``tunnel.fetch(upgrade=True)``: wsproto frames, the tunnel carries bytes."""

    def __init__(self) -> None:
        self.key = base64.b64encode(os.urandom(16)).decode("ascii")
        self.ws = Connection(ConnectionType.CLIENT)
        self.outbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.events: deque[Event] = deque()
        self.response: tunnel.FetchResponse | None = None
        self._incoming: AsyncIterator[bytes] | None = None
        self.ended = False

    async def body(self) -> AsyncIterator[bytes]:
        while (piece := await self.outbox.get()) is not None:
            yield piece

    async def open(self, nc: Client, target: str) -> tunnel.FetchResponse:
        self.response = await tunnel.fetch(
            nc,
            f"tunnel://{HOST}{target}",
            headers=handshake_headers(self.key),
            body=self.body(),
            upgrade=True,
            first_frame_timeout=TIMEOUT,
        )
        self._incoming = aiter(self.response.aiter_bytes())
        return self.response

    def send(self, event: Event) -> None:
        self.outbox.put_nowait(self.ws.send(event))

    def half_close(self) -> None:
        self.outbox.put_nowait(None)

    async def next_event(self) -> Event | None:
        """The next WebSocket event from the service; None when the stream ended."""
        assert self._incoming is not None
        while not self.events:
            if self.ended:
                return None
            data = await anext(self._incoming, b"")
            if not data:
                self.ended = True
                if self.ws.state is not ConnectionState.CLOSED:
                    self.ws.receive_data(None)  # a close without a close frame: 1006
            else:
                self.ws.receive_data(data)
            self.events.extend(self.ws.events())
        return self.events.popleft()

    async def message(self) -> str | bytes:
        """One whole message (wsproto may hand it over in pieces); pings are answered."""
        parts: list[Any] = []
        while True:
            event = await self.next_event()
            if isinstance(event, Ping):
                self.send(event.response())
                continue
            assert isinstance(event, TextMessage | BytesMessage), event
            parts.append(event.data)
            if event.message_finished:
                return "".join(parts) if isinstance(event, TextMessage) else b"".join(parts)

    async def aclose(self) -> None:
        self.half_close()
        if self.response is not None:
            await self.response.aclose()


def accept_for(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + GUID).digest()).decode("ascii")


async def test_messages_both_ways_path_subprotocol_and_the_clients_close_code(
    nats_server: NatsServer,
) -> None:
    async with proxied(nats_server) as (nc, service), asyncio.timeout(30):
        sock = TunnelSocket()
        target = "/ws/hmr%20x?token=a%2Fb&x=1&x=2"
        resp = await sock.open(nc, target)
        try:
            assert (resp.status, resp.upgraded) == (101, True)
            got = {name.lower(): value for name, value in resp.headers}
            assert got["upgrade"].lower() == "websocket"
            assert got["connection"].lower() == "upgrade"
            assert got["sec-websocket-accept"] == accept_for(sock.key)
            assert got["sec-websocket-protocol"] == "vite-hmr"

            (seen,) = service.seen
            assert seen["path"] == target  # path and query exactly as sent
            assert seen["host"] == f"127.0.0.1:{service.port}"
            sent = seen["headers"]
            for pair in [
                ("sec-websocket-key", sock.key),
                ("sec-websocket-protocol", "vite-hmr"),
                ("sec-websocket-version", "13"),
                ("origin", "http://127.0.0.1:5173"),
                ("cookie", "session=abc"),
                ("x-forwarded-host", HOST),
                ("via", "1.1 linkd"),
                ("connection", "Upgrade"),
                ("upgrade", "websocket"),
            ]:
                assert pair in sent, pair

            sock.send(Message(data="héllo"))
            assert await sock.message() == "héllo"
            blob = os.urandom(MiB)
            sock.send(Message(data=blob))
            echoed = await sock.message()
            assert (
                isinstance(echoed, bytes) and hashlib.sha256(echoed).digest() == hashlib.sha256(blob).digest()
            )

            for index in range(1000):
                sock.send(Message(data=f"m{index}"))
            assert [await sock.message() for _ in range(1000)] == [f"m{index}" for index in range(1000)]

            sock.send(CloseConnection(code=4002, reason="client bye"))
            event = await sock.next_event()
            assert isinstance(event, CloseConnection)  # the service answered the close
            sock.half_close()
            assert await sock.next_event() is None  # the service closed its socket: the stream ended
            await wait_until(lambda: service.close_codes, message="the service never saw the close")
            assert service.close_codes == [4002]
        finally:
            await sock.aclose()


async def test_the_services_close_code_and_reason_reach_the_caller(nats_server: NatsServer) -> None:
    async with proxied(nats_server) as (nc, _), asyncio.timeout(20):
        sock = TunnelSocket()
        resp = await sock.open(nc, "/ws/a")
        try:
            assert resp.status == 101
            sock.send(Message(data="close-me"))
            event = await sock.next_event()
            assert isinstance(event, CloseConnection)
            assert (event.code, event.reason) == (4001, "bye")
            sock.send(event.response())
            sock.half_close()
            assert await sock.next_event() is None
        finally:
            await sock.aclose()


async def test_refusals_arrive_as_the_status_the_service_gave(nats_server: NatsServer) -> None:
    async with proxied(nats_server) as (nc, service), asyncio.timeout(20):
        for target, status, text in [
            ("/nothing-here", 404, "404: Not Found"),
            ("/forbidden", 403, "origin not allowed"),
        ]:
            sock = TunnelSocket()
            resp = await sock.open(nc, target)
            try:
                assert (resp.status, resp.upgraded) == (status, False)
                assert (await resp.read()).decode() == text
            finally:
                await sock.aclose()
        assert service.seen == []  # neither reached the WebSocket handler


async def test_a_service_not_listening_is_502_upstream_unreachable(nats_server: NatsServer) -> None:
    async with proxied(nats_server, f"http://127.0.0.1:{free_port()}/") as (nc, _), asyncio.timeout(20):
        sock = TunnelSocket()
        resp = await sock.open(nc, "/ws/a")
        try:
            assert (resp.status, resp.upgraded) == (502, False)
            assert json.loads(await resp.read())["error"]["code"] == "upstream_unreachable"
        finally:
            await sock.aclose()


async def test_the_service_dying_mid_socket_ends_the_stream(nats_server: NatsServer) -> None:
    async with proxied(nats_server) as (nc, _), asyncio.timeout(20):
        sock = TunnelSocket()
        resp = await sock.open(nc, "/ws/a")
        try:
            assert resp.status == 101
            sock.send(Message(data="first"))
            assert await sock.message() == "first"
            sock.send(Message(data="die"))
            try:
                event = await sock.next_event()
            except tunnel.TunnelError:
                event = None  # a reset is reported as a broken stream: also not a hang
            assert event is None or (isinstance(event, CloseConnection) and event.code == 1006), event
        finally:
            await sock.aclose()


async def test_an_upgrade_request_with_a_body_is_refused(nats_server: NatsServer) -> None:
    async with proxied(nats_server) as (nc, service), asyncio.timeout(20):
        sock = TunnelSocket()
        headers = handshake_headers(sock.key, extra=[("Content-Length", "5")])
        resp = await tunnel.fetch(
            nc,
            f"tunnel://{HOST}/ws/a",
            headers=headers,
            body=sock.body(),
            upgrade=True,
            first_frame_timeout=TIMEOUT,
        )
        try:
            assert resp.status == 400
            assert json.loads(await resp.read())["error"]["code"] == "bad_request_header"
        finally:
            sock.half_close()
            await resp.aclose()
        assert service.seen == []


async def test_an_upgrade_header_on_a_plain_request_is_dropped_as_before(nats_server: NatsServer) -> None:
    # An older caller (no upgraded stream): the plain proxy, which strips Upgrade, as ever.
    async with proxied(nats_server) as (nc, service), asyncio.timeout(20):
        key = base64.b64encode(os.urandom(16)).decode("ascii")
        async with await tunnel.fetch(
            nc, f"tunnel://{HOST}/ws/a", headers=handshake_headers(key), first_frame_timeout=TIMEOUT
        ) as resp:
            assert resp.status != 101 and not resp.upgraded
            await resp.read()
        (seen,) = service.seen
        names = [name for name, _ in seen["headers"]]
        assert "upgrade" not in names
        assert ("sec-websocket-key", key) in seen["headers"]


async def test_a_service_that_never_answers_the_upgrade_is_504(nats_server: NatsServer) -> None:
    accepted = asyncio.Event()
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # read nothing, answer nothing
        accepted.set()

    listener = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    proxy = UpstreamProxy(f"http://127.0.0.1:{port}/", head_timeout=0.5)
    try:
        async with connect_peers(nats_server) as peers, serving(peers.server_nc, HOST, proxy):
            sock = TunnelSocket()
            resp = await sock.open(peers.caller_nc, "/ws/a")
            try:
                assert accepted.is_set()
                assert resp.status == 504
                assert json.loads(await resp.read())["error"]["code"] == "upstream_timeout"
            finally:
                await sock.aclose()
    finally:
        for writer in held:
            writer.close()
        listener.close()
        await proxy.aclose()


async def test_the_caller_leaving_closes_the_services_socket(nats_server: NatsServer) -> None:
    async with proxied(nats_server) as (nc, service), asyncio.timeout(20):
        sock = TunnelSocket()
        resp = await sock.open(nc, "/ws/a")
        assert resp.status == 101
        sock.send(Message(data="ping"))
        assert await sock.message() == "ping"
        await resp.aclose()  # abort: no close frame, the caller is just gone
        await wait_until(lambda: service.close_codes, message="the service's socket was left open")
        sock.half_close()


def _self_signed(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    algorithm = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    subject = ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
    files = ["-keyout", str(key), "-out", str(cert), "-days", "1"]
    subprocess.run(["openssl", "req", "-x509", *algorithm, *subject, *files], check=True, capture_output=True)
    return cert, key


async def test_an_https_upstream_is_reached_over_verified_tls(
    nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = _self_signed(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    async with proxied(nats_server, tls=server_tls) as (nc, service), asyncio.timeout(20):
        assert service.url.startswith("https://")
        # A certificate nobody vouches for: refused as the plain proxy refuses it.
        sock = TunnelSocket()
        resp = await sock.open(nc, "/ws/a")
        try:
            assert resp.status == 502
            assert json.loads(await resp.read())["error"]["code"] == "upstream_unreachable"
        finally:
            await sock.aclose()
        assert service.seen == []

        trusting = upstream_socket.ssl_context()
        trusting.load_verify_locations(cert)
        monkeypatch.setattr(upstream_socket, "ssl_context", lambda: trusting)
        sock = TunnelSocket()
        resp = await sock.open(nc, "/ws/tls?x=1")
        try:
            assert resp.status == 101
            assert service.seen[0]["path"] == "/ws/tls?x=1"
            sock.send(Message(data="over tls"))
            assert await sock.message() == "over tls"
            sock.send(CloseConnection(code=1000))
            assert isinstance(await sock.next_event(), CloseConnection)
            sock.half_close()  # over TLS there is no write_eof: the service's close ends it
            assert await sock.next_event() is None
        finally:
            await sock.aclose()
