"""A real HTTP webhook receiver for the tests: checks signatures, deduplicates by delivery id.

It counts every POST (``raw``) and keeps the first of each delivery id (``unique``), as a
receiver following docs/runs.md should. ``status`` is what it answers; ``hang_first`` makes it
hold the first request open until :meth:`release` (a gateway can be killed meanwhile).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from studio_gateway.webhooks.signing import DELIVERY_HEADER, SIGNATURE_HEADER, verify


@dataclass
class Receipt:
    delivery: str
    signature: str
    body: bytes
    valid: bool

    @property
    def json(self) -> dict[str, Any]:
        value = json.loads(self.body)
        assert isinstance(value, dict)
        return value


@dataclass
class WebhookReceiver:
    port: int
    secrets: list[str] = field(default_factory=list)
    status: int = 200
    hang_first: bool = False
    raw: list[Receipt] = field(default_factory=list)
    unique: dict[str, Receipt] = field(default_factory=dict)
    _runner: web.AppRunner | None = None
    _released: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def release(self) -> None:
        self._released.set()

    async def _hook(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        signature = request.headers.get(SIGNATURE_HEADER, "")
        receipt = Receipt(
            request.headers.get(DELIVERY_HEADER, ""),
            signature,
            body,
            any(verify(secret, body, signature) for secret in self.secrets),
        )
        first = not self.raw
        self.raw.append(receipt)
        if self.hang_first and first:
            await self._released.wait()
            return web.Response(status=200)
        if self.status // 100 == 2:
            self.unique.setdefault(receipt.delivery, receipt)
        return web.Response(status=self.status)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        self.release()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
