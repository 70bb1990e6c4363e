"""Webhook signatures: HMAC-SHA256 over ``<timestamp>.<body>`` (the Stripe scheme).

Header ``X-Natslink-Signature: t=<unix seconds>,v1=<hex digest>``; the receiver recomputes
``hmac_sha256(secret, f"{t}.".encode() + body)``, compares in constant time and refuses a
``t`` too far from its clock (replays). ``X-Natslink-Delivery: <delivery id>`` is the id to
deduplicate on (the same on every attempt; also ``id`` in the body).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from typing import Final

__all__ = [
    "DELIVERY_HEADER",
    "SIGNATURE_HEADER",
    "new_secret",
    "sign",
    "verify",
]

SIGNATURE_HEADER: Final = "X-Natslink-Signature"
DELIVERY_HEADER: Final = "X-Natslink-Delivery"
SECRET_PREFIX: Final = "whsec_"
DEFAULT_TOLERANCE: Final = 300.0


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_hex(32)


def _digest(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The signature header's value for ``body`` sent at ``timestamp`` (now by default)."""
    t = int(time.time()) if timestamp is None else timestamp
    return f"t={t},v1={_digest(secret, t, body)}"


def verify(secret: str, body: bytes, header: str, *, tolerance: float = DEFAULT_TOLERANCE) -> bool:
    """Whether ``header`` signs ``body`` with ``secret`` within ``tolerance`` seconds of now."""
    parts: dict[str, list[str]] = {}
    for item in header.split(","):
        name, _, value = item.strip().partition("=")
        parts.setdefault(name, []).append(value)
    try:
        t = int(parts["t"][0])
    except (KeyError, ValueError):
        return False
    if abs(time.time() - t) > tolerance:
        return False
    expected = _digest(secret, t, body)
    return any(hmac.compare_digest(expected, candidate) for candidate in parts.get("v1", []))
