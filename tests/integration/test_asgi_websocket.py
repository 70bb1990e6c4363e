"""The ASGI ``websocket`` scope of ``tunnel.asgi``: real Starlette and FastAPI apps behind
``serve_asgi``, called with ``tunnel.websocket.websocket_connect`` through a real nats-server.

Echo, subprotocol selection, close codes from the app and from the client, a refusal before
accept (403), an app that fails (500 before accept, 1011 after), the scope the app sees, and
that a plain GET of a WebSocket route keeps its HTTP behaviour.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi import WebSocket as FastAPIWebSocket
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

import tunnel
from cli.nats_server import NatsServer
from tests.helpers import wait_until
from tests.integration.tunnel_harness import EVENT_TIMEOUT, Peers, connect_peers
from tunnel.asgi import AsgiTunnelServer, serve_asgi
from tunnel.websocket import WebSocketClosed, WebSocketHandshakeError, websocket_connect

HOST = "desk.example"
URL = f"tunnel://{HOST}"


class Seen:
    """What the apps observed, for assertions from the test."""

    def __init__(self) -> None:
        self.scopes: list[dict[str, Any]] = []
        self.disconnects: list[tuple[int, str]] = []
        self.send_after_close: list[BaseException] = []
        self.disconnected = asyncio.Event()


SEEN = Seen()


async def ws_echo(ws: WebSocket) -> None:
    SEEN.scopes.append(dict(ws.scope))
    await ws.accept(headers=[(b"x-echo", b"yes")])
    try:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                SEEN.disconnects.append((message["code"], message.get("reason") or ""))
                SEEN.disconnected.set()
                return
            if message.get("text") is not None:
                text = message["text"]
                if text.startswith("close:"):
                    _, code, reason = text.split(":", 2)
                    await ws.close(int(code), reason)
                    return
                if text == "boom":
                    raise RuntimeError("the app failed")
                await ws.send_text(text)
            else:
                await ws.send_bytes(message["bytes"])
    except WebSocketDisconnect as exc:  # pragma: no cover - receive() above returns the message
        SEEN.disconnects.append((exc.code, exc.reason or ""))
        SEEN.disconnected.set()


async def ws_subprotocol(ws: WebSocket) -> None:
    offered = ws.scope["subprotocols"]
    chosen = "vite-hmr" if "vite-hmr" in offered else None
    await ws.accept(subprotocol=chosen)
    await ws.send_text(f"chose {chosen}")
    await ws.close()


async def ws_refuse(ws: WebSocket) -> None:
    await ws.close(code=1008)


async def ws_deny(ws: WebSocket) -> None:
    response = JSONResponse({"error": "who are you"}, status_code=401, headers={"www-authenticate": "Bearer"})
    await ws.send_denial_response(response)


async def ws_fail_before_accept(ws: WebSocket) -> None:
    raise RuntimeError("no accept for you")


async def ws_send_after_client_close(ws: WebSocket) -> None:
    await ws.accept()
    try:
        await ws.receive_text()
    except WebSocketDisconnect as exc:
        SEEN.disconnects.append((exc.code, exc.reason or ""))
    try:
        await ws.send_text("too late")
    except BaseException as exc:  # Starlette turns the adapter's OSError into WebSocketDisconnect
        SEEN.send_after_close.append(exc)
    SEEN.disconnected.set()


starlette_app = Starlette(
    routes=[
        WebSocketRoute("/ws", ws_echo),
        WebSocketRoute("/sub", ws_subprotocol),
        WebSocketRoute("/refuse", ws_refuse),
        WebSocketRoute("/fail", ws_fail_before_accept),
        WebSocketRoute("/deny", ws_deny),
        WebSocketRoute("/late", ws_send_after_client_close),
    ]
)

fastapi_app = FastAPI()


@fastapi_app.websocket("/items/{item_id}/ws")
async def fastapi_ws(websocket: FastAPIWebSocket, item_id: str, q: str = "") -> None:
    await websocket.accept()
    async for text in websocket.iter_text():
        await websocket.send_json({"item": item_id, "q": q, "text": text})


@pytest.fixture(autouse=True)
def fresh_seen() -> None:
    global SEEN
    SEEN = Seen()


@asynccontextmanager
async def served(
    server: NatsServer, app: Any, **kwargs: Any
) -> AsyncIterator[tuple[Peers, AsgiTunnelServer]]:
    async with connect_peers(server) as peers:
        asgi_server = await serve_asgi(peers.server_nc, HOST, app, **kwargs)
        try:
            yield peers, asgi_server
        finally:
            await asgi_server.close(timeout=2.0)
        assert peers.errors == []


async def test_starlette_echo_text_and_binary_with_the_websocket_scope(nats_server: NatsServer) -> None:
    async with served(nats_server, starlette_app) as (peers, _):
        ws = await websocket_connect(
            peers.caller_nc,
            f"{URL}/ws?room=1",
            headers=[("origin", "http://127.0.0.1:5173"), ("x-forwarded-proto", "https")],
        )
        async with ws:
            assert ("x-echo", "yes") in ws.response_headers
            assert ws.subprotocol is None
            await ws.send_text("héllo")
            assert (await ws.receive()).data == "héllo"
            await ws.send_bytes(b"\x00\x01\xff")
            message = await ws.receive()
            assert (message.kind, message.data) == ("binary", b"\x00\x01\xff")
        assert ws.close_code == 1000
        await asyncio.wait_for(SEEN.disconnected.wait(), EVENT_TIMEOUT)
    assert SEEN.disconnects == [(1000, "")]
    scope = SEEN.scopes[0]
    assert scope["type"] == "websocket"
    assert scope["asgi"] == {"version": "3.0", "spec_version": "2.4"}
    assert scope["scheme"] == "wss"  # from X-Forwarded-Proto: https
    assert scope["path"] == "/ws"
    assert scope["raw_path"] == b"/ws"
    assert scope["query_string"] == b"room=1"
    assert scope["subprotocols"] == []
    assert scope["http_version"] == "1.1"
    assert "method" not in scope
    assert "websocket.http.response" in scope["extensions"]
    headers = dict(scope["headers"])
    assert headers[b"origin"] == b"http://127.0.0.1:5173"
    assert headers[b"upgrade"] == b"websocket"
    assert headers[b"host"] == HOST.encode()


async def test_plain_scheme_is_ws(nats_server: NatsServer) -> None:
    async with (
        served(nats_server, starlette_app) as (peers, _),
        await websocket_connect(peers.caller_nc, f"{URL}/ws") as ws,
    ):
        await ws.send_text("x")
        await ws.receive()
    assert SEEN.scopes[0]["scheme"] == "ws"


async def test_fastapi_path_and_query_parameters(nats_server: NatsServer) -> None:
    async with (
        served(nats_server, fastapi_app) as (peers, _),
        await websocket_connect(peers.caller_nc, f"{URL}/items/42/ws?q=find") as ws,
    ):
        await ws.send_text("hi")
        message = await ws.receive()
        assert message.kind == "text"
        assert message.data == '{"item":"42","q":"find","text":"hi"}'


async def test_subprotocol_selection(nats_server: NatsServer) -> None:
    async with served(nats_server, starlette_app) as (peers, _):
        ws = await websocket_connect(peers.caller_nc, f"{URL}/sub", subprotocols=["other", "vite-hmr"])
        assert ws.subprotocol == "vite-hmr"
        assert ("sec-websocket-protocol", "vite-hmr") in ws.response_headers
        assert [m.data async for m in ws] == ["chose vite-hmr"]  # ends quietly on the app's 1000
        assert ws.close_code == 1000
        await ws.close()
        ws = await websocket_connect(peers.caller_nc, f"{URL}/sub", subprotocols=["other"])
        assert ws.subprotocol is None
        assert [m.data async for m in ws] == ["chose None"]
        await ws.close()


async def test_close_code_and_reason_from_the_app(nats_server: NatsServer) -> None:
    async with served(nats_server, starlette_app) as (peers, _):
        ws = await websocket_connect(peers.caller_nc, f"{URL}/ws")
        await ws.send_text("close:4001:app says bye")
        with pytest.raises(WebSocketClosed) as info:
            await ws.receive()
        assert (info.value.code, info.value.reason) == (4001, "app says bye")
        with pytest.raises(WebSocketClosed):
            async for _ in ws:  # not 1000/1001: iteration raises too
                pass
        await ws.close()
        assert (ws.close_code, ws.close_reason) == (4001, "app says bye")


async def test_close_code_and_reason_from_the_client(nats_server: NatsServer) -> None:
    async with served(nats_server, starlette_app) as (peers, _):
        ws = await websocket_connect(peers.caller_nc, f"{URL}/ws")
        await ws.send_text("ping")
        assert (await ws.receive()).data == "ping"
        await ws.close(4002, "client leaves")
        await asyncio.wait_for(SEEN.disconnected.wait(), EVENT_TIMEOUT)
        assert SEEN.disconnects == [(4002, "client leaves")]
        assert ws.close_code == 4002  # the app's echo of our close frame
        with pytest.raises(WebSocketClosed):
            await ws.send_text("after close")


async def test_send_after_the_client_closed_raises_in_the_app(nats_server: NatsServer) -> None:
    async with served(nats_server, starlette_app) as (peers, _):
        ws = await websocket_connect(peers.caller_nc, f"{URL}/late")
        await ws.close(1001)
        await asyncio.wait_for(SEEN.disconnected.wait(), EVENT_TIMEOUT)
    assert SEEN.disconnects == [(1001, "")]
    assert len(SEEN.send_after_close) == 1
    assert isinstance(SEEN.send_after_close[0], WebSocketDisconnect | OSError)


async def test_close_before_accept_is_403(nats_server: NatsServer) -> None:
    async with served(nats_server, starlette_app) as (peers, _):
        with pytest.raises(WebSocketHandshakeError) as info:
            await websocket_connect(peers.caller_nc, f"{URL}/refuse")
        assert info.value.status == 403


async def test_a_denial_response_reaches_the_client(nats_server: NatsServer) -> None:
    """The ``websocket.http.response`` extension: the app refuses with its own HTTP response."""
    async with served(nats_server, starlette_app) as (peers, asgi_server):
        with pytest.raises(WebSocketHandshakeError) as info:
            await websocket_connect(peers.caller_nc, f"{URL}/deny")
        assert info.value.status == 401
        assert info.value.body == b'{"error":"who are you"}'
        assert ("www-authenticate", "Bearer") in info.value.headers
        assert ("content-type", "application/json") in info.value.headers
        await wait_until(lambda: asgi_server.asgi.active == 0)


async def test_unknown_route_is_refused(nats_server: NatsServer) -> None:
    """Starlette closes an unmatched WebSocket before accepting: 403, like under uvicorn."""
    async with served(nats_server, starlette_app) as (peers, _):
        with pytest.raises(WebSocketHandshakeError) as info:
            await websocket_connect(peers.caller_nc, f"{URL}/nowhere")
        assert info.value.status == 403


async def test_app_failing_before_accept_is_500(nats_server: NatsServer) -> None:
    async with served(nats_server, starlette_app) as (peers, _):
        with pytest.raises(WebSocketHandshakeError) as info:
            await websocket_connect(peers.caller_nc, f"{URL}/fail")
        assert info.value.status == 500
        assert info.value.body == b"Internal Server Error"


async def test_app_failing_after_accept_closes_1011(nats_server: NatsServer) -> None:
    async with served(nats_server, starlette_app) as (peers, _):
        ws = await websocket_connect(peers.caller_nc, f"{URL}/ws")
        await ws.send_text("boom")
        with pytest.raises(WebSocketClosed) as info:
            await ws.receive()
        assert info.value.code == 1011
        await ws.close()


async def test_plain_get_of_a_websocket_route_keeps_http_behaviour(nats_server: NatsServer) -> None:
    async with served(nats_server, starlette_app) as (peers, _):
        resp = await tunnel.fetch(peers.caller_nc, f"{URL}/ws")
        async with resp:
            assert resp.status == 404
            assert not resp.upgraded
        # Upgrade headers without an upgraded stream are plain HTTP too.
        headers = [("upgrade", "websocket"), ("connection", "Upgrade"), ("sec-websocket-version", "13")]
        resp = await tunnel.fetch(peers.caller_nc, f"{URL}/ws", headers=headers)
        async with resp:
            assert resp.status == 404


async def test_the_client_vanishing_tells_the_app_1006(nats_server: NatsServer) -> None:
    async with served(nats_server, starlette_app) as (peers, asgi_server):
        ws = await websocket_connect(peers.caller_nc, f"{URL}/ws")
        await ws.send_text("hi")
        assert (await ws.receive()).data == "hi"
        await ws._response.aclose()  # abort the tunnel stream: no close frame
        await asyncio.wait_for(SEEN.disconnected.wait(), EVENT_TIMEOUT)
        assert SEEN.disconnects == [(1006, "")]
        await wait_until(lambda: asgi_server.asgi.active == 0)
        await ws.close()


async def test_closing_the_server_says_going_away_to_open_sockets(nats_server: NatsServer) -> None:
    async with connect_peers(nats_server) as peers:
        asgi_server = await serve_asgi(peers.server_nc, HOST, starlette_app)
        ws = await websocket_connect(peers.caller_nc, f"{URL}/ws")
        await ws.send_text("hi")
        assert (await ws.receive()).data == "hi"
        assert asgi_server.asgi.websockets == 1
        await asgi_server.close(timeout=30)
        # The app heard the client's echo of 1001 and returned: nothing was cut off.
        assert SEEN.disconnects == [(1001, "server shutting down")]
        assert asgi_server.asgi.active == 0
        assert asgi_server.asgi.websockets == 0
        with pytest.raises(WebSocketClosed) as info:
            await ws.receive()
        assert (info.value.code, info.value.reason) == (1001, "server shutting down")
        assert [m async for m in ws] == []  # 1001 ends iteration quietly
        await ws.close()
        assert peers.errors == []


async def test_a_mebibyte_and_a_thousand_messages_through_starlette(nats_server: NatsServer) -> None:
    async with (
        served(nats_server, starlette_app) as (peers, _),
        await websocket_connect(peers.caller_nc, f"{URL}/ws") as ws,
    ):
        big = bytes(range(256)) * 4096
        await ws.send_bytes(big)
        assert (await ws.receive()).data == big

        async def send_all() -> None:
            for i in range(1000):
                await ws.send_text(str(i))

        sender = asyncio.create_task(send_all())
        assert [(await ws.receive()).data for _ in range(1000)] == [str(i) for i in range(1000)]
        await sender


async def test_the_app_task_dying_mid_socket_is_1006_for_the_client(nats_server: NatsServer) -> None:
    async with served(nats_server, starlette_app) as (peers, asgi_server):
        ws = await websocket_connect(peers.caller_nc, f"{URL}/ws", idle_timeout=1)
        await ws.send_text("hi")
        assert (await ws.receive()).data == "hi"
        (task,) = asgi_server.asgi._tasks
        task.cancel()
        async with asyncio.timeout(EVENT_TIMEOUT):
            with pytest.raises(WebSocketClosed) as info:
                await ws.receive()
        assert info.value.code == 1006
        await ws.close()
        await wait_until(lambda: asgi_server.asgi.websockets == 0)


async def test_a_long_close_reason_is_cut_and_a_bad_close_code_is_1011(nats_server: NatsServer) -> None:
    """An app closing with a reason longer than a close frame holds (say ``str(exc)``) still closes
    with its code, the reason cut to 123 bytes of UTF-8; a code no endpoint may send fails the app
    (ValueError), which closes with 1011: the client gets a close frame either way, never 1006."""
    async with served(nats_server, starlette_app) as (peers, _):
        ws = await websocket_connect(peers.caller_nc, f"{URL}/ws")
        await ws.send_text("close:4001:" + "é" * 100)  # 200 bytes of UTF-8
        with pytest.raises(WebSocketClosed) as info:
            await ws.receive()
        assert (info.value.code, info.value.reason) == (4001, "é" * 61)
        await ws.close()
        ws = await websocket_connect(peers.caller_nc, f"{URL}/ws")
        await ws.send_text("close:1006:not on the wire")
        with pytest.raises(WebSocketClosed) as info:
            await ws.receive()
        assert info.value.code == 1011
        await ws.close()
