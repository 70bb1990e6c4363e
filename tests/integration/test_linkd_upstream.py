"""The ``--upstream`` reverse proxy through a real tunnel to a real local aiohttp service.

50 MiB each way, byte-exact (sha256), and streamed: the local service sees the upload's
first bytes before the caller has produced its last, and the caller gets the download's
first bytes before the service has written its last.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web
from nats.aio.client import Client

import tunnel
from cli.nats_server import NatsServer, free_port
from linkd.routes import LinkRoutes
from linkd.run_events import MemoryEventSink
from linkd.runs import RunManager
from linkd.upstream import UpstreamProxy
from tests.integration.tunnel_harness import connect_peers, serving

HOST = "desk-upstream"
MiB = 1024 * 1024
SIZE = 50 * MiB
TIMEOUT = 10.0


def block(index: int) -> bytes:
    return random.Random(index).randbytes(MiB)


class Upstream:
    """A small local web service that records what reached it."""

    def __init__(self) -> None:
        self.first_upload_byte_at: float | None = None
        self.download_finished_at: float | None = None
        self.seen: list[dict[str, Any]] = []
        app = web.Application(client_max_size=0)
        app.router.add_post("/upload", self.upload)
        app.router.add_get("/download", self.download)
        app.router.add_route("*", "/{tail:.*}", self.echo_headers)
        self.app = app
        self.port = free_port()
        self.runner = web.AppRunner(app, handle_signals=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def upload(self, request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_any():
            if self.first_upload_byte_at is None:
                self.first_upload_byte_at = time.monotonic()
            digest.update(chunk)
            size += len(chunk)
        return web.json_response({"size": size, "sha256": digest.hexdigest()})

    async def download(self, request: web.Request) -> web.StreamResponse:
        if request.query.get("fail"):
            response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            await response.prepare(request)
            await response.write(block(0))
            assert request.transport is not None
            request.transport.abort()  # the service dies mid-body
            return response
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = SIZE
        await response.prepare(request)
        for index in range(SIZE // MiB):
            await response.write(block(index))
        self.download_finished_at = time.monotonic()
        await response.write_eof()
        return response

    async def echo_headers(self, request: web.Request) -> web.Response:
        self.seen.append(
            {
                "path": request.raw_path,
                "host": request.host,
                "headers": [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers],
            }
        )
        headers = [
            ("Connection", "X-Resp-Hop"),
            ("X-Resp-Hop", "secret"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Authenticate", "Basic"),
            ("Set-Cookie", "a=1"),
            ("Set-Cookie", "b=2"),
            ("X-Plain", "kept"),
        ]
        response = web.Response(status=201, text="ok", reason="Made It")
        for name, value in headers:
            response.headers.add(name, value)
        return response


@asynccontextmanager
async def proxied(server: NatsServer) -> AsyncIterator[tuple[Client, Upstream]]:
    upstream = Upstream()
    await upstream.runner.setup()
    await web.TCPSite(upstream.runner, "127.0.0.1", upstream.port).start()
    proxy = UpstreamProxy(upstream.url + "/")
    routes = LinkRoutes(RunManager({}, MemoryEventSink()), upstream=proxy)
    try:
        async with connect_peers(server) as peers, serving(peers.server_nc, HOST, routes):
            yield peers.caller_nc, upstream
            assert peers.errors == []
    finally:
        await proxy.aclose()
        await upstream.runner.cleanup()


async def test_50_mib_streams_both_ways_byte_exact(nats_server: NatsServer) -> None:
    async with proxied(nats_server) as (nc, upstream):
        expected = hashlib.sha256()
        last_chunk_sent_at = 0.0

        async def body() -> AsyncIterator[bytes]:
            nonlocal last_chunk_sent_at
            for index in range(SIZE // MiB):
                data = block(index)
                expected.update(data)
                yield data
            last_chunk_sent_at = time.monotonic()

        started = time.monotonic()
        async with await tunnel.fetch(
            nc, f"tunnel://{HOST}/upload", method="POST", body=body(), first_frame_timeout=TIMEOUT
        ) as resp:
            assert resp.status == 200
            result = json.loads(await resp.read())
        upload_s = time.monotonic() - started
        assert result == {"size": SIZE, "sha256": expected.hexdigest()}
        assert upstream.first_upload_byte_at is not None
        assert upstream.first_upload_byte_at < last_chunk_sent_at, "the upload was buffered, not streamed"

        started = time.monotonic()
        got = hashlib.sha256()
        size = 0
        first_byte_at: float | None = None
        async with await tunnel.fetch(nc, f"tunnel://{HOST}/download", first_frame_timeout=TIMEOUT) as resp:
            assert resp.status == 200
            assert dict((k.lower(), v) for k, v in resp.headers)["content-length"] == str(SIZE)
            async for chunk in resp.aiter_bytes():
                first_byte_at = first_byte_at or time.monotonic()
                got.update(chunk)
                size += len(chunk)
        download_s = time.monotonic() - started
        want = hashlib.sha256()
        for index in range(SIZE // MiB):
            want.update(block(index))
        assert (size, got.hexdigest()) == (SIZE, want.hexdigest())
        assert upstream.download_finished_at is not None and first_byte_at is not None
        assert first_byte_at < upstream.download_finished_at, "the download was buffered, not streamed"
        print(
            f"50 MiB up {upload_s:.2f}s ({50 / upload_s:.0f} MiB/s), "
            f"down {download_s:.2f}s ({50 / download_s:.0f} MiB/s)"
        )


async def test_hop_by_hop_headers_forwarding_headers_and_the_host_stays_put(nats_server: NatsServer) -> None:
    async with proxied(nats_server) as (nc, upstream):
        headers = [
            ("Connection", "X-Req-Hop"),
            ("X-Req-Hop", "secret"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Upgrade", "websocket"),
            ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
            ("Host", "evil.example"),
            ("X-Forwarded-For", "203.0.113.7"),
            ("Accept", "a/b"),
            ("Accept", "c/d"),
        ]
        async with await tunnel.fetch(
            nc, f"tunnel://{HOST}/evil.example/x?q=1", headers=headers, first_frame_timeout=TIMEOUT
        ) as resp:
            assert (resp.status, await resp.read()) == (201, b"ok")
            got = [(k.lower(), v) for k, v in resp.headers]
        names = [name for name, _ in got]
        for hop in ("connection", "x-resp-hop", "keep-alive", "proxy-authenticate", "transfer-encoding"):
            assert hop not in names
        assert [v for k, v in got if k == "set-cookie"] == ["a=1", "b=2"]
        assert ("x-plain", "kept") in got

        seen = upstream.seen[-1]
        assert seen["path"] == "/evil.example/x?q=1"  # a path on the local service, not another host
        assert seen["host"] == f"127.0.0.1:{upstream.port}"
        sent = [(k.lower(), v) for k, v in seen["headers"]]
        sent_names = [name for name, _ in sent]
        for hop in ("x-req-hop", "keep-alive", "te", "upgrade", "proxy-authorization"):
            assert hop not in sent_names
        assert [v for k, v in sent if k == "accept"] == ["a/b", "c/d"]
        assert ("x-forwarded-host", HOST) in sent and ("x-forwarded-for", "203.0.113.7") in sent
        assert ("via", "1.1 linkd") in sent

        # A network-path lookalike and dot segments never reach the local service.
        for refused in ("//evil.example/x", "/a/../../etc", "/a/..%5c..%5cetc"):
            before = len(upstream.seen)
            async with await tunnel.fetch(
                nc, f"tunnel://{HOST}{refused}", first_frame_timeout=TIMEOUT
            ) as resp:
                assert resp.status == 400, refused
                assert json.loads(await resp.read())["error"]["code"] == "bad_request_target"
            assert len(upstream.seen) == before, refused


async def test_an_upstream_dying_mid_body_is_an_error_not_a_short_success(nats_server: NatsServer) -> None:
    async with proxied(nats_server) as (nc, _):
        received = 0
        with pytest.raises(tunnel.TunnelError):
            async with await tunnel.fetch(
                nc, f"tunnel://{HOST}/download?fail=1", first_frame_timeout=TIMEOUT
            ) as resp:
                assert resp.status == 200
                async for chunk in resp.aiter_bytes():
                    received += len(chunk)
        assert received <= MiB
        await asyncio.sleep(0)
