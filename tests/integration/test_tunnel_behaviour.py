"""HTTP semantics and request lifecycle of the tunnel against a real nats-server.

Each test runs a ``tunnel.serve`` server on one NATS connection and calls it with a
``TunnelClient`` on another, checking one promise of DESIGN.md ("The tunnel protocol:
what it must guarantee") end to end.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from typing import Any

import pytest

import tunnel
from cli.nats_server import NatsServer
from tests.helpers import wait_until
from tests.integration.tunnel_harness import (
    EVENT_TIMEOUT,
    MiB,
    WireLog,
    connect_peers,
    serving,
)
from tunnel import _codec as codec
from tunnel import _frames as frames
from tunnel._events import Publish
from tunnel._natsio.common import flush_everything
from tunnel._subjects import parse_request_subject

HOST = "desk.example"


# Every test here runs twice: with our extensions negotiated ("fast"), and with both ends forced to
# plain reference v1 frames ("v1"): the HTTP promises hold either way. A test that checks the
# extensions themselves is marked ``fast_path_only``.
@pytest.fixture(params=["fast", "v1"], autouse=True)
def wire_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    mode: str = request.param
    if mode == "fast":
        return mode
    if request.node.get_closest_marker("fast_path_only"):
        pytest.skip("checks the negotiated extensions")
    real_client_init = tunnel.TunnelClient.__init__
    real_serve = tunnel.serve

    def client_init(self: tunnel.TunnelClient, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("fast_path", False)
        real_client_init(self, *args, **kwargs)

    async def serve(*args: Any, **kwargs: Any) -> tunnel.TunnelServer:
        # A test's own config keeps its other settings.
        kwargs["config"] = dataclasses.replace(kwargs.get("config") or tunnel.ServerConfig(), fast_path=False)
        return await real_serve(*args, **kwargs)

    monkeypatch.setattr(tunnel.TunnelClient, "__init__", client_init)
    monkeypatch.setattr(tunnel, "serve", serve)
    return mode


# -------------------------------------------------------------------- request line, headers


async def _echo(req: tunnel.Request) -> tunnel.Response:
    """Answers with what it saw: method and target in headers, body back as the body."""
    body = await req.read()
    return tunnel.Response(
        200,
        [("x-method", req.method), ("x-url", req.url), ("x-has-body", str(req.has_body).lower())],
        req.method.encode() + b":" + body,
    )


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "M-SEARCH"])
async def test_every_method_reaches_the_handler_with_its_body(nats_server: NatsServer, method: str) -> None:
    async with connect_peers(nats_server) as p, serving(p.server_nc, HOST, _echo):
        client = tunnel.TunnelClient(p.caller_nc)
        payload = f"body of {method}".encode()
        async with asyncio.timeout(EVENT_TIMEOUT):
            async with await client.fetch(f"tunnel://{HOST}/m", method=method, body=payload) as resp:
                assert resp.status == 200
                assert resp.header("x-method") == method
                assert await resp.read() == method.encode() + b":" + payload
    assert p.errors == []


async def test_head_reaches_the_handler_and_gets_headers_without_body(nats_server: NatsServer) -> None:
    seen: list[str] = []

    async def handler(req: tunnel.Request) -> tunnel.Response:
        seen.append(req.method)
        return tunnel.Response(200, [("content-length", "11"), ("x-method", req.method)], b"hello world")

    async with connect_peers(nats_server) as p, serving(p.server_nc, HOST, handler):
        client = tunnel.TunnelClient(p.caller_nc)
        async with asyncio.timeout(EVENT_TIMEOUT):
            resp = await client.fetch(f"tunnel://{HOST}/h", method="HEAD")
            assert resp.header("x-method") == "HEAD"
            assert resp.header("content-length") == "11"
            assert await resp.read() == b""
    assert seen == ["HEAD"]


@pytest.mark.parametrize(
    ("url", "target", "query"),
    [
        (
            "tunnel://desk.example/search?q=a%20b&tag=x&tag=y&tag=x",
            "/search?q=a%20b&tag=x&tag=y&tag=x",
            [("q", "a b"), ("tag", "x"), ("tag", "y"), ("tag", "x")],
        ),
        (
            "tunnel://desk.example/a%2Fb/c?enc=%2F%3F%26%3D%25&plus=a+b&empty=&flag&utf=%C3%A9%E2%98%83",
            "/a%2Fb/c?enc=%2F%3F%26%3D%25&plus=a+b&empty=&flag&utf=%C3%A9%E2%98%83",
            [("enc", "/?&=%"), ("plus", "a b"), ("empty", ""), ("flag", ""), ("utf", "é☃")],
        ),
        (
            "tunnel://desk.example/caf%C3%A9/%7Euser?A=1&a=2",
            "/caf%C3%A9/%7Euser?A=1&a=2",
            [("A", "1"), ("a", "2")],
        ),
        ("tunnel://desk.example/semi;p=1?x=1;y=2", "/semi;p=1?x=1;y=2", [("x", "1;y=2")]),
        ("tunnel://desk.example", "/", []),
        ("tunnel://desk.example/frag?k=v#not-sent", "/frag?k=v", [("k", "v")]),
    ],
)
async def test_path_and_query_string_arrive_byte_exact(
    nats_server: NatsServer, url: str, target: str, query: list[tuple[str, str]]
) -> None:
    seen: list[tuple[str, str, str, list[tuple[str, str]]]] = []

    async def handler(req: tunnel.Request) -> tunnel.Response:
        seen.append((req.url, req.path, req.query_string, req.query))
        return tunnel.Response(204)

    async with connect_peers(nats_server) as p, serving(p.server_nc, HOST, handler):
        client = tunnel.TunnelClient(p.caller_nc)
        async with asyncio.timeout(EVENT_TIMEOUT):
            resp = await client.fetch(url)
            assert resp.status == 204
    path, _, query_string = target.partition("?")
    assert seen == [(target, path, query_string, query)]


async def test_repeated_headers_keep_order_and_non_ascii_values_both_directions(
    nats_server: NatsServer,
) -> None:
    request_headers = [
        ("X-Rep", "1"),
        ("Accept", "text/plain"),
        ("x-rep", "2"),
        ("X-Name", "Zoë Ünïcødé ☃ 名前"),
        ("X-Rep", "3"),
        ("X-Empty", ""),
        ("Cookie", "a=1; b=2"),
    ]
    response_headers = [
        ("Set-Cookie", "a=1; Path=/"),
        ("X-Greeting", "grüß dich, 世界 🌍"),
        ("set-cookie", "b=2; HttpOnly"),
        ("Vary", "Accept"),
        ("Set-Cookie", "c=3"),
    ]
    seen: list[list[tuple[str, str]]] = []
    rep_values: list[list[str]] = []

    async def handler(req: tunnel.Request) -> tunnel.Response:
        seen.append(list(req.headers))
        rep_values.append(req.header_values("x-rep"))
        return tunnel.Response(200, response_headers, b"ok")

    async with connect_peers(nats_server) as p, serving(p.server_nc, HOST, handler):
        client = tunnel.TunnelClient(p.caller_nc)
        async with asyncio.timeout(EVENT_TIMEOUT):
            async with await client.fetch(f"tunnel://{HOST}/h", headers=request_headers) as resp:
                assert await resp.read() == b"ok"
    assert seen == [request_headers]
    assert rep_values == [["1", "2", "3"]]
    assert resp.headers == response_headers
    assert resp.header_values("SET-COOKIE") == ["a=1; Path=/", "b=2; HttpOnly", "c=3"]
    assert resp.header("x-greeting") == "grüß dich, 世界 🌍"


@pytest.mark.parametrize(
    ("status", "status_text", "reason"),
    [
        (200, None, ""),
        (201, "Created", "Created"),
        (404, "Not Found Here", "Not Found Here"),
        (418, "I'm a teapot", "I'm a teapot"),
        (503, "Wartung läuft ☕", "Wartung läuft ☕"),
        (599, "Custom Reason", "Custom Reason"),
    ],
)
async def test_status_and_reason_text_reach_the_caller(
    nats_server: NatsServer, status: int, status_text: str | None, reason: str
) -> None:
    async def handler(req: tunnel.Request) -> tunnel.Response:
        return tunnel.Response(status, [], f"status {status}", status_text=status_text)

    async with connect_peers(nats_server) as p, serving(p.server_nc, HOST, handler):
        client = tunnel.TunnelClient(p.caller_nc)
        async with asyncio.timeout(EVENT_TIMEOUT):
            async with await client.fetch(f"tunnel://{HOST}/s") as resp:
                assert (resp.status, resp.reason, resp.ok) == (status, reason, status < 400)
                assert await resp.text() == f"status {status}"


async def _async_body() -> AsyncIterator[bytes]:
    for piece in (b"must ", b"not ", b"arrive"):
        yield piece


@pytest.mark.parametrize(
    ("method", "status", "body_kind"),
    [
        ("HEAD", 200, "bytes"),
        ("HEAD", 200, "async"),
        ("GET", 204, "bytes"),
        ("GET", 204, "async"),
        ("GET", 205, "bytes"),
        ("GET", 304, "bytes"),
        ("POST", 304, "async"),
    ],
)
async def test_no_body_responses_carry_no_body_and_the_caller_does_not_wait(
    nats_server: NatsServer, method: str, status: int, body_kind: str
) -> None:
    """HEAD, 204, 205 and 304 never carry a body, even when the handler returns one."""

    async def handler(req: tunnel.Request) -> tunnel.Response:
        body: Any = b"must not arrive" if body_kind == "bytes" else _async_body()
        return tunnel.Response(status, [("etag", '"v1"'), ("content-length", "15")], body)

    wire = WireLog()
    async with connect_peers(nats_server) as p, serving(p.server_nc, HOST, handler, wire_tap=wire) as server:
        client = tunnel.TunnelClient(p.caller_nc)
        async with asyncio.timeout(EVENT_TIMEOUT):
            body = b"x" if method == "POST" else None
            resp = await client.fetch(f"tunnel://{HOST}/nb", method=method, body=body)
            assert resp.is_closed, "a body-less response must be complete when its head arrives"
            assert (resp.status, resp.header("etag")) == (status, '"v1"')
            assert await resp.read() == b""
            await wait_until(lambda: server.in_flight == 0, message="server request not finished")
        assert client.in_flight == 0
        assert server.stats.completed == 1
    data_on_wire = [
        fr
        for fr in wire.frames()
        if isinstance(fr, frames.ResponseChunk) or (isinstance(fr, frames.ResponseWhole) and fr.data)
    ]
    assert data_on_wire == [], "no body bytes may be sent for a body-less response"


@pytest.mark.parametrize(("method", "status"), [("HEAD", 200), ("GET", 204)])
async def test_no_body_response_finishes_even_when_the_handler_body_never_ends(
    nats_server: NatsServer, method: str, status: int
) -> None:
    """A HEAD handler may hand back the same streaming body as GET (say, a huge file).

    The server must not drain that body just to throw it away: the request finishes and
    the iterator is closed, instead of a handler task spinning on it forever.
    """
    closed = asyncio.Event()

    async def endless() -> AsyncIterator[bytes]:
        try:
            while True:
                await asyncio.sleep(0)
                yield b"x" * 1024
        finally:
            closed.set()

    bodies: list[AsyncIterator[bytes]] = []

    async def handler(req: tunnel.Request) -> tunnel.Response:
        bodies.append(endless())
        return tunnel.Response(status, [("content-type", "application/octet-stream")], bodies[-1])

    async with connect_peers(nats_server) as p, serving(p.server_nc, HOST, handler) as server:
        client = tunnel.TunnelClient(p.caller_nc)
        async with asyncio.timeout(EVENT_TIMEOUT):
            resp = await client.fetch(f"tunnel://{HOST}/file", method=method)
            assert resp.status == status
            assert await resp.read() == b""
        await wait_until(lambda: server.in_flight == 0, timeout=2.0, message="server still draining the body")
        # Closed before it ever ran (so its finally never runs), or closed after running: either way done.
        (body,) = bodies
        await wait_until(
            lambda: closed.is_set() or getattr(body, "ag_frame", True) is None,
            timeout=1.0,
            message="body iterator never closed",
        )


# -------------------------------------------------------------------- fail fast when nobody is there


class _StartCounter:
    """A client wire tap that counts request.start publishes and signals the n-th."""

    def __init__(self, signal_at: int = 0) -> None:
        self.starts = 0
        self.signal_at = signal_at
        self.reached = asyncio.Event()

    def __call__(self, pub: Publish) -> Iterable[Publish]:
        if pub.subject.endswith(".request"):
            self.starts += 1
            if self.starts == self.signal_at:
                self.reached.set()
        return [pub]


async def _never_called(req: tunnel.Request) -> tunnel.Response:
    raise AssertionError("no request should reach this host")


async def test_unserved_host_fails_at_once_with_tunnel_unreachable(nats_server: NatsServer) -> None:
    """A host this client never saw serving: NATS's no-responders answer is final at once."""
    async with connect_peers(nats_server) as p, serving(p.server_nc, "someone-else.example", _never_called):
        taps = _StartCounter()
        client = tunnel.TunnelClient(p.caller_nc, wire_tap=taps)
        assert client.timeouts.unreachable_grace == tunnel.DEFAULT_UNREACHABLE_GRACE == 1.0
        with pytest.raises(tunnel.TunnelUnreachable) as info:
            await client.fetch(f"tunnel://{HOST}/status")
    assert info.value.code == "tunnel_unreachable"
    assert info.value.http_status == 503
    assert repr(HOST) in info.value.message, info.value.message  # names the host, not just its token
    assert taps.starts == 2, "first contact: one quick second look, no grace"
    assert client.in_flight == 0


async def _served_then_gone(p: Any, client: tunnel.TunnelClient) -> None:
    """The client sees HOST serving once, then its server leaves."""
    async with serving(p.server_nc, HOST, _answer_ok), await client.fetch(f"tunnel://{HOST}/status") as resp:
        assert await resp.read() == b"ok"
    # The server's UNSUBs leave on its own connection: make sure NATS has them before the caller's
    # next start (else that start can reach the old subscription and no no-responders comes).
    await flush_everything(p.server_nc)


async def _answer_ok(req: tunnel.Request) -> tunnel.Response:
    return tunnel.Response(200, [], b"ok")


async def test_a_host_seen_lately_gets_the_grace_to_reconnect_then_fails(nats_server: NatsServer) -> None:
    async with connect_peers(nats_server) as p:
        taps = _StartCounter()
        client = tunnel.TunnelClient(
            p.caller_nc, wire_tap=taps, timeouts=tunnel.Timeouts(unreachable_grace=0.3)
        )
        await _served_then_gone(p, client)
        starts_before = taps.starts
        with pytest.raises(tunnel.TunnelUnreachable):
            await client.fetch(f"tunnel://{HOST}/status")
    assert taps.starts - starts_before >= 2, "a host seen lately is retried within the grace"


async def test_unserved_host_with_zero_grace_fails_at_once(nats_server: NatsServer) -> None:
    async with connect_peers(nats_server) as p:
        taps = _StartCounter()
        # No republish either (a loaded machine can delay NATS's answer past the 1 s default):
        # the one start counted is the whole story.
        client = tunnel.TunnelClient(
            p.caller_nc,
            timeouts=tunnel.Timeouts(unreachable_grace=0, republish_interval=30.0, first_frame=10.0),
            wire_tap=taps,
        )
        await _served_then_gone(p, client)
        starts_before = taps.starts
        with pytest.raises(tunnel.TunnelUnreachable):
            await client.fetch(f"tunnel://{HOST}/status")
    assert taps.starts - starts_before == 1


async def test_a_server_back_within_the_grace_period_is_reached(nats_server: NatsServer) -> None:
    """A daemon seen lately resubscribes ~50 ms after the fetch began (after the first retry): it
    gets the request, as after a reconnect."""
    calls: list[str] = []

    async def handler(req: tunnel.Request) -> tunnel.Response:
        calls.append(req.path)
        return tunnel.Response(200, [], b"late but here")

    async with connect_peers(nats_server) as p:
        taps = _StartCounter(signal_at=3)
        client = tunnel.TunnelClient(p.caller_nc, wire_tap=taps)
        await _served_then_gone(p, client)  # start 1
        fetch = asyncio.create_task(client.fetch(f"tunnel://{HOST}/status"))  # start 2
        async with asyncio.timeout(EVENT_TIMEOUT):
            await taps.reached.wait()  # start 3, the first retry: nobody has answered yet
            assert not fetch.done()
            server = await tunnel.serve(p.server_nc, HOST, handler)
            try:
                async with await fetch as resp:
                    assert await resp.read() == b"late but here"
            finally:
                await server.close(timeout=1.0)
    assert calls == ["/status"]


# -------------------------------------------------------------------- deadlines


async def test_overall_timeout_reaches_the_handler_as_a_deadline(nats_server: NatsServer) -> None:
    remaining: list[float | None] = []

    async def handler(req: tunnel.Request) -> tunnel.Response:
        now = asyncio.get_running_loop().time()
        remaining.append(None if req.deadline is None else req.deadline - now)
        return tunnel.Response(200, [], b"in time")

    async with connect_peers(nats_server) as p, serving(p.server_nc, HOST, handler):
        client = tunnel.TunnelClient(p.caller_nc)
        async with asyncio.timeout(EVENT_TIMEOUT):
            async with await client.fetch(f"tunnel://{HOST}/d", timeout=2.0) as resp:
                assert await resp.read() == b"in time"
            async with await client.fetch(f"tunnel://{HOST}/d") as resp:
                assert await resp.read() == b"in time"
    with_deadline, without_deadline = remaining
    assert with_deadline is not None and 1.0 < with_deadline <= 2.05
    assert without_deadline is None


async def test_handler_outliving_the_deadline_is_cancelled_and_caller_gets_tunnel_timeout(
    nats_server: NatsServer,
) -> None:
    """The server enforces the propagated deadline itself: the caller's abort frames are dropped here."""
    timeout = 0.5
    loop = asyncio.get_running_loop()
    cancelled_at: list[float] = []
    saw_cancelled_event: list[bool] = []
    cancelled = asyncio.Event()

    async def handler(req: tunnel.Request) -> tunnel.Response:
        try:
            await asyncio.Event().wait()  # never answers
        except asyncio.CancelledError:
            cancelled_at.append(loop.time())
            saw_cancelled_event.append(req.is_cancelled)
            cancelled.set()
            raise
        raise AssertionError("unreachable")

    def drop_aborts(pub: Publish) -> Iterable[Publish]:
        return [] if pub.subject.endswith(".abort") else [pub]

    async with connect_peers(nats_server) as p, serving(p.server_nc, HOST, handler) as server:
        client = tunnel.TunnelClient(p.caller_nc, wire_tap=drop_aborts)
        began = loop.time()
        with pytest.raises(tunnel.DeadlineExceeded) as info:
            async with asyncio.timeout(EVENT_TIMEOUT):
                await client.fetch(f"tunnel://{HOST}/slow", timeout=timeout)
        elapsed = loop.time() - began
        async with asyncio.timeout(EVENT_TIMEOUT):
            await cancelled.wait()
        await wait_until(lambda: server.in_flight == 0, message="timed-out request still in flight")
    assert info.value.code == "tunnel_timeout"
    assert timeout - 0.05 <= elapsed < timeout + 1.0
    assert saw_cancelled_event == [True]
    assert timeout - 0.05 <= cancelled_at[0] - began < timeout + 1.0
    assert client.in_flight == 0


# -------------------------------------------------------------------- several servers, repeated starts


async def test_two_servers_for_one_host_share_the_requests(nats_server: NatsServer) -> None:
    def named(name: str) -> tunnel.Handler:
        async def handler(req: tunnel.Request) -> tunnel.Response:
            return tunnel.Response(200, [("x-served-by", name)], name)

        return handler

    async with connect_peers(nats_server) as p:
        second_nc = await p.connect(nats_server.url, "tunnel-server-2")
        async with serving(p.server_nc, HOST, named("a")) as a, serving(second_nc, HOST, named("b")) as b:
            client = tunnel.TunnelClient(p.caller_nc)

            async def one(i: int) -> str:
                async with await client.fetch(f"tunnel://{HOST}/n/{i}") as resp:
                    body = await resp.text()
                    assert resp.header("x-served-by") == body
                    return body

            async with asyncio.timeout(EVENT_TIMEOUT * 2):
                served = Counter(await asyncio.gather(*(one(i) for i in range(50))))
            assert served["a"] > 0 and served["b"] > 0, served
            assert served["a"] + served["b"] == 50
            assert a.stats.requests + b.stats.requests == 50, "each request ran on exactly one server"
    assert p.errors == []


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_a_repeated_start_frame_runs_the_handler_once(nats_server: NatsServer, method: str) -> None:
    calls: list[str] = []

    async def handler(req: tunnel.Request) -> tunnel.Response:
        calls.append(req.request_id)
        return tunnel.Response(200, [], b"once:" + await req.read())

    starts: list[Publish] = []

    def duplicate_start(pub: Publish) -> Iterable[Publish]:
        if pub.subject.endswith(".request"):
            starts.append(pub)
            return [pub, pub]
        return [pub]

    async with connect_peers(nats_server) as p, serving(p.server_nc, HOST, handler) as server:
        client = tunnel.TunnelClient(p.caller_nc, wire_tap=duplicate_start)
        body = b"payload" if method == "POST" else None
        async with asyncio.timeout(EVENT_TIMEOUT):
            async with await client.fetch(f"tunnel://{HOST}/once", method=method, body=body) as resp:
                assert await resp.read() == b"once:" + (body or b"")
        await wait_until(lambda: server.stats.repeated_starts >= 1, message="duplicate start never seen")
        assert len(calls) == 1
        # The same start frame bytes once more, long after the response: still not run again.
        before = server.stats.repeated_starts
        start = starts[0]
        await p.caller_nc.publish(start.subject, start.payload, reply=start.reply)
        await wait_until(lambda: server.stats.repeated_starts == before + 1, message="late repeat not seen")
        assert len(calls) == 1
        assert server.stats.requests == 1
        assert client.in_flight == 0
    assert p.errors == []


@pytest.mark.parametrize("scenario", ["post-echo-stream", "slow-get-large-response"])
async def test_lost_ack_is_recovered_and_never_wedges_the_stream(
    nats_server: NatsServer, scenario: str
) -> None:
    """The server's first response.ack is lost on the way: the request must still complete, once.

    ``post-echo-stream``: the handler streams the request body straight back (full duplex), so
    response.start is the caller's first frame. ``slow-get-large-response``: a body-less request
    whose handler is slower than the deferred ack and answers with more than one window.
    Both bodies are larger than the 1 MiB flow-control windows.
    """
    calls: list[str] = []
    ack_dropped = asyncio.Event()
    body = bytes(range(256)) * (12 * 1024)  # 3 MiB

    async def handler(req: tunnel.Request) -> tunnel.Response:
        calls.append(req.request_id)
        if req.method == "POST":
            return tunnel.Response(200, [], req.stream())
        await ack_dropped.wait()  # slower than the deferred ack
        return tunnel.Response(200, [], body)

    def drop_first_ack(pub: Publish) -> Iterable[Publish]:
        if not ack_dropped.is_set() and isinstance(_decode(pub), frames.ResponseAck):
            ack_dropped.set()
            return []
        return [pub]

    method, request_body = ("POST", body) if scenario == "post-echo-stream" else ("GET", None)
    async with (
        connect_peers(nats_server) as p,
        serving(
            p.server_nc, HOST, handler, config=tunnel.ServerConfig(window=MiB), wire_tap=drop_first_ack
        ) as server,
    ):
        client = tunnel.TunnelClient(
            p.caller_nc, limits=tunnel.Limits(window=MiB), timeouts=tunnel.Timeouts(republish_interval=0.05)
        )
        async with asyncio.timeout(3.0):
            async with await client.fetch(f"tunnel://{HOST}/echo", method=method, body=request_body) as resp:
                assert await resp.read() == body
        assert ack_dropped.is_set()
        assert len(calls) == 1
        assert server.stats.requests == 1


def _decode(pub: Publish) -> frames.Frame:
    parsed = parse_request_subject(pub.subject, tunnel.DEFAULT_PREFIX)
    return codec.decode_frame(pub.payload, parsed[1] if parsed else None)


# -------------------------------------------------------------------- handler errors


async def _failing_handler(req: tunnel.Request) -> Any:
    if req.path == "/raise":
        raise RuntimeError("handler blew up")
    if req.path == "/none":
        return None
    if req.path == "/dict":
        return {"status": 200}
    if req.path == "/bad-status":
        return tunnel.Response(999)
    if req.path == "/bad-header":
        return tunnel.Response(200, [("bad header", "x")])
    if req.path == "/bad-body":
        return tunnel.Response(200, [], 12345)  # type: ignore[arg-type]  # deliberately wrong
    return tunnel.Response(200, [], b"still serving")


@pytest.mark.parametrize("path", ["/raise", "/none", "/dict", "/bad-status", "/bad-header", "/bad-body"])
async def test_handler_failure_reaches_the_caller_as_tunnel_handler_error(
    nats_server: NatsServer, path: str
) -> None:
    async with connect_peers(nats_server) as p, serving(p.server_nc, HOST, _failing_handler) as server:
        client = tunnel.TunnelClient(p.caller_nc)
        async with asyncio.timeout(EVENT_TIMEOUT):
            with pytest.raises(tunnel.RemoteError) as info:
                async with await client.fetch(f"tunnel://{HOST}{path}") as resp:
                    await resp.read()
            assert info.value.code == "tunnel_handler_error"
            # The server keeps serving.
            async with await client.fetch(f"tunnel://{HOST}/ok") as resp:
                assert await resp.read() == b"still serving"
        assert server.stats.handler_errors == 1
        await wait_until(lambda: server.in_flight == 0)
    assert client.in_flight == 0


async def test_body_failing_mid_stream_is_an_error_never_a_short_success(nats_server: NatsServer) -> None:
    async def handler(req: tunnel.Request) -> tunnel.Response:
        async def body() -> AsyncIterator[bytes]:
            yield b"a" * MiB
            raise OSError("disk went away")

        return tunnel.Response(200, [], body())

    async with connect_peers(nats_server) as p, serving(p.server_nc, HOST, handler):
        client = tunnel.TunnelClient(p.caller_nc)
        received = 0
        async with asyncio.timeout(EVENT_TIMEOUT):
            resp = await client.fetch(f"tunnel://{HOST}/partial")
            assert resp.status == 200
            with pytest.raises(tunnel.RemoteError) as info:
                async for chunk in resp.aiter_bytes():
                    received += len(chunk)
    assert info.value.code == "tunnel_handler_error"
    assert received <= MiB


# -------------------------------------------------------------------- request bodies, json, module fetch


async def _describe_body(req: tunnel.Request) -> tunnel.Response:
    data = await req.read()
    return tunnel.Response(
        200, [("x-has-body", str(req.has_body).lower()), ("x-length", str(len(data)))], data
    )


async def _agen(pieces: list[bytes]) -> AsyncIterator[bytes]:
    for piece in pieces:
        await asyncio.sleep(0)  # a producer that yields to the loop between pieces
        yield piece


@pytest.mark.parametrize(
    ("kind", "expected", "has_body"),
    [
        ("bytes", b"plain bytes", True),
        ("bytearray", b"a bytearray", True),
        ("str", "héllo wörld".encode(), True),
        ("async", b"alphabetagamma", True),
        ("sync-iter", b"onetwo", True),
        ("empty-bytes", b"", False),
        ("none", b"", False),
        ("empty-async", b"", True),
    ],
)
async def test_request_body_sources_arrive_intact(
    nats_server: NatsServer, kind: str, expected: bytes, has_body: bool
) -> None:
    bodies: dict[str, Any] = {
        "bytes": b"plain bytes",
        "bytearray": bytearray(b"a bytearray"),
        "str": "héllo wörld",
        "async": _agen([b"alpha", b"", b"beta", b"gamma"]),
        "sync-iter": iter([b"one", b"two"]),
        "empty-bytes": b"",
        "none": None,
        "empty-async": _agen([]),
    }
    async with connect_peers(nats_server) as p, serving(p.server_nc, HOST, _describe_body):
        client = tunnel.TunnelClient(p.caller_nc)
        async with asyncio.timeout(EVENT_TIMEOUT):
            async with await client.fetch(f"tunnel://{HOST}/b", method="POST", body=bodies[kind]) as resp:
                assert await resp.read() == expected
                assert resp.header("x-has-body") == str(has_body).lower()
                assert resp.header("x-length") == str(len(expected))


async def test_json_request_and_response(nats_server: NatsServer) -> None:
    async def handler(req: tunnel.Request) -> tunnel.Response:
        doc = await req.json()
        reply = {"echo": doc, "count": len(doc["items"])}
        return tunnel.Response(200, [("content-type", "application/json")], json.dumps(reply))

    doc = {"items": [1, 2, 3], "name": "naïve ☃", "nested": {"ok": True, "none": None}}
    async with connect_peers(nats_server) as p, serving(p.server_nc, HOST, handler):
        client = tunnel.TunnelClient(p.caller_nc)
        async with asyncio.timeout(EVENT_TIMEOUT):
            async with await client.fetch(
                f"tunnel://{HOST}/json",
                method="POST",
                headers={"content-type": "application/json"},
                body=json.dumps(doc, ensure_ascii=False),
            ) as resp:
                assert await resp.json() == {"echo": doc, "count": 3}


async def test_module_fetch_uses_one_shared_client_and_one_subscription(nats_server: NatsServer) -> None:
    async with connect_peers(nats_server) as p, serving(p.server_nc, HOST, _describe_body):
        async with asyncio.timeout(EVENT_TIMEOUT):
            for i in range(3):
                async with await tunnel.fetch(
                    p.caller_nc, f"tunnel://{HOST}/m", method="POST", body=f"n{i}"
                ) as resp:
                    assert await resp.read() == f"n{i}".encode()
        shared = tunnel.client_for(p.caller_nc)
        assert tunnel.client_for(p.caller_nc) is shared
        assert shared.in_flight == 0
        await p.caller_nc.flush()
        connz = nats_server.monitor_json("connz?subs=1")
        caller = [c for c in connz["connections"] if c.get("name") == "tunnel-caller"]
        assert len(caller) == 1
        # Its own replies, and the reference reply subject (servers under the reference daemon
        # permissions may answer nowhere else): two wildcards, nothing per request.
        assert caller[0]["subscriptions"] == 2, caller[0].get("subscriptions_list")
        await shared.aclose()


V1_FRAME_TYPES = {
    "request.start",
    "request.chunk",
    "request.end",
    "response.ack",
    "response.start",
    "response.chunk",
    "response.end",
}


@pytest.mark.parametrize(
    ("caller_fast", "server_fast"),
    [(False, False), (True, False), (False, True)],
    ids=["both-v1", "v1-server", "v1-caller"],
)
async def test_plain_v1_frames_work_for_get_and_a_1mib_post_echo(
    nats_server: NatsServer, caller_fast: bool, server_fast: bool
) -> None:
    async def handler(req: tunnel.Request) -> tunnel.Response:
        if req.method == "GET":
            return tunnel.Response(200, [("x-v", "1")], b"plain get")
        return tunnel.Response(200, [], await req.read())

    caller_wire, server_wire = WireLog(), WireLog()
    body = bytes(range(251)) * (MiB // 251 + 1)
    body = body[:MiB]
    async with (
        connect_peers(nats_server) as p,
        serving(
            p.server_nc,
            HOST,
            handler,
            config=tunnel.ServerConfig(fast_path=server_fast),
            wire_tap=server_wire,
        ),
    ):
        client = tunnel.TunnelClient(p.caller_nc, fast_path=caller_fast, wire_tap=caller_wire)
        async with asyncio.timeout(EVENT_TIMEOUT):
            async with await client.fetch(f"tunnel://{HOST}/g") as resp:
                assert (resp.header("x-v"), await resp.read()) == ("1", b"plain get")
            async with await client.fetch(f"tunnel://{HOST}/p", method="POST", body=body) as resp:
                assert await resp.read() == body
    for wire in (caller_wire, server_wire):
        assert all(pub.payload.startswith(b"{") for pub in wire.published), "binary frame in a v1 exchange"
        assert set(wire.types()) <= V1_FRAME_TYPES
    for pub in server_wire.published:
        assert "extensions" not in json.loads(pub.payload)
    assert "request.chunk" in caller_wire.types() and "response.chunk" in server_wire.types()
    assert p.errors == []


@pytest.mark.parametrize("fast_path", [True, False], ids=["extended", "v1"])
async def test_reference_reply_subjects_with_one_subscription_per_request(
    nats_server: NatsServer, fast_path: bool
) -> None:
    """``shared_replies=False`` uses exactly ``P.req.<id>.reply`` (what a v1 daemon may be allowed
    to publish to) and cleans its per-request subscription up afterwards."""

    async def handler(req: tunnel.Request) -> tunnel.Response:
        return tunnel.Response(200, [], await req.read() if req.method == "POST" else b"ok")

    server_wire = WireLog()
    body = bytes(range(256)) * 4096  # 1 MiB
    async with (
        connect_peers(nats_server) as p,
        serving(p.server_nc, HOST, handler, wire_tap=server_wire) as server,
    ):
        client = tunnel.TunnelClient(p.caller_nc, shared_replies=False, fast_path=fast_path)
        async with asyncio.timeout(EVENT_TIMEOUT):
            async with await client.fetch(f"tunnel://{HOST}/g") as resp:
                assert await resp.read() == b"ok"
            async with await client.fetch(f"tunnel://{HOST}/p", method="POST", body=body) as resp:
                assert await resp.read() == body
        reply_subjects = {pub.subject for pub in server_wire.published}
        base = server.subjects.base
        assert reply_subjects and all(
            s.startswith(base + ".req.") and s.endswith(".reply") for s in reply_subjects
        ), reply_subjects
        await wait_until(lambda: len(p.caller_nc._subs) == 0, message="per-request subscriptions leaked")
    assert p.errors == []


async def test_a_timed_out_response_read_aborts_and_never_looks_like_the_end_of_the_body(
    nats_server: NatsServer,
) -> None:
    """No silent truncation on the caller side: after a cancelled read, reading on raises."""
    gate = asyncio.Event()
    handler_cancelled = asyncio.Event()

    async def handler(req: tunnel.Request) -> tunnel.Response:
        async def body() -> AsyncIterator[bytes]:
            yield b"first"
            try:
                await gate.wait()  # the rest comes late: the caller's read times out meanwhile
            except asyncio.CancelledError:
                handler_cancelled.set()
                raise
            yield b"rest"

        return tunnel.Response(200, [], body())

    async with connect_peers(nats_server) as p, serving(p.server_nc, HOST, handler) as server:
        client = tunnel.TunnelClient(p.caller_nc)
        async with await client.fetch(f"tunnel://{HOST}/late") as resp:
            chunks = resp.aiter_bytes()
            assert await anext(chunks) == b"first"
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(anext(chunks), 0.05)
            with pytest.raises(tunnel.TunnelAborted):
                await anext(chunks)  # not StopAsyncIteration: the body did not end
        # The cancelled read aborted the request: the handler's body was cancelled and freed.
        await asyncio.wait_for(handler_cancelled.wait(), EVENT_TIMEOUT)
        await wait_until(lambda: server.in_flight == 0 and client.in_flight == 0)
    assert p.errors == []


async def test_a_response_body_is_closed_even_when_its_head_never_goes_out(nats_server: NatsServer) -> None:
    """An invalid head (here a header value with CR LF): the handler fails, and the body it
    returned is closed at once (its upstream socket or file released), never left to the GC."""
    closed = asyncio.Event()

    async def handler(req: tunnel.Request) -> tunnel.Response:
        async def body() -> AsyncIterator[bytes]:
            try:
                yield b"never sent"
            finally:
                closed.set()

        gen = body()
        await anext(gen)  # started, as a proxy's relay is once it has the upstream's head
        return tunnel.Response(200, [("x-bad", "a\r\nb")], gen)

    async with connect_peers(nats_server) as p, serving(p.server_nc, HOST, handler):
        with pytest.raises(tunnel.RemoteError) as caught:
            await tunnel.TunnelClient(p.caller_nc).fetch(f"tunnel://{HOST}/bad-head")
        assert caught.value.code == "tunnel_handler_error"
        await asyncio.wait_for(closed.wait(), EVENT_TIMEOUT)


async def test_serve_subscribes_its_request_subject_last(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the request subscription exists, starts arrive and are acked naming our up subject:
    a body sent there before that subscription existed would be lost (a caller's upload then
    waits, and fails when the server is later closed). So it must come last."""
    async with connect_peers(nats_server) as p:
        order: list[str] = []
        real_subscribe = p.server_nc.subscribe

        async def recording_subscribe(subject: str, *args: Any, **kwargs: Any) -> Any:
            order.append(subject)
            return await real_subscribe(subject, *args, **kwargs)

        monkeypatch.setattr(p.server_nc, "subscribe", recording_subscribe)
        async with serving(p.server_nc, HOST, _answer_ok):
            subjects = tunnel.HostSubjects.for_host(HOST)
            # The request subscription comes after everything a start needs; the readiness
            # subject after it (held only while requests can arrive).
            assert order[-2:] == [subjects.request, subjects.ready], order
            assert subjects.all_aborts in order[:-2]
            assert any(".up." in subject for subject in order[:-2]), order
