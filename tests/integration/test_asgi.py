"""ASGI applications served through the tunnel (``tunnel.asgi``) and called through httpx.

A real Starlette app (JSON, echo, streaming, upload, SSE, lifespan) and a few raw
ASGI apps for what Starlette hides (disconnect, message order, errors), all behind
a real nats-server and called with ``httpx.AsyncClient(transport=TunnelTransport(nc))``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import tunnel
from cli.nats_server import NatsServer
from tests.helpers import wait_until
from tests.integration.tunnel_harness import EVENT_TIMEOUT, KiB, MiB, Peers, connect_peers, pattern_chunks
from tunnel import asgi as tunnel_asgi
from tunnel.asgi import AsgiTunnelServer, LifespanError, serve_asgi
from tunnel.httpx_transport import TunnelTransport, TunnelTransportError

HOST = "desk.example"
RawApp = Callable[[dict[str, Any], Callable[[], Awaitable[dict[str, Any]]], Any], Awaitable[None]]


@asynccontextmanager
async def asgi_client(
    server: NatsServer, app: Any, **serve_kwargs: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, AsgiTunnelServer, Peers]]:
    """Serve ``app`` for HOST on one connection; an httpx client over the tunnel on another."""
    async with connect_peers(server) as peers:
        served = await serve_asgi(peers.server_nc, HOST, app, **serve_kwargs)
        try:
            async with httpx.AsyncClient(
                transport=TunnelTransport(peers.caller_nc), base_url=f"tunnel://{HOST}"
            ) as client:
                yield client, served, peers
        finally:
            await served.close(timeout=2.0)
        assert peers.errors == []


# -- a Starlette application --------------------------------------------------------------


async def json_endpoint(request: Request) -> JSONResponse:
    return JSONResponse({"hello": "world", "n": [1, 2, 3]})


async def echo_endpoint(request: Request) -> JSONResponse:
    scope = request.scope
    return JSONResponse(
        {
            "route_rest": request.path_params["rest"],
            "type": scope["type"],
            "asgi": scope["asgi"],
            "http_version": scope["http_version"],
            "method": scope["method"],
            "scheme": scope["scheme"],
            "path": scope["path"],
            "raw_path": scope["raw_path"].decode("latin-1"),
            "query_string": scope["query_string"].decode("latin-1"),
            "root_path": scope["root_path"],
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]],
            "client": scope["client"],
            "server": scope["server"],
            "query": list(request.query_params.multi_items()),
            "request_id": scope["extensions"]["tunnel"]["request_id"],
        }
    )


STREAM_CHUNKS = 200
STREAM_CHUNK_SIZE = 32 * KiB  # 200 x 32 KiB = 6.25 MiB, three times the 2 MiB window


def starlette_app(
    streamed: Any | None = None, sse_gate: asyncio.Event | None = None, sse_produced: list[str] | None = None
) -> Starlette:
    async def stream_endpoint(request: Request) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            for chunk in pattern_chunks(STREAM_CHUNKS * STREAM_CHUNK_SIZE, STREAM_CHUNK_SIZE):
                assert streamed is not None
                streamed.update(chunk)
                yield chunk

        return StreamingResponse(body(), media_type="application/octet-stream")

    async def upload_endpoint(request: Request) -> JSONResponse:
        digest = hashlib.sha256()
        sizes = []
        async for chunk in request.stream():
            digest.update(chunk)
            if chunk:
                sizes.append(len(chunk))
        return JSONResponse({"size": sum(sizes), "chunks": len(sizes), "sha256": digest.hexdigest()})

    async def sse_endpoint(request: Request) -> StreamingResponse:
        assert sse_gate is not None and sse_produced is not None

        async def events() -> AsyncIterator[str]:
            try:
                sse_produced.append("one")
                yield "event: tick\ndata: one\n\n"
                await sse_gate.wait()
                sse_produced.append("two")
                yield "event: tick\ndata: two\n\n"
                await asyncio.Event().wait()  # an endless stream: only the caller leaving ends it
            finally:
                sse_produced.append("closed")

        return StreamingResponse(events(), media_type="text/event-stream")

    async def boom_endpoint(request: Request) -> Response:
        raise RuntimeError("boom")

    return Starlette(
        routes=[
            Route("/json", json_endpoint, methods=["GET", "HEAD"]),
            Route("/echo/{rest:path}", echo_endpoint, methods=["GET", "POST"]),
            Route("/stream", stream_endpoint),
            Route("/upload", upload_endpoint, methods=["POST"]),
            Route("/events", sse_endpoint),
            Route("/boom", boom_endpoint),
        ]
    )


async def test_starlette_json_endpoint_answers_through_httpx(nats_server: NatsServer) -> None:
    async with asgi_client(nats_server, starlette_app()) as (client, _, _):
        r = await client.get("/json")
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/json"
        assert r.json() == {"hello": "world", "n": [1, 2, 3]}
        assert r.extensions["tunnel_request_id"]

        head = await client.head("/json")
        assert head.status_code == 200
        assert head.headers["content-length"] == str(len(r.content))
        assert head.content == b""

        missing = await client.get("/nope")
        assert missing.status_code == 404


async def test_scope_has_decoded_path_raw_path_query_headers_and_root_path(nats_server: NatsServer) -> None:
    async with asgi_client(nats_server, starlette_app(), root_path="/api") as (client, _, _):
        r = await client.get(
            "/echo/caf%C3%A9%20x/y?q=1&q=2&e=%20",
            headers=[("X-One", "1"), ("X-Two", "2"), ("X-One", "3")],
        )
    assert r.status_code == 200, r.text
    scope = r.json()
    assert scope["type"] == "http"
    assert scope["asgi"] == {"version": "3.0", "spec_version": "2.3"}
    assert scope["http_version"] == "1.1"
    assert scope["method"] == "GET"
    assert scope["scheme"] == "http"
    # root_path is the mount point: prepended to path and raw_path, stripped again for routing.
    assert scope["root_path"] == "/api"
    assert scope["path"] == "/api/echo/café x/y"
    assert scope["raw_path"] == "/api/echo/caf%C3%A9%20x/y"
    assert scope["route_rest"] == "café x/y"
    assert scope["query_string"] == "q=1&q=2&e=%20"
    assert scope["query"] == [["q", "1"], ["q", "2"], ["e", " "]]
    assert scope["client"] == ["tunnel", 0]  # tunnel.asgi.UNKNOWN_CLIENT: NATS names no peer
    assert scope["server"] == [HOST, None]
    assert scope["request_id"]
    names = [name for name, _ in scope["headers"]]
    assert names == [name.lower() for name in names], "header names must be lowercase"
    assert [h for h in scope["headers"] if h[0].startswith("x-")] == [
        ["x-one", "1"],
        ["x-two", "2"],
        ["x-one", "3"],
    ]
    # httpx's host/connection headers do not travel; the adapter supplies the tunnel host.
    assert ["host", HOST] in scope["headers"]
    assert names.count("host") == 1
    assert "connection" not in names
    assert "user-agent" in names


async def test_streaming_response_larger_than_the_window_arrives_intact(nats_server: NatsServer) -> None:
    produced = hashlib.sha256()
    async with asgi_client(nats_server, starlette_app(streamed=produced)) as (client, _, _):
        received = hashlib.sha256()
        size = 0
        pieces = 0
        async with client.stream("GET", "/stream") as r:
            assert r.status_code == 200
            assert "content-length" not in r.headers
            async for piece in r.aiter_raw():
                received.update(piece)
                size += len(piece)
                pieces += 1
    assert size == STREAM_CHUNKS * STREAM_CHUNK_SIZE
    assert received.hexdigest() == produced.hexdigest()
    assert pieces > 1, "the body must arrive as a stream, not as one piece"


async def test_request_body_streams_into_the_app(nats_server: NatsServer) -> None:
    total = 10 * MiB
    sent = hashlib.sha256()

    async def upload() -> AsyncIterator[bytes]:
        for chunk in pattern_chunks(total, 256 * KiB):
            sent.update(chunk)
            yield chunk

    async with asgi_client(nats_server, starlette_app()) as (client, _, _):
        r = await client.post("/upload", content=upload())
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["size"] == total
    assert result["sha256"] == sent.hexdigest()
    assert result["chunks"] > 1, "the app must see the body as it streams, in several chunks"


async def test_server_sent_events_arrive_one_by_one_and_stop_when_the_caller_leaves(
    nats_server: NatsServer,
) -> None:
    gate = asyncio.Event()
    produced: list[str] = []
    app = starlette_app(sse_gate=gate, sse_produced=produced)
    async with asgi_client(nats_server, app) as (client, _, _):
        async with client.stream("GET", "/events") as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            lines = r.aiter_lines()

            async def next_event() -> list[str]:
                event: list[str] = []
                async for line in lines:
                    if line == "":
                        return event
                    event.append(line)
                raise AssertionError(f"stream ended inside an event: {event}")

            first = await asyncio.wait_for(next_event(), EVENT_TIMEOUT)
            assert first == ["event: tick", "data: one"]
            # The first event reached us while the app is still parked before the second.
            assert produced == ["one"]
            gate.set()
            second = await asyncio.wait_for(next_event(), EVENT_TIMEOUT)
            assert second == ["event: tick", "data: two"]
            assert produced == ["one", "two"]
        # Leaving the stream reaches Starlette as http.disconnect, which stops the generator.
        await wait_until(lambda: produced[-1:] == ["closed"], message="the SSE generator must be closed")


async def test_head_of_an_endless_event_stream_ends_the_stream(nats_server: NatsServer) -> None:
    produced: list[str] = []
    app = starlette_app(sse_gate=asyncio.Event(), sse_produced=produced)
    async with asgi_client(nats_server, app) as (client, served, _):
        r = await client.head("/events")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.content == b""
        # Nobody will read the body: the app hears http.disconnect and its generator closes.
        await wait_until(lambda: produced[-1:] == ["closed"], message="the SSE generator must be closed")
        await wait_until(lambda: served.asgi.active == 0, message="the app task must end")


async def test_starlette_route_error_is_a_500(nats_server: NatsServer) -> None:
    async with asgi_client(nats_server, starlette_app()) as (client, _, _):
        r = await client.get("/boom")
        assert r.status_code == 500
        # The app keeps serving afterwards.
        assert (await client.get("/json")).status_code == 200


# -- lifespan -------------------------------------------------------------------------------


async def test_lifespan_startup_runs_before_serving_and_shutdown_on_close(nats_server: NatsServer) -> None:
    events: list[str] = []

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        events.append("startup")
        yield {"greeting": "hello from lifespan"}
        events.append("shutdown")

    async def greeting(request: Request) -> JSONResponse:
        return JSONResponse({"greeting": request.state.greeting})

    app = Starlette(routes=[Route("/greeting", greeting)], lifespan=lifespan)
    async with connect_peers(nats_server) as peers:
        served = await serve_asgi(peers.server_nc, HOST, app)
        assert events == ["startup"]
        async with httpx.AsyncClient(transport=TunnelTransport(peers.caller_nc)) as client:
            r = await client.get(f"tunnel://{HOST}/greeting")
            assert r.json() == {"greeting": "hello from lifespan"}
        assert events == ["startup"]
        await served.close(timeout=2.0)
        assert events == ["startup", "shutdown"]


async def test_lifespan_startup_failure_fails_serve_asgi_and_serves_nothing(nats_server: NatsServer) -> None:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        raise RuntimeError("database unavailable")
        yield

    app = Starlette(routes=[Route("/json", json_endpoint)], lifespan=lifespan)
    async with connect_peers(nats_server) as peers:
        with pytest.raises(LifespanError, match="database unavailable"):
            await serve_asgi(peers.server_nc, HOST, app)
        with pytest.raises(tunnel.TunnelUnreachable):
            await tunnel.fetch(peers.caller_nc, f"tunnel://{HOST}/json")


async def test_lifespan_on_requires_the_app_to_support_it(nats_server: NatsServer) -> None:
    async def no_lifespan(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http", "this app has no lifespan"

    async with connect_peers(nats_server) as peers:
        with pytest.raises(LifespanError, match="this app has no lifespan"):
            await serve_asgi(peers.server_nc, HOST, no_lifespan, lifespan="on")
        # "auto" accepts an app without lifespan support.
        served = await serve_asgi(peers.server_nc, HOST, no_lifespan)
        await served.close(timeout=1.0)


# -- raw ASGI applications: disconnect, errors, message order --------------------------------


async def test_caller_leaving_mid_stream_reaches_the_app_as_http_disconnect(nats_server: NatsServer) -> None:
    received: list[str] = []
    app_done = asyncio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "http.request"
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
        )
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        received.append((await receive())["type"])  # blocks until the caller leaves
        # Sends to a caller that left are dropped silently (ASGI 2.3), not errors.
        await send({"type": "http.response.body", "body": b"late", "more_body": False})
        app_done.set()

    async with asgi_client(nats_server, app, lifespan="off") as (client, served, _):
        async with client.stream("GET", "/") as r:
            first = await anext(r.aiter_raw())
            assert first == b"first"
            assert received == []
        await asyncio.wait_for(app_done.wait(), EVENT_TIMEOUT)
        assert received == ["http.disconnect"]
        await wait_until(lambda: served.asgi.active == 0, message="the app task must end")


async def test_caller_cancelling_before_the_response_reaches_the_app_as_http_disconnect(
    nats_server: NatsServer,
) -> None:
    received: list[str] = []
    waiting = asyncio.Event()
    app_done = asyncio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "http.request"
        waiting.set()
        received.append((await receive())["type"])  # no response yet: wait for the caller to go
        app_done.set()

    async with asgi_client(nats_server, app, lifespan="off") as (client, _, _):
        call = asyncio.create_task(client.get("/slow"))
        await asyncio.wait_for(waiting.wait(), EVENT_TIMEOUT)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await asyncio.wait_for(app_done.wait(), EVENT_TIMEOUT)
        assert received == ["http.disconnect"]


async def test_app_ignoring_the_disconnect_is_cancelled_after_the_grace_period(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tunnel_asgi, "DISCONNECT_GRACE", 0.2)
    outcome: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        try:
            await asyncio.Event().wait()  # never looks at receive(): ignores the disconnect
        except asyncio.CancelledError:
            outcome.append("cancelled")
            raise

    async with asgi_client(nats_server, app, lifespan="off") as (client, served, _):
        async with client.stream("GET", "/") as r:
            assert await anext(r.aiter_raw()) == b"first"
        await wait_until(lambda: outcome == ["cancelled"], message="the app must be cancelled")
        await wait_until(lambda: served.asgi.active == 0, message="the app task must end")


async def test_closing_the_server_mid_stream_ends_the_stream_then_runs_shutdown(
    nats_server: NatsServer,
) -> None:
    events: list[str] = []

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        events.append("shutdown")

    async def endless(request: Request) -> StreamingResponse:
        async def stream() -> AsyncIterator[bytes]:
            try:
                yield b"data: hello\n\n"
                await asyncio.Event().wait()
            finally:
                events.append("stream closed")

        return StreamingResponse(stream(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/events", endless)], lifespan=lifespan)
    async with connect_peers(nats_server) as peers:
        served = await serve_asgi(peers.server_nc, HOST, app)
        async with (
            httpx.AsyncClient(transport=TunnelTransport(peers.caller_nc)) as client,
            client.stream("GET", f"tunnel://{HOST}/events") as r,
        ):
            chunks = r.aiter_raw()
            assert await anext(chunks) == b"data: hello\n\n"
            await served.close(timeout=0.2)
            # The caller is told the server went away (not a silently complete body).
            with pytest.raises(httpx.ReadError) as info:
                await anext(chunks)
            assert isinstance(info.value, TunnelTransportError)
            assert info.value.tunnel_code == tunnel.ErrorCode.SERVER_CLOSING
    assert events == ["stream closed", "shutdown"]


async def test_slow_reader_makes_the_app_wait_in_send_instead_of_buffering(nats_server: NatsServer) -> None:
    total = 16 * MiB
    piece = b"z" * (64 * KiB)
    produced = 0

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        nonlocal produced
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        while produced < total:
            await send({"type": "http.response.body", "body": piece, "more_body": True})
            produced += len(piece)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    # Caller window (2 MiB) + frames in flight + the adapter's buffer: well under 4 MiB.
    bound = tunnel.DEFAULT_WINDOW + 2 * MiB
    async with asgi_client(nats_server, app, lifespan="off") as (client, _, _):
        async with client.stream("GET", "/") as r:
            chunks = r.aiter_raw()
            got = len(await anext(chunks))
            await wait_until(lambda: produced >= MiB, message="the pipeline should fill up")
            # Now hold still: a send() that never waits would race to 16 MiB in milliseconds.
            with pytest.raises(AssertionError):
                await wait_until(lambda: produced > bound, timeout=0.3)
            async for chunk in chunks:
                got += len(chunk)
        assert got == total == produced


async def test_app_error_before_response_start_is_a_500(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        raise KeyError("missing thing")

    async def silent(scope: dict[str, Any], receive: Any, send: Any) -> None:
        return  # returns without any response: also a 500

    caplog.set_level(logging.ERROR, logger="tunnel.asgi")
    for bad_app in (app, silent):
        async with asgi_client(nats_server, bad_app, lifespan="off") as (client, _, _):
            r = await client.get("/")
            assert r.status_code == 500
            assert r.text == "Internal Server Error"
            head = await client.head("/")
            assert head.status_code == 500
            assert head.content == b""
    messages = [rec.getMessage() for rec in caplog.records if rec.name == "tunnel.asgi"]
    assert any("Exception in ASGI application" in m for m in messages)
    assert any("without starting a response" in m for m in messages)


async def test_app_error_after_response_start_fails_the_stream(nats_server: NatsServer) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        raise RuntimeError("crashed mid-body")

    async with asgi_client(nats_server, app, lifespan="off") as (client, _, _):
        with pytest.raises(httpx.ReadError) as info:
            await client.get("/")
        assert isinstance(info.value, TunnelTransportError)
        assert info.value.tunnel_code == tunnel.ErrorCode.HANDLER_ERROR
        assert isinstance(info.value.__cause__, tunnel.TunnelError)


@pytest.mark.parametrize(
    ("messages", "expected_error"),
    [
        pytest.param(
            [{"type": "http.response.body", "body": b"x"}],
            "Expected ASGI message 'http.response.start'",
            id="body-before-start",
        ),
        pytest.param(
            [
                {"type": "http.response.start", "status": 200, "headers": []},
                {"type": "http.response.start", "status": 200, "headers": []},
            ],
            "Expected ASGI message 'http.response.body'",
            id="start-twice",
        ),
        pytest.param(
            [
                {"type": "http.response.start", "status": 200, "headers": []},
                {"type": "http.response.body", "body": b"done"},
                {"type": "http.response.body", "body": b"more"},
            ],
            "after response already completed",
            id="body-after-complete",
        ),
        pytest.param(
            [{"type": "http.response.start", "status": 200, "headers": [(b"bad name", b"v")]}],
            "invalid header name",
            id="invalid-header",
        ),
    ],
)
async def test_send_enforces_asgi_message_order(
    nats_server: NatsServer, messages: list[dict[str, Any]], expected_error: str
) -> None:
    errors: list[Exception] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        try:
            for message in messages:
                await send(message)
        except (RuntimeError, ValueError) as exc:
            errors.append(exc)
            raise

    async with asgi_client(nats_server, app, lifespan="off") as (client, _, _):
        try:
            r = await client.get("/")
        except httpx.ReadError:
            pass  # a violation after the start fails the stream
        else:
            assert r.status_code in (200, 500)
    assert len(errors) == 1
    assert expected_error in str(errors[0])
