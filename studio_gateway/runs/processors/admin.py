"""``GET /api/admin/processors`` (scope ``runs:admin``): every processor, its checkpoint and lag."""

from __future__ import annotations

import logging
from typing import Final

import nats.errors
from aiohttp import web

from ...auth import User, authenticated
from ...errors import json_error
from ..admin import OPERATOR_SCOPE, is_operator

__all__ = ["PROCESSORS_PATH", "add_routes"]

log = logging.getLogger("studio_gateway.processors")

PROCESSORS_PATH: Final = "/api/admin/processors"


@authenticated
async def list_processors(request: web.Request, user: User) -> web.StreamResponse:
    from .service import PROCESSORS

    if not is_operator(user):
        return json_error(403, "forbidden", f"listing processors needs a token with scope {OPERATOR_SCOPE!r}")
    service = request.app[PROCESSORS]
    if not service.ready.is_set():
        return json_error(503, "runs_unavailable", "the processors are not running yet")
    rows = service.describe()
    try:
        lags = {lag.name: lag for lag in await service.lags()}
    except (nats.errors.Error, TimeoutError) as exc:
        log.warning("GET %s: NATS failed: %r", request.path, exc)
        return json_error(
            503, "runs_unavailable", "the gateway could not reach JetStream just now; try again"
        )
    for row in rows:
        lag = lags.get(row["name"])
        row["pending"] = lag.pending if lag else None
        row["lagSeconds"] = round(lag.age, 3) if lag else None
    return web.json_response({"processors": rows}, headers={"Cache-Control": "no-store"})


def add_routes(app: web.Application) -> None:
    app.router.add_get(PROCESSORS_PATH, list_processors)
