"""Hostile requests and responses through linkd's ``--upstream`` proxy (linkd/upstream.py).

The daemon side is the real ``LinkRoutes`` + ``UpstreamProxy`` serving over a real
nats-server; the local service is :class:`~tests.integration.recording_upstream.RecordingService`, which
records every request it parsed (h11), so a smuggled request or a split header would show.
A second recording service plays "another origin": no request may ever reach it.

Promises: path tricks never leave the configured origin or climb out of its base path;
header injection is refused with a typed error before anything is sent; a body cannot
smuggle a second request; hostile upstream responses become a typed error, never a crash,
and the daemon keeps serving.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Final

import httpx
import pytest
from nats.aio.client import Client

import tunnel
from cli.nats_server import NatsServer
from linkd.routes import LinkRoutes
from linkd.run_events import MemoryEventSink
from linkd.runs import RunManager
from linkd.upstream import UpstreamProxy, upstream_url
from tests.integration.recording_upstream import RAW_RESPONSES, RecordingService
from tests.integration.tunnel_harness import connect_peers, serving

pytestmark = pytest.mark.timeout(60)

HOST: Final = "desk-hostile-upstream"
BASE_PATH: Final = "/base"
TIMEOUT: Final = 10.0


@dataclass
class Rig:
    nc: Client
    local: RecordingService
    other: RecordingService
    server: tunnel.TunnelServer

    async def fetch(
        self,
        path: str,
        *,
        method: str = "GET",
        headers: list[tuple[str, str]] | None = None,
        body: bytes = b"",
    ) -> tuple[int, bytes]:
        async with await tunnel.fetch(
            self.nc,
            f"tunnel://{HOST}{path}",
            method=method,
            headers=headers or [],
            body=body or None,
            first_frame_timeout=TIMEOUT,
            timeout=TIMEOUT,
        ) as resp:
            return resp.status, await resp.read()

    async def still_serves(self) -> None:
        before = len(self.local.seen)
        assert await self.fetch("/healthy") == (200, f"ok {BASE_PATH}/healthy".encode())
        assert len(self.local.seen) == before + 1
        assert self.server.in_flight == 0


@asynccontextmanager
async def rig(nats_server: NatsServer) -> AsyncIterator[Rig]:
    async with RecordingService() as local, RecordingService() as other:
        proxy = UpstreamProxy(local.origin + BASE_PATH + "/")
        routes = LinkRoutes(RunManager({}, MemoryEventSink()), upstream=proxy)
        try:
            async with connect_peers(nats_server) as peers, serving(peers.server_nc, HOST, routes) as server:
                yield Rig(peers.caller_nc, local, other, server)
                assert peers.errors == []
        finally:
            await proxy.aclose()
        assert other.seen == [], "a request reached another origin"


def path_tricks(other_port: int) -> list[str]:
    evil = f"127.0.0.1:{other_port}"
    return [
        "/..",
        "/../x",
        "/a/../../x",
        "/%2e%2e/x",
        "/%2E%2E/x",
        "/.%2e/x",
        "/%2e%2e%2fx",
        "/a/%2e%2e%2f%2e%2e%2fx",
        f"//{evil}/x",
        f"///{evil}/x",
        f"/@{evil}/x",
        f"/http://{evil}/x",
        "/..\\x",
        "/\\..\\x",
        "/%5c..%5cx",
        "/%00",
        "/x%00y",
        "/x?next=/../../y",
        "/x?u=http://evil.example/",
        "/%252e%252e/x",
    ]


async def test_path_tricks_never_leave_the_upstream_origin_or_its_base_path(nats_server: NatsServer) -> None:
    async with rig(nats_server) as r:
        outcomes: dict[str, int | str] = {}
        for path in path_tricks(r.other.port):
            before = len(r.local.seen)
            try:
                status, body = await r.fetch(path)
            except tunnel.TunnelError as exc:  # refused by the caller itself: typed
                outcomes[path] = exc.code
                continue
            outcomes[path] = status
            if status == 400:
                assert json.loads(body)["error"]["code"] == "bad_request_target", (path, body)
                assert len(r.local.seen) == before, f"{path!r} refused but still sent"
                continue
            assert status == 200, (path, status, body)
            seen = r.local.seen[-1]
            target_path = seen.target.split("?", 1)[0]
            assert target_path.startswith(BASE_PATH + "/"), (path, seen.target)
            segments = target_path.split("/")
            assert ".." not in segments and "." not in segments, (path, seen.target)
            assert dict((k.lower(), v) for k, v in seen.headers)["host"] == f"127.0.0.1:{r.local.port}"
        # Every dot-segment trick is a 400, not a silently normalised request.
        for path in ("/..", "/../x", "/a/../../x", "/%2e%2e/x", "/%2E%2E/x", "/.%2e/x"):
            assert outcomes[path] == 400, (path, outcomes[path])
        await r.still_serves()


@pytest.mark.parametrize(
    "target",
    [
        "http://127.0.0.1:1/x",
        "https://evil.example/x",
        "//evil.example/x",
        "x",
        "*",
        "/x\x00",
        "/x\r\nHost: evil",
        "/x#frag",
        "/../x",
        "/%2e%2e/x",
    ],
)
def test_upstream_url_refuses_absolute_form_and_control_characters(target: str) -> None:
    """The pure function behind the proxy: only an origin-form target under the base is accepted."""
    base = httpx.URL("http://127.0.0.1:8000/base/")
    try:
        url = upstream_url(base, target)
    except (ValueError, UnicodeError):
        return
    # Accepted ("//evil.example/x" is a path): still the base's host and under its path.
    assert (url.host, url.port) == ("127.0.0.1", 8000)
    assert url.raw_path.startswith(b"/base/")


@pytest.mark.parametrize(
    "header",
    [
        ("X-Inject", "a\r\nInjected: yes"),
        ("X-Inject", "a\nInjected: yes"),
        ("X-Inject", "a\rb"),
        ("X-Nul", "a\x00b"),
        ("Bad Name", "v"),
        ("X-Inject\r\nInjected", "yes"),
        ("", "v"),
        ("X-Big", "v" * (64 * 1024 + 1)),
        ("N" * 1025, "v"),
    ],
    ids=["crlf", "lf", "cr", "nul", "space-in-name", "crlf-in-name", "empty-name", "huge-value", "huge-name"],
)
async def test_header_injection_is_refused_before_it_reaches_the_upstream(
    nats_server: NatsServer, header: tuple[str, str]
) -> None:
    async with rig(nats_server) as r:
        with pytest.raises(tunnel.TunnelError):
            await r.fetch("/inject", headers=[header])
        assert [s for s in r.local.seen if s.target.endswith("/inject")] == []
        assert not any(k.lower() == "injected" for s in r.local.seen for k, _ in s.headers)
        await r.still_serves()


async def test_many_headers_are_bounded_and_refused_with_a_typed_error(nats_server: NatsServer) -> None:
    async with rig(nats_server) as r:
        # 512 is the protocol's limit: accepted and delivered whole.
        status, _ = await r.fetch("/many", headers=[(f"X-H{i}", "v") for i in range(500)])
        assert status == 200
        assert sum(1 for k, _ in r.local.seen[-1].headers if k.lower().startswith("x-h")) == 500
        for headers in (
            [(f"X-H{i}", "v") for i in range(513)],  # too many
            [(f"X-H{i}", "v" * 60_000) for i in range(40)],  # ~2.4 MB of headers, over max_payload
        ):
            with pytest.raises(tunnel.TunnelError):
                await r.fetch("/too-many", headers=headers)
        assert not any(s.target.endswith("/too-many") for s in r.local.seen)
        await r.still_serves()


@pytest.mark.parametrize(
    "headers",
    [
        [("Content-Length", "0")],
        [("Content-Length", "3")],
        [("Transfer-Encoding", "chunked")],
        [("Content-Length", "0"), ("Transfer-Encoding", "chunked")],
        [("Connection", "content-length"), ("Content-Length", "0")],
    ],
    ids=["cl-0", "cl-short", "te-chunked", "cl-and-te", "cl-named-hop-by-hop"],
)
async def test_a_body_cannot_smuggle_a_second_request_to_the_upstream(
    nats_server: NatsServer, headers: list[tuple[str, str]]
) -> None:
    smuggled = b"GET /base/smuggled HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n"
    async with rig(nats_server) as r:
        try:
            status, _ = await r.fetch("/front", method="POST", headers=headers, body=smuggled)
        except tunnel.TunnelError:
            status = 0  # refused as a typed error: fine
        assert not any(s.target.endswith("/smuggled") for s in r.local.seen), [s.target for s in r.local.seen]
        front = [s for s in r.local.seen if s.target.endswith("/front")]
        if status == 200:
            assert front and front[-1].body == smuggled, "the body was cut short and delivered as success"
        else:
            assert status in (0, 400, 502), status
        await r.still_serves()
        assert not any(s.target.endswith("/smuggled") for s in r.local.seen)


@pytest.mark.parametrize("name", sorted(RAW_RESPONSES))
async def test_hostile_upstream_responses_become_typed_errors_and_the_daemon_keeps_serving(
    nats_server: NatsServer, name: str
) -> None:
    async with rig(nats_server) as r:
        try:
            async with await tunnel.fetch(
                r.nc, f"tunnel://{HOST}/raw/{name}", first_frame_timeout=TIMEOUT, timeout=TIMEOUT
            ) as resp:
                status = resp.status
                headers = [(k.lower(), v) for k, v in resp.headers]
                body = await resp.read()
        except tunnel.TunnelError:
            status, headers, body = 0, [], b""
        # Never a header the upstream smuggled in, never a value carrying CR/LF/NUL.
        assert not any(k == "injected" for k, _ in headers)
        assert not any(c in v for _, v in headers for c in "\r\n\x00")
        if status == 200:
            # Only acceptable when the answer was relayed faithfully enough to be harmless.
            assert body == b"ok", (name, body[:100])
            assert name in ("obs-fold", "nul-header"), f"{name}: a broken response relayed as success"
        else:
            assert status in (0, 502), (name, status, body[:200])
            if status == 502:
                assert json.loads(body)["error"]["code"] in ("upstream_error", "upstream_unreachable")
        await r.still_serves()


async def test_backslash_and_encoded_slash_dot_segments_are_refused(nats_server: NatsServer) -> None:
    async with rig(nats_server) as r:
        for path in ("/..\\x", "/\\..\\x", "/a/..%5c..%5cx", "/%2e%2e%2fx", "/a/%2e%2e%2f%2e%2e%2fx"):
            status, body = await r.fetch(path)
            assert status == 400, (path, status, r.local.seen[-1].target)
            assert json.loads(body)["error"]["code"] == "bad_request_target"


async def test_control_characters_httpx_refuses_are_a_typed_502(nats_server: NatsServer) -> None:
    """VT and FF pass the tunnel's header check; the upstream client refuses them, answered typed."""
    async with rig(nats_server) as r:
        for value in ("a\x0bb", "a\x0cb"):
            status, body = await r.fetch("/ctl", headers=[("X-Ctl", value)])
            assert status == 502 and json.loads(body)["error"]["code"] == "upstream_error", body
        assert not any(s.target.endswith("/ctl") for s in r.local.seen)
        await r.still_serves()


async def test_non_ascii_header_values_are_forwarded_or_refused_cleanly(nats_server: NatsServer) -> None:
    async with rig(nats_server) as r:
        for value in ("caf\xe9", "snow\u2603", "a\x85b"):
            status, body = await r.fetch("/non-ascii", headers=[("X-Text", value)])
            if status == 200:
                sent = dict((k.lower(), v) for k, v in r.local.seen[-1].headers)["x-text"]
                assert sent.encode("latin-1") in (value.encode("latin-1", "ignore"), value.encode("utf-8"))
            else:
                assert status == 400 and json.loads(body)["error"]["code"], body
        await r.still_serves()


async def test_a_content_length_that_disagrees_with_the_body_gets_a_clean_answer(
    nats_server: NatsServer,
) -> None:
    async with rig(nats_server) as r:
        for declared in ("0", "3", "100000"):
            status, body = await r.fetch(
                "/mismatch", method="POST", headers=[("Content-Length", declared)], body=b"x" * 64
            )
            if status == 200:
                assert r.local.seen[-1].body == b"x" * 64
            else:
                assert status in (400, 502) and json.loads(body)["error"]["code"], body
        await r.still_serves()
