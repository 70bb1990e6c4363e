"""A Python daemon under exactly the NATS permissions the reference gateway gives daemons.

Subscribe ``P.request``, ``P.req.*.body``, ``P.req.*.abort``, ``_INBOX.<token>.>``; publish
``P.req.*.reply`` only. Our server cannot subscribe its own up subject nor publish to our
callers' shared reply subjects there: it finds that out at ``serve()`` (NATS's -ERR, checked
with flushes) and falls back to the body-subject wildcard and the reference reply subject,
which our callers also listen on. Credentials that may not even take requests make
``serve()`` fail loudly.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.aio.client import Client

import tunnel
from tests.helpers import NatsServerFactory
from tests.integration.gateway_harness import (
    OperatorServer,
    connect_daemon,
    creds_auth,
    start_operator_server,
)
from tests.integration.tunnel_harness import MiB
from tunnel._natsio.common import flush_everything

HOST = "desk.example"
P = tunnel.HostSubjects.for_host(HOST).base


def reference_daemon_permissions(inbox_token: str = "daemon1") -> dict[str, object]:
    return {
        "sub": {"allow": [f"{P}.request", f"{P}.req.*.body", f"{P}.req.*.abort", f"_INBOX.{inbox_token}.>"]},
        "pub": {"allow": [f"{P}.req.*.reply"]},
    }


@pytest.fixture
def op(nats_server_factory: NatsServerFactory, tmp_path: Path) -> OperatorServer:
    return start_operator_server(nats_server_factory, tmp_path)


async def handler(request: tunnel.Request) -> tunnel.Response:
    if request.path == "/upload":
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.stream():
            digest.update(chunk)
            size += len(chunk)
        return tunnel.Response(200, [], f"{size} {digest.hexdigest()}")
    if request.path == "/download":

        async def body() -> AsyncIterator[bytes]:
            for i in range(8):
                yield bytes([i]) * MiB

        return tunnel.Response(200, [], body())
    return tunnel.Response(200, [("content-type", "text/plain")], b"small")


async def _caller(op: OperatorServer) -> Client:
    return (await connect_daemon(op.server.url, **creds_auth(op.setup.user_creds("caller")))).nc


async def test_a_daemon_under_the_reference_permissions_serves_python_and_v1_callers(
    op: OperatorServer,
) -> None:
    daemon = await connect_daemon(
        op.server.url, **creds_auth(op.setup.user_creds("daemon", permissions=reference_daemon_permissions()))
    )
    caller_nc = await _caller(op)
    server = await tunnel.serve(daemon.nc, HOST, handler)
    try:
        for client in (
            tunnel.TunnelClient(caller_nc),  # extensions, shared replies: the defaults
            tunnel.TunnelClient(caller_nc, fast_path=False, shared_replies=False),  # a plain v1 caller
        ):
            async with await client.fetch(f"tunnel://{HOST}/small", first_frame_timeout=5) as resp:
                assert await resp.read() == b"small"
            upload = bytes(range(256)) * (4 * MiB // 256)
            async with await client.fetch(
                f"tunnel://{HOST}/upload", method="PUT", body=upload, first_frame_timeout=5, idle_timeout=5
            ) as resp:
                assert (await resp.read()).decode() == f"{len(upload)} {hashlib.sha256(upload).hexdigest()}"
            async with await client.fetch(f"tunnel://{HOST}/download", idle_timeout=5) as resp:
                got = await resp.read()
                assert len(got) == 8 * MiB and got[::MiB] == bytes(range(8))
            await client.aclose()
        # The daemon never tripped a permission (its fallbacks are checked at serve(), once each).
        denied_at_serve = [e for e in daemon.errors if "permissions violation" in e.lower()]
        # The up subscription, the reply publish, the readiness subscription.
        assert len(denied_at_serve) == 3, daemon.errors
    finally:
        await server.close()
        await daemon.nc.close()
        await caller_nc.close()


async def test_serve_fails_loudly_when_it_may_not_take_requests(op: OperatorServer) -> None:
    perms = reference_daemon_permissions()
    perms["sub"] = {"allow": [f"{P}.req.*.body", f"{P}.req.*.abort"]}  # no P.request
    daemon = await connect_daemon(
        op.server.url, **creds_auth(op.setup.user_creds("daemon", permissions=perms))
    )
    try:
        with pytest.raises(tunnel.PermissionDenied, match="request") as caught:
            await tunnel.serve(daemon.nc, HOST, handler)
        assert caught.value.code == "tunnel_permission_denied"
    finally:
        await daemon.nc.close()


async def test_under_a_tap_a_daemon_without_its_readiness_subject_still_answers_first_contacts(
    op: OperatorServer,
) -> None:
    """No readiness subject (refused): a caller under a tap gives the host Timeouts.presence to ack
    a first contact, which a server does at once."""
    daemon = await connect_daemon(
        op.server.url, **creds_auth(op.setup.user_creds("daemon", permissions=reference_daemon_permissions()))
    )
    caller_nc = await _caller(op)
    tap_nc = await _caller(op)
    server = await tunnel.serve(daemon.nc, HOST, handler)
    try:
        await tap_nc.subscribe(f"{tunnel.DEFAULT_PREFIX}.>")
        await flush_everything(tap_nc)
        for _ in range(10):  # a fresh client each time: every request is a first contact
            client = tunnel.TunnelClient(caller_nc)
            async with await client.fetch(f"tunnel://{HOST}/small") as resp:
                assert await resp.read() == b"small"
            await client.aclose()
    finally:
        await server.close()
        for nc in (daemon.nc, caller_nc, tap_nc):
            await nc.close()


async def test_a_caller_that_may_not_ask_about_readiness_falls_back_to_the_longer_wait(
    op: OperatorServer,
) -> None:
    """NATS refuses the caller's readiness probe: it cannot tell, so an offline host under a tap
    is reported after Timeouts.presence_fallback, not after 30 ms and not at the first-frame
    timeout."""
    prefix = tunnel.DEFAULT_PREFIX
    caller_perms = {"pub": {"allow": [f"{prefix}.>"]}, "sub": {"allow": [f"{prefix}.>", "_INBOX.>"]}}
    caller_nc = (
        await connect_daemon(
            op.server.url, **creds_auth(op.setup.user_creds("narrow", permissions=caller_perms))
        )
    ).nc
    tap_nc = await _caller(op)
    try:
        await tap_nc.subscribe(f"{prefix}.>")
        await flush_everything(tap_nc)
        client = tunnel.TunnelClient(caller_nc)
        timeouts = tunnel.Timeouts(presence=0.03, presence_fallback=0.4)
        loop = asyncio.get_running_loop()
        began = loop.time()
        with pytest.raises(tunnel.TunnelUnreachable, match="within 400 ms"):
            await client.fetch(f"tunnel://{HOST}/small", timeouts=timeouts)
        assert 0.4 <= loop.time() - began < 5.0
        await client.aclose()
    finally:
        await caller_nc.close()
        await tap_nc.close()
