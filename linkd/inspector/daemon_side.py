"""The inspector as ``linkd up`` runs it: a recorder on the daemon's traffic, the server.

A port that is taken is not fatal: one warning line, and the daemon serves without an
inspector (the tunnel matters more than the page).
"""

from __future__ import annotations

import errno
import logging
from typing import Any

from ..traffic import Traffic
from .recorder import Recorder
from .server import DEFAULT_HOST, InspectorServer, MetricsSource

__all__ = ["DaemonInspector"]

log = logging.getLogger("linkd.inspector")


class DaemonInspector:
    """Records from the first request on; :meth:`start` opens the page, :meth:`close` ends both."""

    def __init__(
        self,
        traffic: Traffic,
        *,
        port: int,
        size: int,
        upstream_url: str | None,
        host: str = DEFAULT_HOST,
        metrics: MetricsSource | None = None,
    ) -> None:
        self.traffic = traffic
        self.recorder = Recorder(size)
        self.host = host
        self.port = port
        self.upstream_url = upstream_url
        self.metrics = metrics  # linkd's /metrics, set before start() (linkd.metrics)
        self.server: InspectorServer | None = None
        traffic.capture_bodies = True  # the page shows bodies
        self._unsubscribe = traffic.subscribe(self.recorder.observe)

    @property
    def url(self) -> str | None:
        return self.server.url if self.server is not None else None

    async def start(self) -> str | None:
        """The page's URL; None (after one warning line) when the port cannot be had."""
        server = InspectorServer(
            self.recorder,
            upstream_url=self.upstream_url,
            host=self.host,
            port=self.port,
            metrics=self.metrics,
        )
        try:
            url = await server.start()
        except OSError as exc:
            await server.close()
            self._unsubscribe()  # no page: nothing to record for
            self.traffic.capture_bodies = False
            why = "the port is in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
            log.warning(
                "inspector: cannot listen on %s:%d (%s); running without it (see --inspect-port)",
                self.host,
                self.port,
                why,
            )
            return None
        self.server = server
        log.info("inspector at %s (recent requests, replay; linkctl inspect)", url)
        return url

    async def close(self) -> None:
        self._unsubscribe()
        server, self.server = self.server, None
        if server is not None:
            await server.close()

    def status(self) -> dict[str, Any] | None:
        """For the status file: ``{"url": ...}`` while the page is up."""
        return self.server.status() if self.server is not None else None
