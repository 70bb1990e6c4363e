"""The middleware in front of everything: a request for a preview host never reaches the API.

For ``<label>.<preview domain>`` (any port): the ticket path redeems a ticket; every other
request needs the preview cookie of the user whose desktop has that label (401 without a
valid one, 403 for someone else's), must not come from another preview's page (its
``Origin``, or ``Sec-Fetch-Site`` for all but navigations; a WebSocket only from its own),
must not be under the daemon's own ``/api/links/`` (404), and then goes to the desktop:
upgraded to a WebSocket, or as HTTP. Any other name under the preview domain is a 404 page.
Other hosts go on to the API.
"""

from __future__ import annotations

import logging
from urllib.parse import unquote, urlsplit

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from contract.routes import RESERVED_PREFIX

from ..hostnames import tunnel_hostname
from .config import PreviewDomain
from .headers import cookie_name, cookie_values, request_headers
from .http_relay import relay_http
from .labels import in_preview_domain, label_for_user, preview_label_of
from .pages import page
from .service import TICKET_PATH, PreviewService
from .tokens import Grant, TokenError
from .ws_relay import relay_websocket

__all__ = ["is_websocket_upgrade", "preview_middleware"]

log = logging.getLogger("studio_gateway.preview")

_SIGN_IN = "Open the preview from the app again (it asks POST /api/links/preview for a new link)."


def preview_middleware(service: PreviewService) -> Middleware:
    """Sends requests for preview hosts to the preview, everything else to ``handler``."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        domain = service.domain
        if domain is None or not in_preview_domain(request.host, domain.host):
            return await handler(request)
        try:
            return await serve_preview(service, domain, request)
        except web.HTTPException as exc:
            if request.writer.output_size > 0:
                raise
            return page(exc.status, exc.reason)
        except Exception as exc:
            # The API's error middleware is behind this one: answer here, with a page, not JSON.
            if isinstance(exc, ConnectionError) or request.writer.output_size > 0:
                raise  # the browser left, or the response has started: nothing more to send
            log.exception("preview request %s %s failed", request.method, request.path)
            return page(500, "The gateway failed on this preview request.", "Reload to try again.")

    return middleware


def is_websocket_upgrade(request: web.Request) -> bool:
    connection = {token.strip().lower() for token in request.headers.get("Connection", "").split(",")}
    return (
        request.method == "GET"
        and "upgrade" in connection
        and request.headers.get("Upgrade", "").strip().lower() == "websocket"
    )


async def serve_preview(
    service: PreviewService, domain: PreviewDomain, request: web.Request
) -> web.StreamResponse:
    label = preview_label_of(request.host, domain.host)
    if label is None:
        return page(404, "There is no preview here.", "Preview links come from the app.")
    if request.path == TICKET_PATH:
        return redeem_ticket(service, domain, label, request)
    grant = authorize(service, label, request)
    if isinstance(grant, web.Response):
        return grant
    websocket = is_websocket_upgrade(request)
    if _from_elsewhere(request, label, domain, websocket=websocket):
        return page(403, "This request came from another page than the preview's own, and was refused.")
    raw_path = request.raw_path.split("?", 1)[0]
    if not raw_path.startswith("/"):
        # Absolute form (``GET http://host/path``, what a client says to a proxy) or ``*``: the
        # relays append the raw target to the tunnel URL, and the checks here are on paths.
        return page(400, "The request target must be a path (origin form).")
    if raw_path.startswith(RESERVED_PREFIX) or unquote(raw_path).lower().startswith(RESERVED_PREFIX):
        return page(404, "Not found.", f"Paths under {RESERVED_PREFIX} belong to the desktop daemon itself.")
    nc = service.nats.nc
    if nc is None or not service.nats.available:
        return page(503, "The gateway is not connected to NATS right now.", "Reload in a moment.")
    host = tunnel_hostname(grant.user)
    headers = request_headers(
        request.headers.items(),
        audience=service.config.auth.audience,
        forwarded_host=request.host,
        forwarded_proto=domain.scheme,
        forwarded_for=request.remote,
        websocket=websocket,
    )
    prefix = service.config.tunnel_prefix
    if websocket:
        return await relay_websocket(request, nc, prefix=prefix, host=host, headers=headers)
    return await relay_http(request, nc, prefix=prefix, host=host, headers=headers)


def redeem_ticket(
    service: PreviewService, domain: PreviewDomain, label: str, request: web.Request
) -> web.StreamResponse:
    """A valid, unused ticket for this label: set the cookie and go to the ticket's path."""
    if request.method not in ("GET", "HEAD"):
        return page(405, "Open the preview link in the browser.", headers={"Allow": "GET, HEAD"})
    now = service.clock()
    try:
        grant = service.signer.verify(request.query.get("t", ""), "ticket", now=now)
    except TokenError as exc:
        return page(401, f"This preview link {_WHY[exc.reason]}.", _SIGN_IN)
    if grant.label != label or label_for_user(grant.user) != label:
        return page(403, "This preview link is for another desktop.")
    try:
        service.ledger.redeem(grant, now=now)
    except TokenError as exc:
        return page(401, f"This preview link {_WHY[exc.reason]}.", _SIGN_IN)
    ttl = service.config.preview.cookie_ttl
    response = web.Response(
        status=303,
        headers={"Location": grant.path, "Cache-Control": "no-store", "Referrer-Policy": "no-referrer"},
    )
    response.set_cookie(
        cookie_name(domain.secure),
        service.signer.cookie(grant.user, label, now=now, ttl=ttl),
        path="/",
        max_age=int(ttl),
        httponly=True,
        samesite="Lax",
        secure=domain.secure,
    )
    log.info("preview ticket redeemed", extra={"tunnel_hostname": tunnel_hostname(grant.user)})
    return response


_WHY = {"invalid": "is not valid", "expired": "has expired", "used": "was already used"}


def authorize(service: PreviewService, label: str, request: web.Request) -> Grant | web.Response:
    """The grant of a valid cookie for ``label``; else 401 (none valid) or 403 (someone else's)."""
    values = cookie_values(request.headers.items())
    if not values:
        return page(401, "You are not signed in to this preview.", _SIGN_IN)
    now = service.clock()
    foreign = False
    for value in values:
        try:
            grant = service.signer.verify(value, "cookie", now=now)
        except TokenError:
            continue
        if grant.label == label and label_for_user(grant.user) == label:
            return grant
        foreign = True
    if foreign:
        return page(403, "This preview belongs to another user.")
    return page(401, "Your preview sign-in is not valid or has expired.", _SIGN_IN)


def _from_elsewhere(request: web.Request, label: str, domain: PreviewDomain, *, websocket: bool) -> bool:
    """True for a request another preview's page made (its ``Origin``), and for a WebSocket
    from any page but this preview's own: sibling previews are same-site, so SameSite cookies
    alone would let one user's page call (or hijack a socket of) another's desktop. Own means
    the whole origin: the label, the preview domain's scheme and the port the browser used
    (a page injected into plain http, or another server's on another port, is not the preview).

    ``Origin`` misses some: a ``<script src>`` sends none, and a POST the sibling redirects
    here from its own origin sends ``Origin: null``. The browser's ``Sec-Fetch-Site`` says
    where each came from: from another site or a sibling (``same-site``), only a navigation
    with GET or HEAD (the app opening its preview, a link) is let through.
    """
    site = request.headers.get("Sec-Fetch-Site", "").strip().lower()
    if site in ("same-site", "cross-site"):
        mode = request.headers.get("Sec-Fetch-Mode", "").strip().lower()
        if mode != "navigate" or request.method not in ("GET", "HEAD"):
            return True
    origin = request.headers.get("Origin")
    if origin is None:
        return False
    try:
        parts = urlsplit(origin.strip().lower())
        origin_port = parts.port
    except ValueError:
        return True
    own = (
        preview_label_of(parts.netloc, domain.host) == label
        and parts.scheme == domain.scheme
        and (origin_port or _DEFAULT_PORTS[domain.scheme]) == _port_of(request.host, domain.scheme)
    )
    if websocket:
        return not own
    return in_preview_domain(parts.netloc, domain.host) and not own


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _port_of(host_header: str | None, scheme: str) -> int | None:
    """The port in ``Host`` (the one the browser used), the scheme's default without one."""
    tail = (host_header or "").rpartition(":")[2] if ":" in (host_header or "") else ""
    if not tail:
        return _DEFAULT_PORTS[scheme]
    return int(tail) if tail.isascii() and tail.isdigit() else None
