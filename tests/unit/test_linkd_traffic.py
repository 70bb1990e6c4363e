"""linkd.traffic: exact counts, capped captures, one finish per request, isolated observers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest

import tunnel
from contract.routes import CONTROL_PATH, STATUS_PATH, WORK_PATH
from linkd.traffic import Exchange, ExchangeEvent, Traffic, classify_route, current_exchange, note_error


async def _no_credit(_n: int) -> None:
    return None


def make_request(
    *,
    method: str = "POST",
    url: str = "/api/x?q=1",
    body: list[bytes] | None = None,
    upgrade: bool = False,
) -> tunnel.Request:
    request = tunnel.Request(
        request_id="rid-1",
        hostname="desk.test",
        method=method,
        url=url,
        headers=[("authorization", "Bearer secret"), ("content-type", "text/plain")],
        has_body=body is not None,
        deadline=None,
        on_consumed=_no_credit,
        upgrade=upgrade,
    )
    for chunk in body or []:
        request._feed(chunk)
    if body is not None:
        request._end()
    return request


class Seen:
    """An observer that keeps (event, snapshot of the interesting fields)."""

    def __init__(self) -> None:
        self.events: list[tuple[ExchangeEvent, Exchange]] = []

    def __call__(self, event: ExchangeEvent, exchange: Exchange) -> None:
        self.events.append((event, exchange))

    def names(self) -> list[str]:
        return [event for event, _ in self.events]

    @property
    def last(self) -> Exchange:
        return self.events[-1][1]


async def drain(body: object) -> list[bytes]:
    assert hasattr(body, "__aiter__")
    return [chunk async for chunk in body]  # type: ignore[attr-defined]


def test_routes_are_classified_from_the_contract_paths() -> None:
    assert classify_route(STATUS_PATH) == "status"
    assert classify_route(WORK_PATH) == "work"
    assert classify_route(CONTROL_PATH) == "control"
    assert classify_route("/api/links/nope") == "other"
    assert classify_route("/") == "upstream"
    assert classify_route("/api/linksx") == "upstream"


async def test_bytes_response_counts_exactly_and_finishes_once() -> None:
    traffic = Traffic(capture_limit=10)
    seen = Seen()
    traffic.subscribe(seen)

    async def handler(request: tunnel.Request) -> tunnel.Response:
        assert await request.read() == b"a" * 7 + b"b" * 9
        return tunnel.Response(201, [("x-a", "1")], "héllo wörld, long enough to cap")

    response = await traffic.wrap(handler)(make_request(body=[b"a" * 7, b"b" * 9]))
    assert response.status == 201
    assert seen.names() == ["started", "response", "finished"]
    ex = seen.last
    assert ex.method == "POST" and ex.target == "/api/x?q=1" and ex.route == "upstream"
    assert ex.request_headers[0] == ("authorization", "Bearer secret")  # consumers redact
    assert ex.request_bytes == 16 and ex.request_body == b"a" * 7 + b"bbb"
    assert ex.response_bytes == len("héllo wörld, long enough to cap".encode())
    assert ex.response_body == "héllo wörld, long enough to cap".encode()[:10]
    assert ex.status == 201 and ex.response_headers == [("x-a", "1")]
    assert ex.error is None and not ex.upgraded
    assert ex.ttfb_ms is not None and ex.duration_ms is not None and ex.duration_ms >= ex.ttfb_ms >= 0


async def test_streamed_response_is_counted_and_finished_at_its_end() -> None:
    traffic = Traffic(capture_limit=5)
    seen = Seen()
    traffic.subscribe(seen)

    async def body() -> AsyncIterator[bytes]:
        yield b"123"
        yield b"4567"
        yield b"89"

    async def handler(request: tunnel.Request) -> tunnel.Response:
        return tunnel.Response(200, [], body())

    response = await traffic.wrap(handler)(make_request(method="GET"))
    assert seen.names() == ["started", "response"]
    assert seen.last.duration_ms is None  # still in flight
    assert await drain(response.body) == [b"123", b"4567", b"89"]
    assert seen.names() == ["started", "response", "finished"]
    assert seen.last.response_bytes == 9 and seen.last.response_body == b"12345"
    await response.body.aclose()  # type: ignore[union-attr]  # the server closes it too
    assert seen.names().count("finished") == 1


async def test_sync_iterable_body_is_counted() -> None:
    traffic = Traffic()
    seen = Seen()
    traffic.subscribe(seen)

    async def handler(request: tunnel.Request) -> tunnel.Response:
        return tunnel.Response(200, [], iter([b"ab", b"cde"]))

    response = await traffic.wrap(handler)(make_request(method="GET"))
    assert list(response.body) == [b"ab", b"cde"]  # type: ignore[arg-type]
    assert seen.names() == ["started", "response", "finished"]
    assert seen.last.response_bytes == 5 and seen.last.response_body == b"abcde"


async def test_capture_off_still_counts_exactly() -> None:
    traffic = Traffic(capture_bodies=False)
    seen = Seen()
    traffic.subscribe(seen)

    async def handler(request: tunnel.Request) -> tunnel.Response:
        total = 0
        async for chunk in request.stream():
            total += len(chunk)
        return tunnel.Response(200, [], b"x" * total)

    await traffic.wrap(handler)(make_request(body=[b"1" * 100_000, b"2" * 3]))
    ex = seen.last
    assert (ex.request_bytes, ex.response_bytes) == (100_003, 100_003)
    assert ex.request_body == b"" and ex.response_body == b""


async def test_no_observer_and_no_capture_calls_the_handler_directly() -> None:
    traffic = Traffic(capture_bodies=False)
    request = make_request(body=[b"abc"])
    stream_method = request.stream

    async def handler(req: tunnel.Request) -> tunnel.Response:
        assert req.stream == stream_method  # not wrapped
        assert current_exchange() is None
        return tunnel.Response(200, [], b"ok")

    response = await traffic.wrap(handler)(request)
    assert response.body == b"ok"
    assert not traffic.active


async def test_handler_error_finishes_once_with_handler_error() -> None:
    traffic = Traffic()
    seen = Seen()
    traffic.subscribe(seen)

    async def handler(request: tunnel.Request) -> tunnel.Response:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        await traffic.wrap(handler)(make_request(method="GET"))
    assert seen.names() == ["started", "finished"]
    assert seen.last.error == "tunnel_handler_error" and "RuntimeError" in (seen.last.error_detail or "")
    assert seen.last.status is None and seen.last.duration_ms is not None


async def test_tunnel_error_keeps_its_code() -> None:
    traffic = Traffic()
    seen = Seen()
    traffic.subscribe(seen)

    async def handler(request: tunnel.Request) -> tunnel.Response:
        raise tunnel.TunnelError("nope", code=tunnel.ErrorCode.BUFFER_LIMIT)

    with pytest.raises(tunnel.TunnelError):
        await traffic.wrap(handler)(make_request(method="GET"))
    assert seen.last.error == tunnel.ErrorCode.BUFFER_LIMIT


async def test_cancel_before_the_response_finishes_cancelled() -> None:
    traffic = Traffic()
    seen = Seen()
    traffic.subscribe(seen)
    entered = asyncio.Event()

    async def handler(request: tunnel.Request) -> tunnel.Response:
        entered.set()
        await asyncio.Event().wait()
        raise AssertionError("not reached")

    task = asyncio.ensure_future(traffic.wrap(handler)(make_request(method="GET")))
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen.names() == ["started", "finished"]
    assert seen.last.error == "cancelled"


async def test_cancel_during_the_body_finishes_cancelled_once() -> None:
    traffic = Traffic()
    seen = Seen()
    traffic.subscribe(seen)
    request = make_request(method="GET")

    async def body() -> AsyncIterator[bytes]:
        yield b"first"
        await asyncio.Event().wait()
        yield b"never"

    async def handler(req: tunnel.Request) -> tunnel.Response:
        return tunnel.Response(200, [], body())

    response = await traffic.wrap(handler)(request)
    iterator = response.body
    assert await iterator.__anext__() == b"first"  # type: ignore[union-attr]
    request._fail(tunnel.TunnelAborted("caller left"))  # what the server does on an abort
    await iterator.aclose()  # type: ignore[union-attr]  # ...and then it closes the body
    assert seen.names() == ["started", "response", "finished"]
    assert seen.last.error == "cancelled" and seen.last.response_bytes == 5


async def test_body_error_mid_stream_keeps_the_tunnel_code() -> None:
    traffic = Traffic()
    seen = Seen()
    traffic.subscribe(seen)

    async def body() -> AsyncIterator[bytes]:
        yield b"part"
        raise tunnel.TunnelError("broke off", code=tunnel.ErrorCode.HANDLER_ERROR)

    async def handler(req: tunnel.Request) -> tunnel.Response:
        return tunnel.Response(200, [], body())

    response = await traffic.wrap(handler)(make_request(method="GET"))
    with pytest.raises(tunnel.TunnelError):
        await drain(response.body)
    await response.body.aclose()  # type: ignore[union-attr]
    assert seen.names().count("finished") == 1
    assert seen.last.error == "tunnel_handler_error" and seen.last.response_bytes == 4


async def test_closed_unread_body_is_a_normal_end() -> None:
    traffic = Traffic()
    seen = Seen()
    traffic.subscribe(seen)

    async def body() -> AsyncIterator[bytes]:
        yield b"unread"

    async def handler(req: tunnel.Request) -> tunnel.Response:
        return tunnel.Response(204, [], body())

    response = await traffic.wrap(handler)(make_request(method="HEAD"))
    await response.body.aclose()  # type: ignore[union-attr]  # HEAD/204: the server closes it unread
    assert seen.names() == ["started", "response", "finished"]
    assert seen.last.error is None and seen.last.response_bytes == 0


async def test_upgraded_stream_counts_without_capturing() -> None:
    traffic = Traffic()
    seen = Seen()
    traffic.subscribe(seen)

    async def handler(request: tunnel.Request) -> tunnel.Response:
        async def down() -> AsyncIterator[bytes]:
            async for chunk in request.stream():
                yield chunk.upper()

        return tunnel.Response(101, [("upgrade", "websocket")], down())

    response = await traffic.wrap(handler)(make_request(method="GET", body=[b"ab", b"cd"], upgrade=True))
    assert await drain(response.body) == [b"AB", b"CD"]
    ex = seen.last
    assert seen.names() == ["started", "response", "finished"]
    assert ex.upgraded and ex.request_bytes == 4 and ex.response_bytes == 4
    assert ex.request_body == b"" and ex.response_body == b""


async def test_note_error_reaches_the_exchange() -> None:
    traffic = Traffic()
    seen = Seen()
    traffic.subscribe(seen)

    async def handler(request: tunnel.Request) -> tunnel.Response:
        assert current_exchange() is not None
        note_error("upstream_unreachable", "connection refused")
        note_error("second", "ignored: the first cause wins")
        return tunnel.Response(502, [], b"{}")

    await traffic.wrap(handler)(make_request(method="GET"))
    assert (seen.last.error, seen.last.error_detail) == ("upstream_unreachable", "connection refused")
    assert current_exchange() is None  # reset after the handler


async def test_failing_observer_is_logged_once_and_never_breaks_a_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    traffic = Traffic()
    seen = Seen()

    def broken(event: ExchangeEvent, exchange: Exchange) -> None:
        raise ValueError("observer bug")

    traffic.subscribe(broken)
    traffic.subscribe(seen)

    async def handler(request: tunnel.Request) -> tunnel.Response:
        return tunnel.Response(200, [], b"ok")

    with caplog.at_level(logging.ERROR, logger="linkd.traffic"):
        for _ in range(3):
            assert (await traffic.wrap(handler)(make_request(method="GET"))).status == 200
    assert traffic.observer_errors == 9  # three events per request, three requests
    assert len([r for r in caplog.records if "observer" in r.getMessage()]) == 1
    assert seen.names().count("finished") == 3  # the others still hear everything


async def test_unsubscribe_stops_events_and_ids_are_unique() -> None:
    traffic = Traffic(capture_bodies=False)
    seen = Seen()
    unsubscribe = traffic.subscribe(seen)

    async def handler(request: tunnel.Request) -> tunnel.Response:
        return tunnel.Response(200, [], b"")

    for _ in range(3):
        await traffic.wrap(handler)(make_request(method="GET"))
    unsubscribe()
    await traffic.wrap(handler)(make_request(method="GET"))
    ids = [ex.id for event, ex in seen.events if event == "finished"]
    assert len(ids) == 3 and len(set(ids)) == 3
    assert not traffic.active
