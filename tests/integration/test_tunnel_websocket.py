"""``tunnel.websocket.websocket_connect`` against a WebSocket server written on ``tunnel.serve``
(the server role of the same ``WebSocketChannel``), through a real nats-server.

Echo (text, 1 MiB binary, 1000 small messages each way), pings both ways, subprotocols,
close codes both ways, a server that dies mid-socket, a slow reader of 32 MiB (memory
bounded, byte-exact), refused and invalid handshakes, and the size limit.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import tunnel
from cli.nats_server import NatsServer
from tests.helpers import wait_until
from tests.integration.tunnel_harness import EVENT_TIMEOUT, KiB, MiB, Peers, connect_peers, serving
from tunnel._ws_protocol import accept_token, split_tokens
from tunnel.websocket import (
    RECEIVE_HIGH_WATER,
    TunnelWebSocket,
    WebSocketChannel,
    WebSocketClosed,
    WebSocketHandshakeError,
    WebSocketMessage,
    websocket_connect,
)

HOST = "ws.example"
URL = f"tunnel://{HOST}"
Behaviour = Callable[[WebSocketChannel], Awaitable[None]]


@dataclass
class WsServer:
    """A minimal WebSocket server on ``tunnel.serve``: ``behaviours[path]`` runs per socket."""

    behaviours: dict[str, Behaviour]
    choose: Callable[[list[str]], str | None] = lambda offered: None
    accept_header: Callable[[str], str] = accept_token
    channels: list[WebSocketChannel] = field(default_factory=list)
    requests: list[tunnel.Request] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def __call__(self, request: tunnel.Request) -> tunnel.Response:
        self.requests.append(request)
        behaviour = self.behaviours.get(request.path)
        if behaviour is None or not request.upgrade:
            return tunnel.Response(
                404, [("content-type", "text/plain")], b"no socket at " + request.path.encode()
            )
        key = request.header("sec-websocket-key") or ""
        headers = [
            ("upgrade", "websocket"),
            ("connection", "Upgrade"),
            ("sec-websocket-accept", self.accept_header(key)),
        ]
        chosen = self.choose(split_tokens(request.header_values("sec-websocket-protocol")))
        if chosen is not None:
            headers.append(("sec-websocket-protocol", chosen))
        channel = WebSocketChannel(client=False)
        self.channels.append(channel)
        channel.start(aiter(request.stream()))

        async def run() -> None:
            try:
                await behaviour(channel)
            except WebSocketClosed:
                pass
            finally:
                await channel.close()

        task = asyncio.get_running_loop().create_task(run())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return tunnel.Response(101, headers, self._body(channel))

    @staticmethod
    async def _body(channel: WebSocketChannel) -> AsyncIterator[bytes]:
        try:
            async for data in channel.outbound.chunks():
                yield data
        finally:
            channel.stop()  # the body's end ends the stream both ways


async def echo(channel: WebSocketChannel) -> None:
    while True:
        message = await channel.receive()
        if message.kind == "text":
            assert isinstance(message.data, str)
            if message.data.startswith("close:"):
                _, code, reason = message.data.split(":", 2)
                await channel.close(int(code), reason)
                return
            await channel.send_text(message.data)
        else:
            assert isinstance(message.data, bytes)
            await channel.send_bytes(message.data)


@asynccontextmanager
async def ws_server(nats_server: NatsServer, server: WsServer, **kwargs: object) -> AsyncIterator[Peers]:
    async with connect_peers(nats_server) as peers, serving(peers.server_nc, HOST, server, **kwargs):
        try:
            yield peers
        finally:
            for task in list(server.tasks):
                task.cancel()


async def test_echo_text_binary_and_a_mebibyte(nats_server: NatsServer) -> None:
    server = WsServer({"/echo": echo})
    async with ws_server(nats_server, server) as peers:
        ws = await websocket_connect(
            peers.caller_nc, f"{URL}/echo?x=1", headers=[("origin", "http://a.example")]
        )
        async with ws:
            await ws.send_text("hello")
            assert await ws.receive() == WebSocketMessage("text", "hello")
            await ws.send_bytes(b"\x00\x01")
            assert await ws.receive() == WebSocketMessage("binary", b"\x00\x01")
            big = bytes(range(256)) * (4 * KiB)  # 1 MiB
            await ws.send_bytes(big)
            assert await ws.receive() == WebSocketMessage("binary", big)
            text = "é" * (MiB // 2)
            await ws.send_text(text)
            assert await ws.receive() == WebSocketMessage("text", text)
        assert ws.close_code == 1000
        request = server.requests[0]
        assert request.url == "/echo?x=1"
        assert request.header("origin") == "http://a.example"
        assert request.header("upgrade") == "websocket"
        assert request.header("sec-websocket-version") == "13"
        await wait_until(lambda: not server.tasks)
        assert peers.errors == []


async def test_the_callers_copies_of_handshake_headers_are_dropped(nats_server: NatsServer) -> None:
    """A proxy passing its client's headers on must not send a second key or offer."""
    server = WsServer({"/echo": echo}, choose=lambda offered: offered[0] if offered else None)
    client_headers = [
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("sec-websocket-version", "8"),
        ("Sec-WebSocket-Protocol", "smuggled"),
        ("sec-websocket-extensions", "permessage-deflate"),
        ("Connection", "keep-alive"),
        ("cookie", "a=1"),
    ]
    async with ws_server(nats_server, server) as peers:
        async with await websocket_connect(
            peers.caller_nc, f"{URL}/echo", subprotocols=["mine"], headers=client_headers
        ) as ws:
            assert ws.subprotocol == "mine"
        request = server.requests[0]
        for name in ("sec-websocket-key", "sec-websocket-version", "sec-websocket-protocol", "connection"):
            assert len(request.header_values(name)) == 1, name
        assert request.header("sec-websocket-version") == "13"
        assert request.header("sec-websocket-protocol") == "mine"
        assert request.header_values("sec-websocket-extensions") == []
        assert request.header("cookie") == "a=1"


async def test_a_thousand_small_messages_each_way(nats_server: NatsServer) -> None:
    async with ws_server(nats_server, WsServer({"/echo": echo})) as peers:
        async with await websocket_connect(peers.caller_nc, f"{URL}/echo") as ws:

            async def send_all() -> None:
                for i in range(1000):
                    await ws.send_text(f"m{i}")

            sender = asyncio.create_task(send_all())
            got = [(await ws.receive()).data for _ in range(1000)]
            await sender
        assert got == [f"m{i}" for i in range(1000)]


async def test_pings_both_ways(nats_server: NatsServer) -> None:
    server_pinged = asyncio.Event()

    async def pinger(channel: WebSocketChannel) -> None:
        await channel.ping(b"from server")
        await wait_until(lambda: channel.proto.pongs_received == 1)
        assert channel.proto.last_pong == b"from server"
        server_pinged.set()
        await echo(channel)

    async with (
        ws_server(nats_server, WsServer({"/ping": pinger})) as peers,
        await websocket_connect(peers.caller_nc, f"{URL}/ping") as ws,
    ):
        await ws.ping(b"from client")
        # The client answers the server's ping by itself (its reader runs without receive()).
        await asyncio.wait_for(server_pinged.wait(), EVENT_TIMEOUT)
        await wait_until(lambda: ws.pongs_received == 1)
        await ws.send_text("still fine")
        assert (await ws.receive()).data == "still fine"


async def test_subprotocol_negotiation(nats_server: NatsServer) -> None:
    server = WsServer({"/hmr": echo}, choose=lambda offered: "vite-hmr" if "vite-hmr" in offered else None)
    async with ws_server(nats_server, server) as peers:
        async with await websocket_connect(
            peers.caller_nc, f"{URL}/hmr", subprotocols=["x", "vite-hmr"]
        ) as ws:
            assert ws.subprotocol == "vite-hmr"
        assert server.requests[-1].header("sec-websocket-protocol") == "x, vite-hmr"
        async with await websocket_connect(peers.caller_nc, f"{URL}/hmr") as ws:
            assert ws.subprotocol is None
        assert server.requests[-1].header("sec-websocket-protocol") is None


async def test_a_subprotocol_that_was_not_offered_is_refused(nats_server: NatsServer) -> None:
    server = WsServer({"/hmr": echo}, choose=lambda offered: "sneaky")
    async with ws_server(nats_server, server) as peers:
        with pytest.raises(WebSocketHandshakeError, match="not offered") as info:
            await websocket_connect(peers.caller_nc, f"{URL}/hmr", subprotocols=["vite-hmr"])
        assert info.value.status == 101
        await wait_until(lambda: all(c.reader_done.is_set() for c in server.channels))


async def test_a_wrong_accept_token_is_refused(nats_server: NatsServer) -> None:
    server = WsServer({"/echo": echo}, accept_header=lambda key: accept_token("AAAAAAAAAAAAAAAAAAAAAA=="))
    async with ws_server(nats_server, server) as peers:
        with pytest.raises(WebSocketHandshakeError, match="Sec-WebSocket-Accept") as info:
            await websocket_connect(peers.caller_nc, f"{URL}/echo")
        assert info.value.status == 101


async def test_close_from_the_client_with_code_and_reason(nats_server: NatsServer) -> None:
    seen: list[tuple[int, str]] = []

    async def recorder(channel: WebSocketChannel) -> None:
        try:
            await channel.receive()
        except WebSocketClosed as exc:
            seen.append((exc.code, exc.reason))

    async with ws_server(nats_server, WsServer({"/rec": recorder})) as peers:
        ws = await websocket_connect(peers.caller_nc, f"{URL}/rec")
        await ws.close(4100, "client done")
        await wait_until(lambda: seen)
        assert seen == [(4100, "client done")]
        assert (ws.close_code, ws.close_reason) == (4100, "client done")
        with pytest.raises(WebSocketClosed):
            await ws.receive()


async def test_close_from_the_server_with_code_and_reason(nats_server: NatsServer) -> None:
    async with ws_server(nats_server, WsServer({"/echo": echo})) as peers:
        ws = await websocket_connect(peers.caller_nc, f"{URL}/echo")
        await ws.send_text("before")
        await ws.send_text("close:4200:server done")
        assert (await ws.receive()).data == "before"
        with pytest.raises(WebSocketClosed) as info:
            await ws.receive()
        assert (info.value.code, info.value.reason) == (4200, "server done")
        assert info.value.__cause__ is None
        with pytest.raises(WebSocketClosed):
            await ws.send_text("too late")
        await ws.close()
        assert ws.close_code == 4200

        # A normal close (1000) ends ``async for`` quietly.
        ws = await websocket_connect(peers.caller_nc, f"{URL}/echo")
        await ws.send_text("one")
        await ws.send_text("close:1000:")
        assert [m.data async for m in ws] == ["one"]
        await ws.close()


async def test_the_server_dying_mid_socket_is_1006_within_the_idle_timeout(nats_server: NatsServer) -> None:
    async with ws_server(nats_server, WsServer({"/echo": echo})) as peers:
        ws = await websocket_connect(peers.caller_nc, f"{URL}/echo", idle_timeout=1)
        await ws.send_text("alive")
        assert (await ws.receive()).data == "alive"
        await peers.server_nc.close()  # the serving side vanishes: no close frame, no end
        async with asyncio.timeout(EVENT_TIMEOUT):
            with pytest.raises(WebSocketClosed) as info:
                await ws.receive()
        assert info.value.code == 1006
        assert isinstance(info.value.__cause__, tunnel.TunnelError)
        assert ws.close_code == 1006
        await ws.close()


async def test_a_slow_reader_holds_bounded_memory_and_gets_every_byte(nats_server: NatsServer) -> None:
    total, size = 32 * MiB, 256 * KiB
    sent = hashlib.sha256()
    stalls = 0

    async def firehose(channel: WebSocketChannel) -> None:
        for i in range(total // size):
            piece = i.to_bytes(4, "big") * (size // 4)
            sent.update(piece)
            await channel.send_bytes(piece)
        await channel.close(1000, "all sent")

    server = WsServer({"/fire": firehose})
    async with ws_server(nats_server, server) as peers:
        # The window grows while the reader keeps up (between the slow reads): bounded by this.
        limits = tunnel.Limits(max_window=2 * tunnel.DEFAULT_WINDOW)
        client = tunnel.TunnelClient(peers.caller_nc, limits=limits)
        window = limits.effective_max_window
        ws = await websocket_connect(client, f"{URL}/fire")
        received = hashlib.sha256()
        count = 0
        peak = 0
        async for message in ws:
            assert isinstance(message.data, bytes)
            received.update(message.data)
            count += len(message.data)
            if count % (4 * MiB) == 0 and count < total:
                # Read slowly: let the server run until it is stuck behind flow control. Its
                # queue alone can fill for a moment while credit is left (a busy machine): stuck
                # means the caller also holds a good part of the window by then.
                await wait_until(
                    lambda: (
                        server_stalled(server.channels[0])
                        and ws.buffered + tunnel_buffered(ws) >= window // 4
                    ),
                    message="the server never ran ahead of the reader",
                )
                stalls += 1
                held = ws.buffered + tunnel_buffered(ws)
                peak = max(peak, held)
                assert held <= window + RECEIVE_HIGH_WATER + 2 * size, held
        assert (ws.close_code, ws.close_reason) == (1000, "all sent")
        await ws.close()
        await client.aclose()
    assert count == total
    assert received.digest() == sent.digest()
    assert stalls == 7
    assert peak >= window // 4, "the server really ran ahead of the reader"


async def test_sending_waits_for_a_slow_server_and_nothing_is_lost(nats_server: NatsServer) -> None:
    total, size = 32 * MiB, 256 * KiB
    release = asyncio.Event()
    got = hashlib.sha256()
    counted = [0]

    async def slow_sink(channel: WebSocketChannel) -> None:
        await release.wait()
        while True:
            message = await channel.receive()  # WebSocketClosed at the client's close
            assert isinstance(message.data, bytes)
            got.update(message.data)
            counted[0] += len(message.data)

    server = WsServer({"/sink": slow_sink})
    async with ws_server(nats_server, server) as peers:
        client = tunnel.TunnelClient(peers.caller_nc)
        window = client.limits.window
        ws = await websocket_connect(client, f"{URL}/sink")
        sent = hashlib.sha256()

        async def send_all() -> None:
            for i in range(total // size):
                piece = i.to_bytes(4, "big") * (size // 4)
                sent.update(piece)
                await ws.send_bytes(piece)

        sender = asyncio.create_task(send_all())
        outbound = ws._channel.outbound

        def server_held() -> int:
            if not server.channels or not server.requests:
                return 0
            return server.channels[0].buffered + sum(len(chunk) for chunk in server.requests[0]._chunks)

        # The sender is held back: its queue is full and the server holds what the window let
        # through (the queue alone can fill for a moment before the first bytes arrive).
        await wait_until(
            lambda: outbound.buffered >= outbound.high_water and server_held() > 0,
            message="the sender was never held back by the server",
        )
        assert not sender.done()
        assert outbound.buffered <= outbound.high_water + 2 * size
        held = server_held()
        assert 0 < held <= window + RECEIVE_HIGH_WATER + 2 * size, held
        release.set()
        await asyncio.wait_for(sender, 30)
        await ws.close()
        await wait_until(lambda: counted[0] == total)
        await client.aclose()
    assert got.digest() == sent.digest()


def server_stalled(channel: WebSocketChannel) -> bool:
    """The server's sends wait: its queue is full because the tunnel stopped taking bytes."""
    return channel.outbound.buffered >= channel.outbound.high_water


def tunnel_buffered(ws: TunnelWebSocket) -> int:
    """Bytes the tunnel client holds for this socket that the WebSocket reader has not pulled."""
    return sum(len(chunk) for chunk in ws._response._request.chunks)


async def test_a_refused_handshake_carries_status_headers_and_body(nats_server: NatsServer) -> None:
    async with ws_server(nats_server, WsServer({})) as peers:
        with pytest.raises(WebSocketHandshakeError) as info:
            await websocket_connect(peers.caller_nc, f"{URL}/nothing")
        assert info.value.status == 404
        assert info.value.body == b"no socket at /nothing"
        assert ("content-type", "text/plain") in info.value.headers


async def test_a_message_over_max_message_size_closes_with_1009(nats_server: NatsServer) -> None:
    async def big(channel: WebSocketChannel) -> None:
        await channel.send_bytes(b"x" * 2000)
        await channel.receive()

    server = WsServer({"/big": big})
    async with ws_server(nats_server, server) as peers:
        ws = await websocket_connect(peers.caller_nc, f"{URL}/big", max_message_size=1000)
        with pytest.raises(WebSocketClosed) as info:
            await ws.receive()
        assert info.value.code == 1009
        await wait_until(lambda: server.channels[0].close_code == 1009)
        await ws.close()


async def test_a_server_without_upgrades_raises_upgrade_unsupported(nats_server: NatsServer) -> None:
    config = tunnel.ServerConfig(fast_path=False)
    async with ws_server(nats_server, WsServer({"/echo": echo}), config=config) as peers:
        with pytest.raises(tunnel.UpgradeUnsupported):
            await websocket_connect(peers.caller_nc, f"{URL}/echo")


async def test_a_tunnel_client_and_prefix_are_accepted(nats_server: NatsServer) -> None:
    prefix = "custom.prefix"
    async with ws_server(nats_server, WsServer({"/echo": echo}), prefix=prefix) as peers:
        async with await websocket_connect(peers.caller_nc, f"{URL}/echo", prefix=prefix) as ws:
            await ws.send_text("via prefix")
            assert (await ws.receive()).data == "via prefix"
        async with (
            tunnel.TunnelClient(peers.caller_nc, prefix=prefix) as client,
            await websocket_connect(client, f"{URL}/echo") as ws,
        ):
            await ws.send_text("via client")
            assert (await ws.receive()).data == "via client"


def docs_section(title: str) -> str:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "tunnel.md").read_text()
    return docs.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


async def test_the_docs_example_runs_and_prints_what_the_docs_say(nats_server: NatsServer) -> None:
    """docs/tunnel.md's WebSockets script, run as a separate process against this nats-server."""
    section = docs_section("WebSockets")
    script = section.split("```python\n", 1)[1].split("```", 1)[0]
    expected = section.split("```text\n", 1)[1].split("```", 1)[0]
    assert "nats://127.0.0.1:4222" in script
    script = script.replace("nats://127.0.0.1:4222", nats_server.url)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(30):
        stdout, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()
    assert stdout.decode() == expected
