"""The tunnel hostname of a user: derived on the server from the user id, never chosen by a client.

Why this shape (``<slug>-<hash>``, e.g. ``alice-example-com-k3v9q2m7x1ab``):

- deterministic: the same user always gets the same host, on every gateway instance;
- lowercase and DNS-safe (one label of ``[a-z0-9-]``, at most 63 characters), because
  tunnel hostnames are case-insensitive and end up in URLs and subjects;
- collision-resistant: the hash covers the *exact* user id (case and all), so two
  ids that slug alike (``Alice`` and ``alice``, or ids differing only in punctuation)
  still get different hosts; the slug is only there for humans reading logs.
"""

from __future__ import annotations

import base64
import hashlib
import re
import unicodedata
from typing import Final

__all__ = ["HASH_LENGTH", "MAX_SLUG_LENGTH", "tunnel_hostname"]

# 12 base32 characters = 60 bits: a collision among a million users has odds of about 1e-6,
# and that would additionally need identical slugs.
HASH_LENGTH: Final = 12
# Slug + "-" + hash fits one DNS label (63 characters).
MAX_SLUG_LENGTH: Final = 40
# Distinguishes these hashes from any other use of sha256 over user ids.
_DOMAIN: Final = b"natslink-tunnel-hostname-v1\x00"
_NON_SLUG: Final = re.compile(r"[^a-z0-9]+")


def tunnel_hostname(user_id: str) -> str:
    """The tunnel hostname of ``user_id`` (a non-empty string)."""
    if not isinstance(user_id, str) or not user_id:
        raise ValueError("user id must be a non-empty string")
    ascii_form = unicodedata.normalize("NFKD", user_id).encode("ascii", "ignore").decode("ascii")
    slug = _NON_SLUG.sub("-", ascii_form.lower()).strip("-")[:MAX_SLUG_LENGTH].strip("-") or "user"
    digest = hashlib.sha256(_DOMAIN + user_id.encode("utf-8", "surrogatepass")).digest()
    tag = base64.b32encode(digest).decode("ascii").lower()[:HASH_LENGTH]
    return f"{slug}-{tag}"
