"""The preview's shared state: its settings, the signer, the ticket ledger and the NATS connection."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from aiohttp import web

from ..config import GatewayConfig
from ..natsconn import GatewayNats
from .config import PreviewDomain
from .tokens import TicketLedger, TokenSigner

__all__ = ["PREVIEW", "TICKET_PATH", "PreviewService"]

log = logging.getLogger("studio_gateway.preview")

# The one path a preview origin answers itself: it redeems a ticket (and shadows that path
# of the dev server, which is unlikely to have one of this name).
TICKET_PATH: Final = "/__natslink/ticket"


@dataclass
class PreviewService:
    """Everything the preview routes share; ``clock`` is wall time (tokens carry Unix times)."""

    config: GatewayConfig
    nats: GatewayNats
    clock: Callable[[], float] = time.time
    signer: TokenSigner = field(init=False)
    ledger: TicketLedger = field(init=False, default_factory=TicketLedger)

    def __post_init__(self) -> None:
        key = self.config.preview.secret
        if key is None:
            key = secrets.token_bytes(32)
            if self.config.preview.domain is not None:
                log.info(
                    "GATEWAY_PREVIEW_SECRET is not set: preview tickets and cookies are signed with a "
                    "key of this process (they end with it; set one secret for a fleet of gateways)"
                )
        self.signer = TokenSigner(key)

    @property
    def domain(self) -> PreviewDomain | None:
        return self.config.preview.domain

    def origin(self, label: str, domain: PreviewDomain, api_host: str | None) -> str:
        """``scheme://<label>.<domain>[:port]``: the setting's port, else the one the API caller used."""
        port = domain.port
        if port is None and api_host and not api_host.endswith("]") and ":" in api_host:
            tail = api_host.rsplit(":", 1)[1]
            port = int(tail) if tail.isdigit() else None
        default = 443 if domain.secure else 80
        suffix = f":{port}" if port is not None and port != default else ""
        return f"{domain.scheme}://{label}.{domain.host}{suffix}"


PREVIEW: Final = web.AppKey("studio_gateway.preview", PreviewService)
