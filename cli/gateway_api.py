"""A small async client for the gateway's HTTP API, with every failure turned into a typed one-liner.

Used by ``linkctl session``, ``status --gateway``, ``runs`` and ``demo``. The mapping from
HTTP answers to exit statuses lives here, in one place (:func:`error_for`):

======================================  ========================================
the gateway...                          exit status
======================================  ========================================
cannot be reached                       2 (set-up: wrong ``--gateway``)
answers 401 (token missing/expired)     2 (set-up: wrong ``--gateway-token``)
answers 400/422 (our request is wrong)  2
answers 404                             4 (no such run)
answers 409                             5 (e.g. ``run_finished``)
answers anything else unexpected        3
======================================  ========================================
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Final
from urllib.parse import urlsplit

import httpx
import typer

from . import exitcodes
from .common import CliError, given_on_command_line

__all__ = [
    "DEFAULT_GATEWAY",
    "GATEWAY_ENV",
    "TOKEN_ENV",
    "GatewayApiError",
    "GatewayClient",
    "GatewayOpt",
    "GatewayOptions",
    "GatewayTokenOpt",
    "LegacyTokenOpt",
    "error_for",
]

GATEWAY_ENV: Final = "LINKCTL_GATEWAY"
TOKEN_ENV: Final = "LINKCTL_TOKEN"
# studio-gateway's own default listen address.
DEFAULT_GATEWAY: Final = "http://127.0.0.1:8080"
# Plain API calls answer in milliseconds; /api/links/me waits for a probe of at most ~5 s.
DEFAULT_HTTP_TIMEOUT: Final = 15.0
# The gateway sends keep-alive comments while a run is idle; this long without a byte means
# the connection is dead (a NAT dropped it, the gateway froze): reconnect and resume.
DEFAULT_STREAM_IDLE_TIMEOUT: Final = 45.0
# An error body is a small JSON document; more is not an error body.
MAX_ERROR_BODY: Final = 64 * 1024
GATEWAY_PANEL: Final = "Gateway"

GatewayOpt = Annotated[
    str,
    typer.Option(
        "--gateway",
        metavar="URL",
        envvar=GATEWAY_ENV,
        help="Gateway base URL.",
        rich_help_panel=GATEWAY_PANEL,
    ),
]
GatewayTokenOpt = Annotated[
    str | None,
    typer.Option(
        "--gateway-token",
        metavar="TOKEN",
        envvar=TOKEN_ENV,
        help="Gateway API token (prefer the variable: command lines are visible to other users). "
        "--token is always the NATS token.",
        show_default=False,
        rich_help_panel=GATEWAY_PANEL,
    ),
]
# Before the one rule (--token: NATS, --gateway-token: the gateway), the gateway-only commands
# took the gateway token as --token; still accepted there (hidden), with a warning.
LegacyTokenOpt = Annotated[
    str | None,
    typer.Option("--token", metavar="TOKEN", hidden=True, show_default=False),
]


class GatewayApiError(CliError):
    """The gateway answered with an error (or could not be reached); ``status`` 0 when unreachable."""

    def __init__(self, message: str, exit_code: int, *, status: int = 0, code: str | None = None) -> None:
        super().__init__(message, exit_code)
        self.status = status
        self.code = code


def check_gateway_url(raw: str) -> str:
    url = raw.strip()
    if "://" not in url:
        url = f"http://{url}"
    try:
        parts = urlsplit(url)
        _ = parts.port
    except ValueError as exc:
        raise CliError(f"--gateway: {raw!r} is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CliError(f"--gateway: {raw!r} must be an http:// or https:// URL with a host")
    if parts.query or parts.fragment:
        raise CliError(f"--gateway: {raw!r} must not have a query or fragment")
    return url.rstrip("/")


@dataclass(frozen=True)
class GatewayOptions:
    url: str
    token: str
    timeout: float = DEFAULT_HTTP_TIMEOUT

    @classmethod
    def from_flags(
        cls, gateway: str | None, token: str | None, legacy_token: str | None = None
    ) -> GatewayOptions:
        """``legacy_token``: the old ``--token`` of a gateway-only command (a warning; it wins
        over ``$LINKCTL_TOKEN``, not over ``--gateway-token``)."""
        url = check_gateway_url(gateway or DEFAULT_GATEWAY)
        if legacy_token is not None:
            print(
                "linkctl: warning: --token is the NATS token; give the gateway's as --gateway-token "
                "(--token is taken as the gateway token here, for now)",
                file=sys.stderr,
                flush=True,
            )
            if not given_on_command_line("gateway_token"):
                token = legacy_token
        token = (token or "").strip()
        if not token:
            raise CliError(
                f"no gateway API token: pass --gateway-token or set {TOKEN_ENV} "
                "(`linkctl dev` prints one; `studio-gateway issue-token --user ID` makes one)"
            )
        if any(c.isspace() for c in token):
            raise CliError(f"--gateway-token / {TOKEN_ENV}: the token must not contain spaces or line breaks")
        return cls(url, token)


def _error_body(response: httpx.Response) -> tuple[str | None, str | None, str | None]:
    """(code, message, field) from ``{"error": {"code", "message", "field"?}}``, when present."""
    try:
        doc = json.loads(response.content[:MAX_ERROR_BODY])
    except (ValueError, UnicodeDecodeError):
        return None, None, None
    error = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(error, dict):
        return None, None, None

    def text(key: str) -> str | None:
        value = error.get(key)
        return value[:500] if isinstance(value, str) else None

    return text("code"), text("message"), text("field")


def error_for(response: httpx.Response, what: str) -> GatewayApiError:
    """The typed error for a non-success answer to ``what`` (e.g. ``GET /api/runs/r1``)."""
    status = response.status_code
    code, message, field = _error_body(response)
    detail = message or (response.reason_phrase or "").lower() or "no details"
    label = f"{code}: {detail}" if code else f"HTTP {status}: {detail}"
    if field:
        label += f" (field {field!r})"
    if status == 401:
        return GatewayApiError(
            f"the gateway refused the token ({label}); set --gateway-token or {TOKEN_ENV}",
            exitcodes.USAGE,
            status=status,
            code=code,
        )
    if status == 404:
        return GatewayApiError(f"{what}: not found ({label})", exitcodes.NOT_FOUND, status=status, code=code)
    if status == 409:
        return GatewayApiError(f"{what}: {label}", exitcodes.CONFLICT, status=status, code=code)
    if status in (400, 413, 422):
        return GatewayApiError(f"{what}: {label}", exitcodes.USAGE, status=status, code=code)
    return GatewayApiError(
        f"{what}: the gateway answered {label}", exitcodes.GATEWAY_ERROR, status=status, code=code
    )


def unreachable(url: str, exc: Exception) -> GatewayApiError:
    reason = str(exc) or type(exc).__name__
    return GatewayApiError(
        f"cannot reach the gateway at {url} ({reason}); set --gateway or {GATEWAY_ENV}", exitcodes.USAGE
    )


def transport_error(url: str, what: str, exc: httpx.TransportError, timeout: float) -> GatewayApiError:
    """The error for a request that failed in transit: ``--gateway`` is only the fix when no
    connection was made; a gateway that took the connection and then went quiet (or hung up)
    is a problem of the gateway, said as such (exit status 3)."""
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.UnsupportedProtocol):
        return unreachable(url, exc)
    if isinstance(exc, httpx.TimeoutException):
        return GatewayApiError(
            f"{what}: the gateway at {url} took the connection but did not answer within {timeout:g} s "
            "(is it overloaded or stuck?)",
            exitcodes.GATEWAY_ERROR,
        )
    reason = str(exc) or type(exc).__name__
    return GatewayApiError(
        f"{what}: the gateway at {url} broke off the exchange ({reason})", exitcodes.GATEWAY_ERROR
    )


class GatewayClient:
    """``async with GatewayClient(options) as gw``: JSON calls with typed errors, and streams."""

    def __init__(self, options: GatewayOptions, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.options = options
        self._http = httpx.AsyncClient(
            base_url=options.url,
            headers={"Authorization": f"Bearer {options.token}", "User-Agent": "linkctl"},
            timeout=options.timeout,
            trust_env=False,  # a proxy from the environment must not intercept a local gateway
            transport=transport,
        )

    async def __aenter__(self) -> GatewayClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def call(
        self, method: str, path: str, *, body: Any = None, ok: tuple[int, ...] = (200,)
    ) -> dict[str, Any]:
        """One JSON request; the decoded JSON object of a success, else :class:`GatewayApiError`."""
        what = f"{method} {path}"
        try:
            kwargs: dict[str, Any] = {}
            if body is not None:
                kwargs["json"] = body
            response = await self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise transport_error(self.options.url, what, exc, self.options.timeout) from None
        if response.status_code not in ok:
            raise error_for(response, what)
        try:
            doc = response.json()
        except (ValueError, UnicodeDecodeError):
            doc = None
        if not isinstance(doc, dict):
            raise GatewayApiError(
                f"{what}: the gateway's answer is not a JSON object",
                exitcodes.GATEWAY_ERROR,
                status=response.status_code,
            )
        return doc

    @asynccontextmanager
    async def stream(
        self,
        path: str,
        *,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        idle_timeout: float = DEFAULT_STREAM_IDLE_TIMEOUT,
    ) -> AsyncIterator[httpx.Response]:
        """A streaming GET; a non-200 answer raises :class:`GatewayApiError` (transport errors pass)."""
        timeout = httpx.Timeout(self.options.timeout, read=idle_timeout)
        request = self._http.build_request("GET", path, params=params, headers=headers, timeout=timeout)
        response = await self._http.send(request, stream=True)
        try:
            if response.status_code != 200:
                await response.aread()
                raise error_for(response, f"GET {path}")
            yield response
        finally:
            await response.aclose()
