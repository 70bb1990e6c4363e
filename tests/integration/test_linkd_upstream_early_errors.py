"""An upstream's early error answer passes through the tunnel as that answer (issue #19).

The local service here reads only the request head of a 5 MB PUT, answers 501 (or 413)
and closes with the body unread (a TCP reset). Before, httpcore wrote the whole body
before reading, the write failed, the answer was never read and the caller got ``502
upstream_error ... ReadError``; curl got the 501. Now the caller gets the service's own
status, headers and body, and the access log records it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx
import pytest

import tunnel
from cli.nats_server import NatsServer
from linkd import upstream_upload
from linkd.access_log import ACCESS_LOGGER, AccessLog
from linkd.routes import LinkRoutes
from linkd.run_events import MemoryEventSink
from linkd.runs import RunManager
from linkd.traffic import Exchange, ExchangeEvent, Traffic
from linkd.upstream import UpstreamProxy
from linkd.upstream_upload import send_with_body
from tests.helpers import wait_until
from tests.integration.tunnel_harness import connect_peers, serving

HOST = "desk-early"
MiB = 1024 * 1024
SIZE = 5 * MiB
TIMEOUT = 15.0


@dataclass
class EarlyRefuser:
    """A raw service: reads a head, answers ``status`` at once and closes (the body unread).

    ``keep_open``: answers without closing and never reads the body (the upload stalls on
    flow control), closing only when the proxy does.
    """

    status: int
    reason: str
    keep_open: bool = False
    heads: list[bytes] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0
    server: asyncio.Server | None = None

    body = b'{"error":"refused early","by":"the local service"}'

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            self.heads.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(
                f"HTTP/1.1 {self.status} {self.reason}\r\n".encode()
                + b"Content-Type: application/json\r\nX-Refused-By: early\r\n"
                + f"Content-Length: {len(self.body)}\r\n".encode()
                + (b"" if self.keep_open else b"Connection: close\r\n")
                + b"\r\n"
                + self.body
            )
            await writer.drain()
            if self.keep_open:
                await self.release.wait()  # the body stays unread until the test ends
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def five_mb() -> AsyncIterator[bytes]:
    for _ in range(SIZE // (64 * 1024)):
        yield b"x" * (64 * 1024)


@asynccontextmanager
async def through_tunnel(
    nats_server: NatsServer, upstream: EarlyRefuser
) -> AsyncIterator[tuple[tunnel.TunnelClient, list[Exchange]]]:
    await upstream.start()
    proxy = UpstreamProxy(upstream.url)
    routes = LinkRoutes(RunManager({}, MemoryEventSink()), upstream=proxy)
    traffic = Traffic(capture_bodies=False)
    finished: list[Exchange] = []

    def keep(event: ExchangeEvent, exchange: Exchange) -> None:
        if event == "finished":
            finished.append(exchange)

    traffic.subscribe(keep)
    traffic.subscribe(AccessLog())
    try:
        async with connect_peers(nats_server) as peers, serving(peers.server_nc, HOST, traffic.wrap(routes)):
            yield tunnel.client_for(peers.caller_nc), finished
    finally:
        await proxy.aclose()
        assert upstream.server is not None
        upstream.release.set()
        upstream.server.close()


@pytest.mark.parametrize(
    ("status", "reason", "declared"),
    [(501, "Not Implemented", True), (413, "Payload Too Large", True), (501, "Not Implemented", False)],
    ids=["501-content-length", "413-content-length", "501-chunked"],
)
async def test_an_early_refusal_of_a_5mb_put_reaches_the_caller_as_sent(
    nats_server: NatsServer, status: int, reason: str, declared: bool, caplog: pytest.LogCaptureFixture
) -> None:
    upstream = EarlyRefuser(status, reason)
    headers = [("Content-Type", "application/octet-stream")]
    if declared:
        headers.append(("Content-Length", str(SIZE)))
    with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER):
        async with through_tunnel(nats_server, upstream) as (client, finished):
            async with await client.fetch(
                f"tunnel://{HOST}/upload/big", method="PUT", headers=headers, body=five_mb()
            ) as resp:
                got_headers = {k.lower(): v for k, v in resp.headers}
                got_body = await resp.read()
            await wait_until(lambda: finished, TIMEOUT)
    assert resp.status == status, got_body
    assert resp.reason == reason
    assert got_body == upstream.body
    assert json.loads(got_body)["by"] == "the local service"
    assert got_headers["x-refused-by"] == "early"
    assert got_headers["content-type"] == "application/json"
    assert len(upstream.heads) == 1 and upstream.heads[0].startswith(b"PUT /upload/big HTTP/1.1\r\n")
    exchange = finished[0]
    assert (exchange.status, exchange.error, exchange.response_bytes) == (status, None, len(upstream.body))
    assert exchange.request_bytes <= SIZE
    lines = [r.getMessage() for r in caplog.records if r.name == ACCESS_LOGGER]
    assert len(lines) == 1 and lines[0].startswith(f"PUT /upload/big {status} "), lines


async def test_an_early_answer_from_a_service_that_stops_reading_is_not_held_back(
    nats_server: NatsServer,
) -> None:
    # The service answers 413 and keeps the socket open without reading: with httpcore the
    # upload blocked on flow control until a timeout; now the answer is relayed at once.
    upstream = EarlyRefuser(413, "Payload Too Large", keep_open=True)

    async def endless() -> AsyncIterator[bytes]:
        while True:
            yield b"y" * (64 * 1024)

    async with through_tunnel(nats_server, upstream) as (client, finished):
        async with asyncio.timeout(TIMEOUT):
            async with await client.fetch(f"tunnel://{HOST}/upload", method="POST", body=endless()) as resp:
                assert resp.status == 413
                assert await resp.read() == upstream.body
            await wait_until(lambda: finished, TIMEOUT)
    assert finished[0].status == 413 and finished[0].error is None


async def test_a_service_that_answers_nothing_is_a_logged_upstream_error(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    upstream = EarlyRefuser(0, "")

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.transport.abort()  # a reset and no answer at all

    upstream.handle = hang_up  # type: ignore[method-assign]
    with caplog.at_level(logging.INFO):
        async with through_tunnel(nats_server, upstream) as (client, finished):
            async with await client.fetch(f"tunnel://{HOST}/x", method="PUT", body=five_mb()) as resp:
                answer = json.loads(await resp.read())
            await wait_until(lambda: finished, TIMEOUT)
    assert resp.status == 502 and answer["error"]["code"] == "upstream_error"
    assert finished[0].error == "upstream_error"
    warnings = [r.getMessage() for r in caplog.records if r.name == "linkd.upstream"]
    assert any(upstream.url in w and "PUT /x failed" in w for w in warnings), warnings
    access = [r for r in caplog.records if r.name == ACCESS_LOGGER]
    assert len(access) == 1 and access[0].getMessage().endswith("error=upstream_error")


async def test_an_early_answer_ends_even_when_the_uploads_cancel_is_swallowed() -> None:
    """Ending the answer cancels the upload; a cancel that lands in a credit publish of the
    request body can be swallowed (nats-py does, in ``Client._flush_pending``). The upload then
    went on feeding a service that does not read, and the answer's end waited for it."""
    upstream = EarlyRefuser(413, "Payload Too Large", keep_open=True)
    await upstream.start()
    swallowed = 0

    async def credit_that_swallows_a_cancel(_: int) -> None:
        nonlocal swallowed
        if swallowed:
            return
        try:
            await asyncio.Event().wait()  # a credit publish waiting for nats-py's flusher
        except asyncio.CancelledError:
            swallowed += 1  # as nats-py does: its caller goes on as if not cancelled

    request = tunnel.Request(
        request_id="r1",
        hostname=HOST,
        method="PUT",
        url="/up",
        headers=[],
        has_body=True,
        deadline=None,
        on_consumed=credit_that_swallows_a_cancel,
    )
    for _ in range(64):
        request._feed(b"u" * (64 * 1024))  # the caller's body: more than any socket buffer takes
    uploads = {t for t in upstream_upload._TASKS if t.get_name() == "linkd-upstream-upload"}
    try:
        resp = await send_with_body(
            request,
            base=httpx.URL(upstream.url),
            base_url=upstream.url,
            target=b"/up",
            headers=[(b"host", b"svc")],
            length=None,
            connect_timeout=TIMEOUT,
            head_timeout=TIMEOUT,
        )
        assert resp.status == 413
        (upload,) = {t for t in upstream_upload._TASKS if t.get_name() == "linkd-upstream-upload"} - uploads
        body = resp.body
        assert isinstance(body, AsyncIterable)

        async def read_all() -> bytes:
            return b"".join([chunk async for chunk in body])

        # Waited for with asyncio.wait: a swallowed cancel must fail this test, not hang it.
        reading = asyncio.get_running_loop().create_task(read_all())
        await asyncio.wait([reading], timeout=TIMEOUT)
        assert reading.done(), "the answer's end waited for the upload"
        assert reading.result() == upstream.body
        assert swallowed == 1  # the case this is about happened
        await asyncio.wait([upload], timeout=TIMEOUT)
        assert upload.done(), "the upload went on after the answer ended"
    finally:
        upstream.release.set()
        assert upstream.server is not None
        upstream.server.close()
