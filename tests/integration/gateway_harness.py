"""Shared pieces for the studio_gateway integration tests: real nats-servers, the real aiohttp app.

- :func:`start_operator_server`: an operator-mode nats-server (via ``OperatorSetup``) with a
  websocket listener, plus an unrestricted ``.creds`` file for the gateway's own connection;
- :func:`running_gateway`: ``create_app(config)`` behind aiohttp's ``TestServer``/``TestClient``,
  waiting until the gateway's NATS connection is up;
- :class:`Daemon`: a desktop-side NATS connection that records every async error (permission
  violations arrive only through nats-py's ``error_cb``).
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import nats
import nkeys
from aiohttp.test_utils import TestClient, TestServer
from nats.aio.client import Client, RawCredentials

import tunnel
from cli.nats_server import NatsServer
from contract.nats_jwt import decode_jwt
from contract.permissions import GrantProvider
from studio_gateway.app import create_app
from studio_gateway.auth import issue_token
from studio_gateway.config import GatewayConfig
from studio_gateway.nats_jwt import OperatorSetup
from studio_gateway.natsconn import GATEWAY_NATS, GatewayNats
from tests.helpers import NatsServerFactory

# 48 bytes: comfortably above the 32-byte minimum the gateway enforces for HS256.
SECRET = "test-gateway-secret-0123456789abcdef0123456789abcdef"
# Waits on a local server: seconds are already generous; only a hang hits them.
EVENT_TIMEOUT = 5.0
STATUS = {"hostname": "desk-of-test", "capabilities": ["runs", "fetch"], "cliVersion": "9.8.7"}


def base_env(**overrides: str) -> dict[str, str]:
    env = {"GATEWAY_JWT_SECRET": SECRET}
    env.update(overrides)
    return env


@dataclass
class OperatorServer:
    setup: OperatorSetup
    server: NatsServer
    gateway_creds: Path

    def env(self, **overrides: str) -> dict[str, str]:
        """Gateway settings for operator mode on this server (public URL: its nats:// URL)."""
        env = base_env(
            NATS_URL=self.server.url, NATS_CREDS=str(self.gateway_creds), NATS_PUBLIC_URL=self.server.url
        )
        env.update(self.setup.gateway_env())
        env.update(overrides)
        return env


def start_operator_server(
    factory: NatsServerFactory, tmp_path: Path, *, jetstream: bool = False
) -> OperatorServer:
    setup = OperatorSetup.generate()
    server = factory(extra_conf=setup.server_conf(), websocket_port=0, jetstream=jetstream)
    creds = tmp_path / "gateway.creds"
    creds.write_text(setup.user_creds("studio-gateway"), encoding="utf-8")
    return OperatorServer(setup, server, creds)


@dataclass
class Gateway:
    client: TestClient[Any, Any]
    config: GatewayConfig
    nats: GatewayNats

    def headers(self, user: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {issue_token(self.config.auth, user, 300)}"}

    async def session(self, user: str, body: Any = None) -> tuple[int, dict[str, Any]]:
        kwargs: dict[str, Any] = {"headers": self.headers(user)}
        if body is not None:
            kwargs["json"] = body
        resp = await self.client.post("/api/links/session", **kwargs)
        return resp.status, await resp.json()

    async def ok_session(self, user: str, body: Any = None) -> dict[str, Any]:
        status, payload = await self.session(user, body)
        assert status == 200, payload
        return payload

    async def me(self, user: str) -> dict[str, Any]:
        resp = await self.client.get("/api/links/me", headers=self.headers(user))
        assert resp.status == 200, await resp.text()
        payload: dict[str, Any] = await resp.json()
        return payload

    @property
    def nc(self) -> Client:
        nc = self.nats.nc
        assert nc is not None, "gateway has no NATS connection"
        return nc


@asynccontextmanager
async def running_gateway(
    env: Mapping[str, str],
    *,
    wait_nats: bool = True,
    extra_grants: tuple[GrantProvider, ...] = (),
    **config_overrides: Any,
) -> AsyncIterator[Gateway]:
    config = GatewayConfig.from_env(env)
    if config_overrides:
        config = replace(config, **config_overrides)
    app = create_app(config, extra_grants=extra_grants)
    client: TestClient[Any, Any] = TestClient(TestServer(app))
    await client.start_server()
    try:
        if wait_nats:
            assert await app[GATEWAY_NATS].wait_connected(EVENT_TIMEOUT), "gateway never connected to NATS"
        yield Gateway(client, config, app[GATEWAY_NATS])
    finally:
        await client.close()


@dataclass
class Daemon:
    """A desktop's NATS connection; ``errors`` collects what nats-py reports asynchronously."""

    nc: Client
    errors: list[str] = field(default_factory=list)
    error_event: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait_error(self, fragment: str) -> str:
        """The first recorded error containing ``fragment``, ignoring case (waits for it).

        nats-py lowercases the server's ``-ERR`` text, subjects included.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + EVENT_TIMEOUT
        while True:
            for error in self.errors:
                if fragment.lower() in error.lower():
                    return error
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"no NATS error containing {fragment!r}; got {self.errors}")
            self.error_event.clear()
            with suppress(TimeoutError):
                await asyncio.wait_for(self.error_event.wait(), remaining)


async def connect_daemon(url: str, **auth: Any) -> Daemon:
    """Connect like a desktop would: no reconnect, so a refusal surfaces as an exception."""
    errors: list[str] = []
    event = asyncio.Event()

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))
        event.set()

    nc = await nats.connect(
        url,
        name="linkd-test",
        error_cb=on_error,
        allow_reconnect=False,
        max_reconnect_attempts=0,
        connect_timeout=EVENT_TIMEOUT,
        **auth,
    )
    return Daemon(nc, errors, event)


def creds_auth(creds: str) -> dict[str, Any]:
    return {"user_credentials": RawCredentials(creds)}


def own_key_auth(jwt: str, seed: str) -> dict[str, Any]:
    """Authenticate with a JWT from the gateway and a seed that never left this process."""
    keypair = nkeys.from_seed(bytearray(seed.encode("ascii")))

    def signature_cb(nonce: str) -> bytes:
        return base64.b64encode(keypair.sign(nonce.encode()))

    return {"user_jwt_cb": lambda: jwt.encode(), "signature_cb": signature_cb}


async def serve_status(nc: Client, hostname: str, prefix: str = tunnel.DEFAULT_PREFIX) -> tunnel.TunnelServer:
    """A plain tunnel server answering /api/links/status like linkd, and /hello."""

    async def handler(request: tunnel.Request) -> tunnel.Response:
        if request.path == "/api/links/status":
            return tunnel.Response(200, [("content-type", "application/json")], json.dumps(STATUS))
        return tunnel.Response(200, [("content-type", "text/plain")], f"hello from {hostname}")

    return await tunnel.serve(nc, hostname, handler, prefix=prefix)


def jwt_claims(jwt: str) -> dict[str, Any]:
    return decode_jwt(jwt)
