"""Header injection through the ASGI adapter (tunnel.asgi) with a Starlette app, both directions.

Requests: CR, LF, NUL, bad names, oversized names/values and too many headers are refused
with a typed error by the caller, and the same headers forged into a raw request frame are
answered with a protocol error; in neither case does the application run. Valid but unusual
headers (latin-1 obs-text, non-latin-1 text, tabs, repeats) reach the app as bytes with no
CR/LF/NUL. Responses: an app that puts CR/LF/NUL or oversized headers into its answer yields
a plain 500 for the caller, never a split or smuggled header, and the server keeps serving.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final

import pytest
from nats.aio.client import Client
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import tunnel
from cli.nats_server import NatsServer
from tests.integration.tunnel_harness import connect_peers
from tunnel.asgi import serve_asgi

pytestmark = pytest.mark.timeout(60)

HOST: Final = "asgi-hostile.test"
SUBJECTS: Final = tunnel.HostSubjects.for_host(HOST)
TIMEOUT: Final = 10.0

BAD_RESPONSE_HEADERS: Final[dict[str, list[tuple[str, str]]]] = {
    "crlf-value": [("X-Bad", "a\r\nInjected: yes")],
    "lf-value": [("X-Bad", "a\nInjected: yes")],
    "nul-value": [("X-Bad", "a\x00b")],
    "space-in-name": [("X Bad", "v")],
    "colon-in-name": [("Injected: yes\r\nX", "v")],
    "huge-value": [("X-Big", "v" * (64 * 1024 + 1))],
    "too-many": [(f"X-H{i}", "v") for i in range(600)],
}


@dataclass
class App:
    """The Starlette app behind the tunnel; counts every request that reached it."""

    calls: list[str] = field(default_factory=list)

    def starlette(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/echo", self.echo, methods=["GET", "POST"]),
                Route("/respond/{case}", self.respond),
            ]
        )

    async def echo(self, request: Request) -> JSONResponse:
        self.calls.append(request.url.path)
        raw = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.scope["headers"]]
        return JSONResponse({"headers": raw})

    async def respond(self, request: Request) -> Response:
        case = request.path_params["case"]
        self.calls.append(case)
        response = Response("body", media_type="text/plain")
        for name, value in BAD_RESPONSE_HEADERS.get(case, []):
            # Starlette encodes headers without checking them: exactly what a careless app does.
            response.raw_headers.append((name.encode("latin-1"), value.encode("latin-1")))
        return response


@dataclass
class Rig:
    nc: Client
    raw: Client
    app: App
    server: tunnel.TunnelServer

    async def get(
        self, path: str, headers: list[tuple[str, str]] | None = None
    ) -> tuple[int, Any, list[Any]]:
        async with await tunnel.fetch(
            self.nc,
            f"tunnel://{HOST}{path}",
            headers=headers or [],
            first_frame_timeout=TIMEOUT,
            timeout=TIMEOUT,
        ) as resp:
            body = await resp.read()
            return resp.status, body, [(k.lower(), v) for k, v in resp.headers]

    async def still_serves(self) -> None:
        status, body, _ = await self.get("/echo")
        assert status == 200 and "headers" in json.loads(body)
        assert self.server.in_flight == 0


@asynccontextmanager
async def rig(nats_server: NatsServer) -> AsyncIterator[Rig]:
    app = App()
    async with connect_peers(nats_server) as peers:
        raw = await peers.connect(nats_server.url, "attacker")
        server = await serve_asgi(peers.server_nc, HOST, app.starlette(), lifespan="off")
        try:
            yield Rig(peers.caller_nc, raw, app, server)
        finally:
            await server.close(timeout=1.0)
        assert peers.errors == []


REQUEST_INJECTIONS: Final = [
    ("X-Inject", "a\r\nInjected: yes"),
    ("X-Inject", "a\nInjected: yes"),
    ("X-Inject", "a\rInjected: yes"),
    ("X-Nul", "a\x00b"),
    ("X Inject", "v"),
    ("X-Inject\r\nInjected", "yes"),
    ("Injected:", "yes"),
    ("X-Big", "v" * (64 * 1024 + 1)),
    ("N" * 1025, "v"),
]
INJECTION_IDS: Final = ["crlf", "lf", "cr", "nul", "space", "crlf-name", "colon", "huge-value", "huge-name"]


@pytest.mark.parametrize("header", REQUEST_INJECTIONS, ids=INJECTION_IDS)
async def test_request_header_injection_is_refused_by_the_caller_and_the_app_never_runs(
    nats_server: NatsServer, header: tuple[str, str]
) -> None:
    async with rig(nats_server) as r:
        with pytest.raises(tunnel.TunnelError):
            await r.get("/echo", headers=[header])
        assert r.app.calls == []
        await r.still_serves()


@pytest.mark.parametrize("header", REQUEST_INJECTIONS, ids=INJECTION_IDS)
async def test_forged_request_frames_with_injected_headers_get_a_protocol_error_and_the_app_never_runs(
    nats_server: NatsServer, header: tuple[str, str]
) -> None:
    async with rig(nats_server) as r:
        rid = "forged1"
        reply = SUBJECTS.reply(rid)
        sub = await r.raw.subscribe(reply)
        frame = {
            "type": "request.start",
            "protocol": "tunnel.v1",
            "requestId": rid,
            "method": "GET",
            "url": "/echo",
            "headers": [list(header)],
            "replySubject": reply,
            "abortSubject": SUBJECTS.abort(rid),
        }
        await r.raw.publish(SUBJECTS.request, json.dumps(frame).encode(), reply=reply)
        answer = json.loads((await sub.next_msg(timeout=TIMEOUT)).data)
        assert answer["type"] == "response.error" and answer["code"] == "tunnel_protocol_error", answer
        assert r.app.calls == []
        await r.still_serves()
        assert r.app.calls == ["/echo"]


async def test_unusual_but_valid_headers_reach_the_app_as_clean_bytes(nats_server: NatsServer) -> None:
    async with rig(nats_server) as r:
        headers = [
            ("X-Latin", "caf\xe9"),
            ("X-Unicode", "snow\u2603man \u2028 line-separator \u0085 nel"),
            ("X-Tab", "a\tb"),
            ("X-Spaces", "  padded  "),
            ("X-Repeat", "1"),
            ("x-repeat", "2"),
            ("Host", "evil.example"),
            ("Host", "second.example"),
            ("X-Max", "v" * (64 * 1024)),
            *[(f"X-N{i}", str(i)) for i in range(400)],
        ]
        status, body, _ = await r.get("/echo", headers=headers)
        assert status == 200
        seen = json.loads(body)["headers"]
        for name, value in seen:
            assert name == name.lower()
            assert not any(c in name + value for c in "\r\n\x00"), (name, value[:80])
        values = dict((n, v) for n, v in seen if n != "x-repeat")
        assert values["x-latin"] == "caf\xe9"
        assert (
            values["x-unicode"].encode("latin-1").decode("utf-8")
            == "snow\u2603man \u2028 line-separator \u0085 nel"
        )
        assert [v for n, v in seen if n == "x-repeat"] == ["1", "2"]
        assert len(values["x-max"]) == 64 * 1024
        assert sum(1 for n, _ in seen if n.startswith("x-n")) == 400


@pytest.mark.parametrize("case", sorted(BAD_RESPONSE_HEADERS))
async def test_an_app_injecting_response_headers_yields_a_plain_500_and_no_split_header(
    nats_server: NatsServer, case: str
) -> None:
    async with rig(nats_server) as r:
        status, body, headers = await r.get(f"/respond/{case}")
        assert r.app.calls == [case]
        assert status == 500, (case, status, body[:200])
        assert not any(n == "injected" or n.startswith("x-bad") or n.startswith("x-h") for n, _ in headers)
        assert not any(c in v for _, v in headers for c in "\r\n\x00")
        await r.still_serves()
