"""The runs control-plane routes: talk to a running run, its outbound messages, validate, rebuild.

- ``POST /api/runs/validate`` (a ``POST /api/runs`` body) -> ``200 {ok: true, runner, threadId,
  title, wouldDispatchTo: {tunnelHostname, hostname, cliVersion, latencyMs}}``, or the error
  ``POST /api/runs`` would give (``422 invalid_field`` / ``unknown_runner``), ``409
  desktop_unreachable`` (nobody serves the caller's host), ``422 unknown_runner`` with the
  desktop's ``runners`` (the desktop does not offer it); nothing is created;
- ``POST /api/runs/{id}/context`` ``{context, idempotencyKey?}`` and
  ``POST /api/runs/{id}/signals`` ``{signalType, severity?, payload?, idempotencyKey?}``
  (the ``Idempotency-Key`` header works too) -> see :mod:`.outbound` for the answers;
- ``GET /api/runs/{id}/messages`` (owner, or a ``runs:admin`` token) -> ``{runId, messages:
  [<record>...], summary}`` (records: :mod:`.messages`);
- ``POST /api/runs/{id}/projection/rebuild`` (owner or ``runs:admin``) -> ``200 {runId,
  changed: {field: {from, to}}, events, state}`` (:mod:`.rebuild`).
"""

from __future__ import annotations

from typing import Final

from aiohttp import web

from contract.run_messages import CONTEXT, SIGNAL, InvalidMessage, check_context, parse_signal
from contract.run_protocol import is_valid_run_id

from ..auth import User, authenticated
from ..bodies import ExpectHandler
from ..errors import json_error
from .admin import is_operator
from .api import _NO_STORE, _Invalid, _json_body, _nats_errors, _owned, _refused, _store
from .messages import summarize
from .rebuild import rebuild
from .service import RequestRefused, RunsService
from .state import RunState
from .store import Conflict, RunStore

__all__ = ["add_routes"]

MAX_IDEMPOTENCY_KEY: Final = 200
IDEMPOTENCY_HEADER: Final = "Idempotency-Key"
# A context or signal body: the message (at most 64 KiB as JSON) and a little around it.
MAX_MESSAGE_BODY: Final = 96 * 1024


async def _owned_or_admin(request: web.Request, user: User) -> tuple[RunsService, RunStore, RunState]:
    if not is_operator(user):
        return await _owned(request, user)
    service, store = _store(request)
    run_id = request.match_info["runId"]
    loaded = await store.load(run_id) if is_valid_run_id(run_id) else None
    if loaded is None:
        raise _Invalid(json_error(404, "run_not_found", f"no run {run_id[:140]!r}"))
    return service, store, loaded[0]


def _idempotency_key(request: web.Request, body_key: object) -> str | None:
    header = request.headers.get(IDEMPOTENCY_HEADER)
    keys = {key for key in (header, body_key) if key is not None}
    if not keys:
        return None
    if len(keys) > 1:
        raise _Invalid(
            json_error(
                422,
                "invalid_field",
                "idempotencyKey: the body and the Idempotency-Key header name different keys",
                field="idempotencyKey",
            )
        )
    key = keys.pop()
    if not isinstance(key, str) or not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY or not key.isprintable():
        raise _Invalid(
            json_error(
                422,
                "invalid_field",
                f"idempotencyKey: 1..{MAX_IDEMPOTENCY_KEY} printable characters",
                field="idempotencyKey",
            )
        )
    return key


async def _post_message(request: web.Request, user: User, kind: str) -> web.StreamResponse:
    try:
        service, _, state = await _owned(request, user)
        payload = await _json_body(request, MAX_MESSAGE_BODY)
        key = _idempotency_key(request, payload.get("idempotencyKey"))
        try:
            if kind == CONTEXT:
                content = check_context(payload.get("context"))
            else:
                content = parse_signal(payload).as_json()
        except InvalidMessage as exc:
            raise _Invalid(json_error(422, "invalid_field", str(exc), field=exc.field)) from None
        try:
            outcome = await service.post_message(state, kind, content, key)
        except RequestRefused as exc:
            raise _refused(exc) from None
    except _Invalid as exc:
        return exc.response
    if kind == SIGNAL and outcome.http_status == 202 and not outcome.body.get("idempotentReplay"):
        service.signal_posted(str(content["signalType"]), str(content["severity"]))
    return web.json_response(outcome.body, status=outcome.http_status, headers=_NO_STORE)


@authenticated
@_nats_errors
async def post_context(request: web.Request, user: User) -> web.StreamResponse:
    return await _post_message(request, user, CONTEXT)


@authenticated
@_nats_errors
async def post_signal(request: web.Request, user: User) -> web.StreamResponse:
    return await _post_message(request, user, SIGNAL)


@authenticated
@_nats_errors
async def list_messages(request: web.Request, user: User) -> web.StreamResponse:
    try:
        service, _, state = await _owned_or_admin(request, user)
        try:
            records = await service.messages(state)
        except RequestRefused as exc:
            raise _refused(exc) from None
    except _Invalid as exc:
        return exc.response
    body = {"runId": state.run_id, "messages": records, "summary": summarize(records)}
    return web.json_response(body, headers=_NO_STORE)


@authenticated
@_nats_errors
async def validate_run(request: web.Request, user: User) -> web.StreamResponse:
    try:
        service, _ = _store(request)
        payload = await _json_body(request, service.runs.max_body_bytes)
        try:
            result = await service.validate(user.id, payload)
        except RequestRefused as exc:
            raise _refused(exc) from None
    except _Invalid as exc:
        return exc.response
    return web.json_response(result, headers=_NO_STORE)


@authenticated
@_nats_errors
async def rebuild_projection(request: web.Request, user: User) -> web.StreamResponse:
    try:
        _, store, state = await _owned_or_admin(request, user)
    except _Invalid as exc:
        return exc.response
    try:
        result = await rebuild(store, state.run_id)
    except Conflict:
        return json_error(
            409, "rebuild_conflict", "the run's state kept changing during the rebuild; try again"
        )
    if result is None:
        return json_error(404, "run_not_found", f"no run {state.run_id!r}")
    body = {
        "runId": state.run_id,
        "changed": result.changed,
        "events": result.events,
        "state": result.state.public(),
    }
    return web.json_response(body, headers=_NO_STORE)


def add_routes(app: web.Application, *, expect_handler: ExpectHandler | None = None) -> None:
    app.router.add_post("/api/runs/validate", validate_run, expect_handler=expect_handler)
    app.router.add_post("/api/runs/{runId}/context", post_context, expect_handler=expect_handler)
    app.router.add_post("/api/runs/{runId}/signals", post_signal, expect_handler=expect_handler)
    app.router.add_get("/api/runs/{runId}/messages", list_messages)
    app.router.add_post(
        "/api/runs/{runId}/projection/rebuild", rebuild_projection, expect_handler=expect_handler
    )
