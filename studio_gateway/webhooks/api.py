"""``/api/webhooks``: register, list and remove a user's webhooks, list a webhook's deliveries.

- ``POST /api/webhooks`` ``{url, runId?, eventTypes?}`` -> ``201 {id, url, runId, eventTypes,
  createdAt, secret}`` (the secret only here); ``eventTypes`` default ``["done"]``;
- ``GET /api/webhooks[?runId=ID]`` -> ``200 {"webhooks": [...]}`` (no secrets);
- ``DELETE /api/webhooks/{id}`` -> ``200 {id, removed: true}``; ``404 webhook_not_found``;
- ``GET /api/webhooks/{id}/deliveries`` -> ``200 {"deliveries": [...]}``, oldest first.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any, Final

import nats.errors
from aiohttp import web

from contract.run_protocol import is_valid_run_id

from ..auth import User, authenticated
from ..bodies import BodyError, ExpectHandler, read_json_object
from ..errors import json_error
from .processor import DEFAULT_EVENT_TYPES, EVENT_TYPES
from .service import WEBHOOKS
from .urls import UrlRefused, check_url

__all__ = ["WEBHOOKS_PATH", "add_routes"]

log = logging.getLogger("studio_gateway.webhooks")

WEBHOOKS_PATH: Final = "/api/webhooks"
MAX_BODY: Final = 16 * 1024
MAX_WEBHOOKS_PER_USER: Final = 50
_ID: Final = re.compile(r"wh_[0-9a-f]{32}")
_UNAVAILABLE: Final = "webhooks need JetStream; the gateway could not reach it just now, try again"


def public(record: dict[str, Any]) -> dict[str, Any]:
    return {k: record.get(k) for k in ("id", "url", "runId", "eventTypes", "createdAt")}


def public_delivery(record: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "id", "webhookId", "runId", "type", "status", "attempts", "lastStatus", "lastError",
        "nextAttemptAt", "createdAt", "updatedAt", "deliveredAt", "failedAt",
    )  # fmt: skip
    out = {k: record.get(k) for k in keys}
    if out["status"] != "pending":
        out["nextAttemptAt"] = None
    return out


def _field(name: str, message: str) -> web.Response:
    return json_error(422, "invalid_field", f"{name}: {message}", field=name)


@authenticated
async def create_webhook(request: web.Request, user: User) -> web.StreamResponse:
    service = request.app[WEBHOOKS]
    try:
        body = await read_json_object(request, MAX_BODY)
    except BodyError as exc:
        return exc.response()
    config = service.config
    try:
        url = check_url(body.get("url"), allow_http=config.allow_http, allow_private=config.allow_private)  # type: ignore[arg-type]
    except UrlRefused as exc:
        return json_error(422, "invalid_url", str(exc), field="url")
    run_id = body.get("runId")
    if run_id is not None and (not isinstance(run_id, str) or not is_valid_run_id(run_id)):
        return _field("runId", "not a run id")
    types = body.get("eventTypes", list(DEFAULT_EVENT_TYPES))
    if (
        not isinstance(types, list)
        or not types
        or not all(isinstance(t, str) and t in EVENT_TYPES for t in types)
    ):
        return _field("eventTypes", f"a non-empty list of {', '.join(sorted(EVENT_TYPES))}")
    store = service.store
    if store is None:
        return json_error(503, "runs_unavailable", _UNAVAILABLE)
    try:
        if len(await store.user_webhooks(user.id)) >= MAX_WEBHOOKS_PER_USER:
            return json_error(409, "too_many_webhooks", f"at most {MAX_WEBHOOKS_PER_USER} webhooks per user")
        secret = service.new_secret()
        record = {
            "id": f"wh_{uuid.uuid4().hex}",
            "userId": user.id,
            "url": url,
            "runId": run_id,
            "eventTypes": sorted(set(types)),
            "secret": secret,
            "createdAt": int(time.time() * 1000),
        }
        await store.add_webhook(record)
        service.registered(record)
        try:  # the webhook processor's consumer delivers this host's events from now on
            await service.processors.reconcile(service.processor.name)
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("webhook %s: the processor's filters follow within 5 s (%r)", record["id"], exc)
    except (nats.errors.Error, TimeoutError) as exc:
        log.warning("POST %s: NATS failed: %r", request.path, exc)
        return json_error(503, "runs_unavailable", _UNAVAILABLE)
    return web.json_response(
        {**public(record), "secret": secret},
        status=201,
        headers={"Location": f"{WEBHOOKS_PATH}/{record['id']}"},
    )


@authenticated
async def list_webhooks(request: web.Request, user: User) -> web.StreamResponse:
    service = request.app[WEBHOOKS]
    run_id = request.query.get("runId")
    if run_id is not None and not is_valid_run_id(run_id):
        return _field("runId", "not a run id")
    store = service.store
    if store is None:
        return json_error(503, "runs_unavailable", _UNAVAILABLE)
    try:
        hooks = await store.user_webhooks(user.id)
    except (nats.errors.Error, TimeoutError):
        return json_error(503, "runs_unavailable", _UNAVAILABLE)
    if run_id is not None:
        hooks = [h for h in hooks if h.get("runId") == run_id]
    return web.json_response({"webhooks": [public(h) for h in hooks]}, headers={"Cache-Control": "no-store"})


async def _owned(request: web.Request, user: User) -> tuple[str, web.StreamResponse | None]:
    webhook_id = request.match_info["id"]
    service = request.app[WEBHOOKS]
    store = service.store
    if store is None:
        return webhook_id, json_error(503, "runs_unavailable", _UNAVAILABLE)
    if _ID.fullmatch(webhook_id) is None or not any(
        h.get("id") == webhook_id for h in await store.user_webhooks(user.id)
    ):
        return webhook_id, json_error(404, "webhook_not_found", "no such webhook")
    return webhook_id, None


@authenticated
async def delete_webhook(request: web.Request, user: User) -> web.StreamResponse:
    try:
        webhook_id, problem = await _owned(request, user)
        if problem is not None:
            return problem
        store = request.app[WEBHOOKS].store
        assert store is not None
        await store.remove_webhook(user.id, webhook_id)
        request.app[WEBHOOKS].processor.index.remove(webhook_id)
    except (nats.errors.Error, TimeoutError):
        return json_error(503, "runs_unavailable", _UNAVAILABLE)
    return web.json_response({"id": webhook_id, "removed": True})


@authenticated
async def list_deliveries(request: web.Request, user: User) -> web.StreamResponse:
    try:
        webhook_id, problem = await _owned(request, user)
        if problem is not None:
            return problem
        store = request.app[WEBHOOKS].store
        assert store is not None
        records = await store.deliveries_of(webhook_id)
    except (nats.errors.Error, TimeoutError):
        return json_error(503, "runs_unavailable", _UNAVAILABLE)
    return web.json_response(
        {"deliveries": [public_delivery(r) for r in records]}, headers={"Cache-Control": "no-store"}
    )


def add_routes(app: web.Application, *, expect_handler: ExpectHandler | None = None) -> None:
    app.router.add_post(WEBHOOKS_PATH, create_webhook, expect_handler=expect_handler)
    app.router.add_get(WEBHOOKS_PATH, list_webhooks)
    app.router.add_delete(WEBHOOKS_PATH + "/{id}", delete_webhook)
    app.router.add_get(WEBHOOKS_PATH + "/{id}/deliveries", list_deliveries)
