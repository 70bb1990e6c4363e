"""What the inspector never shows: credentials in headers, query parameters and JSON bodies.

The rules (docs/inspector.md): a header is secret when its name is ``authorization``,
``proxy-authorization``, ``cookie`` or ``set-cookie``, or contains ``token``, ``secret``,
``api-key``/``apikey``/``api_key``, ``password`` or ``session``; a query parameter or a
JSON body's top-level key is secret when its name matches the same words (``token``,
``access_token``, ``password``, ``auth``, ...). Bodies are otherwise not parsed: a secret
inside text is the user's own to see. The values held in memory stay real (replay sends
them); only what is shown or answered goes through here.
"""

from __future__ import annotations

import json
import re
from typing import Final
from urllib.parse import parse_qsl

__all__ = [
    "REDACTED",
    "is_secret_header",
    "is_secret_name",
    "redact_headers",
    "redact_json_body",
    "redact_target",
]

REDACTED: Final = "[redacted]"
_SECRET_HEADERS: Final = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie"})
# Words that make a header, query parameter or JSON key a secret (matched in the lowered name,
# with '-' and '_' ignored so api-key, api_key and apikey are one word).
_SECRET_WORDS: Final = ("token", "secret", "apikey", "password", "passwd", "session", "signature")
_SECRET_NAMES: Final = frozenset({"auth", "authorization", "key", "code", "sig", "jwt", "credentials"})
_SEPARATORS: Final = re.compile(r"[-_.\s]")


def is_secret_name(name: str) -> bool:
    """A query parameter or JSON key named like a credential."""
    folded = _SEPARATORS.sub("", name.lower())
    return folded in _SECRET_NAMES or any(word in folded for word in _SECRET_WORDS)


def is_secret_header(name: str) -> bool:
    lowered = name.lower()
    if lowered in _SECRET_HEADERS:
        return True
    folded = _SEPARATORS.sub("", lowered)
    return any(word in folded for word in _SECRET_WORDS)


def redact_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(name, REDACTED if is_secret_header(name) else value) for name, value in headers]


def redact_target(target: str) -> str:
    """``target`` (path and query) with the values of secret-named query parameters replaced."""
    path, sep, query = target.partition("?")
    if not sep or not query:
        return target
    pairs = parse_qsl(query, keep_blank_values=True)
    if not any(is_secret_name(name) for name, _ in pairs):
        return target
    parts: list[str] = []
    for piece in query.split("&"):
        raw_name, eq, _ = piece.partition("=")
        name = parse_qsl(raw_name + "=x", keep_blank_values=True)
        decoded = name[0][0] if name else raw_name
        parts.append(f"{raw_name}={REDACTED}" if eq and is_secret_name(decoded) else piece)
    return f"{path}?{'&'.join(parts)}"


def redact_json_body(body: bytes, content_type: str | None) -> bytes | None:
    """A JSON object body with its secret-named top-level keys redacted; None when nothing changes.

    Only a complete JSON object is rewritten (a truncated capture is not JSON and stays as it
    is, so a capped body's secrets are shown only if the capture cut the key away from ``{``:
    the caller then hides the body, see :func:`body_may_hide_secrets`).
    """
    if not _looks_json(body, content_type):
        return None
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(payload, dict) or not any(is_secret_name(str(k)) for k in payload):
        return None
    cleaned = {k: (REDACTED if is_secret_name(str(k)) else v) for k, v in payload.items()}
    return json.dumps(cleaned, indent=None, ensure_ascii=False).encode("utf-8")


def body_may_hide_secrets(body: bytes, content_type: str | None) -> bool:
    """A JSON body we could not parse (cut by the capture cap) that names a secret key: hide it."""
    if not _looks_json(body, content_type):
        return False
    text = body[:65536].decode("utf-8", "replace").lower()
    keys = re.findall(r'"([^"\\]{1,64})"\s*:', text)
    return any(is_secret_name(key) for key in keys)


def _looks_json(body: bytes, content_type: str | None) -> bool:
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    if kind == "application/json" or kind.endswith("+json"):
        return True
    return body.lstrip()[:1] == b"{"
