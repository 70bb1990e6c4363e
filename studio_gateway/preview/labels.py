"""The preview origin of a desktop: ``<label>.<preview domain>``, and the label of a request's host.

Why an opaque label (``p`` + 25 base32 characters of a hash of the tunnel hostname) rather
than the tunnel hostname itself: the tunnel hostname starts with a slug of the user id (often
an e-mail address), and a preview origin travels further than it looks: browser history,
``Referer``/``Origin`` headers to every third party a dev page loads from. The label says
nothing about its user, is stable (the same desktop keeps the same origin, so its cookies and
storage survive a restart) and fits one DNS label. It is not a secret and does not need to
be: access is by cookie, and the gateway never maps a label back to a desktop, it checks that
the cookie's user has that label (:func:`label_for_user`).
"""

from __future__ import annotations

import base64
import hashlib
import re
from typing import Final

from ..hostnames import tunnel_hostname

__all__ = [
    "LABEL_LENGTH",
    "host_name",
    "in_preview_domain",
    "label_for_host",
    "label_for_user",
    "preview_label_of",
]

# 'p' + 25 base32 characters (125 bits): lowercase letters and digits, a valid DNS label.
LABEL_LENGTH: Final = 26
_DOMAIN_SEPARATION: Final = b"natslink-preview-label-v1\x00"
_LABEL: Final = re.compile(r"p[a-z2-7]{25}")


def label_for_host(hostname: str) -> str:
    """The preview label of the desktop serving tunnel host ``hostname``."""
    digest = hashlib.sha256(_DOMAIN_SEPARATION + hostname.encode("utf-8")).digest()
    return "p" + base64.b32encode(digest).decode("ascii").lower()[: LABEL_LENGTH - 1]


def label_for_user(user_id: str) -> str:
    """The preview label of ``user_id``'s desktop (through its tunnel hostname)."""
    return label_for_host(tunnel_hostname(user_id))


def host_name(host_header: str | None) -> str | None:
    """The name in a ``Host`` header, lowercase, without port or trailing dot (None for IPv6 or none)."""
    if not host_header:
        return None
    host = host_header.strip().lower()
    if not host or host.startswith("["):
        return None  # an IPv6 literal is never a preview host
    return host.rsplit(":", 1)[0].removesuffix(".") if ":" in host else host.removesuffix(".")


def in_preview_domain(host_header: str | None, domain_host: str) -> bool:
    """True for every name under the preview domain: none of them is the API.

    The domain itself is not a preview host, so the API may live there (with
    ``GATEWAY_PREVIEW_DOMAIN=localhost``, ``http://localhost:8080/api/...`` stays the API): it is
    another origin than every preview, which is what keeps previews away from it.
    """
    name = host_name(host_header)
    return name is not None and name.endswith("." + domain_host)


def preview_label_of(host_header: str | None, domain_host: str) -> str | None:
    """The label when ``host_header`` (``Host``, any port) is ``<label>.<domain_host>``, else None.

    Only exactly one well-formed label in front of the domain counts: ``a.b.<domain>``, the
    bare domain or a label of another shape is no preview (the middleware answers 404 for the
    names under the domain that are no preview).
    """
    name = host_name(host_header)
    if name is None:
        return None
    label, dot, rest = name.partition(".")
    if not dot or rest != domain_host or not _LABEL.fullmatch(label):
        return None
    return label
