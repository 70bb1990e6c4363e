"""Shared pieces for the linkd integration tests: a real gateway on a real port, the daemon in-process.

- :class:`LiveGateway`: ``studio_gateway.create_app`` behind aiohttp's ``AppRunner`` on a fixed
  loopback port, so it can be stopped and started again at the same URL;
- :func:`running_daemon`: a :class:`linkd.daemon.LinkDaemon` in a task, waited until online,
  recording every state change;
- :func:`probe`: ``GET tunnel://<host>/api/links/status`` from the gateway side.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from aiohttp import web
from nats.aio.client import Client

import tunnel
from cli.nats_server import free_port
from linkd.config import RunnerSettings, Settings
from linkd.credentials_store import generate_seed
from linkd.daemon import LinkDaemon, State, StateChange
from linkd.run_events import MemoryEventSink
from linkd.session import GatewayClient
from studio_gateway.app import create_app
from studio_gateway.auth import issue_token
from studio_gateway.config import GatewayConfig
from studio_gateway.natsconn import GATEWAY_NATS
from tests.helpers import wait_until
from tunnel.backoff import Backoff

EVENT_TIMEOUT = 5.0


class LiveGateway:
    """The real gateway app on ``127.0.0.1:<port>``; ``stop()``/``start()`` keep the URL."""

    def __init__(self, env: Mapping[str, str], **config_overrides: Any) -> None:
        config = GatewayConfig.from_env(env)
        self.config = replace(config, **config_overrides) if config_overrides else config
        self.port = free_port()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def token(self, user: str, ttl: float = 600) -> str:
        return issue_token(self.config.auth, user, ttl)

    async def start(self) -> None:
        app = create_app(self.config)
        runner = web.AppRunner(app, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port)
        await site.start()
        self._runner = runner
        assert await app[GATEWAY_NATS].wait_connected(EVENT_TIMEOUT), "gateway never connected to NATS"

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    @property
    def nc(self) -> Client:
        assert self._runner is not None
        nc = self._runner.app[GATEWAY_NATS].nc
        assert nc is not None
        return nc


@asynccontextmanager
async def live_gateway(env: Mapping[str, str], **config_overrides: Any) -> AsyncIterator[LiveGateway]:
    gateway = LiveGateway(env, **config_overrides)
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.stop()


def daemon_settings(tmp_path: Path, **overrides: Any) -> Settings:
    runners = overrides.pop("runners", RunnerSettings(heartbeat_interval=0.5))
    return Settings(
        status_file=tmp_path / "linkd-status.json", drain_timeout=2.0, runners=runners, **overrides
    )


@dataclass
class RunningDaemon:
    daemon: LinkDaemon
    task: asyncio.Task[None]
    changes: list[StateChange] = field(default_factory=list)

    @property
    def hostname(self) -> str:
        assert self.daemon.session is not None
        return self.daemon.session.hostname

    def messages(self) -> list[str]:
        return [c.message for c in self.changes]

    async def wait_state(self, state: State, timeout: float = EVENT_TIMEOUT, contains: str = "") -> None:
        await wait_until(
            lambda: self.daemon.state is state and contains in self.daemon.message,
            timeout,
            message=f"daemon never {state.value} ({contains!r}); history: {self.messages()}",
        )


@asynccontextmanager
async def running_daemon(
    tmp_path: Path,
    gateway_url: str,
    token: str,
    *,
    seed: str | None = "generate",
    settings: Settings | None = None,
    retry_backoff: Backoff | None = None,
    wait_online: bool = True,
    on_connection: Any = None,
) -> AsyncIterator[RunningDaemon]:
    own_seed = generate_seed() if seed == "generate" else seed
    client = GatewayClient(gateway_url, lambda: token)
    changes: list[StateChange] = []
    daemon = LinkDaemon(
        settings or daemon_settings(tmp_path),
        client,
        own_seed=own_seed,
        sink=MemoryEventSink(),
        on_change=changes.append,
        on_connection=on_connection,
        machine_name=lambda: "test-desktop",
        retry_backoff=retry_backoff or Backoff(initial=0.2, cap=1.0),
    )
    task = asyncio.ensure_future(daemon.run())
    running = RunningDaemon(daemon, task, changes)
    try:
        if wait_online:
            await running.wait_state(State.ONLINE)
        yield running
    finally:
        daemon.request_stop("test over")
        await asyncio.wait_for(task, 10.0)


async def probe(nc: Client, hostname: str, timeout: float = EVENT_TIMEOUT) -> dict[str, Any]:
    """The daemon's status document through the tunnel (raises a TunnelError when unreachable)."""
    async with await tunnel.fetch(
        nc, f"tunnel://{hostname}/api/links/status", first_frame_timeout=timeout, timeout=timeout
    ) as resp:
        assert resp.status == 200, resp.status
        doc: dict[str, Any] = json.loads(await resp.read())
        return doc
