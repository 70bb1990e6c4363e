"""``POST /api/links/session``: everything a desktop daemon needs to connect to NATS as its user's host.

Request body (optional JSON object; every other field is ignored, in particular
a client cannot choose ``tunnelHostname``)::

    {"publicKey": "U..."}   # the daemon's own user nkey public key (operator mode)

Response 200::

    {
      "connection": {
        "urls": ["wss://nats.example.com"],          # NATS_PUBLIC_URL, in order
        "allowedConnectionTypes": ["WEBSOCKET"],     # wss/ws only -> WEBSOCKET; nats/tls -> + STANDARD
        "tunnelPrefix": "tunnel.v1"                  # subject prefix to serve under
      },
      "credentials": {...},      # operator mode, see below
      "token": "...",            # token mode instead of "credentials"
      "expiresAt": "2030-01-01T12:00:00Z",           # UTC; null in token mode (tokens do not expire)
      "tunnelHostname": "alice-k3v9q2m7x1ab"         # derived from the user id on the server
    }

``credentials`` in operator mode:

- with ``publicKey``: ``{"jwt": "<user JWT for that key>"}`` and nothing else: the
  seed never leaves the desktop; connect with the JWT and sign the server's nonce
  with your own seed (nats-py ``user_jwt_cb`` + ``signature_cb``);
- without: ``{"jwt": "<user JWT>", "creds": "<.creds file text: the JWT and a fresh
  user seed>"}``; the gateway generated the key pair and does not keep it.

The user JWT is signed by the account signing key, expires after
``NATS_TUNNEL_SESSION_TTL_SECONDS``, may only use the listed connection types, and
may only do what serving its own host, publishing its own runs' events and answering
service discovery for its own host need (see :mod:`contract.permissions`, :mod:`contract.discovery`).

Errors: 401 (see :mod:`.auth`); 400 ``invalid_body`` (not a JSON object, over 16 KiB, or
nested deeper than 64 levels: :mod:`.bodies`) / ``invalid_public_key``;
503 ``tunnel_disabled`` (``NATS_TUNNEL_PUBLIC_ENABLED`` is false),
``no_public_url`` (``NATS_PUBLIC_URL`` unset), ``tunnel_not_configured`` (no operator
keys and no token), ``nats_unavailable`` (the gateway's own NATS connection is down).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

from aiohttp import web

from contract.discovery import RESPONSE_PERMISSION, discovery_grant
from contract.nats_jwt import KeyKind, is_public_key
from contract.permissions import DEFAULT_GRANTS, GrantProvider, daemon_permissions

from . import nats_jwt
from .auth import User, authenticated
from .bodies import BodyError, read_json_object
from .config import CredentialMode, GatewayConfig
from .errors import json_error
from .hostnames import tunnel_hostname
from .natsconn import GATEWAY_NATS
from .telemetry import GATEWAY_METRICS

__all__ = ["MINTER", "SessionMinter", "create_session"]

log = logging.getLogger("studio_gateway.sessions")

# The body holds at most a public key; anything bigger is not a session request.
MAX_BODY_BYTES: Final = 16 * 1024


# What one daemon connection may hold (docs/runs.md, "Tenants"). linkd needs a handful of
# subscriptions (wildcards for its tunnel server, one for publish acks, nats-py's inbox); a
# cap keeps a misbehaving desktop from making the servers track unbounded interest. Payload
# stays at the server's max_payload: the tunnel sizes its frames from the server's INFO, which
# does not show a per-user limit, so a lower one would break large bodies; the run stream
# bounds stored events itself (RUNS_MAX_EVENT_BYTES, RUNS_MAX_EVENTS_PER_RUN).
DAEMON_MAX_SUBSCRIPTIONS: Final = 256
DAEMON_USER_LIMITS: Final[Mapping[str, Any]] = {"subs": DAEMON_MAX_SUBSCRIPTIONS, "data": -1, "payload": -1}


class SessionMinter:
    """Builds session responses for one configuration (signing key loaded once)."""

    def __init__(self, config: GatewayConfig, *, extra_grants: tuple[GrantProvider, ...] = ()) -> None:
        self.config = config
        # The run uplink is always part of a daemon's credential; callers may add more.
        self.extra_grants = (*DEFAULT_GRANTS, *(g for g in extra_grants if g not in DEFAULT_GRANTS))
        self._signing_kp: Any = None
        self._issuer_account: str | None = None
        if config.operator is not None:
            self._signing_kp = nats_jwt.keypair_from_seed(config.operator.signing_key_seed)
            # issuer_account is only for signing keys; the account key itself signs as the account.
            if config.operator.signing_public_key != config.operator.account_public_key:
                self._issuer_account = config.operator.account_public_key

    def unavailable(self) -> tuple[str, str] | None:
        """(code, message) when this gateway cannot hand out sessions at all, else None."""
        config = self.config
        if not config.tunnel_public_enabled:
            return (
                "tunnel_disabled",
                "desktop links are disabled on this gateway (NATS_TUNNEL_PUBLIC_ENABLED)",
            )
        if not config.public_urls:
            return "no_public_url", "this gateway has no public NATS URL for desktops (NATS_PUBLIC_URL)"
        if config.credential_mode is CredentialMode.NONE:
            return (
                "tunnel_not_configured",
                "this gateway has no NATS credentials to hand out (operator keys or NATS_TOKEN)",
            )
        return None

    def mint(
        self, user_id: str, public_key: str | None = None, *, now: float | None = None
    ) -> dict[str, Any]:
        """The session response body for ``user_id`` (``public_key``: the daemon's own user key)."""
        config = self.config
        if config.credential_mode is CredentialMode.NONE:
            raise RuntimeError("mint() without operator keys or a token (check unavailable() first)")
        hostname = tunnel_hostname(user_id)
        body: dict[str, Any] = {
            "connection": {
                "urls": list(config.public_urls),
                "allowedConnectionTypes": list(config.allowed_connection_types),
                "tunnelPrefix": config.tunnel_prefix,
            }
        }
        if config.credential_mode is CredentialMode.TOKEN:
            body["token"] = config.nats_token
            body["expiresAt"] = None
        else:
            issued = int(time.time() if now is None else now)
            expires_at = issued + config.session_ttl_seconds
            body["credentials"] = self._user_credentials(hostname, public_key, issued, expires_at)
            body["expiresAt"] = _iso_utc(expires_at)
        body["tunnelHostname"] = hostname
        return body

    def _user_credentials(
        self, hostname: str, public_key: str | None, issued: int, expires_at: int
    ) -> dict[str, str]:
        seed: str | None = None
        if public_key is None:
            key = nats_jwt.new_key(KeyKind.USER)
            public_key, seed = key.public_key, key.seed
        # Discovery first (contract.discovery: its own $SRV name, answered through the response
        # permission), then the tunnel rules and the extras, all confined to this host.
        grant = discovery_grant(hostname, self.config.tunnel_prefix) + daemon_permissions(
            hostname, self.config.tunnel_prefix, extra=self.extra_grants
        )
        claims = nats_jwt.user_claims(
            public_key,
            f"linkd {hostname}",
            issuer_account=self._issuer_account,
            permissions=grant.as_claims(),
            expires_at=expires_at,
            allowed_connection_types=self.config.allowed_connection_types,
            tags=[f"host:{hostname}"],
            limits=DAEMON_USER_LIMITS,
        )
        claims["nats"]["resp"] = dict(RESPONSE_PERMISSION)
        claims["iat"] = issued
        jwt = nats_jwt.encode_jwt(claims, self._signing_kp)
        if seed is None:
            return {"jwt": jwt}
        return {"jwt": jwt, "creds": nats_jwt.creds_text(jwt, seed)}


def _iso_utc(unix_seconds: int) -> str:
    return datetime.fromtimestamp(unix_seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


MINTER: Final = web.AppKey("studio_gateway.minter", SessionMinter)


async def _read_public_key(request: web.Request) -> str | web.Response | None:
    """The ``publicKey`` from the body (None when absent), or a 400 response."""
    try:
        payload = await read_json_object(
            request, MAX_BODY_BYTES, optional=True, code="invalid_body", too_large=(400, "invalid_body")
        )
    except BodyError as exc:
        return exc.response()
    public_key = payload.get("publicKey")
    if public_key is None:
        return None
    if not is_public_key(public_key, KeyKind.USER):
        return json_error(
            400, "invalid_public_key", "publicKey must be a NATS user public key (56 characters, 'U...')"
        )
    assert isinstance(public_key, str)
    return public_key


@authenticated
async def create_session(request: web.Request, user: User) -> web.StreamResponse:
    response = await _create_session(request, user)
    request.app[GATEWAY_METRICS].session_answered(response)
    return response


async def _create_session(request: web.Request, user: User) -> web.Response:
    minter = request.app[MINTER]
    problem = minter.unavailable()
    if problem is not None:
        return json_error(503, *problem)
    nats = request.app[GATEWAY_NATS]
    if not nats.available:
        return json_error(503, "nats_unavailable", nats.unavailable_reason())
    public_key = await _read_public_key(request)
    if isinstance(public_key, web.Response):
        return public_key
    if minter.config.credential_mode is not CredentialMode.OPERATOR:
        public_key = None  # token mode: nothing to sign
    body = minter.mint(user.id, public_key)
    log.info(
        "link session issued",
        extra={
            "tunnel_hostname": body["tunnelHostname"],
            "mode": minter.config.credential_mode.value,
            "daemon_key": public_key is not None,
        },
    )
    return web.json_response(body, headers={"Cache-Control": "no-store"})
