"""``POST /api/links/preview``: a one-time ticket URL that opens the caller's own desktop in a browser.

Request body (optional JSON object)::

    {"path": "/some/page?x=1"}     # where the browser lands after the ticket (default "/")

Response 200 (``Cache-Control: no-store``)::

    {"url": "https://p....preview.example.com/__natslink/ticket?t=v1....",
     "origin": "https://p....preview.example.com",
     "expiresAt": "2030-01-01T12:00:00Z"}      # the ticket's expiry (GATEWAY_PREVIEW_TICKET_TTL_SECONDS)

Errors: 401 (see :mod:`..auth`); 400 ``invalid_body`` / ``invalid_path`` (not a path on the
preview origin: must start with one ``/``, at most 2048 characters, no whitespace, controls or
backslashes, not the daemon's own ``/api/links/``); 503 ``preview_disabled`` (no
``GATEWAY_PREVIEW_DOMAIN``). The desktop is not probed: an offline desktop is the preview's
own 502 page, which says so.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Final
from urllib.parse import quote, unquote

from aiohttp import web

from contract.routes import RESERVED_PREFIX

from ..auth import User, authenticated
from ..bodies import BodyError, read_json_object
from ..errors import json_error
from .labels import label_for_user
from .service import PREVIEW, TICKET_PATH

__all__ = ["MAX_PATH_LENGTH", "PREVIEW_PATH", "check_landing_path", "create_preview"]

PREVIEW_PATH: Final = "/api/links/preview"
MAX_PATH_LENGTH: Final = 2048
MAX_BODY_BYTES: Final = 16 * 1024
_BAD_PATH: Final = re.compile(r"[\x00-\x20\x7f\\#]")


def check_landing_path(path: object) -> str | None:
    """``path`` when it is a path on the preview origin to land on, else None.

    Not ``//host`` (a browser follows that to another site), no backslash (some browsers read
    it as a slash), nothing the daemon answers itself, not the ticket path.
    """
    if not isinstance(path, str) or not path.startswith("/") or len(path) > MAX_PATH_LENGTH:
        return None
    if path.startswith("//") or _BAD_PATH.search(path) or _BAD_PATH.search(unquote(path)):
        return None
    bare = unquote(path.split("?", 1)[0]).lower()
    if bare.startswith((RESERVED_PREFIX, TICKET_PATH)):
        return None
    return path


@authenticated
async def create_preview(request: web.Request, user: User) -> web.StreamResponse:
    service = request.app[PREVIEW]
    domain = service.domain
    if domain is None:
        return json_error(
            503, "preview_disabled", "this gateway serves no desktop previews (GATEWAY_PREVIEW_DOMAIN)"
        )
    try:
        payload = await read_json_object(
            request, MAX_BODY_BYTES, optional=True, code="invalid_body", too_large=(400, "invalid_body")
        )
    except BodyError as exc:
        return exc.response()
    path = check_landing_path(payload.get("path", "/"))
    if path is None:
        return json_error(
            400, "invalid_path", "path must be a path on the preview origin, starting with a single '/'"
        )
    label = label_for_user(user.id)
    now = service.clock()
    ttl = service.config.preview.ticket_ttl
    ticket = service.signer.ticket(user.id, label, path, now=now, ttl=ttl)
    origin = service.origin(label, domain, request.host)
    body = {
        "url": f"{origin}{TICKET_PATH}?t={quote(ticket, safe='')}",
        "origin": origin,
        "expiresAt": datetime.fromtimestamp(int(now + ttl), UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    return web.json_response(body, headers={"Cache-Control": "no-store"})
