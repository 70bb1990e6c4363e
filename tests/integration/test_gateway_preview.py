"""The gateway's preview route (#17): a user's own desktop dev server in a browser, HTTP and WebSocket.

Everything real: an operator-mode nats-server, the gateway's aiohttp app, desktops connected with
credentials the gateway minted (``POST /api/links/session``), each serving its tunnel host with
linkd's own routes and ``--upstream`` proxy in front of an aiohttp dev server (HTTP routes and a
``vite-hmr`` WebSocket). The "browser" is an aiohttp client whose resolver sends every name to
loopback (as browsers do for ``*.localhost``) and whose cookie jar keeps host-only cookies per
host, as a browser's does. What the gateway sent is recorded at each desktop's tunnel handler.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from wsproto import ConnectionType as WsType
from wsproto.connection import Connection as WsConnection
from wsproto.events import BytesMessage, CloseConnection

import tunnel
from linkd.routes import LinkRoutes
from linkd.run_events import MemoryEventSink
from linkd.runs import RunManager
from linkd.upstream import UpstreamProxy
from studio_gateway.preview.labels import label_for_user
from studio_gateway.preview.service import PREVIEW, TICKET_PATH
from tests.helpers import NatsServerFactory, wait_until
from tests.integration.gateway_harness import (
    EVENT_TIMEOUT,
    Gateway,
    OperatorServer,
    connect_daemon,
    creds_auth,
    running_gateway,
    start_operator_server,
)
from tunnel.websocket import accept_token, new_key

pytestmark = pytest.mark.timeout(60)

DOMAIN = "preview.localhost"
MiB = 1024 * 1024


# ------------------------------------------------------------------ the desktop: a dev server behind linkd


@dataclass
class DevServer:
    """A local aiohttp dev server: pages, a streamed upload and download, a ``vite-hmr`` socket."""

    first_piece: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    ws_seen: list[dict[str, Any]] = field(default_factory=list)
    ws_closes: list[tuple[int | None, str]] = field(default_factory=list)
    runner: web.AppRunner | None = None
    url: str = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self.page)
        app.router.add_route("*", "/page/{tail:.*}", self.page)
        app.router.add_post("/upload", self.upload)
        app.router.add_get("/stream", self.stream)
        app.router.add_get("/ws/{tail:.*}", self.websocket)
        app.router.add_get("/forbidden", self.forbidden)
        return app

    async def start(self) -> None:
        self.runner = web.AppRunner(self.app(), handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert isinstance(server, asyncio.Server)
        self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"

    async def page(self, request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response(
            {"method": request.method, "path": request.raw_path, "body": body.decode()},
            headers={"X-Dev": "yes"},
        )

    async def upload(self, request: web.Request) -> web.Response:
        digest, size = hashlib.sha256(), 0
        async for piece in request.content.iter_any():
            digest.update(piece)
            size += len(piece)
            self.first_piece.set()
        return web.json_response({"size": size, "sha256": digest.hexdigest()})

    async def stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        await response.write(b"first|")
        await self.release.wait()  # only once the browser has read the first part
        await response.write(b"second")
        await response.write_eof()
        return response

    async def forbidden(self, request: web.Request) -> web.Response:
        return web.Response(status=403, text="origin not allowed", headers={"X-Why": "origin"})

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        self.ws_seen.append({"path": request.raw_path, "headers": dict(request.headers)})
        ws = web.WebSocketResponse(protocols=("vite-hmr",), max_msg_size=4 * MiB)
        await ws.prepare(request)
        while True:
            msg = await ws.receive()
            if msg.type is aiohttp.WSMsgType.TEXT:
                if msg.data == "close-me":
                    await ws.close(code=4001, message=b"bye from the desktop")
                    self.ws_closes.append((4001, "sent"))
                    break
                if msg.data == "die":
                    assert request.transport is not None
                    request.transport.abort()  # the dev server dies mid-socket
                    return ws
                await ws.send_str(msg.data)
            elif msg.type is aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
            else:
                if msg.type is aiohttp.WSMsgType.CLOSE:
                    self.ws_closes.append((msg.data, msg.extra))
                break
        return ws

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@dataclass
class Desktop:
    """One user's desktop: linkd's routes (``--upstream`` the dev server) on its tunnel host."""

    user: str
    hostname: str
    dev: DevServer
    seen: list[tunnel.Request] = field(default_factory=list)


# Tunnel answers a test installs for one path (a desktop misbehaving in that test's way).
RAW_HANDLERS: dict[str, Any] = {}


def raw_answers(request: tunnel.Request) -> tunnel.Response | None:
    """Answers the tunnel handler gives itself (not through linkd's proxy, which filters)."""
    if request.path in RAW_HANDLERS:
        answer: tunnel.Response = RAW_HANDLERS[request.path](request)
        return answer
    if request.path == "/raw-headers":
        return tunnel.Response(
            200,
            [
                ("Content-Type", "text/plain"),
                ("Connection", "X-Bad"),
                ("X-Bad", "hop"),
                ("Keep-Alive", "timeout=5"),
                ("Set-Cookie", "natslink_preview=forged-by-the-desktop; Path=/"),
                ("Set-Cookie", "app=1; Path=/"),
            ],
            b"raw",
        )
    if request.path in ("/short-length", "/long-length"):
        # A desktop whose Content-Length disagrees with its body (the tunnel does not check).
        declared = "100" if request.path == "/short-length" else "4"

        async def lying() -> AsyncIterator[bytes]:
            yield b"ten bytes!"

        return tunnel.Response(200, [("Content-Type", "text/plain"), ("Content-Length", declared)], lying())
    if request.path == "/broken-body":

        async def body() -> AsyncIterator[bytes]:
            yield b"the first part"
            raise RuntimeError("the desktop broke off")

        return tunnel.Response(200, [("Content-Type", "text/plain")], body())
    return None


@asynccontextmanager
async def desktop_of(gw: Gateway, op: OperatorServer, user: str) -> AsyncIterator[Desktop]:
    session = await gw.ok_session(user)
    daemon = await connect_daemon(op.server.url, **creds_auth(session["credentials"]["creds"]))
    dev = DevServer()
    await dev.start()
    proxy = UpstreamProxy(dev.url)
    routes = LinkRoutes(RunManager({}, MemoryEventSink()), upstream=proxy)
    desktop = Desktop(user, session["tunnelHostname"], dev)

    async def handler(request: tunnel.Request) -> tunnel.Response:
        desktop.seen.append(request)
        return raw_answers(request) or await routes(request)

    server = await tunnel.serve(daemon.nc, desktop.hostname, handler)
    try:
        yield desktop
    finally:
        await server.close()
        await proxy.aclose()
        await dev.stop()
        await daemon.nc.close()


# ------------------------------------------------------------------ the browser


class LoopbackResolver(AbstractResolver):
    """Every name is 127.0.0.1, as browsers resolve ``*.localhost``."""

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[ResolveResult]:
        return [
            {
                "hostname": host,
                "host": "127.0.0.1",
                "port": port,
                "family": socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
        ]

    async def close(self) -> None:
        return None


def browser() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(resolver=LoopbackResolver()),
        cookie_jar=aiohttp.CookieJar(),
        timeout=aiohttp.ClientTimeout(total=EVENT_TIMEOUT * 2),
    )


@dataclass
class Stack:
    gw: Gateway
    desktops: dict[str, Desktop]
    exits: AsyncExitStack

    async def preview_url(self, user: str, path: str | None = None) -> dict[str, Any]:
        body = {} if path is None else {"path": path}
        resp = await self.gw.client.post("/api/links/preview", headers=self.gw.headers(user), json=body)
        assert resp.status == 200, await resp.text()
        assert resp.headers["Cache-Control"] == "no-store"
        payload: dict[str, Any] = await resp.json()
        return payload

    async def signed_in(self, user: str, path: str | None = None) -> tuple[aiohttp.ClientSession, str]:
        """A browser that opened ``user``'s preview link (landing on ``path``), and the origin."""
        link = await self.preview_url(user, path)
        session = browser()
        self.exits.push_async_callback(session.close)
        async with session.get(link["url"]) as resp:
            assert resp.status == 200, await resp.text()
        return session, link["origin"]


@pytest.fixture
def op(nats_server_factory: NatsServerFactory, tmp_path: Path) -> OperatorServer:
    return start_operator_server(nats_server_factory, tmp_path)


@asynccontextmanager
async def preview_stack(op: OperatorServer, *users: str, **env: str) -> AsyncIterator[Stack]:
    async with AsyncExitStack() as exits:
        gw = await exits.enter_async_context(
            running_gateway(op.env(**{"GATEWAY_PREVIEW_DOMAIN": DOMAIN, "RUNS_ENABLED": "false", **env}))
        )
        desktops = {user: await exits.enter_async_context(desktop_of(gw, op, user)) for user in users}
        yield Stack(gw, desktops, exits)


def origin_of(stack: Stack, user: str) -> str:
    port = stack.gw.client.port
    return f"http://{label_for_user(user)}.{DOMAIN}:{port}"


# ------------------------------------------------------------------ the ticket and the cookie


async def test_a_ticket_signs_the_browser_in_and_lands_on_the_asked_path(op: OperatorServer) -> None:
    async with preview_stack(op, "alice") as stack:
        link = await stack.preview_url("alice", "/page/landing?x=1")
        origin = origin_of(stack, "alice")
        assert link["origin"] == origin
        assert link["url"].startswith(f"{origin}{TICKET_PATH}?t=v1.")
        assert "alice" not in link["url"]  # the label says nothing about its user
        async with browser() as session:
            async with session.get(link["url"], allow_redirects=False) as resp:
                assert resp.status == 303
                assert resp.headers["Location"] == "/page/landing?x=1"
                cookie = resp.headers["Set-Cookie"]
                assert cookie.startswith("natslink_preview=v1.")
                for attribute in ("HttpOnly", "SameSite=Lax", "Path=/", "Max-Age=28800"):
                    assert attribute in cookie
                assert "Domain" not in cookie  # host-only: no other preview, no gateway API
                assert resp.headers["Referrer-Policy"] == "no-referrer"
            async with session.get(f"{origin}/page/landing?x=1") as resp:
                assert resp.status == 200
                assert await resp.json() == {"method": "GET", "path": "/page/landing?x=1", "body": ""}
                assert resp.headers["X-Dev"] == "yes"
            # The link is spent.
            async with session.get(link["url"], allow_redirects=False) as resp:
                assert resp.status == 401
                assert "already used" in await resp.text()


async def test_no_cookie_is_401_and_never_reaches_the_desktop(op: OperatorServer) -> None:
    async with preview_stack(op, "alice") as stack:
        async with browser() as session, session.get(f"{origin_of(stack, 'alice')}/page/x") as resp:
            assert resp.status == 401
            assert resp.content_type == "text/plain"
            assert "not signed in" in await resp.text()
        assert stack.desktops["alice"].seen == []


async def test_the_api_needs_a_token_and_previews_can_be_off(op: OperatorServer) -> None:
    async with preview_stack(op, "alice") as stack:
        resp = await stack.gw.client.post("/api/links/preview")
        assert resp.status == 401
        bad = await stack.gw.client.post(
            "/api/links/preview", headers=stack.gw.headers("alice"), json={"path": "//evil.example/"}
        )
        assert bad.status == 400
        assert (await bad.json())["error"]["code"] == "invalid_path"
    async with running_gateway(op.env()) as gw:
        resp = await gw.client.post("/api/links/preview", headers=gw.headers("alice"))
        assert resp.status == 503
        assert (await resp.json())["error"]["code"] == "preview_disabled"


# ------------------------------------------------------------------ isolation


async def test_one_user_never_reaches_another_users_desktop(op: OperatorServer) -> None:
    async with preview_stack(op, "alice", "bob") as stack:
        alice, alice_origin = await stack.signed_in("alice")
        bob_origin = origin_of(stack, "bob")
        # The cookie is host-only: Alice's browser has none for Bob's preview.
        async with alice.get(f"{bob_origin}/page/secret") as resp:
            assert resp.status == 401
        # Alice's cookie, copied by hand onto Bob's host: someone else's preview.
        cookie = alice.cookie_jar.filter_cookies(aiohttp.client.URL(alice_origin))["natslink_preview"].value
        async with browser() as other:
            headers = {"Cookie": f"natslink_preview={cookie}"}
            async with other.get(f"{bob_origin}/page/secret", headers=headers) as resp:
                assert resp.status == 403
                assert "another user" in await resp.text()
        # A ticket of Alice's replayed on Bob's host.
        link = await stack.preview_url("alice")
        async with browser() as other:
            bob_url = link["url"].replace(alice_origin, bob_origin)
            async with other.get(bob_url, allow_redirects=False) as resp:
                assert resp.status == 403
                assert "another desktop" in await resp.text()
        assert stack.desktops["bob"].seen == []
        # Alice's own preview works all along.
        async with alice.get(f"{alice_origin}/page/mine") as resp:
            assert resp.status == 200


async def test_forged_and_expired_tickets_and_cookies_are_refused(op: OperatorServer) -> None:
    async with preview_stack(op, "alice") as stack:
        origin = origin_of(stack, "alice")
        link = await stack.preview_url("alice")
        ticket = link["url"].split("?t=", 1)[1]
        version, payload, mac = ticket.split(".")
        service = stack.gw.client.server.app[PREVIEW]
        label = label_for_user("alice")
        expired = service.signer.ticket("alice", label, "/", now=time.time() - 120, ttl=60)
        other_key = type(service.signer)(b"another key, not the gateway's....")
        cases = {
            "forged": f"{version}.{payload}.{mac[::-1]}",
            "other-key": other_key.ticket("alice", label, "/", now=time.time(), ttl=60),
            "a cookie": service.signer.cookie("alice", label, now=time.time(), ttl=60),
            "expired": expired,
            "empty": "",
        }
        async with browser() as session:
            for name, bad in cases.items():
                async with session.get(f"{origin}{TICKET_PATH}?t={bad}", allow_redirects=False) as resp:
                    assert resp.status == 401, name
                    assert "Set-Cookie" not in resp.headers, name
            cookie = service.signer.cookie("alice", label, now=time.time(), ttl=60)
            version, payload, mac = cookie.split(".")
            bad_cookies = {
                "forged": f"{version}.{payload}.{mac[::-1]}",
                "other-key": other_key.cookie("alice", label, now=time.time(), ttl=60),
                "a ticket": ticket,
                "expired": service.signer.cookie("alice", label, now=1.0, ttl=60),
            }
            for name, bad in bad_cookies.items():
                async with session.get(
                    f"{origin}/page/x", headers={"Cookie": f"natslink_preview={bad}"}
                ) as resp:
                    assert resp.status == 401, name
        assert stack.desktops["alice"].seen == []


async def test_preview_hosts_never_reach_the_gateway_api(op: OperatorServer) -> None:
    async with preview_stack(op, "alice") as stack:
        alice, origin = await stack.signed_in("alice")
        port = stack.gw.client.port
        # Unknown names under the preview domain are no preview and no API.
        async with alice.get(f"http://junk.{DOMAIN}:{port}/healthz") as resp:
            assert resp.status == 404
            assert resp.content_type == "text/plain"
        # The domain itself is another origin than every preview: the API may live there.
        async with alice.get(f"http://{DOMAIN}:{port}/healthz") as resp:
            assert (await resp.json())["status"] == "ok"
        # On a preview host, /healthz is the dev server's path, not the gateway's route ...
        async with alice.get(f"{origin}/page/healthz") as resp:
            assert (await resp.json())["path"] == "/page/healthz"
        # ... and the daemon's own routes are refused before the tunnel.
        for path in ("/api/links/status", "/api/links%2Fstatus", "/API/links/status"):
            async with alice.get(f"{origin}{path}") as resp:
                assert resp.status == 404, path
        # The absolute form (a request to a proxy) is no way around that check either.
        cookie = alice.cookie_jar.filter_cookies(aiohttp.client.URL(origin))["natslink_preview"].value
        for target in (f"{origin}/api/links/status", f"{origin}/page/x"):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                f"GET {target} HTTP/1.1\r\nHost: {origin.removeprefix('http://')}\r\n"
                f"Cookie: natslink_preview={cookie}\r\nConnection: close\r\n\r\n".encode("ascii")
            )
            answer = await asyncio.wait_for(reader.read(), EVENT_TIMEOUT)
            writer.close()
            assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
        assert all(not r.path.lower().startswith("/api/links") for r in stack.desktops["alice"].seen)
        assert all(r.url.startswith("/") for r in stack.desktops["alice"].seen)
        # Another preview's page may not call this one.
        sibling = origin_of(stack, "bob")
        async with alice.post(f"{origin}/page/x", headers={"Origin": sibling}, data=b"x") as resp:
            assert resp.status == 403


# ------------------------------------------------------------------ HTTP through the preview


async def test_get_and_post_stream_both_ways(op: OperatorServer) -> None:
    async with preview_stack(op, "alice") as stack:
        alice, origin = await stack.signed_in("alice")
        dev = stack.desktops["alice"].dev
        async with alice.post(f"{origin}/page/form?y=2", data=b"name=value") as resp:
            assert await resp.json() == {"method": "POST", "path": "/page/form?y=2", "body": "name=value"}

        # Upload: the second piece is only produced once the dev server has the first.
        piece = b"u" * (256 * 1024)

        async def upload() -> AsyncIterator[bytes]:
            yield piece
            await asyncio.wait_for(dev.first_piece.wait(), EVENT_TIMEOUT)
            for _ in range(7):
                yield piece

        async with alice.post(f"{origin}/upload", data=upload()) as resp:
            assert resp.status == 200
            assert await resp.json() == {
                "size": 8 * len(piece),
                "sha256": hashlib.sha256(piece * 8).hexdigest(),
            }

        # Download: the dev server writes its second part only after the browser read the first.
        async with alice.get(f"{origin}/stream") as resp:
            assert resp.status == 200
            assert await resp.content.readexactly(len(b"first|")) == b"first|"
            dev.release.set()
            assert await resp.content.read() == b"second"


async def test_what_the_desktop_gets_and_what_the_browser_gets_back(op: OperatorServer) -> None:
    async with preview_stack(op, "alice") as stack:
        alice, origin = await stack.signed_in("alice")
        alice.cookie_jar.update_cookies({"theme": "dark"}, aiohttp.client.URL(origin))
        gateway_token = stack.gw.headers("alice")["Authorization"]
        headers = {
            "Authorization": gateway_token,
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "dropped",
            "Keep-Alive": "timeout=5",
            "X-Forwarded-For": "6.6.6.6",
            "X-Custom": "kept",
        }
        async with alice.get(f"{origin}/page/h", headers=headers) as resp:
            assert resp.status == 200
        got = {name.lower(): value for name, value in stack.desktops["alice"].seen[-1].headers}
        assert got["x-custom"] == "kept"
        assert got["cookie"] == "theme=dark"  # the page's cookie, not ours
        for name in ("authorization", "x-hop", "keep-alive", "connection", "host"):
            assert name not in got, name
        assert got["x-forwarded-host"] == f"{label_for_user('alice')}.{DOMAIN}:{stack.gw.client.port}"
        assert got["x-forwarded-proto"] == "http"
        assert got["x-forwarded-for"] == "127.0.0.1"
        # An app's own Authorization is the app's business.
        async with alice.get(f"{origin}/page/h", headers={"Authorization": "Basic YXBwOnB3"}) as resp:
            assert resp.status == 200
        assert dict(stack.desktops["alice"].seen[-1].headers)["Authorization"] == "Basic YXBwOnB3"
        # Back to the browser: no hop-by-hop headers, no cookie of ours from the desktop.
        async with alice.get(f"{origin}/raw-headers") as resp:
            assert await resp.read() == b"raw"
            assert "X-Bad" not in resp.headers and "Keep-Alive" not in resp.headers
            assert resp.headers.getall("Set-Cookie") == ["app=1; Path=/"]
        # The gateway's cookie survived the desktop's attempt to replace it.
        async with alice.get(f"{origin}/page/still-signed-in") as resp:
            assert resp.status == 200


async def test_a_body_that_breaks_off_is_never_a_complete_one(op: OperatorServer) -> None:
    async with preview_stack(op, "alice") as stack:
        alice, origin = await stack.signed_in("alice")
        async with alice.get(f"{origin}/broken-body") as resp:
            assert resp.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()
        async with alice.get(f"{origin}/page/after") as resp:  # the preview still works
            assert resp.status == 200


async def test_a_content_length_the_body_breaks_never_looks_complete(op: OperatorServer) -> None:
    """A desktop's body shorter than its Content-Length would leave the browser's kept-alive
    connection waiting for bytes that belong to the next response; a longer one would be cut
    to a body that looks complete. Either way the browser must see a broken body."""
    async with preview_stack(op, "alice") as stack:
        alice, origin = await stack.signed_in("alice")
        for path in ("/short-length", "/long-length"):
            async with asyncio.timeout(EVENT_TIMEOUT), alice.get(f"{origin}{path}") as resp:
                assert resp.status == 200
                with pytest.raises(aiohttp.ClientPayloadError):
                    await resp.read()
        async with alice.get(f"{origin}/page/after") as resp:  # the preview still works
            assert resp.status == 200
            assert (await resp.json())["path"] == "/page/after"


async def test_on_https_the_cookie_is_secure_and_host_prefixed(op: OperatorServer) -> None:
    async with preview_stack(op, "alice", GATEWAY_PREVIEW_DOMAIN=f"https://{DOMAIN}") as stack:
        link = await stack.preview_url("alice")
        assert link["origin"].startswith(f"https://{label_for_user('alice')}.{DOMAIN}:")
        plain = link["url"].replace("https://", "http://", 1)  # the test server speaks plain HTTP
        async with browser() as session, session.get(plain, allow_redirects=False) as resp:
            assert resp.status == 303
            cookie = resp.headers["Set-Cookie"]
            assert cookie.startswith("__Host-natslink_preview=v1.")
            assert "Secure" in cookie and "Path=/" in cookie and "Domain" not in cookie
            value = cookie.split(";", 1)[0].split("=", 1)[1]
        async with browser() as session:
            headers = {"Cookie": f"__Host-natslink_preview={value}"}
            async with session.get(
                f"{link['origin'].replace('https://', 'http://', 1)}/page/x", headers=headers
            ) as resp:
                assert resp.status == 200
                assert (await resp.json())["path"] == "/page/x"
        got = dict(stack.desktops["alice"].seen[-1].headers)
        assert "Cookie" not in got
        assert got["X-Forwarded-Proto"] == "https"


async def test_an_offline_desktop_is_a_502_page_naming_the_cause(op: OperatorServer) -> None:
    async with preview_stack(op) as stack:  # carol has no desktop connected
        link = await stack.preview_url("carol")
        async with browser() as session:
            async with session.get(link["url"], allow_redirects=False) as resp:
                assert resp.status == 303
            async with session.get(f"{link['origin']}/page/x") as resp:
                assert resp.status == 502
                text = await resp.text()
                assert "tunnel_unreachable" in text and "not connected" in text
            with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
                await session.ws_connect(f"{link['origin']}/ws/hmr")
            assert caught.value.status == 502


# ------------------------------------------------------------------ WebSocket through the preview


async def test_websocket_echo_through_the_preview(op: OperatorServer) -> None:
    async with preview_stack(op, "alice") as stack:
        alice, origin = await stack.signed_in("alice")
        alice.cookie_jar.update_cookies({"theme": "dark"}, aiohttp.client.URL(origin))
        dev = stack.desktops["alice"].dev
        async with alice.ws_connect(
            f"{origin}/ws/hmr?token=abc", protocols=("other", "vite-hmr"), origin=origin
        ) as ws:
            assert ws.protocol == "vite-hmr"
            await ws.send_str("hello")
            assert await ws.receive_str(timeout=EVENT_TIMEOUT) == "hello"
            blob = bytes(range(256)) * 4096  # 1 MiB
            await ws.send_bytes(blob)
            assert await ws.receive_bytes(timeout=EVENT_TIMEOUT) == blob
            for i in range(200):
                await ws.send_str(f"m{i}")
            assert [await ws.receive_str(timeout=EVENT_TIMEOUT) for _ in range(200)] == [
                f"m{i}" for i in range(200)
            ]
        seen = dev.ws_seen[0]
        assert seen["path"] == "/ws/hmr?token=abc"
        assert seen["headers"]["Origin"] == origin
        assert seen["headers"]["Cookie"] == "theme=dark"
        assert "natslink_preview" not in str(seen["headers"])


async def test_close_codes_and_reasons_travel_both_ways(op: OperatorServer) -> None:
    async with preview_stack(op, "alice") as stack:
        alice, origin = await stack.signed_in("alice")
        dev = stack.desktops["alice"].dev
        # The browser closes: the dev server gets its code and reason.
        async with alice.ws_connect(f"{origin}/ws/a", protocols=("vite-hmr",)) as ws:
            await ws.send_str("ping")
            assert await ws.receive_str(timeout=EVENT_TIMEOUT) == "ping"
            await ws.close(code=4002, message=b"tab closed")
        await wait_until(lambda: dev.ws_closes, EVENT_TIMEOUT)
        assert dev.ws_closes == [(4002, "tab closed")]
        # The dev server closes: the browser gets its code and reason.
        async with alice.ws_connect(f"{origin}/ws/b", protocols=("vite-hmr",)) as ws:
            await ws.send_str("close-me")
            msg = await ws.receive(timeout=EVENT_TIMEOUT)
            assert (msg.type, msg.data, msg.extra) == (aiohttp.WSMsgType.CLOSE, 4001, "bye from the desktop")
        # The dev server dies mid-socket: the browser is closed with 1014, not left hanging.
        async with alice.ws_connect(f"{origin}/ws/c", protocols=("vite-hmr",)) as ws:
            await ws.send_str("die")
            msg = await ws.receive(timeout=EVENT_TIMEOUT)
            assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 1014)


async def test_a_browser_that_vanishes_is_going_away_for_the_desktop(op: OperatorServer) -> None:
    async with preview_stack(op, "alice") as stack:
        alice, origin = await stack.signed_in("alice")
        dev = stack.desktops["alice"].dev
        cookie = alice.cookie_jar.filter_cookies(aiohttp.client.URL(origin))["natslink_preview"].value
        reader, writer = await asyncio.open_connection("127.0.0.1", stack.gw.client.port)
        handshake = (
            "GET /ws/gone HTTP/1.1\r\n"
            f"Host: {origin.removeprefix('http://')}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Protocol: vite-hmr\r\nCookie: natslink_preview={cookie}\r\n\r\n"
        )
        writer.write(handshake.encode("ascii"))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), EVENT_TIMEOUT)
        assert head.startswith(b"HTTP/1.1 101 ")
        await wait_until(lambda: dev.ws_seen, EVENT_TIMEOUT)
        writer.transport.abort()  # no close frame: the tab crashed, the laptop slept
        await wait_until(lambda: dev.ws_closes, EVENT_TIMEOUT)
        assert dev.ws_closes == [(1001, "")]


async def test_a_refused_desktop_handshake_is_its_status_and_other_origins_are_refused(
    op: OperatorServer,
) -> None:
    async with preview_stack(op, "alice") as stack:
        alice, origin = await stack.signed_in("alice")
        with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
            await alice.ws_connect(f"{origin}/forbidden")
        assert caught.value.status == 403
        async with alice.get(
            f"{origin}/forbidden",
            headers={
                "Connection": "Upgrade",
                "Upgrade": "websocket",
                "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            },
        ) as resp:
            assert resp.status == 403
            assert await resp.text() == "origin not allowed"
            assert resp.headers["X-Why"] == "origin"
        # A socket opened by any other page than the preview's own (cross-site WebSocket hijacking).
        # The preview's own host under another scheme or port is another origin (a page a
        # network attacker injected into plain http, another server on the machine).
        port = stack.gw.client.port
        same_label = (origin.replace("http://", "https://"), origin.replace(f":{port}", f":{port + 1}"))
        for other in ("http://evil.example", origin_of(stack, "bob"), "null", *same_label):
            with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
                await alice.ws_connect(f"{origin}/ws/x", origin=other)
            assert caught.value.status == 403, other
        # A handshake aiohttp could not accept is refused before the desktop is asked.
        bad = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "8"}
        async with alice.get(f"{origin}/ws/x", headers=bad) as resp:
            assert resp.status == 400
        # No cookie, no socket.
        async with browser() as stranger:
            with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
                await stranger.ws_connect(f"{origin}/ws/x")
            assert caught.value.status == 401
        assert len(stack.desktops["alice"].dev.ws_seen) == 0


async def test_requests_another_preview_makes_the_browser_send_are_refused(op: OperatorServer) -> None:
    """Sibling previews are same-site, so the browser sends this preview's (SameSite=Lax) cookie
    on requests another user's page makes, some without any ``Origin`` (a ``<script src>``) or
    with ``Origin: null`` (a POST redirected from the sibling's own origin): its
    ``Sec-Fetch-Site`` gives them away. Navigations from the app (same-site) still land."""
    async with preview_stack(op, "alice") as stack:
        alice, origin = await stack.signed_in("alice")
        desktop = stack.desktops["alice"]
        before = len(desktop.seen)  # the landing page
        attacks = {
            # bob's page: <script src="alice's preview/page/secret.js">: the classic no-Origin XSSI.
            "script include": ("GET", {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "no-cors"}),
            # bob's page POSTs to bob's own origin, which 307s to alice's: the Origin becomes null.
            "redirected POST": (
                "POST",
                {"Origin": "null", "Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "no-cors"},
            ),
            # The same as a top-level form POST (a navigation, but no GET).
            "redirected form": (
                "POST",
                {"Origin": "null", "Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "navigate"},
            ),
            "cross-site fetch": ("GET", {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "cors"}),
        }
        for name, (method, headers) in attacks.items():
            async with alice.request(method, f"{origin}/page/secret", headers=headers, data=b"x") as resp:
                assert resp.status == 403, name
        assert [r.path for r in desktop.seen[before:]] == []
        fine = {
            # The app (same-site to its previews) opens the preview in a tab or an iframe.
            "navigation from the app": ("GET", {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "navigate"}),
            # A page of the preview's own with Referrer-Policy: no-referrer posts to itself.
            "own POST, no referrer": (
                "POST",
                {"Origin": "null", "Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors"},
            ),
            "typed into the address bar": ("GET", {"Sec-Fetch-Site": "none", "Sec-Fetch-Mode": "navigate"}),
            "a browser without fetch metadata": ("POST", {}),
        }
        for name, (method, headers) in fine.items():
            async with alice.request(method, f"{origin}/page/ok", headers=headers, data=b"x") as resp:
                assert resp.status == 200, name
        assert len(desktop.seen) == before + len(fine)


async def test_a_desktop_that_closes_and_never_ends_its_stream_is_let_go(op: OperatorServer) -> None:
    """The desktop sends a large message and a close frame but never ends its tunnel stream
    (its heartbeats keep it alive). The browser's message going up meets the close while the
    large message is stuck on the browser's full socket; then the browser reads everything
    and gets the close. The gateway must still end the desktop's stream (abort it), or it
    holds the stream, and its subscription, for as long as the desktop likes."""
    replied = asyncio.Event()  # the gateway answered the desktop's close frame
    cancelled = asyncio.Event()  # the gateway ended the desktop's stream (aborted it)

    def hostile(request: tunnel.Request) -> tunnel.Response:
        frames = WsConnection(WsType.SERVER)

        async def watch_up() -> None:
            async for data in request.stream():
                frames.receive_data(data)
                if any(isinstance(event, CloseConnection) for event in frames.events()):
                    replied.set()

        async def down() -> AsyncIterator[bytes]:
            up = asyncio.create_task(watch_up())
            try:
                yield frames.send(BytesMessage(data=b"b" * (8 * MiB)))  # more than the sockets hold
                yield frames.send(CloseConnection(code=4000, reason="bye"))
                await asyncio.Event().wait()  # the stream never ends by itself
            finally:  # the tunnel server aborted the stream: it cancels this body
                up.cancel()
                cancelled.set()

        key = (request.header("sec-websocket-key") or "").strip()
        headers = [
            ("upgrade", "websocket"),
            ("connection", "Upgrade"),
            ("sec-websocket-accept", accept_token(key)),
        ]
        return tunnel.Response(101, headers, down())

    RAW_HANDLERS["/ws-hostile"] = hostile
    try:
        async with preview_stack(op, "alice") as stack:
            alice, origin = await stack.signed_in("alice")
            cookie = alice.cookie_jar.filter_cookies(aiohttp.client.URL(origin))["natslink_preview"].value
            reader, writer = await asyncio.open_connection("127.0.0.1", stack.gw.client.port)
            writer.write(
                (
                    "GET /ws-hostile HTTP/1.1\r\n"
                    f"Host: {origin.removeprefix('http://')}\r\n"
                    "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                    f"Sec-WebSocket-Key: {new_key()}\r\nSec-WebSocket-Version: 13\r\n"
                    f"Cookie: natslink_preview={cookie}\r\n\r\n"
                ).encode("ascii")
            )
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), EVENT_TIMEOUT)
            assert head.startswith(b"HTTP/1.1 101 "), head
            await asyncio.wait_for(replied.wait(), EVENT_TIMEOUT)  # the desktop's close is in
            browser_frames = WsConnection(WsType.CLIENT)
            writer.write(browser_frames.send(BytesMessage(data=b"up")))  # meets that close
            await writer.drain()
            closes: list[CloseConnection] = []
            async with asyncio.timeout(EVENT_TIMEOUT):
                while not closes:  # the browser reads at last: the large message, then the close
                    data = await reader.read(1024 * 1024)
                    assert data, "the gateway closed the browser's connection without a close frame"
                    browser_frames.receive_data(data)
                    closes += [e for e in browser_frames.events() if isinstance(e, CloseConnection)]
            assert (closes[0].code, closes[0].reason) == (4000, "bye")
            writer.write(browser_frames.send(closes[0].response()))  # the browser's close reply
            await asyncio.wait_for(cancelled.wait(), 3 * EVENT_TIMEOUT)
            writer.close()
    finally:
        RAW_HANDLERS.clear()
