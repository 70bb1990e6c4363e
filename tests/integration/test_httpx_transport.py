"""``TunnelTransport``: httpx over the tunnel, against a real nats-server.

Error mapping keeps the tunnel's code reachable; both bodies stream; leaving a
``client.stream()`` early aborts the server's handler; same-host redirects (relative, or
``http(s)://`` naming the tunnel host) are followed through the tunnel. Real web apps
redirecting through it: tests/integration/test_asgi_web_apps.py.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import httpx
import pytest

import tunnel
from cli.nats_server import NatsServer
from tests.helpers import wait_until
from tests.integration.tunnel_harness import (
    EVENT_TIMEOUT,
    KiB,
    MiB,
    Peers,
    connect_peers,
    pattern_chunks,
    serving,
)
from tunnel._events import Publish
from tunnel._natsio.common import flush_everything
from tunnel.httpx_transport import (
    HOP_BY_HOP_HEADERS,
    NotATunnelURL,
    TunnelTransport,
    TunnelTransportError,
    tunnel_location,
)

HOST = "desk.example"
URL = f"tunnel://{HOST}"


@asynccontextmanager
async def over_tunnel(
    server: NatsServer,
    handler: tunnel.Handler | None = None,
    *,
    transport: dict[str, Any] | None = None,
    timeout: httpx.Timeout | None = None,
    **serve_kwargs: Any,
) -> AsyncIterator[tuple[httpx.AsyncClient, Peers, tunnel.TunnelServer | None]]:
    """An httpx client over the tunnel; ``handler`` (if any) serves HOST on another connection."""
    async with AsyncExitStack() as stack:
        peers = await stack.enter_async_context(connect_peers(server))
        served = None
        if handler is not None:
            served = await stack.enter_async_context(serving(peers.server_nc, HOST, handler, **serve_kwargs))
        client = await stack.enter_async_context(
            httpx.AsyncClient(
                transport=TunnelTransport(peers.caller_nc, **(transport or {})),
                timeout=timeout if timeout is not None else httpx.Timeout(5.0),
            )
        )
        yield client, peers, served


def assert_tunnel_cause(exc: BaseException, code: str, cls: type[tunnel.TunnelError]) -> None:
    assert isinstance(exc, TunnelTransportError)
    assert exc.tunnel_code == code
    assert isinstance(exc.__cause__, cls)
    assert exc.__cause__.code == code
    assert exc.tunnel_error is exc.__cause__


async def test_unreachable_host_is_a_connect_error(nats_server: NatsServer) -> None:
    async with over_tunnel(nats_server) as (client, _, _):
        with pytest.raises(httpx.ConnectError) as info:
            await client.get("tunnel://nobody.example/x")
    assert_tunnel_cause(info.value, tunnel.ErrorCode.UNREACHABLE, tunnel.TunnelUnreachable)
    assert info.value.request.url == "tunnel://nobody.example/x"


async def test_no_first_frame_is_a_connect_timeout_from_httpx_connect_timeout(
    nats_server: NatsServer,
) -> None:
    loop = asyncio.get_running_loop()
    async with over_tunnel(nats_server, timeout=httpx.Timeout(10.0, connect=0.3)) as (client, peers, _):
        # Something takes the request start (so it is not "unreachable") but never answers.
        subjects = tunnel.HostSubjects.for_host(HOST)
        black_hole = await peers.server_nc.subscribe(subjects.request, queue=subjects.queue_group)
        await flush_everything(peers.server_nc)
        started = loop.time()
        with pytest.raises(httpx.ConnectTimeout) as info:
            await client.get(f"{URL}/x")
        elapsed = loop.time() - started
        await black_hole.unsubscribe()
    assert_tunnel_cause(info.value, tunnel.ErrorCode.NO_FIRST_FRAME, tunnel.NoFirstFrameTimeout)
    assert 0.25 <= elapsed < 5.0, "httpx's connect timeout must be the first-frame timeout (default 30 s)"


async def test_silent_server_is_a_read_timeout_from_httpx_read_timeout(nats_server: NatsServer) -> None:
    forever = asyncio.Event()

    async def handler(req: tunnel.Request) -> tunnel.Response:
        await forever.wait()
        return tunnel.Response(200)

    frames_sent = 0

    def only_first_frame(pub: Publish) -> Iterable[Publish]:
        # The server acks, then "dies": its heartbeats and everything else are lost.
        nonlocal frames_sent
        frames_sent += 1
        return [pub] if frames_sent == 1 else []

    loop = asyncio.get_running_loop()
    env = over_tunnel(nats_server, handler, timeout=httpx.Timeout(10.0, read=0.3), wire_tap=only_first_frame)
    async with env as (client, _, _):
        started = loop.time()
        with pytest.raises(httpx.ReadTimeout) as info:
            await client.get(f"{URL}/x")
        elapsed = loop.time() - started
    assert_tunnel_cause(info.value, tunnel.ErrorCode.IDLE_TIMEOUT, tunnel.IdleTimeout)
    assert elapsed < 5.0, "httpx's read timeout must be the idle timeout (default 20 s)"
    assert frames_sent > 1, "the server kept sending (heartbeats) that the tap dropped"


async def test_overall_deadline_is_a_read_timeout(nats_server: NatsServer) -> None:
    forever = asyncio.Event()

    async def handler(req: tunnel.Request) -> tunnel.Response:
        await forever.wait()
        return tunnel.Response(200)

    async with over_tunnel(nats_server, handler, transport={"timeout": 0.3}) as (client, _, _):
        with pytest.raises(httpx.ReadTimeout) as info:
            await client.get(f"{URL}/x")
    assert_tunnel_cause(info.value, tunnel.ErrorCode.TIMEOUT, tunnel.DeadlineExceeded)


async def test_handler_error_is_a_read_error_with_the_tunnel_code(nats_server: NatsServer) -> None:
    async def handler(req: tunnel.Request) -> tunnel.Response:
        raise ValueError("handler bug")

    async with over_tunnel(nats_server, handler) as (client, _, _):
        with pytest.raises(httpx.ReadError) as info:
            await client.get(f"{URL}/x")
    assert_tunnel_cause(info.value, tunnel.ErrorCode.HANDLER_ERROR, tunnel.RemoteError)


async def test_error_mid_body_is_a_read_error_while_reading(nats_server: NatsServer) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"partial"
        raise RuntimeError("source failed")

    async def handler(req: tunnel.Request) -> tunnel.Response:
        return tunnel.Response(200, [], body())

    async with over_tunnel(nats_server, handler) as (client, _, _), client.stream("GET", f"{URL}/x") as r:
        assert r.status_code == 200
        with pytest.raises(httpx.ReadError) as info:
            await r.aread()
    assert_tunnel_cause(info.value, tunnel.ErrorCode.HANDLER_ERROR, tunnel.RemoteError)


async def test_non_tunnel_urls_are_refused_without_touching_nats(nats_server: NatsServer) -> None:
    async with over_tunnel(nats_server) as (client, _, _):
        with pytest.raises(NotATunnelURL, match=r"not http:// \(http://example\.com/\)"):
            await client.get("http://example.com/")
        with pytest.raises(httpx.UnsupportedProtocol):
            await client.get("tunnel://desk.example:8080/")


@pytest.mark.parametrize(
    ("location", "followable"),
    [
        ("/target", f"{URL}/target"),
        ("target", f"{URL}/a/target"),
        ("../up", f"{URL}/up"),
        ("?page=2", f"{URL}/a/b?page=2"),
        (f"//{HOST}/p", f"{URL}/p"),
        (f"http://{HOST}/s/?q=1#frag", f"{URL}/s/?q=1#frag"),
        ("https://DESK.example/s", f"{URL}/s"),
        (f"http://{HOST}:80/x", f"{URL}/x"),
        # left alone: already a tunnel URL, another host (also as a network-path reference: a
        # desktop must not bounce its caller to another host), a port, credentials, not a URL
        ("tunnel://other.example/x", None),
        ("//other.example/p", None),
        ("https://example.com/", None),
        (f"http://{HOST}:8080/", None),
        (f"http://user:pw@{HOST}/", None),
        ("http://[bad", None),
    ],
)
def test_redirect_locations_the_tunnel_can_follow(location: str, followable: str | None) -> None:
    assert tunnel_location(httpx.URL(f"{URL}/a/b?x=1"), location) == followable


async def test_redirects_from_a_plain_handler_are_followed_and_only_redirects_rewritten(
    nats_server: NatsServer,
) -> None:
    async def handler(req: tunnel.Request) -> tunnel.Response:
        text = [("content-type", "text/plain")]
        if req.path == "/relative":
            return tunnel.Response(302, [*text, ("location", "/landed")], b"")
        if req.path == "/absolute":
            return tunnel.Response(301, [*text, ("location", f"https://{HOST}/landed?via=abs")], b"")
        if req.path == "/created":
            return tunnel.Response(201, [*text, ("location", "/items/1")], b"created")
        if req.path == "/away":
            return tunnel.Response(308, [*text, ("location", "https://example.com/")], b"")
        return tunnel.Response(200, text, f"{req.method} {req.url}")

    async with over_tunnel(nats_server, handler) as (client, _, _):
        r = await client.get(f"{URL}/relative", follow_redirects=True)
        assert (r.status_code, r.text, r.url) == (200, "GET /landed", f"{URL}/landed")
        r = await client.get(f"{URL}/absolute", follow_redirects=True)
        assert (r.status_code, r.text) == (200, "GET /landed?via=abs")
        assert r.history[0].extensions["tunnel_original_location"] == f"https://{HOST}/landed?via=abs"
        # Only a redirect's Location is a navigation target: a 201's stays as sent.
        created = await client.post(f"{URL}/created", follow_redirects=True)
        assert created.status_code == 201
        assert created.headers["location"] == "/items/1"
        assert "tunnel_original_location" not in created.extensions
        # Leaving the tunnel: httpx hands the transport a non-tunnel URL, a typed error.
        away = await client.get(f"{URL}/away")
        assert away.headers["location"] == "https://example.com/"
        with pytest.raises(NotATunnelURL):
            await client.get(f"{URL}/away", follow_redirects=True)


async def test_request_and_response_bodies_stream_both_ways(nats_server: NatsServer) -> None:
    total = 6 * MiB
    seen: dict[str, Any] = {}

    async def handler(req: tunnel.Request) -> tunnel.Response:
        seen["headers"] = req.headers
        digest = hashlib.sha256()
        pieces = 0
        async for chunk in req.stream():
            digest.update(chunk)
            pieces += 1

        async def echo_digest() -> AsyncIterator[bytes]:
            for chunk in pattern_chunks(total, 128 * KiB):
                seen.setdefault("out", hashlib.sha256()).update(chunk)
                yield chunk

        seen["in"] = digest.hexdigest()
        seen["pieces"] = pieces
        return tunnel.Response(201, [("x-in-sha256", digest.hexdigest())], echo_digest(), "Made")

    sent = hashlib.sha256()

    async def upload() -> AsyncIterator[bytes]:
        for chunk in pattern_chunks(total, 256 * KiB):
            sent.update(chunk)
            yield chunk

    received = hashlib.sha256()
    size = 0
    async with (
        over_tunnel(nats_server, handler) as (client, _, _),
        client.stream("PUT", f"{URL}/up?x=1", content=upload(), headers={"X-Custom": "yes"}) as r,
    ):
        assert r.status_code == 201
        assert r.reason_phrase == "Made"
        async for chunk in r.aiter_raw():
            received.update(chunk)
            size += len(chunk)
    assert seen["in"] == sent.hexdigest() == r.headers["x-in-sha256"]
    assert seen["pieces"] > 1
    assert size == total
    assert received.hexdigest() == seen["out"].hexdigest()
    names = [name.lower() for name, _ in seen["headers"]]
    assert "x-custom" in names
    assert "user-agent" in names
    assert not HOP_BY_HOP_HEADERS & set(names), f"hop-by-hop headers travelled: {names}"


async def test_request_body_error_raises_the_callers_own_exception(nats_server: NatsServer) -> None:
    async def handler(req: tunnel.Request) -> tunnel.Response:
        await req.read()
        return tunnel.Response(200)

    async def upload() -> AsyncIterator[bytes]:
        yield b"some"
        raise OSError("disk read failed")

    async with over_tunnel(nats_server, handler) as (client, _, _):
        with pytest.raises(OSError, match="disk read failed") as info:
            await client.post(f"{URL}/x", content=upload())
    assert isinstance(info.value.__cause__, tunnel.TunnelError)


async def test_leaving_a_stream_early_aborts_the_server_handler(nats_server: NatsServer) -> None:
    body_closed = asyncio.Event()
    produced = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal produced
        try:
            while True:
                produced += 64 * KiB
                yield b"e" * (64 * KiB)
        finally:
            body_closed.set()

    async def handler(req: tunnel.Request) -> tunnel.Response:
        if req.path == "/endless":
            return tunnel.Response(200, [], endless())
        return tunnel.Response(200, [], b"small")

    async with over_tunnel(nats_server, handler) as (client, _, server):
        assert server is not None
        async with client.stream("GET", f"{URL}/endless") as r:
            first = await anext(r.aiter_raw())
            assert first
        # Leaving the block closed the response: the server's handler must stop.
        await asyncio.wait_for(body_closed.wait(), EVENT_TIMEOUT)
        await wait_until(lambda: server.in_flight == 0, message="the request must be released")
        # The transport stays usable.
        assert (await client.get(f"{URL}/small")).content == b"small"
    assert produced < 64 * MiB


async def test_transport_with_a_shared_client_does_not_close_it(nats_server: NatsServer) -> None:
    async def handler(req: tunnel.Request) -> tunnel.Response:
        return tunnel.Response(200, [("content-type", "text/plain")], f"{req.method} {req.url}")

    async with connect_peers(nats_server) as peers, serving(peers.server_nc, HOST, handler):
        shared = tunnel.TunnelClient(peers.caller_nc)
        async with httpx.AsyncClient(transport=TunnelTransport(shared)) as client:
            r = await client.get(f"{URL}/a/b%20c?d=e")
            assert r.text == "GET /a/b%20c?d=e"
        # The httpx client is closed, the TunnelClient it was given still works.
        async with await shared.fetch(f"{URL}/again") as resp:
            assert await resp.text() == "GET /again"
        await shared.aclose()
