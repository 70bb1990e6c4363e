"""Link sessions from the gateway: ``POST <gateway>/api/links/session``.

The daemon authenticates with the user's gateway API token (``Authorization:
Bearer``) and sends its own public nkey (``{"publicKey": "U..."}``); the gateway
answers with where to connect and a credential (see ``studio_gateway/sessions.py``):

- operator mode, our key signed: ``credentials: {"jwt"}``: we sign the server's
  nonce with our own seed, which never leaves the desktop;
- operator mode, gateway-made key: ``credentials: {"jwt", "creds"}`` (creds-file text);
- token mode: ``token`` (no expiry).

Expiry is tracked in *local monotonic* time: the credential's lifetime is taken
from the JWT (``exp - iat``, both the gateway's clock), so a desktop whose clock
is off still refreshes in time. Without a JWT, ``expiresAt`` minus local now.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final
from urllib.parse import urlsplit

import httpx

import tunnel
from contract.nats_jwt import CONNECTION_TYPE_STANDARD, CONNECTION_TYPE_WEBSOCKET, JwtError, claims_of
from contract.routes import SESSION_PATH
from tunnel.connect import parse_creds

from . import __version__

__all__ = ["GatewayClient", "GatewayError", "LinkSession", "parse_session"]

REQUEST_TIMEOUT: Final = 15.0
CONNECT_TIMEOUT: Final = 5.0
MAX_RESPONSE_BYTES: Final = 256 * 1024
# URL scheme -> connection type (a user JWT's allowed_connection_types).
NATS_SCHEMES: Final = {
    "nats": CONNECTION_TYPE_STANDARD,
    "tls": CONNECTION_TYPE_STANDARD,
    "ws": CONNECTION_TYPE_WEBSOCKET,
    "wss": CONNECTION_TYPE_WEBSOCKET,
}
# iat has whole-second precision: count one second less than exp - iat, to be safe.
_IAT_ROUNDING: Final = 1.0


class GatewayError(Exception):
    """No session: ``reason`` is one human line; ``auth`` when the API token itself was refused."""

    def __init__(
        self, reason: str, *, status: int | None = None, code: str | None = None, auth: bool = False
    ):
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.code = code
        self.auth = auth


@dataclass(frozen=True)
class LinkSession:
    hostname: str
    urls: tuple[str, ...]
    allowed_connection_types: tuple[str, ...]
    prefix: str = tunnel.DEFAULT_PREFIX
    jwt: str | None = field(default=None, repr=False)
    seed: str | None = field(default=None, repr=False)  # only when the gateway made the key pair
    token: str | None = field(default=None, repr=False)
    expires_at: float | None = None  # unix seconds, as the gateway said (display only)
    lifetime: float | None = None  # seconds from received_at until the credential expires
    received_at: float = field(default_factory=time.monotonic)

    @property
    def expires_monotonic(self) -> float | None:
        return None if self.lifetime is None else self.received_at + self.lifetime

    def remaining(self, now: float | None = None) -> float | None:
        end = self.expires_monotonic
        if end is None:
            return None
        return end - (time.monotonic() if now is None else now)


def _jwt_claims(jwt: str) -> dict[str, Any]:
    try:
        return claims_of(jwt)
    except JwtError:
        raise GatewayError("the gateway sent a malformed NATS credential (JWT)") from None


def _parse_time(value: Any) -> float | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise GatewayError("the gateway sent a malformed expiresAt")
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise GatewayError(f"the gateway sent a malformed expiresAt ({value!r})") from None


def parse_session(body: Any, *, sent_public_key: bool, received_at: float | None = None) -> LinkSession:
    """Validate a session response; :class:`GatewayError` names what is wrong."""
    now_mono = time.monotonic() if received_at is None else received_at
    if not isinstance(body, Mapping):
        raise GatewayError("the gateway's session answer is not a JSON object")
    connection = body.get("connection")
    if not isinstance(connection, Mapping):
        raise GatewayError("the gateway's session answer has no connection")
    urls = connection.get("urls")
    if not isinstance(urls, list) or not urls or not all(isinstance(u, str) and u for u in urls):
        raise GatewayError("the gateway's session answer has no NATS URLs")
    for url in urls:
        if urlsplit(url).scheme not in NATS_SCHEMES:
            raise GatewayError(f"the gateway sent an unsupported NATS URL {url!r}")
    types = connection.get("allowedConnectionTypes")
    if types is None or types == []:
        allowed = tuple(sorted({NATS_SCHEMES[urlsplit(u).scheme] for u in urls}))
    elif isinstance(types, list) and all(isinstance(t, str) for t in types):
        allowed = tuple(t.upper() for t in types)
    else:
        raise GatewayError("the gateway sent malformed allowedConnectionTypes")
    prefix = connection.get("tunnelPrefix") or tunnel.DEFAULT_PREFIX
    hostname = body.get("tunnelHostname")
    if not isinstance(hostname, str) or not hostname.strip() or not isinstance(prefix, str):
        raise GatewayError("the gateway's session answer has no tunnel hostname")
    try:
        tunnel.HostSubjects.for_host(hostname, prefix)
    except tunnel.LocalProtocolError as exc:
        raise GatewayError(f"the gateway sent an unusable tunnel hostname or prefix: {exc}") from None
    expires_at = _parse_time(body.get("expiresAt"))

    jwt: str | None = None
    seed: str | None = None
    token: str | None = None
    credentials = body.get("credentials")
    if credentials is not None:
        if not isinstance(credentials, Mapping) or not isinstance(credentials.get("jwt"), str):
            raise GatewayError("the gateway's credentials have no JWT")
        jwt = credentials["jwt"]
        creds_text = credentials.get("creds")
        if isinstance(creds_text, str):
            try:
                jwt, seed = parse_creds(creds_text)
            except ValueError as exc:
                raise GatewayError(f"the gateway sent unusable credentials: {exc}") from None
        elif not sent_public_key:
            raise GatewayError("the gateway sent a JWT without a key, but we did not send ours")
    elif isinstance(body.get("token"), str) and body["token"]:
        token = body["token"]
    else:
        raise GatewayError("the gateway's session answer has neither credentials nor a token")

    lifetime: float | None = None
    if jwt is not None:
        claims = _jwt_claims(jwt)
        exp, iat = claims.get("exp"), claims.get("iat")
        if isinstance(exp, int | float) and isinstance(iat, int | float):
            lifetime = max(0.0, float(exp) - float(iat) - _IAT_ROUNDING)
            if expires_at is None:
                expires_at = float(exp)
        elif isinstance(exp, int | float):
            lifetime = max(0.0, float(exp) - time.time())
    if lifetime is None and expires_at is not None:
        lifetime = max(0.0, expires_at - time.time())
    return LinkSession(
        hostname=hostname.strip(),
        urls=tuple(urls),
        allowed_connection_types=allowed,
        prefix=prefix,
        jwt=jwt,
        seed=seed,
        token=token,
        expires_at=expires_at,
        lifetime=lifetime,
        received_at=now_mono,
    )


def _error_detail(response: httpx.Response) -> tuple[str | None, str]:
    try:
        payload = response.json()
        error = payload.get("error") if isinstance(payload, dict) else None
        if isinstance(error, dict):
            code, message = error.get("code"), error.get("message")
            return (code if isinstance(code, str) else None), (message if isinstance(message, str) else "")
    except ValueError:
        pass
    return None, response.text[:200].strip()


class GatewayClient:
    """Asks one gateway for link sessions with the token ``token_provider()`` returns at each call."""

    def __init__(
        self,
        base_url: str,
        token_provider: Callable[[], str | None],
        *,
        timeout: float = REQUEST_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token_provider = token_provider
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=min(CONNECT_TIMEOUT, timeout)),
            transport=transport,
            headers={"User-Agent": f"linkd/{__version__}"},
            follow_redirects=False,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def request_session(self, public_key: str | None) -> LinkSession:
        token = self.token_provider()
        if not token:
            raise GatewayError("not logged in: run 'linkd login --gateway URL'", auth=True)
        url = self.base_url + SESSION_PATH
        body = {"publicKey": public_key} if public_key else {}
        try:
            response = await self._client.post(url, json=body, headers={"Authorization": f"Bearer {token}"})
        except httpx.TimeoutException:
            raise GatewayError(f"gateway {self.base_url} did not answer in time") from None
        except httpx.HTTPError as exc:
            detail = str(exc) or type(exc).__name__
            raise GatewayError(f"gateway {self.base_url} is unreachable ({detail})") from None
        received_at = time.monotonic()
        if response.status_code in (401, 403):
            code, message = _error_detail(response)
            raise GatewayError(
                f"the gateway refused the API token ({code or response.status_code}: {message}); "
                "run 'linkd login' again",
                status=response.status_code,
                code=code,
                auth=True,
            )
        if response.status_code != 200:
            code, message = _error_detail(response)
            raise GatewayError(
                f"the gateway answered {response.status_code}"
                + (f" {code}" if code else "")
                + (f": {message}" if message else ""),
                status=response.status_code,
                code=code,
            )
        if len(response.content) > MAX_RESPONSE_BYTES:
            raise GatewayError("the gateway's session answer is too large")
        try:
            payload = response.json()
        except ValueError:
            raise GatewayError("the gateway's session answer is not JSON") from None
        return parse_session(payload, sent_public_key=bool(public_key), received_at=received_at)
