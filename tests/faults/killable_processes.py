"""Processes for gateway/linkd chaos tests: the gateway and ``linkd up`` as real OS processes.

A process can be killed with SIGKILL (kill -9: no clean-up, no goodbye to NATS) and started
again at the same address, which an in-process object cannot do honestly.

- :class:`GatewayProcess`: ``python -m studio_gateway.cli serve`` on a fixed port;
- :class:`LinkdProcess`: ``python -m linkd.cli up --json-logs`` with ``LINKD_TOKEN`` and a
  file keyring in the test's directory (its NATS key survives a restart, as on a desktop);
- :func:`presence`: ``GET /api/links/me`` of a gateway, as the browser asks it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import httpx

from cli.nats_server import free_port
from studio_gateway.auth import issue_token
from studio_gateway.config import GatewayConfig
from tests.helpers import wait_until
from tests.linkd_support import subprocess_env

START_TIMEOUT: Final = 20.0  # a cold Python start on a loaded 2-core machine


class GatewayProcess:
    def __init__(self, env: Mapping[str, str], port: int | None = None) -> None:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "GATEWAY_", "TUNNEL_"))}
        self.env = {**base, **env}
        self.config = GatewayConfig.from_env(self.env)
        self.port = port or free_port()
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def token(self, user: str, ttl: float = 600) -> str:
        return issue_token(self.config.auth, user, ttl)

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "studio_gateway.cli",
            "serve",
            "--port",
            str(self.port),
            env=self.env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        async with httpx.AsyncClient(base_url=self.url, trust_env=False, timeout=2.0) as http:

            async def ready() -> bool:
                assert self.proc is not None and self.proc.returncode is None, "gateway exited"
                try:
                    return bool((await http.get("/healthz")).json()["nats"] == "connected")
                except httpx.TransportError:
                    return False

            await wait_until(ready, START_TIMEOUT, interval=0.05, message="gateway never ready")

    async def kill(self) -> None:
        """SIGKILL, and reap it."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    async def stop(self) -> None:
        await self.kill()


class LinkdProcess:
    def __init__(self, tmp_path: Path, gateway_url: str, token: str, *args: str) -> None:
        self.env = subprocess_env(tmp_path, LINKD_TOKEN=token)
        self.argv = [sys.executable, "-m", "linkd.cli", "up", "--json-logs", "--gateway", gateway_url, *args]
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[dict[str, Any]] = []
        self._readers: list[asyncio.Future[None]] = []

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,  # linkd logs on stderr
        )
        self._readers.append(asyncio.ensure_future(self._read(self.proc)))

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        async for raw in proc.stderr:
            with contextlib.suppress(ValueError):
                self.lines.append(json.loads(raw))

    def messages(self) -> list[str]:
        return [str(line.get("message")) for line in self.lines]

    def count(self, fragment: str) -> int:
        return sum(fragment in m for m in self.messages())

    async def wait_message(self, fragment: str, timeout: float = START_TIMEOUT, *, at_least: int = 1) -> None:
        await wait_until(
            lambda: self.count(fragment) >= at_least,
            timeout,
            interval=0.05,
            message=f"linkd never logged {fragment!r} x{at_least}: {self.messages()[-8:]}",
        )

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        await asyncio.gather(*self._readers, return_exceptions=True)
        self._readers.clear()


async def presence(gateway_url: str, token: str, timeout: float = 10.0) -> dict[str, Any]:
    async with httpx.AsyncClient(trust_env=False, timeout=timeout) as http:
        resp = await http.get(f"{gateway_url}/api/links/me", headers={"Authorization": f"Bearer {token}"})
        assert resp.status_code == 200, resp.text
        doc: dict[str, Any] = resp.json()
        return doc


async def wait_presence(gateway_url: str, token: str, online: bool, timeout: float) -> float:
    """Poll ``/api/links/me`` until ``online`` matches; returns the seconds it took."""
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def matches() -> bool:
        try:
            return (await presence(gateway_url, token, timeout=5.0))["online"] is online
        except httpx.TransportError:
            return False

    await wait_until(matches, timeout, interval=0.1, message=f"presence never became online={online}")
    return loop.time() - started
