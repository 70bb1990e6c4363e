"""What crosses the gateway between a browser and a desktop, in each direction (sans-IO).

Towards the desktop:

- hop-by-hop headers go (``Connection`` and what it names, ``Keep-Alive``, ``Proxy-*``,
  ``TE``, ``Trailer``, ``Transfer-Encoding``, ``Upgrade``), and ``Host`` (the desktop serves
  its tunnel host; the browser's host is in ``X-Forwarded-Host``);
- our preview cookie is cut out of ``Cookie`` (the page's own cookies stay);
- ``Authorization`` goes when it carries the gateway's own bearer token (a JWT for the
  gateway's audience, valid or not); an app's own ``Authorization`` (Basic, its own tokens) stays;
- ``Forwarded``/``X-Forwarded-*`` from the browser go: the gateway is the edge the desktop
  trusts, and sets ``X-Forwarded-Host``/``-Proto``/``-For`` itself;
- for WebSocket upgrades also every ``Sec-WebSocket-*``: each side negotiates its own
  handshake (the subprotocol list is offered separately).

Back to the browser: hop-by-hop headers go, and so does a ``Set-Cookie`` for our cookie's
name (a desktop cannot replace the gateway's cookie).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

import jwt

from contract.http_headers import HOP_BY_HOP, connection_named

__all__ = [
    "COOKIE_NAMES",
    "HOP_BY_HOP",
    "cookie_name",
    "cookie_values",
    "is_gateway_token",
    "request_headers",
    "response_headers",
    "without_our_cookie",
]

# On https the cookie has the __Host- prefix: browsers then refuse it with a Domain attribute
# (so a sibling preview cannot toss one at us) and without Secure and Path=/.
SECURE_COOKIE: Final = "__Host-natslink_preview"
PLAIN_COOKIE: Final = "natslink_preview"
COOKIE_NAMES: Final = frozenset({SECURE_COOKIE.lower(), PLAIN_COOKIE})
_FORWARDING: Final = frozenset(
    {"forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-real-ip"}
)

Headers = list[tuple[str, str]]


def cookie_name(secure: bool) -> str:
    return SECURE_COOKIE if secure else PLAIN_COOKIE


def _cookie_pairs(value: str) -> list[tuple[str, str]]:
    pairs = []
    for part in value.split(";"):
        name, eq, val = part.strip().partition("=")
        if name or eq:
            pairs.append((name.strip(), val.strip()))
    return pairs


def cookie_values(headers: Iterable[tuple[str, str]]) -> list[str]:
    """Every value of our cookie in ``Cookie`` headers (a sibling may have tossed in one more)."""
    return [
        val
        for name, value in headers
        if name.lower() == "cookie"
        for cookie, val in _cookie_pairs(value)
        if cookie.lower() in COOKIE_NAMES
    ]


def without_our_cookie(value: str) -> str:
    """A ``Cookie`` header value without our cookie ('' when nothing else is left)."""
    return "; ".join(
        f"{name}={val}" if name else val
        for name, val in _cookie_pairs(value)
        if name.lower() not in COOKIE_NAMES
    )


def is_gateway_token(authorization: str, audience: str) -> bool:
    """True for ``Bearer <a JWT whose aud is the gateway's>``, signature and expiry unchecked:
    an expired or foreign-signed gateway token is no business of the desktop's either."""
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return False
    try:
        claims = jwt.decode(token.strip(), options={"verify_signature": False})
    except jwt.PyJWTError:
        return False
    aud = claims.get("aud")
    return aud == audience or (isinstance(aud, list) and audience in aud)


def request_headers(
    headers: Iterable[tuple[str, str]],
    *,
    audience: str,
    forwarded_host: str,
    forwarded_proto: str,
    forwarded_for: str | None,
    websocket: bool = False,
) -> Headers:
    """The browser's headers as the desktop gets them (see the module docstring), order kept."""
    items = list(headers)
    drop = HOP_BY_HOP | connection_named(items) | _FORWARDING | {"host"}
    out: Headers = []
    for name, value in items:
        lower = name.lower()
        if lower in drop or lower.startswith("proxy-"):
            continue
        if websocket and lower.startswith("sec-websocket-"):
            continue
        if lower == "authorization" and is_gateway_token(value, audience):
            continue
        if lower == "cookie":
            value = without_our_cookie(value)
            if not value:
                continue
        out.append((name, value))
    out.append(("X-Forwarded-Host", forwarded_host))
    out.append(("X-Forwarded-Proto", forwarded_proto))
    if forwarded_for:
        out.append(("X-Forwarded-For", forwarded_for))
    return out


def response_headers(headers: Iterable[tuple[str, str]]) -> Headers:
    """The desktop's response headers as the browser gets them, order kept."""
    items = list(headers)
    drop = HOP_BY_HOP | connection_named(items)
    out: Headers = []
    for name, value in items:
        lower = name.lower()
        if lower in drop or lower.startswith("proxy-"):
            continue
        if lower == "set-cookie" and value.partition("=")[0].strip().lower() in COOKIE_NAMES:
            continue
        out.append((name, value))
    return out
