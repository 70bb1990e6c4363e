"""linkd answers NATS micro service discovery (``$SRV.PING/INFO/STATS``) for its own host.

``nats.micro`` does the protocol; this module names the service and adds what micro cannot
see. The service is ``linkd-<host token>`` (:func:`contract.discovery.desktop_service_name`;
subjects and permissions there), with metadata ``hostname`` (the tunnel hostname),
``machine`` (this computer's name) and ``version``, and two endpoints:

- ``status``: a real micro endpoint on ``<host prefix>.svc.status`` answering the daemon's
  status document; its stats are micro's own (requests to that endpoint);
- ``tunnel``: the tunnel's request subject, served by the tunnel server (not by micro, which
  would steal its requests); its stats come from the daemon's traffic record
  (:class:`linkd.metrics.RequestStats`): ``num_requests`` = tunnelled requests finished,
  ``num_errors`` = those that ended in an error of linkd's (upstream unreachable, a tunnel
  error, cancelled: an upstream's own 4xx/5xx is an answer, not an error), ``processing_time``
  = the sum of their durations (ns), ``average_processing_time`` = its mean.

The service follows the daemon's current connection (:meth:`DesktopDiscovery.attach`); a
credential without the discovery permissions (a gateway from before them) is detected from
its JWT and gets no service rather than a stream of permission errors.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any, Final

from nats.aio.client import Client as NATS
from nats.micro.request import Request
from nats.micro.service import EndpointInfo, EndpointStats, Service, ServiceConfig, ServiceInfo, ServiceStats

import tunnel
from contract.discovery import desktop_service_name, discovery_grant, service_version, status_subject
from contract.nats_jwt import JwtError, decode_jwt
from contract.permissions import PermissionGrant

from .metrics import RequestStats
from .session import LinkSession

__all__ = ["DesktopDiscovery", "DesktopService", "discovery_permitted"]

log = logging.getLogger("linkd.discovery")

STOP_TIMEOUT: Final = 2.0  # a connection going away must not hold the daemon up
DESCRIPTION: Final = "natslink desktop daemon: serves one tunnel host"


def discovery_permitted(session: LinkSession) -> bool:
    """Whether the session's credential may answer discovery (token mode: no JWT, nothing to check)."""
    if session.jwt is None:
        return True
    try:
        claims = decode_jwt(session.jwt)
    except JwtError:
        return False
    nats = claims.get("nats")
    granted = PermissionGrant.from_claims(nats if isinstance(nats, dict) else {})
    if not granted.subscribe:  # an empty allow-list: everything in the account
        return True
    needed = discovery_grant(session.hostname, session.prefix).subscribe
    return set(needed) <= set(granted.subscribe)


class DesktopService(Service):
    """A micro service whose STATS and INFO also list the tunnel endpoint, counted by the traffic."""

    def __init__(
        self, nc: NATS, config: ServiceConfig, *, traffic: RequestStats, tunnel_subject: str
    ) -> None:
        super().__init__(nc, config)
        self.traffic = traffic
        self.tunnel_subject = tunnel_subject

    def stats(self) -> ServiceStats:
        stats = super().stats()
        t = self.traffic
        stats.endpoints.append(
            EndpointStats(
                name="tunnel",
                subject=self.tunnel_subject,
                queue_group="tunnel",
                num_requests=t.requests,
                num_errors=t.errors,
                processing_time=t.processing_ns,
                average_processing_time=t.processing_ns // t.requests if t.requests else 0,
                last_error=t.last_error or None,
            )
        )
        return stats

    def info(self) -> ServiceInfo:
        info = super().info()
        info.endpoints.append(
            EndpointInfo(
                name="tunnel",
                subject=self.tunnel_subject,
                queue_group="tunnel",
                metadata={"served_by": "tunnel"},
            )
        )
        return info


class DesktopDiscovery:
    """The daemon's micro service, moved to each new current connection."""

    def __init__(
        self, *, traffic: RequestStats, status: Callable[[], dict[str, Any]], machine: str, version: str
    ) -> None:
        self.traffic = traffic
        self.status = status
        self.machine = machine
        self.version = version
        self.service: DesktopService | None = None
        self._stopping: set[asyncio.Task[None]] = set()

    async def attach(self, nc: NATS | None, session: LinkSession | None) -> None:
        """Serve discovery on ``nc`` for ``session``'s host (None: stop). Never raises.

        The previous connection's service stops in the background: that connection may be
        draining its requests, and a credential rotation must not wait for it.
        """
        previous, self.service = self.service, None
        if previous is not None:
            task = asyncio.ensure_future(_stop(previous))
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)
        if nc is None or session is None:
            return
        if not discovery_permitted(session):
            log.info("service discovery off: this credential has no $SRV permissions (an older gateway)")
            return
        subjects = tunnel.HostSubjects.for_host(session.hostname, session.prefix)
        config = ServiceConfig(
            name=desktop_service_name(session.hostname),
            version=service_version(self.version),
            description=DESCRIPTION,
            metadata={"hostname": session.hostname, "machine": self.machine, "version": self.version},
        )
        service = DesktopService(nc, config, traffic=self.traffic, tunnel_subject=subjects.request)
        try:
            await service.start()
            await service.add_endpoint(
                name="status", subject=status_subject(subjects), queue_group="status", handler=self._status
            )
        except Exception as exc:  # discovery is a convenience: the tunnel goes on without it
            log.warning("service discovery unavailable: %s", exc)
            await _stop(service)
            return
        self.service = service

    async def close(self) -> None:
        service, self.service = self.service, None
        if service is not None:
            await _stop(service)
        if self._stopping:
            await asyncio.gather(*self._stopping, return_exceptions=True)

    async def _status(self, request: Request) -> None:
        await request.respond(json.dumps(self.status()).encode())


async def _stop(service: Service) -> None:
    try:
        await asyncio.wait_for(service.stop(), STOP_TIMEOUT)
    except Exception as exc:  # a closed connection: its subscriptions are gone anyway
        log.debug("stopping the discovery service: %s", exc)
