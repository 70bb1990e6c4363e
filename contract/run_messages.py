"""Messages to a running run (context and signals): the shapes gateway and daemon agree on.

The gateway sends them on the control route (:data:`contract.routes.CONTROL_PATH`), next
to ``cancel``::

    {"runId": "run_...", "action": "context", "messageId": "msg_<32 hex>", "context": <any JSON>}
    {"runId": "run_...", "action": "signal", "messageId": "msg_...",
     "signal": {"signalType": "build.progress", "severity": "info", "payload": {...}}}

The daemon answers ``202 {"runId", "action", "messageId", "status": "delivered", "duplicate"}``
(``duplicate: true`` when it had delivered that message id already: a gateway that resends
after a crash never delivers twice), ``404 unknown_run``, ``409 run_finished``, or
``409 message_not_accepted`` (the run's runner takes no messages of that kind, with
``accepts``: the kinds it does take).

The checks here run on both ends: the gateway answers ``422 invalid_field`` at once, the
daemon refuses with ``422 invalid_control``.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "CONTEXT",
    "MAX_CONTEXT_BYTES",
    "MAX_SIGNAL_PAYLOAD_BYTES",
    "MESSAGE_ACTIONS",
    "MESSAGE_ID_PATTERN",
    "SEVERITIES",
    "SIGNAL",
    "SIGNAL_TYPE_PATTERN",
    "InvalidMessage",
    "Signal",
    "check_context",
    "control_body",
    "is_message_id",
    "new_message_id",
    "parse_signal",
]

CONTEXT: Final = "context"
SIGNAL: Final = "signal"
MESSAGE_ACTIONS: Final = frozenset({CONTEXT, SIGNAL})
SEVERITIES: Final = ("info", "warning", "error", "critical")
# A signal type: a short dotted name, e.g. "build.progress" or "user_note".
SIGNAL_TYPE_PATTERN: Final = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")
MESSAGE_ID_PATTERN: Final = re.compile(r"msg_[0-9a-f]{32}")
# Bounds, as compact ASCII JSON: a message fits the daemon's control body limit with room to spare.
MAX_CONTEXT_BYTES: Final = 64 * 1024
MAX_SIGNAL_PAYLOAD_BYTES: Final = 16 * 1024


class InvalidMessage(ValueError):
    """A context or signal that does not fit the contract; ``field`` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True, slots=True)
class Signal:
    signal_type: str
    severity: str
    payload: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        return {"signalType": self.signal_type, "severity": self.severity, "payload": self.payload}


def _size(value: Any) -> int:
    """Bytes on the wire: compact JSON with non-ASCII escaped (what the gateway sends; never
    fails on a lone surrogate, which UTF-8 cannot encode)."""
    return len(json.dumps(value, separators=(",", ":")))


def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


def is_message_id(value: object) -> bool:
    return isinstance(value, str) and MESSAGE_ID_PATTERN.fullmatch(value) is not None


def check_context(value: Any) -> Any:
    """Context is any JSON value (text or a document) other than null, up to MAX_CONTEXT_BYTES."""
    if value is None:
        raise InvalidMessage("context", "required: text or any JSON value")
    if _size(value) > MAX_CONTEXT_BYTES:
        raise InvalidMessage("context", f"at most {MAX_CONTEXT_BYTES} bytes as compact JSON")
    return value


def parse_signal(data: Mapping[str, Any]) -> Signal:
    """A typed signal: ``signalType`` (a short dotted name), ``severity``, ``payload`` (an object)."""
    signal_type = data.get("signalType")
    if not isinstance(signal_type, str) or not SIGNAL_TYPE_PATTERN.fullmatch(signal_type):
        raise InvalidMessage(
            "signalType", "required: a letter then up to 63 of A-Z a-z 0-9 _ . - (e.g. build.progress)"
        )
    severity = data.get("severity", "info")
    if severity not in SEVERITIES:
        raise InvalidMessage("severity", f"one of {', '.join(SEVERITIES)}")
    payload = data.get("payload", {})
    if payload is None:
        payload = {}
    if not isinstance(payload, dict):
        raise InvalidMessage("payload", "a JSON object")
    if _size(payload) > MAX_SIGNAL_PAYLOAD_BYTES:
        raise InvalidMessage("payload", f"at most {MAX_SIGNAL_PAYLOAD_BYTES} bytes as compact JSON")
    return Signal(signal_type, str(severity), payload)


def control_body(run_id: str, action: str, message_id: str, content: Any) -> dict[str, Any]:
    """The control request for one message (``content``: the context, or a signal's JSON)."""
    if action not in MESSAGE_ACTIONS:
        raise ValueError(f"not a message action: {action!r}")
    return {"runId": run_id, "action": action, "messageId": message_id, action: content}
