"""What the daemon serves over the tunnel (the paths are :mod:`contract.routes`).

- ``GET /api/links/status`` -> ``200 {hostname, tunnelHostname, capabilities, cliVersion}``:
  ``hostname`` is this machine's name, ``capabilities`` the runner names it can
  execute plus optional features (``cancel``, ``upstream``); with the command
  runner, ``commandTemplates`` lists the template names.
- ``POST /api/links/work`` with ``{runId, threadId, userId, runFenceToken, runner, input}``
  -> ``202 {accepted: true, runId, fence}`` as soon as the item is validated; the
  run executes in the background (see :mod:`linkd.runs`) and its events go to the
  event sink. Redelivery of the same ``runId`` and fence -> ``202`` with
  ``duplicate: true`` and nothing new runs.
- ``POST /api/links/control`` with ``{runId, action: "cancel"}`` -> ``202`` (cancelling),
  ``200`` when it already ended cancelled, ``404 unknown_run``, ``409 run_finished``;
  with ``{runId, action: "context"|"signal", messageId, context|signal}`` (shapes:
  :mod:`contract.run_messages`) -> ``202 {runId, action, messageId, status: "delivered",
  duplicate}``, ``404 unknown_run``, ``409 run_finished``, ``409 message_not_accepted``
  (with ``accepts``), ``422 invalid_control``. The status document's ``messageKinds`` maps
  each runner to the message kinds it takes.
- anything else under ``/api/links/``: ``404``; any other path: the ``--upstream``
  proxy when configured, else ``404``.

Errors are ``{"error": {"code", "message", ...}}``: ``400 invalid_json`` (not JSON,
or not an object), ``413 body_too_large``, ``422 invalid_work_item`` (with
``field``), ``422 unknown_runner``, ``422 invalid_input`` (the runner refused the
input), ``409 run_conflict`` (that run is executing with another fence),
``429 too_many_runs``, ``503 shutting_down``, ``405 method_not_allowed``.

``runId``: 1..128 characters of ``A-Z a-z 0-9 _ -`` (it ends up in NATS subjects
and message ids). ``runFenceToken``: a non-negative integer or a non-empty string
of up to 128 such characters.
"""

from __future__ import annotations

import json
import platform
import re
from collections.abc import Callable, Mapping
from typing import Any, Final

import tunnel
from contract.routes import CONTROL_PATH, RESERVED_PREFIX, STATUS_PATH, WORK_PATH
from contract.run_messages import (
    CONTEXT,
    MESSAGE_ACTIONS,
    InvalidMessage,
    check_context,
    is_message_id,
    parse_signal,
)

from . import __version__
from .run_events import Fence
from .runners.base import InvalidInput, RunMessage, Runner, WorkItem, message_kinds
from .runs import DeliverOutcome, RunManager, SubmitOutcome
from .upstream import UpstreamProxy

__all__ = [
    "LinkRoutes",
    "Problem",
    "parse_work_item",
]

MAX_WORK_BYTES: Final = 1024 * 1024
# A control request: a cancel, or a message (context up to 64 KiB as JSON, see contract.run_messages).
MAX_CONTROL_BYTES: Final = 128 * 1024
MAX_ID_LENGTH: Final = 256
_RUN_ID: Final = re.compile(r"[A-Za-z0-9_-]{1,128}")
_JSON: Final = [("content-type", "application/json"), ("cache-control", "no-store")]


class Problem(Exception):
    """An error answer: ``status`` and a stable ``code``."""

    def __init__(self, status: int, code: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details

    def response(self) -> tunnel.Response:
        return _json(self.status, {"error": {"code": self.code, "message": self.message, **self.details}})


def _json(
    status: int, payload: Mapping[str, Any], headers: list[tuple[str, str]] | None = None
) -> tunnel.Response:
    return tunnel.Response(status, [*_JSON, *(headers or [])], json.dumps(payload, separators=(",", ":")))


async def _read_json_object(request: tunnel.Request, limit: int) -> dict[str, Any]:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Problem(413, "body_too_large", f"the body must be at most {limit} bytes")
        chunks.append(chunk)
    try:
        payload = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError):
        raise Problem(400, "invalid_json", "the body must be a JSON object") from None
    if not isinstance(payload, dict):
        raise Problem(400, "invalid_json", "the body must be a JSON object")
    return payload


def _field_error(name: str, message: str) -> Problem:
    return Problem(422, "invalid_work_item", f"{name}: {message}", field=name)


def _string_field(payload: Mapping[str, Any], name: str) -> str:
    value = payload.get(name)
    if not isinstance(value, str) or not value.strip():
        raise _field_error(name, "required, a non-empty string")
    if len(value) > MAX_ID_LENGTH:
        raise _field_error(name, f"at most {MAX_ID_LENGTH} characters")
    return value


def _fence(payload: Mapping[str, Any]) -> Fence:
    value = payload.get("runFenceToken")
    if isinstance(value, bool) or value is None:
        raise _field_error("runFenceToken", "required, a non-negative integer or a token string")
    if isinstance(value, int):
        if value < 0:
            raise _field_error("runFenceToken", "must not be negative")
        return value
    if isinstance(value, str) and _RUN_ID.fullmatch(value):
        return value
    raise _field_error("runFenceToken", "a non-negative integer or 1..128 characters of A-Z a-z 0-9 _ -")


def parse_work_item(payload: Mapping[str, Any], runners: Mapping[str, Runner]) -> WorkItem:
    """Validate a work item (raises :class:`Problem`), including the runner's own input check."""
    run_id = payload.get("runId")
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
        raise _field_error("runId", "required, 1..128 characters of A-Z a-z 0-9 _ -")
    thread_id = _string_field(payload, "threadId")
    user_id = _string_field(payload, "userId")
    fence = _fence(payload)
    runner_name = payload.get("runner")
    if not isinstance(runner_name, str) or not runner_name:
        raise _field_error("runner", "required, the name of a runner")
    if "input" not in payload:
        raise _field_error("input", "required (null is allowed)")
    runner = runners.get(runner_name)
    if runner is None:
        known = sorted(runners)
        raise Problem(
            422,
            "unknown_runner",
            f"this desktop has no runner {runner_name!r} (available: {', '.join(known) or 'none'})",
            runners=known,
        )
    try:
        runner.validate(payload["input"])
    except InvalidInput as exc:
        raise Problem(422, "invalid_input", str(exc), runner=runner_name) from None
    return WorkItem(run_id, thread_id, user_id, fence, runner_name, payload["input"])


def _method(request: tunnel.Request, *allowed: str) -> None:
    if request.method not in allowed:
        raise Problem(
            405, "method_not_allowed", f"{request.path} accepts {', '.join(allowed)}", allow=list(allowed)
        )


class LinkRoutes:
    """The tunnel handler of ``linkd up``."""

    def __init__(
        self,
        runs: RunManager,
        *,
        upstream: UpstreamProxy | None = None,
        machine_name: Callable[[], str] = platform.node,
    ) -> None:
        self.runs = runs
        self.upstream = upstream
        self.machine_name = machine_name

    def capabilities(self) -> list[str]:
        features = ["cancel"]
        if self.upstream is not None:
            features.append("upstream")
        return sorted(self.runs.runners) + features

    def message_kinds(self) -> dict[str, list[str]]:
        """Each runner that takes messages while it runs, with the kinds it takes."""
        kinds = {name: sorted(message_kinds(runner)) for name, runner in self.runs.runners.items()}
        return {name: names for name, names in kinds.items() if names}

    def status_document(self, tunnel_hostname: str) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "hostname": self.machine_name() or "unknown",
            "tunnelHostname": tunnel_hostname,
            "capabilities": self.capabilities(),
            "cliVersion": __version__,
            "messageKinds": self.message_kinds(),
        }
        command = self.runs.runners.get("command")
        templates = getattr(command, "templates", None)
        if isinstance(templates, Mapping):
            doc["commandTemplates"] = sorted(templates)
        return doc

    async def __call__(self, request: tunnel.Request) -> tunnel.Response:
        try:
            path = request.path
            if path == STATUS_PATH:
                _method(request, "GET", "HEAD")
                return _json(200, self.status_document(request.hostname))
            if path == WORK_PATH:
                _method(request, "POST")
                return await self._work(request)
            if path == CONTROL_PATH:
                _method(request, "POST")
                return await self._control(request)
            if self.upstream is not None and not path.startswith(RESERVED_PREFIX):
                return await self.upstream(request)
            raise Problem(404, "not_found", f"no route for {path}")
        except Problem as problem:
            response = problem.response()
            if problem.status == 405:
                response.headers.append(("allow", ", ".join(problem.details["allow"])))
            return response

    async def _work(self, request: tunnel.Request) -> tunnel.Response:
        payload = await _read_json_object(request, MAX_WORK_BYTES)
        item = parse_work_item(payload, self.runs.runners)
        result = self.runs.submit(item)
        accepted = {"accepted": True, "runId": item.run_id, "fence": item.fence}
        if result.outcome is SubmitOutcome.STARTED:
            return _json(202, accepted)
        if result.outcome is SubmitOutcome.DUPLICATE:
            return _json(202, {**accepted, "duplicate": True, "status": result.status})
        if result.outcome is SubmitOutcome.CONFLICT:
            raise Problem(
                409,
                "run_conflict",
                f"run {item.run_id} is already executing with another fence",
                runningFence=result.fence,
            )
        if result.outcome is SubmitOutcome.BUSY:
            raise Problem(
                429,
                "too_many_runs",
                f"this desktop already runs {self.runs.max_concurrent} runs; retry later",
            )
        raise Problem(503, "shutting_down", "the desktop daemon is shutting down")

    async def _control(self, request: tunnel.Request) -> tunnel.Response:
        return await self.answer_control(await _read_json_object(request, MAX_CONTROL_BYTES))

    async def answer_control(self, payload: Mapping[str, Any]) -> tunnel.Response:
        """The answer to one control request's JSON body (errors as answers, not exceptions)."""
        try:
            return self._answer_control(payload)
        except Problem as problem:
            return problem.response()

    def _answer_control(self, payload: Mapping[str, Any]) -> tunnel.Response:
        run_id = payload.get("runId")
        if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
            raise Problem(
                422, "invalid_control", "runId: required, 1..128 characters of A-Z a-z 0-9 _ -", field="runId"
            )
        action = payload.get("action")
        if action in MESSAGE_ACTIONS:
            return self._message(run_id, str(action), payload)
        if action != "cancel":
            raise Problem(
                422, "invalid_control", 'action: must be "cancel", "context" or "signal"', field="action"
            )
        reason = payload.get("reason")
        reason_text = reason if isinstance(reason, str) and reason.strip() else "cancelled by request"
        info = self.runs.cancel(run_id, reason_text[:500])
        if info is not None:
            return _json(202, {"runId": run_id, "action": "cancel", "status": "cancelling"})
        finished = self.runs.get(run_id)
        if finished is None:
            raise Problem(404, "unknown_run", f"no run {run_id} on this desktop")
        if finished.status == "cancelled":
            return _json(200, {"runId": run_id, "action": "cancel", "status": "cancelled"})
        raise Problem(
            409, "run_finished", f"run {run_id} already ended: {finished.status}", runStatus=finished.status
        )

    def _message(self, run_id: str, action: str, payload: Mapping[str, Any]) -> tunnel.Response:
        message_id = payload.get("messageId")
        if not is_message_id(message_id):
            raise Problem(422, "invalid_control", "messageId: required, msg_<32 hex>", field="messageId")
        assert isinstance(message_id, str)
        try:
            if action == CONTEXT:
                content: Any = check_context(payload.get(CONTEXT))
            else:
                raw = payload.get(action)
                if not isinstance(raw, Mapping):
                    raise InvalidMessage(action, "required, a JSON object")
                content = parse_signal(raw).as_json()
        except InvalidMessage as exc:
            raise Problem(422, "invalid_control", str(exc), field=exc.field) from None
        result = self.runs.deliver(run_id, RunMessage(message_id, action, content))
        answer = {"runId": run_id, "action": action, "messageId": message_id}
        if result.outcome in (DeliverOutcome.DELIVERED, DeliverOutcome.DUPLICATE):
            duplicate = result.outcome is DeliverOutcome.DUPLICATE
            return _json(202, {**answer, "status": "delivered", "duplicate": duplicate})
        if result.outcome is DeliverOutcome.UNKNOWN:
            raise Problem(404, "unknown_run", f"no run {run_id} on this desktop")
        if result.outcome is DeliverOutcome.FINISHED:
            raise Problem(
                409, "run_finished", f"run {run_id} already ended: {result.status}", runStatus=result.status
            )
        raise Problem(409, "message_not_accepted", result.reason, accepts=list(result.accepts))
