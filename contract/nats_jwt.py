"""Reading NATS decentralized-auth JWTs and nkeys: what the gateway mints, the daemon and linkctl read.

Shape (what nats-server and the Go ``jwt`` library expect)::

    b64url({"typ":"JWT","alg":"ed25519-nkey"}) . b64url(claims) . b64url(ed25519(first two parts))

no padding; ``claims`` carry ``jti``, ``iat``, ``iss``, ``sub``, ``name``, optional
``exp`` (Unix seconds) and ``nats`` with ``type`` and ``"version": 2``; a user's
``nats`` holds its permissions (see :mod:`contract.permissions`) and
``allowed_connection_types``.

Decoding and key checks only: minting and signing (the operator's and account's seeds)
are the gateway's (``studio_gateway.nats_jwt``). The signature is checked with PyNaCl's
ed25519 (the library ``nkeys`` is built on, so the desktop install needs nothing more):
PyJWT and cryptography stay the gateway's (the ``gateway`` extra).
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, Final

import nacl.exceptions
import nacl.signing
import nkeys

__all__ = [
    "CLAIMS_VERSION",
    "CONNECTION_TYPE_STANDARD",
    "CONNECTION_TYPE_WEBSOCKET",
    "JWT_HEADER",
    "JwtError",
    "KeyKind",
    "b64url",
    "claims_of",
    "decode_jwt",
    "decode_public_key",
    "is_public_key",
]

JWT_HEADER: Final = {"typ": "JWT", "alg": "ed25519-nkey"}
# Claims format understood by nats-server >= 2.2 (v1 JWTs are long deprecated).
CLAIMS_VERSION: Final = 2
# ``allowed_connection_types`` of a user JWT: plain NATS (nats://, tls://) and WebSocket.
CONNECTION_TYPE_STANDARD: Final = "STANDARD"
CONNECTION_TYPE_WEBSOCKET: Final = "WEBSOCKET"

# Public nkeys: 1 prefix byte + 32 key bytes + 2 CRC bytes, base32 without padding.
_PUBLIC_KEY_RAW_LENGTH: Final = 35
_PUBLIC_KEY_LENGTH: Final = 56


class JwtError(ValueError):
    """A JWT or key that is malformed, wrongly signed, or of the wrong kind."""


class KeyKind:
    """The nkey roles we use, as ``nkeys`` prefix bytes (public keys start with O/A/U)."""

    OPERATOR: Final = nkeys.PREFIX_BYTE_OPERATOR
    ACCOUNT: Final = nkeys.PREFIX_BYTE_ACCOUNT
    USER: Final = nkeys.PREFIX_BYTE_USER


_KIND_LETTER: Final = {KeyKind.OPERATOR: "O", KeyKind.ACCOUNT: "A", KeyKind.USER: "U"}


def decode_public_key(key: str, kind: int) -> bytes:
    """The 32 raw ed25519 bytes of a public nkey of ``kind``; :class:`JwtError` otherwise.

    Checks length, alphabet, role prefix and CRC, so a typo or a seed pasted by
    mistake is refused before we sign anything for it.
    """
    letter = _KIND_LETTER.get(kind, "?")
    if not isinstance(key, str) or len(key) != _PUBLIC_KEY_LENGTH or not key.isascii():
        raise JwtError(f"not a public {letter}... nkey (expected {_PUBLIC_KEY_LENGTH} characters)")
    try:
        raw = base64.b32decode(key.encode("ascii"))  # 56 characters = 35 bytes, no padding
    except (binascii.Error, ValueError):
        raise JwtError(f"not a public {letter}... nkey (bad base32)") from None
    if len(raw) != _PUBLIC_KEY_RAW_LENGTH or raw[0] != kind:
        raise JwtError(f"not a public {letter}... nkey (wrong key type)")
    body, crc = raw[:-2], raw[-2:]
    if nkeys.crc16(bytearray(body)) != int.from_bytes(crc, "little"):
        raise JwtError(f"not a public {letter}... nkey (checksum mismatch)")
    return bytes(body[1:])


def is_public_key(key: object, kind: int) -> bool:
    try:
        decode_public_key(key, kind)  # type: ignore[arg-type]
    except JwtError:
        return False
    return True


def b64url(data: bytes) -> str:
    """base64url without padding, as JWTs are written."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def claims_of(token: str) -> dict[str, Any]:
    """The claims object of a JWT, read without any check of its header or signature.

    For a credential we hold and only need to read (its ``exp``, say); :class:`JwtError`
    when the second part is not a base64url JSON object.
    """
    try:
        claims = json.loads(_unb64(token.split(".")[1]))
    except (IndexError, ValueError, binascii.Error):
        raise JwtError("not a JWT (bad base64url or JSON)") from None
    if not isinstance(claims, dict):
        raise JwtError("not a JWT (the claims are not a JSON object)")
    return claims


def _signature_matches(public_key: bytes, signing_input: bytes, signature: bytes) -> bool:
    try:
        nacl.signing.VerifyKey(public_key).verify(signing_input, signature)
    except nacl.exceptions.CryptoError:  # a bad signature, or one of the wrong length
        return False
    return True


def decode_jwt(token: str, *, verify: bool = True) -> dict[str, Any]:
    """The claims of a NATS JWT; with ``verify`` the signature must match ``iss``.

    Does not judge expiry or trust (whether ``iss`` is an operator or account you
    accept): that is the caller's policy.
    """
    parts = token.strip().split(".") if isinstance(token, str) else []
    if len(parts) != 3:
        raise JwtError("not a JWT (expected three dot-separated parts)")
    try:
        header = json.loads(_unb64(parts[0]))
        claims = json.loads(_unb64(parts[1]))
        signature = _unb64(parts[2])
    except (binascii.Error, ValueError, UnicodeError):
        raise JwtError("not a JWT (bad base64url or JSON)") from None
    if not isinstance(header, dict) or header.get("alg") != JWT_HEADER["alg"]:
        raise JwtError("not a NATS JWT (header alg is not ed25519-nkey)")
    if not isinstance(claims, dict) or not isinstance(claims.get("nats"), dict):
        raise JwtError("not a NATS JWT (no 'nats' claims)")
    if verify:
        issuer = claims.get("iss")
        raw_key = None
        for kind in (KeyKind.OPERATOR, KeyKind.ACCOUNT):
            if is_public_key(issuer, kind):
                raw_key = decode_public_key(issuer, kind)  # type: ignore[arg-type]
        if raw_key is None:
            raise JwtError("NATS JWT issuer is not an operator or account public key")
        if not _signature_matches(raw_key, f"{parts[0]}.{parts[1]}".encode("ascii"), signature):
            raise JwtError("NATS JWT signature does not match its issuer")
    return claims
