"""Structured logs: one JSON object per line, for the gateway's own records and its access log.

Why JSON: gateway logs are read by machines (log shippers, queries by user host or
status) far more than by eyes. The schema is :mod:`contract.logs` (the daemon's
``--json-logs`` too): fields passed with ``extra={...}`` become keys of the object;
secrets are never passed there.
"""

from __future__ import annotations

import logging
import sys

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from contract.logs import JsonFormatter

__all__ = ["JsonAccessLogger", "configure_logging"]


class JsonAccessLogger(AbstractAccessLogger):
    """aiohttp access log as structured records (no Authorization header, no query secrets)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            "%s %s %s",
            request.method,
            request.path,
            response.status,
            extra={
                "method": request.method,
                "path": request.path,
                "status": response.status,
                "duration_ms": round(time * 1000, 2),
                "remote": request.remote,
            },
        )


def configure_logging(level: str = "info") -> None:
    """Send every log record to stderr as JSON lines (call once, from the CLI)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
