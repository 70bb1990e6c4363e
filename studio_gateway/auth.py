"""Gateway API authentication: ``Authorization: Bearer <JWT>``; the token's ``sub`` is the user id.

Checked: signature (HS256 with a shared secret by default, or RS/ES with a
public key), ``exp`` (required), and ``aud`` (required, must match the configured
audience). Anything wrong is a 401 JSON error with a stable code, never a trace:

- ``missing_token``: no bearer token;
- ``token_expired``: past ``exp``;
- ``invalid_audience``: ``aud`` missing or not ours;
- ``invalid_token``: bad signature, malformed, wrong algorithm, no usable ``sub``...
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization

from .config import AuthConfig, ConfigError
from .errors import json_error

__all__ = [
    "VERIFIER",
    "AuthError",
    "TokenVerifier",
    "User",
    "authenticated",
    "issue_token",
]

# Clock skew we tolerate between the token issuer and us; small, because expiry is security.
LEEWAY_SECONDS: Final = 5
# A user id is an opaque identifier; anything longer is a mistake or an attack.
MAX_USER_ID_LENGTH: Final = 256
# Default lifetime of a development token from ``issue_token``.
DEFAULT_TOKEN_TTL_SECONDS: Final = 3600


@dataclass(frozen=True, slots=True)
class User:
    """The authenticated caller."""

    id: str
    claims: dict[str, Any] = field(repr=False, compare=False)


class AuthError(Exception):
    """Why a request is not authenticated; ``code`` is stable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class TokenVerifier:
    """Verifies bearer tokens against one :class:`AuthConfig` (key material parsed once)."""

    def __init__(self, config: AuthConfig) -> None:
        self.config = config
        self._key: Any
        if config.public_key is not None:
            try:
                self._key = serialization.load_pem_public_key(config.public_key.encode("utf-8"))
            except (ValueError, TypeError) as exc:
                raise ConfigError(
                    "GATEWAY_JWT_PUBLIC_KEY", f"cannot load the PEM public key: {exc}"
                ) from None
        else:
            self._key = config.secret
        self._algorithms = list(config.algorithms)

    def verify(self, token: str) -> User:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                audience=self.config.audience,
                leeway=LEEWAY_SECONDS,
                options={"require": ["exp", "sub", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token_expired", "the bearer token has expired") from None
        except jwt.InvalidAudienceError:
            raise AuthError("invalid_audience", "the bearer token is not meant for this service") from None
        except jwt.MissingRequiredClaimError as exc:
            code = "invalid_audience" if exc.claim == "aud" else "invalid_token"
            raise AuthError(code, f"the bearer token has no {exc.claim!r} claim") from None
        except jwt.InvalidSignatureError:
            raise AuthError("invalid_token", "the bearer token signature is not valid") from None
        except jwt.PyJWTError as exc:
            raise AuthError(
                "invalid_token", f"the bearer token is not valid ({type(exc).__name__})"
            ) from None
        user_id = claims.get("sub")
        if not isinstance(user_id, str) or not user_id.strip() or len(user_id) > MAX_USER_ID_LENGTH:
            raise AuthError("invalid_token", "the bearer token subject is not a usable user id")
        return User(user_id, claims)


VERIFIER: Final = web.AppKey("studio_gateway.verifier", TokenVerifier)


def issue_token(
    config: AuthConfig, user_id: str, ttl: float = DEFAULT_TOKEN_TTL_SECONDS, scopes: Sequence[str] = ()
) -> str:
    """A token this gateway accepts, for development (needs the shared secret); ``scopes`` go
    in its ``scope`` claim (space-separated, OAuth 2 style), e.g. ``runs:admin``."""
    if config.secret is None:
        raise ConfigError("GATEWAY_JWT_SECRET", "issuing tokens needs the shared secret (HS256)")
    if not user_id or len(user_id) > MAX_USER_ID_LENGTH:
        raise ValueError(f"user id must be 1..{MAX_USER_ID_LENGTH} characters")
    now = int(time.time())
    claims: dict[str, object] = {"sub": user_id, "aud": config.audience, "iat": now, "exp": now + int(ttl)}
    if scopes:
        claims["scope"] = " ".join(scopes)
    return jwt.encode(claims, config.secret, algorithm=config.algorithms[0])


def _bearer_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


UserHandler = Callable[[web.Request, User], Awaitable[web.StreamResponse]]


def authenticated(handler: UserHandler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Route decorator: verify the bearer token, then call ``handler(request, user)``.

    A decorator rather than a middleware, so which routes are protected is visible
    at each route and a handler cannot forget to look the user up.
    """

    @functools.wraps(handler)
    async def wrapper(request: web.Request) -> web.StreamResponse:
        token = _bearer_token(request)
        try:
            if token is None:
                raise AuthError("missing_token", "send 'Authorization: Bearer <token>'")
            user = request.app[VERIFIER].verify(token)
        except AuthError as exc:
            # RFC 6750: no error attribute when no credentials were sent at all.
            challenge = "Bearer" if exc.code == "missing_token" else 'Bearer error="invalid_token"'
            return json_error(401, exc.code, exc.message, headers={"WWW-Authenticate": challenge})
        return await handler(request, user)

    return wrapper
