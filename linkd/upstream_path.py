"""Validation of the request target the ``--upstream`` proxy appends to its base URL.

Why strict: the local service behind the proxy may decode ``%2e``/``%2f`` (once or
twice), treat ``\\`` as a separator, strip ``;params`` or stop at a NUL, and then
resolve ``..`` against its own root, climbing out of the configured base path.
Rather than guess one normalisation, every plausible decoding of the path is checked
and a target is refused when any of them holds a dot segment, a backslash, a NUL or a
control character. Nothing is rewritten: an accepted target is forwarded as sent
(non-ASCII characters percent-encoded as UTF-8, as a browser would).
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import quote, unquote_to_bytes

__all__ = ["InvalidTarget", "check_target", "decoded_paths"]

# Decoding more often than this and still changing: nobody legitimate nests encodings that deep.
MAX_DECODE_ROUNDS: Final = 3
# Controls (incl. NUL, CR, LF, TAB), DEL and the backslash, in any decoding of the path.
_FORBIDDEN_BYTES: Final = re.compile(rb"[\x00-\x1f\x7f\\]")
# Raw target characters that never belong in an origin-form target (the fragment included).
_FORBIDDEN_RAW: Final = re.compile(r"[\x00-\x20\x7f#]")
_DOT_SEGMENTS: Final = frozenset({b".", b".."})
# Printable ASCII stays as sent; only other characters are percent-encoded.
_SAFE_ASCII: Final = "".join(chr(c) for c in range(0x21, 0x7F))


class InvalidTarget(ValueError):
    """The request target is not a safe origin-form path (+ query) for the upstream."""


def decoded_paths(path: str) -> list[bytes]:
    """``path`` as bytes, then each successive percent-decoding of it, until stable."""
    current = _utf8(path)
    out = [current]
    for _ in range(MAX_DECODE_ROUNDS):
        decoded = unquote_to_bytes(current)
        if decoded == current:
            return out
        out.append(decoded)
        current = decoded
    if unquote_to_bytes(current) != current:
        raise InvalidTarget("the request path is percent-encoded too many times")
    return out


def _check_path_bytes(path: bytes) -> None:
    if _FORBIDDEN_BYTES.search(path):
        raise InvalidTarget("the request path holds a backslash, NUL or control character")
    for segment in path.split(b"/"):
        # ``..;x`` is ``..`` to servers that strip path parameters (Tomcat, Jetty).
        if segment.split(b";", 1)[0] in _DOT_SEGMENTS:
            raise InvalidTarget("the request path holds a '.' or '..' segment")


def check_target(target: str) -> bytes:
    """The raw bytes to append to the base path for ``target``, or :class:`InvalidTarget`.

    ``target`` must be origin-form (``/path?query``): not absolute-form
    (``http://host/x``), not starting with ``//`` (a network-path reference to some
    servers), without fragment, whitespace or control characters, and without
    backslashes, NULs, controls or ``.``/``..`` segments in any percent-decoding of its
    path. The query is opaque to the proxy and only checked for raw control characters.
    """
    if not isinstance(target, str) or not target.startswith("/"):
        raise InvalidTarget("the request target must be origin-form: a path starting with '/'")
    if target.startswith("//"):
        raise InvalidTarget("the request target must not start with '//'")
    if _FORBIDDEN_RAW.search(target):
        raise InvalidTarget("the request target holds whitespace, a control character or '#'")
    path = target.split("?", 1)[0]
    for decoded in decoded_paths(path):
        _check_path_bytes(decoded)
    return quote(_utf8(target), safe=_SAFE_ASCII).encode("ascii")


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        raise InvalidTarget("the request target is not valid Unicode") from None
