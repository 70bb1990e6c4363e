"""Signed preview tickets and cookies (sans-IO: the clock is passed in), and the one-time ledger.

Both are ``v1.<payload>.<mac>``: the payload is compact JSON in unpadded base64url, the MAC
HMAC-SHA256 of a domain-separated payload under the preview secret. Signed, not encrypted:
they hold a user id, a label and times, nothing the user may not see. ``kind`` is inside
the signed payload, so a cookie never passes as a ticket nor a ticket as a cookie.

- ticket: ``{"k": "ticket", "u": user, "l": label, "p": path, "e": expiry, "n": nonce}``,
  in the URL the API hands out; good once (:class:`TicketLedger`) until ``e``;
- cookie: ``{"k": "cookie", "u": user, "l": label, "e": expiry}``, HttpOnly on one preview host.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from typing import Any, Final, Literal

__all__ = [
    "MAX_TOKEN_LENGTH",
    "Grant",
    "TicketLedger",
    "TokenError",
    "TokenSigner",
]

_VERSION: Final = "v1"
_MAC_CONTEXT: Final = b"natslink-preview-token-v1\x00"
# A token is a few hundred bytes; anything much longer is not ours (and not worth decoding).
MAX_TOKEN_LENGTH: Final = 4096
Kind = Literal["ticket", "cookie"]


class TokenError(Exception):
    """Why a ticket or cookie is refused; ``reason`` is stable (``invalid``, ``expired``, ``used``)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class Grant:
    """A verified ticket or cookie: who, for which preview label, until when."""

    kind: Kind
    user: str
    label: str
    expires: float
    path: str = "/"
    nonce: str = ""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenSigner:
    """Makes and checks tickets and cookies under one key."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def _mac(self, payload: str) -> str:
        return _b64(hmac.new(self._key, _MAC_CONTEXT + payload.encode("ascii"), hashlib.sha256).digest())

    def _sign(self, claims: dict[str, Any]) -> str:
        payload = _b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode("utf-8"))
        return f"{_VERSION}.{payload}.{self._mac(payload)}"

    def ticket(self, user: str, label: str, path: str, *, now: float, ttl: float) -> str:
        claims = {
            "k": "ticket",
            "u": user,
            "l": label,
            "p": path,
            "e": now + ttl,
            "n": secrets.token_urlsafe(16),
        }
        return self._sign(claims)

    def cookie(self, user: str, label: str, *, now: float, ttl: float) -> str:
        return self._sign({"k": "cookie", "u": user, "l": label, "e": now + ttl})

    def verify(self, token: str, kind: Kind, *, now: float) -> Grant:
        """The grant in ``token``, or :class:`TokenError` (forged, malformed, other kind, expired)."""
        invalid = TokenError("invalid", f"this preview {kind} is not valid")
        if len(token) > MAX_TOKEN_LENGTH:
            raise invalid
        version, _, rest = token.partition(".")
        payload, _, mac = rest.partition(".")
        if version != _VERSION or not payload or not mac:
            raise invalid
        try:
            good = hmac.compare_digest(self._mac(payload), mac)
        except (TypeError, UnicodeEncodeError):  # non-ASCII MAC or payload
            raise invalid from None
        if not good:
            raise invalid
        try:
            claims = json.loads(_unb64(payload))
        except (ValueError, binascii.Error):
            raise invalid from None
        grant = _grant(claims)
        if grant is None or grant.kind != kind:
            raise invalid
        if now >= grant.expires:
            raise TokenError("expired", f"this preview {kind} has expired")
        return grant


def _grant(claims: object) -> Grant | None:
    """The claims as a :class:`Grant`, None when any field is missing or of the wrong type."""
    if not isinstance(claims, dict):
        return None
    kind, user, label, expires = claims.get("k"), claims.get("u"), claims.get("l"), claims.get("e")
    path, nonce = claims.get("p", "/"), claims.get("n", "")
    if kind not in ("ticket", "cookie") or not isinstance(user, str) or not isinstance(label, str):
        return None
    if not isinstance(expires, int | float) or isinstance(expires, bool):
        return None
    if not isinstance(path, str) or not isinstance(nonce, str):
        return None
    return Grant(kind=kind, user=user, label=label, expires=float(expires), path=path, nonce=nonce)


class TicketLedger:
    """Nonces of redeemed tickets, each kept until its ticket would have expired anyway.

    In memory, so "one-time" holds per gateway process (docs/preview.md says what that means
    for a fleet). Bounded by what can be redeemed within one ticket lifetime: only tickets
    this gateway signed for authenticated callers get here, and expired ones are forgotten.
    """

    def __init__(self) -> None:
        self._used: dict[str, float] = {}

    def redeem(self, grant: Grant, *, now: float) -> None:
        """Mark ``grant``'s ticket used; :class:`TokenError` ``used`` when it already was."""
        self._forget_expired(now)
        if grant.nonce in self._used:
            raise TokenError("used", "this preview ticket was already used")
        self._used[grant.nonce] = grant.expires

    def _forget_expired(self, now: float) -> None:
        # Tickets share one lifetime, so insertion order is (nearly) expiry order: stop at the
        # first live one. A straggler behind it is forgotten a little later, never too early.
        while self._used:
            nonce, expires = next(iter(self._used.items()))
            if expires > now:
                return
            del self._used[nonce]

    def __len__(self) -> int:
        return len(self._used)
