"""What the application sees of a tunnel request: the ASGI ``http`` and ``websocket``
scopes, with ``X-Forwarded-*`` read as the package docstring describes."""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Final
from urllib.parse import unquote

from .._handler import Request
from .._ws_protocol import split_tokens
from ._types import Scope

#: ``scope["client"]`` when no ``X-Forwarded-For`` names the caller (see the package docstring).
UNKNOWN_CLIENT: Final[tuple[str, int]] = ("tunnel", 0)
# What X-Forwarded-Host may be: a DNS name or IPv4 address, or a bracketed IPv6 literal, and a port.
_FORWARDED_HOST: Final = re.compile(
    r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9._-]{0,251}[A-Za-z0-9])?)(?::[0-9]{1,5})?"
)


def _header_bytes(value: str) -> bytes:
    """Header text back to the bytes an HTTP server would have read (latin-1, else UTF-8)."""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8")


def _host_bytes(hostname: str) -> bytes:
    try:
        return hostname.encode("ascii")
    except UnicodeEncodeError:
        try:
            return hostname.encode("idna")
        except UnicodeError:
            return hostname.encode("utf-8")


def _first_value(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    """The first (leftmost, i.e. the original client's) value of a comma-separated header."""
    for key, value in headers:
        if key == name:
            first = value.decode("latin-1").split(",", 1)[0].strip()
            return first or None
    return None


def _ip_address(text: str) -> str | None:
    """``text`` as an IP address (``1.2.3.4``, ``::1``, ``[::1]``, ``1.2.3.4:80``, ``[::1]:80``) or None."""
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def http_scope(
    request: Request, root_path: str, raw_root: bytes, proxy_headers: bool, state: dict[str, Any]
) -> Scope:
    """The ASGI http scope for one tunnel request (see the package docstring)."""
    raw_path = request.path
    headers = [(name.lower().encode("latin-1"), _header_bytes(value)) for name, value in request.headers]
    scheme = "http"
    client = UNKNOWN_CLIENT
    public_host: bytes | None = None
    if proxy_headers:
        proto = _first_value(headers, b"x-forwarded-proto")
        if proto is not None and proto.lower() in ("http", "https"):
            scheme = proto.lower()
        host = _first_value(headers, b"x-forwarded-host")
        if host is not None and _FORWARDED_HOST.fullmatch(host):
            public_host = host.encode("ascii")
        forwarded_for = _first_value(headers, b"x-forwarded-for")
        address = None if forwarded_for is None else _ip_address(forwarded_for)
        if address is not None:
            client = (address, 0)
    if public_host is not None:
        headers = [(b"host", public_host), *((n, v) for n, v in headers if n != b"host")]
    elif not any(name == b"host" for name, _ in headers):
        headers.insert(0, (b"host", _host_bytes(request.hostname)))
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": scheme,
        "path": root_path + unquote(raw_path, encoding="utf-8", errors="replace"),
        "raw_path": raw_root + raw_path.encode("utf-8"),
        "query_string": request.query_string.encode("utf-8"),
        "root_path": root_path,
        "headers": headers,
        "client": client,
        "server": (request.hostname, None),
        "state": state.copy(),
        "extensions": {"tunnel": {"request_id": request.request_id}},
    }


def websocket_scope(scope: Scope, request: Request) -> Scope:
    """The http ``scope`` of a WebSocket upgrade request, made a websocket scope (spec 2.4)."""
    del scope["method"]
    scope["type"] = "websocket"
    scope["asgi"] = {"version": "3.0", "spec_version": "2.4"}
    scope["scheme"] = "wss" if scope["scheme"] == "https" else "ws"
    scope["subprotocols"] = split_tokens(request.header_values("sec-websocket-protocol"))
    scope["extensions"]["websocket.http.response"] = {}
    return scope
