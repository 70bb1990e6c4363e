"""The gateway's own NATS connection: started in the background, reconnecting forever.

Why in the background: the gateway must come up (health checks, auth, clear 503s)
even while NATS is down, and must recover by itself when NATS comes back, without
a restart. While there is no live connection, :attr:`GatewayNats.available` is
False and :attr:`GatewayNats.reason` says why; the session endpoint answers 503
and presence answers ``{online: false}`` from that, instead of waiting on a
connection that is not there.

Connection settings (reconnect forever with jitter, ping interval, credential
validation) come from :func:`tunnel.connect.connect`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

from aiohttp import web
from nats.aio.client import Client as NATS

import tunnel
from tunnel.connect import NatsAuthError, NatsConnectError, NatsTLSError, connect, parse_creds

from .config import ConfigError, GatewayConfig

__all__ = ["GATEWAY_NATS", "GatewayNats"]

log = logging.getLogger("studio_gateway.nats")

# First-connect retry: quick at first (NATS often starts alongside the gateway), then
# backing off to a calm pace so a long outage does not flood the logs or the server.
FIRST_RETRY_DELAY: Final = 0.5
MAX_RETRY_DELAY: Final = 10.0
# Refused credentials will not fix themselves quickly; retry rarely (they may be rotated).
AUTH_RETRY_DELAY: Final = 30.0
# A certificate problem needs someone to change a certificate or a setting: retry at a calm pace.
TLS_RETRY_DELAY: Final = 10.0
# How the gateway's TLS settings are named in a fix.
TLS_CA_HINT: Final = "NATS_CA (--nats-ca FILE)"
TLS_CERT_HINT: Final = "NATS_CERT and NATS_KEY (--nats-cert FILE --nats-key FILE)"
# Closing must not hang shutdown when the server is gone.
CLOSE_TIMEOUT: Final = 5.0
CONNECTION_NAME: Final = "studio-gateway"


class GatewayNats:
    """Owns the gateway's NATS connection and the tunnel client on it."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self._auth: dict[str, Any] = _auth_options(config)
        self._nc: NATS | None = None
        self._client: tunnel.TunnelClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.reason = "not connected to NATS yet"
        # Observers (the gateway's metrics): its tunnel client's events, and "disconnected" /
        # "reconnected" of the connection.
        self.on_tunnel_event: tunnel.EventHook | None = None
        self.on_connection_event: Callable[[str], None] | None = None
        # Called with each new connection once it is up (the gateway's service discovery).
        self.on_connected: Callable[[NATS], Awaitable[None]] | None = None

    @property
    def nc(self) -> NATS | None:
        return self._nc

    @property
    def available(self) -> bool:
        """True while the connection is up (not connecting, reconnecting or closed)."""
        return self._nc is not None and self._nc.is_connected

    @property
    def client(self) -> tunnel.TunnelClient | None:
        """The tunnel client for probes and dispatch (None until the first connect)."""
        return self._client

    def unavailable_reason(self) -> str:
        if self._nc is not None and self._nc.is_reconnecting:
            return "the gateway lost its NATS connection and is reconnecting"
        return self.reason

    async def start(self) -> None:
        """Begin connecting; returns at once (see :meth:`wait_connected`)."""
        if self._task is None:
            self._closing = False
            self._task = asyncio.get_running_loop().create_task(self._connect_loop(), name="gateway-nats")

    async def wait_connected(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a live connection (for start-up checks and tests)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.available:
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        client, self._client = self._client, None
        nc, self._nc = self._nc, None
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.aclose(), CLOSE_TIMEOUT)
        if nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), CLOSE_TIMEOUT)
        self.reason = "the gateway is shutting down"

    async def _connect_loop(self) -> None:
        delay = FIRST_RETRY_DELAY
        attempt = 0
        while not self._closing:
            attempt += 1
            try:
                nc = await connect(
                    list(self.config.nats_urls),
                    name=CONNECTION_NAME,
                    tls=self.config.nats_tls,
                    closed_cb=self._on_closed,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    **self._auth,
                )
            except NatsAuthError as exc:
                self.reason = "NATS refused the gateway's own credentials (NATS_CREDS / NATS_TOKEN)"
                log.error("%s; retrying in %.0f s", exc, AUTH_RETRY_DELAY)
                await asyncio.sleep(AUTH_RETRY_DELAY)
                continue
            except NatsTLSError as exc:
                problem = exc.problem
                fix = problem.fix(ca=TLS_CA_HINT, cert=TLS_CERT_HINT)
                self.reason = f"the gateway's NATS connection failed TLS: {problem.reason}"
                log.error(
                    "nats %s: %s: %s; retrying every %.0f s", exc.where, problem.reason, fix, TLS_RETRY_DELAY
                )
                await asyncio.sleep(TLS_RETRY_DELAY)
                continue
            except NatsConnectError as exc:
                self.reason = "the gateway cannot reach NATS"
                level = logging.WARNING if attempt == 1 else logging.DEBUG
                log.log(level, "%s; retrying (every %.0f s at most)", exc, MAX_RETRY_DELAY)
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, MAX_RETRY_DELAY)
                continue
            self._nc = nc
            self._client = tunnel.TunnelClient(
                nc,
                prefix=self.config.tunnel_prefix,
                timeouts=tunnel.Timeouts(
                    first_frame=self.config.presence_first_frame_timeout, total=self.config.presence_timeout
                ),
                on_event=self.on_tunnel_event,
            )
            self.reason = "connected"
            if self.on_connected is not None:
                await self.on_connected(nc)
            if attempt > 1:
                log.info("connected to NATS after %d attempts", attempt)
            return

    async def _on_disconnected(self) -> None:
        if self.on_connection_event is not None and not self._closing:
            self.on_connection_event("disconnected")

    async def _on_reconnected(self) -> None:
        if self.on_connection_event is not None:
            self.on_connection_event("reconnected")

    async def _on_closed(self) -> None:
        """nats-py gave up on the connection (e.g. the server rejected it): start over."""
        nc = self._nc
        # A failed connect attempt closes its half-made client too; that is not our connection.
        if self._closing or nc is None or not nc.is_closed:
            return
        log.warning("the gateway's NATS connection closed; connecting again")
        self._nc = None
        self._client = None
        self.reason = "the gateway's NATS connection closed; connecting again"
        self._task = asyncio.get_running_loop().create_task(self._connect_loop(), name="gateway-nats")


GATEWAY_NATS: Final = web.AppKey("studio_gateway.nats", GatewayNats)


def _auth_options(config: GatewayConfig) -> dict[str, Any]:
    """connect() keyword arguments for the gateway's own credentials, validated now (start-up)."""
    if config.nats_token is not None:
        return {"token": config.nats_token}
    creds = config.nats_creds
    if creds is None:
        return {}
    if "-----BEGIN" in creds:
        text = creds
    else:
        try:
            text = Path(creds).expanduser().read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError("NATS_CREDS", f"cannot read {creds}: {exc.strerror}") from None
    try:
        parse_creds(text)
    except ValueError as exc:
        raise ConfigError("NATS_CREDS", str(exc)) from None
    return {"creds_text": text} if "-----BEGIN" in creds else {"creds": creds}
