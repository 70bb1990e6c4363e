"""The gateway answers NATS micro service discovery as ``studio-gateway`` (``nats.micro``).

One service instance per gateway process and connection: PING/INFO/STATS on the ``$SRV``
subjects, metadata ``version`` and ``connection`` (the NATS connection name), and one
endpoint, ``health`` on :data:`contract.discovery.GATEWAY_HEALTH_SUBJECT`, answering what
``GET /healthz`` says (NATS and runs); its STATS are micro's own (health requests).
Tenants' credentials may PING and INFO it (``contract.discovery``), not STATS or health.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any, Final

from nats.aio.client import Client as NATS
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import Service

from contract.discovery import GATEWAY_HEALTH_SUBJECT, GATEWAY_SERVICE, service_version

__all__ = ["GatewayDiscovery"]

log = logging.getLogger("studio_gateway.discovery")

DESCRIPTION: Final = "natslink studio gateway: link sessions, presence, runs"
STOP_TIMEOUT: Final = 2.0


class GatewayDiscovery:
    """The gateway's micro service, started on each new NATS connection."""

    def __init__(self, health: Callable[[], dict[str, Any]], version: str) -> None:
        self.health = health
        self.version = version
        self.service: Service | None = None

    async def attach(self, nc: NATS) -> None:
        """Serve discovery on ``nc`` (the previous connection's service stops). Never raises."""
        await self.close()
        try:
            service = await add_service(
                nc,
                name=GATEWAY_SERVICE,
                version=service_version(self.version),
                description=DESCRIPTION,
                metadata={"version": self.version},
            )
            await service.add_endpoint(
                name="health", subject=GATEWAY_HEALTH_SUBJECT, queue_group="health", handler=self._health
            )
        except Exception as exc:  # discovery is a convenience: the gateway serves without it
            log.warning("service discovery unavailable: %s", exc)
            return
        self.service = service

    async def close(self) -> None:
        service, self.service = self.service, None
        if service is None:
            return
        try:
            await asyncio.wait_for(service.stop(), STOP_TIMEOUT)
        except Exception as exc:  # its connection closed: the subscriptions went with it
            log.debug("stopping the discovery service: %s", exc)

    async def _health(self, request: Request) -> None:
        await request.respond(json.dumps(self.health()).encode())
