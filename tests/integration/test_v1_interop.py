"""Interoperability with peers that speak only the reference ``tunnel.v1`` (issue 3).

The v1 peer (``tests/integration/v1_peer.py``) is written from
shared/PROTOCOL-v1-reference.md alone and imports nothing from ``tunnel``. Over a
real nats-server:

- our server (``tunnel.serve``) answers a ``V1Caller`` exactly as a v1 caller
  expects: ack first, then start, base64url JSON chunks, end; aborts, deadlines,
  repeated starts, handler errors, HEAD/204, 10 MiB bodies both ways;
- our client (``tunnel.TunnelClient`` with default settings, i.e. offering its
  extensions) calls a ``V1Server`` and falls back to plain v1: same list, plus
  early close and the caller's own timeouts.

Every test ends by asserting the v1 peer never saw a frame it cannot read, a
malformed field, a sequence gap or an extension field (``assert_plain_v1``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

import tunnel
from cli.nats_server import NatsServer
from tests.helpers import wait_until
from tests.integration.tunnel_harness import (
    EVENT_TIMEOUT,
    KiB,
    MiB,
    WireLog,
    connect_peers,
    hashed_body,
    serving,
)
from tests.integration.v1_peer import (
    MAX_REQUEST_CHUNK,
    FrameLog,
    V1Caller,
    V1Error,
    V1Reply,
    V1Server,
    V1ServerRequest,
    host_base,
)
from tunnel._events import Publish

HOST = "desk.example"
PREFIXES = ["_tunnel.v1", "tunnel.v1"]
BIG = 10 * MiB
V1_RESPONSE_TYPES = {"response.ack", "response.start", "response.chunk", "response.end", "response.error"}
B64URL = re.compile(r"[A-Za-z0-9_-]*")
# "Cancelled within 1 s" of an abort: the promise under test.
CANCEL_BOUND = 1.0


@pytest.fixture(params=PREFIXES)
def prefix(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def assert_plain_v1(log: FrameLog, *, allowed_extra: set[tuple[str, tuple[str, ...]]] | None = None) -> None:
    """The v1 peer saw only well-formed v1 frames without fields v1 does not define."""
    assert log.unknown_frames == [], f"frames a v1 peer cannot read: {log.unknown_frames[:3]}"
    assert log.violations == []
    assert [x for x in log.extra_fields if x not in (allowed_extra or set())] == []


def frames_for(wire: WireLog, request_id: str) -> list[dict[str, Any]]:
    """The JSON frames our server published for one request (asserting each is JSON)."""
    out = []
    for pub in wire.published:
        if f".req.{request_id}." not in pub.subject:
            continue
        assert pub.payload[:1] == b"{", f"binary frame sent to a v1 caller: {pub.payload[:16]!r}"
        out.append(json.loads(pub.payload))
    return out


@asynccontextmanager
async def v1_serving(nc: Any, handler: Any, prefix: str, hostname: str = HOST) -> AsyncIterator[V1Server]:
    server = V1Server(nc, hostname, handler, prefix=prefix)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


async def _echo(req: tunnel.Request) -> tunnel.Response:
    body = await req.read()
    return tunnel.Response(
        200, [("x-method", req.method), ("x-url", req.url)], req.method.encode() + b":" + body
    )


async def _v1_echo(req: V1ServerRequest) -> V1Reply:
    body = await req.read()
    return V1Reply(200, [("x-method", req.method), ("x-url", req.url)], req.method.encode() + b":" + body)


# ============================================================== our server, v1 caller


async def test_our_server_answers_small_get_and_post_from_a_v1_caller(
    nats_server: NatsServer, prefix: str
) -> None:
    async with connect_peers(nats_server) as p, serving(p.server_nc, HOST, _echo, prefix=prefix) as server:
        caller = V1Caller(p.caller_nc, prefix=prefix)
        async with asyncio.timeout(EVENT_TIMEOUT):
            got = await caller.request(f"tunnel://{HOST}/hello?x=1&x=2")
            posted = await caller.request(f"tunnel://{HOST}/p", method="POST", body=b"ping \x00\xff")
    assert (got.status, got.body) == (200, b"GET:")
    assert ("x-url", "/hello?x=1&x=2") in got.headers
    assert (posted.status, posted.body) == (200, b"POST:ping \x00\xff")
    assert server.stats.completed == 2
    assert server.stats.protocol_errors == server.stats.malformed_frames == 0
    assert_plain_v1(caller.log)
    assert p.errors == []


async def test_our_server_takes_a_streamed_10_mib_request_body_from_a_v1_caller(
    nats_server: NatsServer, prefix: str
) -> None:
    sent = hashlib.sha256()

    async def handler(req: tunnel.Request) -> tunnel.Response:
        digest = hashlib.sha256()
        size = 0
        async for chunk in req.stream():
            digest.update(chunk)
            size += len(chunk)
        return tunnel.Response(200, body=f"{size}:{digest.hexdigest()}")

    async with connect_peers(nats_server) as p, serving(p.server_nc, HOST, handler, prefix=prefix):
        caller = V1Caller(p.caller_nc, prefix=prefix)
        async with asyncio.timeout(4 * EVENT_TIMEOUT):
            result = await caller.request(
                f"tunnel://{HOST}/upload", method="PUT", body=hashed_body(BIG, sent)
            )
    assert result.status == 200
    assert result.body.decode() == f"{BIG}:{sent.hexdigest()}"
    chunks = caller.calls[0].body_sent_chunks
    assert sum(chunks) == BIG and max(chunks) <= MAX_REQUEST_CHUNK
    assert_plain_v1(caller.log)
    assert p.errors == []


async def test_our_server_streams_a_10_mib_response_body_to_a_v1_caller(
    nats_server: NatsServer, prefix: str
) -> None:
    produced = hashlib.sha256()

    async def handler(req: tunnel.Request) -> tunnel.Response:
        return tunnel.Response(
            200, [("content-type", "application/octet-stream")], hashed_body(BIG, produced)
        )

    async with connect_peers(nats_server) as p, serving(p.server_nc, HOST, handler, prefix=prefix):
        caller = V1Caller(p.caller_nc, prefix=prefix)
        received = hashlib.sha256()
        size = 0
        async with asyncio.timeout(4 * EVENT_TIMEOUT):
            call = await caller.open(f"tunnel://{HOST}/download")
            head = await call.response()
            async for chunk in call.iter_body():
                received.update(chunk)
                size += len(chunk)
            await call.close()
    assert head.status == 200
    assert size == BIG
    assert received.hexdigest() == produced.hexdigest()
    assert_plain_v1(caller.log)  # includes: chunk seqs contiguous from 0, end seq = chunk count
    assert p.errors == []


async def test_repeated_headers_keep_their_order_both_ways_with_a_v1_caller(
    nats_server: NatsServer, prefix: str
) -> None:
    sent_headers = [("x-a", "1"), ("set-cookie", "a=1"), ("X-A", "2"), ("set-cookie", "b=2"), ("x-e", "é ☃")]
    reply_headers = [("set-cookie", "s=1"), ("vary", "a"), ("Set-Cookie", "s=2"), ("vary", "b")]
    seen: list[list[tuple[str, str]]] = []

    async def handler(req: tunnel.Request) -> tunnel.Response:
        seen.append(list(req.headers))
        return tunnel.Response(200, reply_headers, b"ok")

    async with connect_peers(nats_server) as p, serving(p.server_nc, HOST, handler, prefix=prefix):
        caller = V1Caller(p.caller_nc, prefix=prefix)
        async with asyncio.timeout(EVENT_TIMEOUT):
            result = await caller.request(f"tunnel://{HOST}/h", headers=sent_headers)
    assert seen == [sent_headers]
    assert result.headers == reply_headers
    assert_plain_v1(caller.log)


@pytest.mark.parametrize(("method", "status"), [("HEAD", 200), ("GET", 204), ("GET", 304)])
async def test_our_server_sends_a_v1_caller_no_body_for_head_and_204_304(
    nats_server: NatsServer, prefix: str, method: str, status: int
) -> None:
    async def handler(req: tunnel.Request) -> tunnel.Response:
        return tunnel.Response(status, [("content-length", "5")], b"hello")

    wire = WireLog(prefix)
    async with (
        connect_peers(nats_server) as p,
        serving(p.server_nc, HOST, handler, prefix=prefix, wire_tap=wire) as server,
    ):
        caller = V1Caller(p.caller_nc, prefix=prefix)
        async with asyncio.timeout(EVENT_TIMEOUT):
            call = await caller.open(f"tunnel://{HOST}/nobody", method=method)
            head = await call.response()
            assert await call.read() == b""
            await wait_until(lambda: server.stats.completed == 1, message="response not completed")
            await wait_until(lambda: [f["type"] for f in call.received][-1:] == ["response.end"])
            await call.close()
    assert (head.status, head.has_body) == (status, False)
    assert [fr["type"] for fr in frames_for(wire, call.request_id)] == [
        "response.ack",
        "response.start",
        "response.end",
    ]
    assert [fr["type"] for fr in call.received] == ["response.ack", "response.start", "response.end"]
    assert call.received[-1]["seq"] == 0
    assert_plain_v1(caller.log)


async def test_handler_error_reaches_a_v1_caller_as_tunnel_handler_error(
    nats_server: NatsServer, prefix: str
) -> None:
    async def handler(req: tunnel.Request) -> tunnel.Response:
        raise RuntimeError("boom")

    async with connect_peers(nats_server) as p, serving(p.server_nc, HOST, handler, prefix=prefix) as server:
        caller = V1Caller(p.caller_nc, prefix=prefix)
        async with asyncio.timeout(EVENT_TIMEOUT):
            with pytest.raises(V1Error) as info:
                await caller.request(f"tunnel://{HOST}/boom")
    assert info.value.code == "tunnel_handler_error"
    assert [fr["type"] for fr in caller.calls[0].received] == ["response.ack", "response.error"]
    assert server.stats.handler_errors == 1
    assert_plain_v1(caller.log)


@pytest.mark.parametrize("when", ["before_response_start", "during_response_body"])
async def test_v1_caller_abort_cancels_our_handler_within_a_second(
    nats_server: NatsServer, prefix: str, when: str
) -> None:
    loop = asyncio.get_running_loop()
    started = asyncio.Event()
    cancelled_at: list[float] = []

    async def endless() -> AsyncIterator[bytes]:
        try:
            while True:
                yield b"x" * KiB
                started.set()
                await asyncio.sleep(0.01)  # a slow producer, not synchronisation
        except asyncio.CancelledError:
            cancelled_at.append(loop.time())
            raise

    async def handler(req: tunnel.Request) -> tunnel.Response:
        if when == "during_response_body":
            return tunnel.Response(200, body=endless())
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled_at.append(loop.time())
            raise
        raise AssertionError("unreachable")

    async with connect_peers(nats_server) as p, serving(p.server_nc, HOST, handler, prefix=prefix) as server:
        caller = V1Caller(p.caller_nc, prefix=prefix)
        async with asyncio.timeout(EVENT_TIMEOUT):
            call = await caller.open(f"tunnel://{HOST}/slow")
            if when == "during_response_body":
                await call.response()
                await anext(call.iter_body())
            await asyncio.wait_for(started.wait(), EVENT_TIMEOUT)
            aborted_at = loop.time()
            await call.abort("user went away")
            await wait_until(
                lambda: bool(cancelled_at), timeout=EVENT_TIMEOUT, message="handler not cancelled"
            )
            await wait_until(lambda: server.in_flight == 0)
            await call.close()
    assert cancelled_at[0] - aborted_at < CANCEL_BOUND
    assert server.stats.aborted == 1
    assert_plain_v1(caller.log)


async def test_deadline_unix_ms_from_a_v1_caller_is_honoured(nats_server: NatsServer, prefix: str) -> None:
    loop = asyncio.get_running_loop()
    deadlines: list[tuple[float | None, float]] = []  # (req.deadline, loop time when the handler ran)
    cancelled_at: list[float] = []

    async def handler(req: tunnel.Request) -> tunnel.Response:
        deadlines.append((req.deadline, loop.time()))
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled_at.append(loop.time())
            raise
        raise AssertionError("unreachable")

    budget = 0.4
    async with connect_peers(nats_server) as p, serving(p.server_nc, HOST, handler, prefix=prefix) as server:
        caller = V1Caller(p.caller_nc, prefix=prefix)
        async with asyncio.timeout(EVENT_TIMEOUT):
            sent_at = loop.time()
            deadline_ms = int((time.time() + budget) * 1000)
            with pytest.raises(V1Error) as info:
                await caller.request(f"tunnel://{HOST}/slow", deadline_unix_ms=deadline_ms)
            await wait_until(lambda: server.in_flight == 0)
    assert info.value.code == "tunnel_timeout"
    assert len(deadlines) == 1
    deadline, ran_at = deadlines[0]
    assert deadline is not None and ran_at < deadline
    assert abs(deadline - (sent_at + budget)) < 0.25  # the wall-clock deadline, on the loop clock
    assert len(cancelled_at) == 1
    assert deadline - 0.05 <= cancelled_at[0] < deadline + CANCEL_BOUND
    assert server.stats.timeouts == 1
    assert_plain_v1(caller.log)


async def test_a_repeated_start_from_a_v1_caller_only_re_acks(nats_server: NatsServer, prefix: str) -> None:
    release = asyncio.Event()
    runs: list[str] = []

    async def handler(req: tunnel.Request) -> tunnel.Response:
        runs.append(req.request_id)
        await release.wait()
        return tunnel.Response(200, body=b"once")

    def acks(call: Any) -> int:
        return sum(1 for fr in call.received if fr["type"] == "response.ack")

    async with connect_peers(nats_server) as p, serving(p.server_nc, HOST, handler, prefix=prefix) as server:
        # No automatic republish: the test repeats the start by hand.
        caller = V1Caller(p.caller_nc, prefix=prefix, republish_interval=60.0)
        async with asyncio.timeout(EVENT_TIMEOUT):
            call = await caller.open(f"tunnel://{HOST}/once")
            await wait_until(lambda: acks(call) == 1, message="no ack")
            await call.republish()
            await call.republish()
            await wait_until(lambda: acks(call) == 3, message="repeated starts while running not re-acked")
            release.set()
            assert (await call.response()).status == 200
            assert await call.read() == b"once"
            await call.republish()  # after the response: the v1 server answer is another ack
            await wait_until(lambda: acks(call) == 4, message="repeated start after the end not re-acked")
            await call.close()
    assert runs == [call.request_id]
    assert server.stats.requests == 1
    assert server.stats.repeated_starts == 3
    types = [fr["type"] for fr in call.received]
    assert types == ["response.ack"] * 3 + [
        "response.start",
        "response.chunk",
        "response.end",
        "response.ack",
    ]
    assert_plain_v1(caller.log)


async def test_a_lost_ack_is_recovered_by_the_v1_callers_republish(nats_server: NatsServer) -> None:
    """The body only flows after a first frame: the republished start gets a re-ack, the body flows."""
    dropped: list[Publish] = []

    def drop_first_ack(pub: Publish) -> list[Publish]:
        if not dropped and b'"response.ack"' in pub.payload:
            dropped.append(pub)
            return []
        return [pub]

    async with (
        connect_peers(nats_server) as p,
        serving(p.server_nc, HOST, _echo, wire_tap=drop_first_ack) as server,
    ):
        caller = V1Caller(p.caller_nc, republish_interval=0.2)
        async with asyncio.timeout(EVENT_TIMEOUT):
            result = await caller.request(f"tunnel://{HOST}/p", method="POST", body=b"after the ack")
    assert len(dropped) == 1
    assert result.body == b"POST:after the ack"
    assert caller.calls[0].starts_published >= 2
    assert server.stats.requests == 1 and server.stats.repeated_starts >= 1
    assert_plain_v1(caller.log)


async def test_our_server_sends_a_v1_caller_only_plain_v1_frames_in_order(
    nats_server: NatsServer, prefix: str
) -> None:
    async def handler(req: tunnel.Request) -> tunnel.Response:
        body = await req.read()
        return tunnel.Response(201, [("x-len", str(len(body)))], body * 3, status_text="Created")

    wire = WireLog(prefix)
    upload = bytes(range(256)) * 800  # 200 KiB: several v1 chunks each way
    async with (
        connect_peers(nats_server) as p,
        serving(p.server_nc, HOST, handler, prefix=prefix, wire_tap=wire) as server,
    ):
        caller = V1Caller(p.caller_nc, prefix=prefix)
        async with asyncio.timeout(EVENT_TIMEOUT):
            result = await caller.request(f"tunnel://{HOST}/shape", method="POST", body=upload)
            await wait_until(lambda: server.stats.completed == 1)
    assert (result.status, result.status_text, result.body) == (201, "Created", upload * 3)
    call = caller.calls[0]
    base = host_base(HOST, prefix)
    # Everything our server published went to the caller's reply subject, as JSON v1 frames.
    assert {pub.subject for pub in wire.published} == {f"{base}.req.{call.request_id}.reply"}
    sent = frames_for(wire, call.request_id)
    types = [fr["type"] for fr in sent]
    assert types[0] == "response.ack" and types[1] == "response.start" and types[-1] == "response.end"
    assert set(types[2:-1]) == {"response.chunk"} and len(types) > 4
    assert sent == call.received  # nothing else, nothing lost, same order
    assert all("extensions" not in fr for fr in sent)
    assert sent[0] == {"type": "response.ack", "requestId": call.request_id}
    assert sent[1] == {
        "type": "response.start",
        "requestId": call.request_id,
        "status": 201,
        "statusText": "Created",
        "headers": [["x-len", str(len(upload))]],
    }
    chunks = [fr for fr in sent if fr["type"] == "response.chunk"]
    assert [fr["seq"] for fr in chunks] == list(range(len(chunks)))
    assert all(B64URL.fullmatch(fr["data"]) for fr in chunks)
    assert sent[-1] == {"type": "response.end", "requestId": call.request_id, "seq": len(chunks)}
    assert_plain_v1(caller.log)


async def test_concurrent_v1_calls_each_get_their_own_response(nats_server: NatsServer, prefix: str) -> None:
    async with connect_peers(nats_server) as p, serving(p.server_nc, HOST, _echo, prefix=prefix) as server:
        caller = V1Caller(p.caller_nc, prefix=prefix)
        async with asyncio.timeout(EVENT_TIMEOUT):
            results = await asyncio.gather(
                *(
                    caller.request(f"tunnel://{HOST}/n/{i}", method="POST", body=f"body {i}".encode() * 500)
                    for i in range(20)
                )
            )
    for i, result in enumerate(results):
        assert ("x-url", f"/n/{i}") in result.headers
        assert result.body == b"POST:" + f"body {i}".encode() * 500
    assert server.stats.completed == 20
    assert_plain_v1(caller.log)


async def test_an_abort_seen_before_its_start_keeps_the_handler_from_running(nats_server: NatsServer) -> None:
    runs: list[str] = []

    async def handler(req: tunnel.Request) -> tunnel.Response:
        runs.append(req.url)
        return tunnel.Response(200, body=b"ran")

    async with connect_peers(nats_server) as p, serving(p.server_nc, HOST, handler) as server:
        caller = V1Caller(p.caller_nc, republish_interval=60.0)
        rid = "ab0" + "0" * 29
        abort = {"type": "abort", "requestId": rid, "reason": "tunnel_aborted"}
        await p.caller_nc.publish(f"{host_base(HOST)}.req.{rid}.abort", json.dumps(abort).encode())
        await p.caller_nc.flush()
        async with asyncio.timeout(EVENT_TIMEOUT):
            late = await caller.open(f"tunnel://{HOST}/late", request_id=rid)
            # Starts are handled in order: once a later request is answered, the late one was seen.
            later = await caller.request(f"tunnel://{HOST}/later")
            await late.close()
    assert later.body == b"ran"
    assert runs == ["/later"]
    assert late.received == []
    assert server.stats.requests == 1
    assert_plain_v1(caller.log)


async def test_a_start_whose_deadline_already_passed_gets_tunnel_timeout_without_running(
    nats_server: NatsServer, prefix: str
) -> None:
    runs: list[str] = []

    async def handler(req: tunnel.Request) -> tunnel.Response:
        runs.append(req.url)
        return tunnel.Response(200)

    async with connect_peers(nats_server) as p, serving(p.server_nc, HOST, handler, prefix=prefix):
        caller = V1Caller(p.caller_nc, prefix=prefix)
        async with asyncio.timeout(EVENT_TIMEOUT):
            with pytest.raises(V1Error) as info:
                await caller.request(f"tunnel://{HOST}/late", deadline_unix_ms=int(time.time() * 1000) - 1000)
    assert info.value.code == "tunnel_timeout"
    assert runs == []
    assert_plain_v1(caller.log)


async def test_request_error_from_a_v1_caller_stops_our_handler(nats_server: NatsServer, prefix: str) -> None:
    failures: list[BaseException] = []
    first_chunk = asyncio.Event()

    async def handler(req: tunnel.Request) -> tunnel.Response:
        try:
            async for _ in req.stream():
                first_chunk.set()
        except BaseException as exc:
            failures.append(exc)
            raise
        return tunnel.Response(200)

    async def failing_body() -> AsyncIterator[bytes]:
        yield b"part one"
        await first_chunk.wait()
        raise OSError("disk went away")

    async with connect_peers(nats_server) as p, serving(p.server_nc, HOST, handler, prefix=prefix) as server:
        caller = V1Caller(p.caller_nc, prefix=prefix)
        async with asyncio.timeout(EVENT_TIMEOUT):
            call = await caller.open(f"tunnel://{HOST}/up", method="POST", body=failing_body())
            await wait_until(lambda: bool(failures), message="handler not stopped by request.error")
            await wait_until(lambda: server.in_flight == 0)
            await call.close()
    assert server.stats.aborted == 1
    assert server.stats.handler_errors == 0  # the caller's fault, not the handler's
    assert_plain_v1(caller.log)


# ============================================================== our client, v1 server


async def test_our_client_calls_a_v1_server_small_get_and_post(nats_server: NatsServer, prefix: str) -> None:
    async with connect_peers(nats_server) as p, v1_serving(p.server_nc, _v1_echo, prefix) as server:
        client = tunnel.TunnelClient(p.caller_nc, prefix=prefix)
        async with asyncio.timeout(EVENT_TIMEOUT):
            async with await client.fetch(f"tunnel://{HOST}/hello?x=1") as resp:
                got = (resp.status, resp.header("x-url"), await resp.read())
            async with await client.fetch(f"tunnel://{HOST}/p", method="POST", body=b"ping") as resp:
                posted = (resp.status, await resp.read())
        await client.aclose()
    assert got == (200, "/hello?x=1", b"GET:")
    assert posted == (200, b"POST:ping")
    base = host_base(HOST, prefix)
    get_start, post_start = server.starts
    assert get_start["protocol"] == "tunnel.v1" and "bodySubject" not in get_start
    rid = post_start["requestId"]
    assert post_start["bodySubject"] == f"{base}.req.{rid}.body"
    assert post_start["abortSubject"] == f"{base}.req.{rid}.abort"
    assert post_start["replySubject"].startswith(f"{base}.req.{rid}.reply")
    # Our extension offer is an extra field the v1 server ignores; nothing else is extra.
    assert_plain_v1(server.log, allowed_extra={("request.start", ("extensions",))})
    assert [fr["type"] for fr in server.body_frames] == ["request.chunk", "request.end"]
    assert server.stray == []
    assert p.errors == []


async def test_our_client_streams_a_10_mib_request_body_to_a_v1_server(
    nats_server: NatsServer, prefix: str
) -> None:
    async def handler(req: V1ServerRequest) -> V1Reply:
        digest = hashlib.sha256()
        size = 0
        async for chunk in req.stream():
            digest.update(chunk)
            size += len(chunk)
        return V1Reply(200, body=f"{size}:{digest.hexdigest()}".encode())

    sent = hashlib.sha256()
    async with connect_peers(nats_server) as p, v1_serving(p.server_nc, handler, prefix) as server:
        client = tunnel.TunnelClient(p.caller_nc, prefix=prefix)
        async with asyncio.timeout(4 * EVENT_TIMEOUT):
            resp = await client.fetch(f"tunnel://{HOST}/up", method="PUT", body=hashed_body(BIG, sent))
            answer = await resp.read()
        await client.aclose()
    assert resp.status == 200
    assert answer.decode() == f"{BIG}:{sent.hexdigest()}"
    types = [fr["type"] for fr in server.body_frames]
    assert types[-1] == "request.end" and set(types[:-1]) == {"request.chunk"}
    assert_plain_v1(server.log, allowed_extra={("request.start", ("extensions",))})
    assert server.stray == []
    assert p.errors == []


async def test_our_client_reads_a_10_mib_response_body_from_a_v1_server(
    nats_server: NatsServer, prefix: str
) -> None:
    produced = hashlib.sha256()

    async def handler(req: V1ServerRequest) -> V1Reply:
        return V1Reply(200, [("content-type", "application/octet-stream")], hashed_body(BIG, produced))

    async with connect_peers(nats_server) as p, v1_serving(p.server_nc, handler, prefix) as server:
        client = tunnel.TunnelClient(p.caller_nc, prefix=prefix)
        received = hashlib.sha256()
        size = 0
        async with asyncio.timeout(4 * EVENT_TIMEOUT):
            async with await client.fetch(f"tunnel://{HOST}/down") as resp:
                async for chunk in resp.aiter_bytes():
                    received.update(chunk)
                    size += len(chunk)
        await client.aclose()
    assert size == BIG
    assert received.hexdigest() == produced.hexdigest()
    assert server.completed == [server.starts[0]["requestId"]]
    assert server.aborts == []
    assert_plain_v1(server.log, allowed_extra={("request.start", ("extensions",))})
    assert server.stray == []  # e.g. no credit frames to an up subject the server never named
    assert p.errors == []


async def test_our_client_keeps_repeated_headers_in_order_with_a_v1_server(
    nats_server: NatsServer, prefix: str
) -> None:
    sent_headers = [("x-a", "1"), ("set-cookie", "a=1"), ("X-A", "2"), ("set-cookie", "b=2")]
    reply_headers = [("set-cookie", "s=1"), ("vary", "a"), ("Set-Cookie", "s=2"), ("vary", "b")]
    seen: list[list[tuple[str, str]]] = []

    async def handler(req: V1ServerRequest) -> V1Reply:
        seen.append(req.headers)
        return V1Reply(200, reply_headers, b"ok", status_text="Fine")

    async with connect_peers(nats_server) as p, v1_serving(p.server_nc, handler, prefix) as server:
        client = tunnel.TunnelClient(p.caller_nc, prefix=prefix)
        async with asyncio.timeout(EVENT_TIMEOUT):
            async with await client.fetch(f"tunnel://{HOST}/h", headers=sent_headers) as resp:
                headers = resp.headers
                assert resp.reason == "Fine"
                assert resp.header_values("set-cookie") == ["s=1", "s=2"]
                assert await resp.read() == b"ok"
        await client.aclose()
    assert seen == [sent_headers]
    assert headers == reply_headers
    assert_plain_v1(server.log, allowed_extra={("request.start", ("extensions",))})


@pytest.mark.parametrize(("method", "status"), [("HEAD", 200), ("GET", 204)])
async def test_our_client_expects_no_body_from_a_v1_server_for_head_and_204(
    nats_server: NatsServer, prefix: str, method: str, status: int
) -> None:
    async def handler(req: V1ServerRequest) -> V1Reply:
        return V1Reply(status, [("content-length", "5")], b"hello")

    async with connect_peers(nats_server) as p, v1_serving(p.server_nc, handler, prefix) as server:
        client = tunnel.TunnelClient(p.caller_nc, prefix=prefix)
        async with asyncio.timeout(EVENT_TIMEOUT):
            resp = await client.fetch(f"tunnel://{HOST}/nobody", method=method)
            assert (resp.status, resp.header("content-length")) == (status, "5")
            assert await resp.read() == b""
            await wait_until(lambda: server.in_flight == 0)
        await client.aclose()
    assert client.in_flight == 0
    assert server.aborts == []  # the response was complete: nothing to abort
    assert_plain_v1(server.log, allowed_extra={("request.start", ("extensions",))})


async def test_v1_server_handler_error_reaches_our_client_with_its_code(
    nats_server: NatsServer, prefix: str
) -> None:
    async def handler(req: V1ServerRequest) -> V1Reply:
        raise RuntimeError("boom")

    async with connect_peers(nats_server) as p, v1_serving(p.server_nc, handler, prefix) as server:
        client = tunnel.TunnelClient(p.caller_nc, prefix=prefix)
        async with asyncio.timeout(EVENT_TIMEOUT):
            with pytest.raises(tunnel.RemoteError) as info:
                await client.fetch(f"tunnel://{HOST}/boom")
        await client.aclose()
    assert info.value.code == "tunnel_handler_error"
    assert client.in_flight == 0
    assert_plain_v1(server.log, allowed_extra={("request.start", ("extensions",))})


async def test_closing_a_response_early_aborts_the_v1_server(nats_server: NatsServer, prefix: str) -> None:
    async def endless() -> AsyncIterator[bytes]:
        while True:
            yield b"y" * KiB
            await asyncio.sleep(0.01)  # a slow producer, not synchronisation

    async def handler(req: V1ServerRequest) -> V1Reply:
        return V1Reply(200, body=endless())

    async with connect_peers(nats_server) as p, v1_serving(p.server_nc, handler, prefix) as server:
        client = tunnel.TunnelClient(p.caller_nc, prefix=prefix)
        async with asyncio.timeout(EVENT_TIMEOUT):
            resp = await client.fetch(f"tunnel://{HOST}/stream")
            rid = resp.request_id
            assert await anext(resp.aiter_bytes()) == b"y" * KiB
            await resp.aclose()
            await wait_until(lambda: rid in server.cancelled, message="abort did not reach the v1 server")
        await client.aclose()
    assert [a[0] for a in server.aborts] == [rid]
    assert server.completed == []
    assert_plain_v1(server.log, allowed_extra={("request.start", ("extensions",))})
    assert server.stray == []


async def test_our_clients_overall_timeout_applies_to_a_v1_server_and_aborts_it(
    nats_server: NatsServer, prefix: str
) -> None:
    async def handler(req: V1ServerRequest) -> V1Reply:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    loop = asyncio.get_running_loop()
    async with connect_peers(nats_server) as p, v1_serving(p.server_nc, handler, prefix) as server:
        client = tunnel.TunnelClient(p.caller_nc, prefix=prefix)
        async with asyncio.timeout(EVENT_TIMEOUT):
            before_ms = time.time() * 1000
            started = loop.time()
            with pytest.raises(tunnel.DeadlineExceeded) as info:
                await client.fetch(f"tunnel://{HOST}/slow", timeout=0.4)
            elapsed = loop.time() - started
            rid = server.starts[0]["requestId"]
            await wait_until(
                lambda: rid in server.cancelled, message="timeout abort did not reach the server"
            )
        await client.aclose()
    assert info.value.code == "tunnel_timeout"
    assert 0.35 <= elapsed < 0.4 + CANCEL_BOUND
    assert abs(server.starts[0]["deadlineUnixMs"] - (before_ms + 400)) < 250
    assert server.aborts == [(rid, "tunnel_timeout")]
    assert_plain_v1(server.log, allowed_extra={("request.start", ("extensions",))})


async def test_our_client_expects_no_heartbeats_from_a_v1_server_and_checks_it_is_still_there(
    nats_server: NatsServer, prefix: str
) -> None:
    """A v1 server sends nothing between ack and response.start, nor while its body is quiet:
    silence is normal. Each idle period of silence the caller checks that the host still has a
    server (an abort of an id nobody has, with a reply inbox); only when none is left does the
    request fail with tunnel_idle_timeout."""
    idle = 0.25

    async def one_then_silence() -> AsyncIterator[bytes]:
        yield b"first"
        await asyncio.Event().wait()

    async def handler(req: V1ServerRequest) -> V1Reply:
        await asyncio.sleep(3 * idle)  # a slow handler, longer than the idle timeout
        return V1Reply(200, body=one_then_silence())

    async with connect_peers(nats_server) as p:
        server_nc = await p.connect(nats_server.url, "v1-daemon")
        server = await V1Server(server_nc, HOST, handler, prefix=prefix).start()
        client = tunnel.TunnelClient(p.caller_nc, prefix=prefix, timeouts=tunnel.Timeouts(idle=idle))
        async with asyncio.timeout(EVENT_TIMEOUT):
            resp = await client.fetch(f"tunnel://{HOST}/slow")
            body = resp.aiter_bytes()
            assert await anext(body) == b"first"
            rid = resp.request_id
            reading = asyncio.ensure_future(anext(body))
            # Quiet for several idle periods: each answered by a liveness probe, not a failure.
            await wait_until(lambda: len([a for a in server.aborts if a[0] != rid]) >= 3)
            assert not reading.done()
            assert all(reason == "liveness probe" for _, reason in server.aborts)
            # The daemon goes away without a word: the next probe finds nobody.
            await server_nc.close()
            with pytest.raises(tunnel.IdleTimeout, match="has no server any more"):
                await reading
        await client.aclose()
    assert rid not in server.cancelled  # the server was never told to stop: it was gone
    assert_plain_v1(server.log, allowed_extra={("request.start", ("extensions",))})


async def test_cancelling_a_pending_fetch_aborts_the_v1_server(nats_server: NatsServer, prefix: str) -> None:
    entered = asyncio.Event()

    async def handler(req: V1ServerRequest) -> V1Reply:
        entered.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async with connect_peers(nats_server) as p, v1_serving(p.server_nc, handler, prefix) as server:
        client = tunnel.TunnelClient(p.caller_nc, prefix=prefix)
        async with asyncio.timeout(EVENT_TIMEOUT):
            task = asyncio.create_task(client.fetch(f"tunnel://{HOST}/pending"))
            await entered.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            rid = server.starts[0]["requestId"]
            await wait_until(lambda: rid in server.cancelled, message="cancel did not reach the v1 server")
        await client.aclose()
    assert [a[0] for a in server.aborts] == [rid]
    assert client.in_flight == 0
    assert_plain_v1(server.log, allowed_extra={("request.start", ("extensions",))})
