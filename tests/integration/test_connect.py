"""``tunnel.connect.connect``: auth modes, credential validation and reconnects, on a real nats-server."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nkeys
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

import tunnel
from cli.nats_server import NatsServer, free_port
from tests.helpers import NatsServerFactory, wait_until
from tunnel.connect import (
    MAX_OUTSTANDING_PINGS,
    PING_INTERVAL,
    NatsAuthError,
    NatsConnectError,
    connect,
    parse_creds,
)

# A failing connect must give up in seconds; this only catches a hang.
HANG_GUARD = 10.0
TOKEN = "s3cret-token"
# A syntactically valid JWT (header.payload.signature); only its shape is checked here.
FAKE_JWT = "eyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.eyJzdWIiOiJVQUJDIn0.c2lnbmF0dXJl"


def user_seed() -> str:
    return nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER).decode("ascii")


def public_key(seed: str) -> str:
    return nkeys.from_seed(bytearray(seed.encode())).public_key.decode("ascii")


def creds_text(jwt: str, seed: str, newline: str = "\n") -> str:
    """The layout ``nsc`` writes, warning banner included."""
    lines = [
        "-----BEGIN NATS USER JWT-----",
        jwt,
        "------END NATS USER JWT------",
        "",
        "************************* IMPORTANT *************************",
        "NKEY Seed printed below can be used to sign and prove identity.",
        "",
        "-----BEGIN USER NKEY SEED-----",
        seed,
        "------END USER NKEY SEED------",
        "",
    ]
    return newline.join(lines)


@asynccontextmanager
async def connected(urls: str, **kwargs: Any) -> AsyncIterator[Client]:
    nc = await asyncio.wait_for(connect(urls, **kwargs), HANG_GUARD)
    try:
        yield nc
    finally:
        await nc.close()


async def test_token_auth_is_accepted_and_sets_the_reconnect_policy(
    nats_server_factory: NatsServerFactory,
) -> None:
    server = nats_server_factory(token=TOKEN)
    async with connected(server.url, token=TOKEN, name="connect-test") as nc:
        assert nc.is_connected
        # Reconnect forever, ping often enough to notice a dead path within a minute.
        assert nc.options["allow_reconnect"] is True
        assert nc.options["max_reconnect_attempts"] == -1
        assert nc.options["ping_interval"] == PING_INTERVAL
        assert nc.options["max_outstanding_pings"] == MAX_OUTSTANDING_PINGS
        connections = server.monitor_json("connz")["connections"]
        assert [c.get("name") for c in connections] == ["connect-test"]

        async def echo(msg: Msg) -> None:
            await msg.respond(msg.data)

        await nc.subscribe("echo", cb=echo)
        assert (await nc.request("echo", b"hi", timeout=5)).data == b"hi"


@pytest.mark.parametrize("token", ["wrong-token", None], ids=["wrong-token", "no-token"])
async def test_refused_token_is_a_clear_auth_error(
    nats_server_factory: NatsServerFactory, token: str | None
) -> None:
    server = nats_server_factory(token=TOKEN)
    with pytest.raises(NatsAuthError, match="authorization violation") as info:
        await asyncio.wait_for(connect(server.url, token=token), HANG_GUARD)
    assert server.url in str(info.value)
    assert info.value.__cause__ is not None
    assert isinstance(info.value, NatsConnectError)


async def test_unreachable_server_is_a_connect_error_not_a_hang() -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    with pytest.raises(NatsConnectError, match="cannot connect") as info:
        await asyncio.wait_for(connect(url), HANG_GUARD)
    assert url in str(info.value)
    assert not isinstance(info.value, NatsAuthError)


async def test_nkey_seed_auth_is_accepted_and_a_wrong_seed_refused(
    nats_server_factory: NatsServerFactory,
) -> None:
    seed = user_seed()
    server = nats_server_factory(
        extra_conf=f'authorization {{ users = [ {{ nkey: "{public_key(seed)}" }} ] }}'
    )
    async with connected(server.url, nkey_seed=seed) as nc:
        assert nc.is_connected
    with pytest.raises(NatsAuthError):
        await asyncio.wait_for(connect(server.url, nkey_seed=user_seed()), HANG_GUARD)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        pytest.param("", "no user JWT block", id="empty"),
        pytest.param(FAKE_JWT, "no user JWT block", id="bare-jwt-without-header-line"),
        pytest.param(
            f"-----BEGIN NATS USER JWT-----\n{FAKE_JWT}\n------END NATS USER JWT------\n",
            "no user nkey seed block",
            id="no-seed",
        ),
        pytest.param(creds_text("not a jwt", "SUAAAA"), "does not hold a JWT", id="garbage-jwt"),
        pytest.param(creds_text(FAKE_JWT, "SUNOTAREALSEED"), "does not hold a user seed", id="garbage-seed"),
        pytest.param(creds_text(FAKE_JWT, "SU" + "A" * 56), "checksum mismatch", id="bad-seed-checksum"),
    ],
)
async def test_malformed_creds_text_is_a_value_error_before_connecting(text: str, problem: str) -> None:
    # Nothing listens on this port: the error must come from validation, at once.
    url = f"nats://127.0.0.1:{free_port()}"
    with pytest.raises(ValueError, match=problem) as info:
        await asyncio.wait_for(connect(url, creds_text=text), HANG_GUARD)
    for line in text.splitlines():
        if line.startswith("SU"):
            assert line not in str(info.value), "the seed must not leak into the message"


def test_parse_creds_accepts_the_nsc_layout_with_any_line_ends() -> None:
    seed = user_seed()
    for newline in ("\n", "\r\n"):
        assert parse_creds(creds_text(FAKE_JWT, seed, newline)) == (FAKE_JWT, seed)


async def test_creds_file_and_text_connect_to_a_server_without_auth(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    # Operator-mode servers come later; a plain server ignores the credentials, so this
    # proves the options we build are accepted by nats-py (CRLF files included).
    seed = user_seed()
    crlf = tmp_path / "user.creds"
    crlf.write_bytes(creds_text(FAKE_JWT, seed, "\r\n").encode())
    async with connected(nats_server.url, creds=crlf) as nc:
        assert nc.is_connected
    async with connected(nats_server.url, creds_text=creds_text(FAKE_JWT, seed)) as nc:
        assert nc.is_connected
    with pytest.raises(ValueError, match="cannot read NATS credentials file"):
        await connect(nats_server.url, creds=tmp_path / "missing.creds")


async def test_conflicting_or_incomplete_auth_options_are_value_errors() -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    with pytest.raises(ValueError, match="one authentication method"):
        await connect(url, token="t", creds_text=creds_text(FAKE_JWT, user_seed()))
    with pytest.raises(ValueError, match="jwt_cb needs nkey_seed"):
        await connect(url, jwt_cb=lambda: FAKE_JWT)
    with pytest.raises(ValueError, match="invalid NATS nkey seed"):
        await connect(url, nkey_seed="SUnotaseed")
    with pytest.raises(ValueError, match="at least one"):
        await connect([])


async def test_reconnects_after_a_server_restart_and_tunnels_work_again(
    nats_server_factory: NatsServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tunnel.connect")
    server = nats_server_factory(token=TOKEN)
    calls: list[str] = []
    reconnected = asyncio.Event()

    def on_disconnected() -> None:  # a plain function is accepted too
        calls.append("disconnected")

    async def on_reconnected() -> None:
        calls.append("reconnected")
        reconnected.set()

    async def handler(req: tunnel.Request) -> tunnel.Response:
        return tunnel.Response(200, [], b"pong")

    async with (
        connected(
            server.url, token=TOKEN, disconnected_cb=on_disconnected, reconnected_cb=on_reconnected
        ) as srv_nc,
        connected(server.url, token=TOKEN) as caller_nc,
    ):
        served = await tunnel.serve(srv_nc, "desk.example", handler)
        async with await tunnel.fetch(caller_nc, "tunnel://desk.example/ping") as resp:
            assert await resp.read() == b"pong"

        server.restart()
        await asyncio.wait_for(reconnected.wait(), HANG_GUARD)
        assert calls == ["disconnected", "reconnected"]

        async def tunnel_answers() -> bool:
            try:
                # Short timeouts: each try must end well inside the wait_until deadline.
                async with await tunnel.fetch(
                    caller_nc, "tunnel://desk.example/ping", first_frame_timeout=1.0, timeout=2.0
                ) as resp:
                    return await resp.read() == b"pong"
            except tunnel.TunnelError:
                return False  # the caller's own connection may still be reconnecting

        await wait_until(tunnel_answers, timeout=HANG_GUARD, message="tunnel must work after the restart")
        await served.close(timeout=1.0)
    messages = [r.getMessage() for r in caplog.records if r.name == "tunnel.connect"]
    assert any("disconnected" in m for m in messages)
    assert any("reconnected" in m for m in messages)


async def test_keeps_retrying_while_the_server_is_down(nats_server: NatsServer) -> None:
    failed_attempts: list[Exception] = []
    reconnected = asyncio.Event()

    async def on_error(exc: Exception) -> None:
        failed_attempts.append(exc)

    async with connected(nats_server.url, error_cb=on_error, reconnected_cb=reconnected.set) as nc:
        nats_server.kill()
        # Several refused attempts (the first one quickly, then ~1-2 s apart, jittered).
        await wait_until(lambda: len(failed_attempts) >= 3, timeout=HANG_GUARD, message="no retries")
        assert not nc.is_closed
        nats_server.start()
        await asyncio.wait_for(reconnected.wait(), HANG_GUARD)
        assert nc.is_connected
