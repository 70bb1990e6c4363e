"""Operator endpoints for runs: ``GET /api/admin/runs/dead-letters``.

Why a scope and not a user list: the gateway's bearer tokens come from the operator's identity
provider, which is where "who operates this" is decided; the gateway only checks that the
token's ``scope`` claim (OAuth 2 style: space-separated, or a JSON list) holds
:data:`OPERATOR_SCOPE`. Any other valid token gets ``403 forbidden``.

``GET /api/admin/runs/dead-letters?limit=N&runId=ID`` ->
``{"deadLetters": [<record>...], "total": T}``, newest first, at most ``limit`` (1..1000,
default 100); a record says which run, subject, stream seq and event seq, how many deliveries,
the error the apply step raised, when it was stored and parked, and the message's text (its
first 64 KiB). See :meth:`.projector.Projector._dead_letter`.
"""

from __future__ import annotations

import logging
from typing import Any, Final

import nats.errors
from aiohttp import web

from contract.run_protocol import is_valid_run_id

from ..auth import User, authenticated
from ..errors import json_error
from .pull_feed import ConsumerGone
from .service import RUNS

__all__ = ["DEAD_LETTERS_PATH", "OPERATOR_SCOPE", "add_routes", "is_operator"]

log = logging.getLogger("studio_gateway.runs_admin")

DEAD_LETTERS_PATH: Final = "/api/admin/runs/dead-letters"
OPERATOR_SCOPE: Final = "runs:admin"
DEFAULT_LIMIT: Final = 100
MAX_LIMIT: Final = 1000


def is_operator(user: User) -> bool:
    """Whether the token's ``scope`` claim grants :data:`OPERATOR_SCOPE`."""
    scope = user.claims.get("scope")
    if isinstance(scope, str):
        return OPERATOR_SCOPE in scope.split()
    return isinstance(scope, list) and OPERATOR_SCOPE in scope


def _limit(raw: str | None) -> int | None:
    if raw is None:
        return DEFAULT_LIMIT
    text = raw.strip()
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
        return None
    return int(text)


@authenticated
async def list_dead_letters(request: web.Request, user: User) -> web.StreamResponse:
    if not is_operator(user):
        why = f"listing dead letters needs a token with scope {OPERATOR_SCOPE!r}"
        return json_error(403, "forbidden", why)
    service = request.app[RUNS]
    store = service.store
    if store is None:
        return json_error(503, "runs_unavailable", service.unavailable_reason())
    limit = _limit(request.query.get("limit"))
    if limit is None:
        return json_error(422, "invalid_field", f"limit: a whole number from 1 to {MAX_LIMIT}", field="limit")
    run_id = request.query.get("runId")
    if run_id is not None and not is_valid_run_id(run_id):
        return json_error(422, "invalid_field", "runId: not a run id", field="runId")
    try:
        records = await store.dead_letters()
    except (nats.errors.Error, TimeoutError, ConsumerGone) as exc:
        log.warning("GET %s: NATS failed: %r", request.path, exc)
        why = "the gateway could not reach JetStream just now; try again"
        return json_error(503, "runs_unavailable", why)
    if run_id is not None:
        records = [r for r in records if r.get("runId") == run_id]
    records.sort(key=_parked_at, reverse=True)
    body: dict[str, Any] = {"deadLetters": records[:limit], "total": len(records)}
    return web.json_response(body, headers={"Cache-Control": "no-store"})


def _parked_at(record: dict[str, Any]) -> int:
    value = record.get("deadAt")
    return value if isinstance(value, int) else 0


def add_routes(app: web.Application) -> None:
    app.router.add_get(DEAD_LETTERS_PATH, list_dead_letters)
