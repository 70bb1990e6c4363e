"""Which webhook URLs the gateway posts to (an SSRF guard).

By default only ``https://`` URLs whose host resolves to public addresses: no loopback,
private (RFC 1918, unique local), link-local (cloud metadata at 169.254.169.254), multicast,
reserved or unspecified addresses, so a user cannot make the gateway call its own network.
``WEBHOOKS_ALLOW_HTTP`` allows ``http://``, ``WEBHOOKS_ALLOW_PRIVATE`` those addresses.

The URL is checked when it is registered, and the addresses again at every delivery, by the
resolver the HTTP client connects with (:class:`GuardedResolver`): a name that resolves to a
public address at registration and to a private one later (DNS rebinding) is refused then.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Final
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

__all__ = ["GuardedResolver", "UrlRefused", "check_url", "is_public_address"]

MAX_URL_LENGTH: Final = 2048


class UrlRefused(ValueError):
    """A webhook URL (or the address it resolves to) the settings do not allow."""


def is_public_address(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified)


def check_url(url: str, *, allow_http: bool, allow_private: bool) -> str:
    """``url`` if it may be registered, else :class:`UrlRefused` saying why (no DNS lookup here
    for names: the resolver checks every delivery; a literal address is checked at once)."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL_LENGTH:
        raise UrlRefused(f"url: an absolute http(s) URL of at most {MAX_URL_LENGTH} characters")
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http"):
        raise UrlRefused("url: the scheme must be https")
    if parts.scheme == "http" and not allow_http:
        raise UrlRefused("url: http is not allowed on this gateway (WEBHOOKS_ALLOW_HTTP), use https")
    if not parts.hostname or parts.username or parts.password:
        raise UrlRefused("url: needs a host and no user:password")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise UrlRefused("url: bad port") from None
    if not allow_private:
        host = parts.hostname
        if host == "localhost" or host.endswith(".localhost"):
            raise UrlRefused("url: loopback addresses are not allowed (WEBHOOKS_ALLOW_PRIVATE)")
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None and not is_public_address(str(literal)):
            raise UrlRefused(f"url: {host} is not a public address (WEBHOOKS_ALLOW_PRIVATE)")
    return url


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver, refusing non-public addresses unless allowed (checked per connection)."""

    def __init__(self, *, allow_private: bool) -> None:
        self._inner = DefaultResolver()
        self._allow_private = allow_private

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if self._allow_private:
            return results
        kept = [r for r in results if is_public_address(str(r["host"]))]
        if not kept:
            raise OSError(f"{host} resolves to no public address (webhooks refuse private ones)")
        return kept

    async def close(self) -> None:
        await self._inner.close()
