"""A small encoder for NATS decentralized-auth JWTs, built on ``nkeys``: the gateway mints them.

Why our own: a NATS JWT is three base64url parts and an ed25519 signature by an
nkey, which ``nkeys`` already does; the PyPI NATS-JWT helpers mis-encode ``resp``
and timestamps, and a few dozen lines we test against a real nats-server are
easier to trust than a dependency we would have to patch around.

The shape, decoding and key checks are :mod:`contract.nats_jwt` (the daemon and
linkctl read what is minted here); this module signs: claim builders, :func:`encode_jwt`,
creds files, and :class:`OperatorSetup`, a complete operator + account + account
signing key and the matching server config (``operator``, ``resolver: MEMORY``,
``resolver_preload``), for tests and the one-command local stack.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import nkeys

from contract.nats_jwt import (
    CLAIMS_VERSION,
    JWT_HEADER,
    JwtError,
    KeyKind,
    b64url,
    decode_public_key,
)

# JwtError and KeyKind are contract.nats_jwt's, re-exported: minting speaks them (new_key(KeyKind.USER)).
__all__ = [
    "ACCOUNT_JETSTREAM_UNLIMITED",
    "ACCOUNT_LIMITS_UNLIMITED",
    "JwtError",
    "KeyKind",
    "NKey",
    "OperatorSetup",
    "account_claims",
    "creds_text",
    "encode_jwt",
    "keypair_from_seed",
    "new_key",
    "operator_claims",
    "user_claims",
]

# -1 means unlimited. Omitted limits mean 0 to nats-server ("maximum subscriptions
# exceeded" at connect), so every limit we rely on is spelled out.
ACCOUNT_LIMITS_UNLIMITED: Final[Mapping[str, Any]] = {
    "subs": -1,
    "data": -1,
    "payload": -1,
    "imports": -1,
    "exports": -1,
    "wildcards": True,
    "conn": -1,
    "leaf": -1,
}
# JetStream enabled for the account without quotas, so run streams (a later issue) can use it.
ACCOUNT_JETSTREAM_UNLIMITED: Final[Mapping[str, Any]] = {
    "mem_storage": -1,
    "disk_storage": -1,
    "streams": -1,
    "consumer": -1,
}
USER_LIMITS_UNLIMITED: Final[Mapping[str, Any]] = {"subs": -1, "data": -1, "payload": -1}

_CREDS_TEMPLATE: Final = """-----BEGIN NATS USER JWT-----
{jwt}
------END NATS USER JWT------

************************* IMPORTANT *************************
NKEY Seed printed below can be used to sign and prove identity.
NKEYs are sensitive and should be treated as secrets.

-----BEGIN USER NKEY SEED-----
{seed}
------END USER NKEY SEED------

*************************************************************
"""


@dataclass(frozen=True, slots=True)
class NKey:
    """An nkey as strings: the secret ``seed`` (``SO…``/``SA…``/``SU…``) and its ``public_key``."""

    seed: str
    public_key: str

    def keypair(self) -> Any:
        return keypair_from_seed(self.seed)

    def __repr__(self) -> str:  # never print the seed by accident
        return f"NKey(public_key={self.public_key!r})"


def new_key(kind: int) -> NKey:
    """A fresh random nkey of ``kind`` (a :class:`KeyKind` value)."""
    seed = nkeys.encode_seed(os.urandom(32), kind)
    keypair = nkeys.from_seed(bytearray(seed))
    return NKey(seed.decode("ascii"), keypair.public_key.decode("ascii"))


def keypair_from_seed(seed: str) -> Any:
    """An ``nkeys.KeyPair`` from a seed string; :class:`JwtError` when it is not a seed."""
    try:
        return nkeys.from_seed(bytearray(seed.strip().encode("ascii")))
    except (nkeys.NkeysError, ValueError, UnicodeError, binascii.Error) as exc:
        raise JwtError(f"not a valid nkey seed ({type(exc).__name__})") from None


def _compact_json(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def encode_jwt(claims: Mapping[str, Any], signing_kp: Any) -> str:
    """Sign ``claims`` with an nkeys ``KeyPair``; ``iss`` is always the signer's public key.

    ``iat`` defaults to now; ``jti`` to a hash of the claims (as the Go library does),
    so every distinct claim set gets its own id.
    """
    body: dict[str, Any] = dict(claims)
    body["iss"] = signing_kp.public_key.decode("ascii")
    body.setdefault("iat", int(time.time()))
    if "sub" not in body or "nats" not in body:
        raise JwtError("NATS JWT claims need 'sub' and 'nats'")
    body.pop("jti", None)
    digest = hashlib.sha256(_compact_json(body)).digest()
    body = {"jti": base64.b32encode(digest).rstrip(b"=").decode("ascii"), **body}
    signing_input = f"{b64url(_compact_json(JWT_HEADER))}.{b64url(_compact_json(body))}"
    signature = signing_kp.sign(signing_input.encode("ascii"))
    return f"{signing_input}.{b64url(signature)}"


def operator_claims(
    operator_public_key: str,
    name: str,
    *,
    signing_keys: Sequence[str] = (),
    system_account: str | None = None,
) -> dict[str, Any]:
    """Claims of a self-signed operator JWT."""
    decode_public_key(operator_public_key, KeyKind.OPERATOR)
    nats: dict[str, Any] = {"type": "operator", "version": CLAIMS_VERSION}
    if signing_keys:
        nats["signing_keys"] = list(signing_keys)
    if system_account is not None:
        decode_public_key(system_account, KeyKind.ACCOUNT)
        nats["system_account"] = system_account
    return {"sub": operator_public_key, "name": name, "nats": nats}


def account_claims(
    account_public_key: str,
    name: str,
    *,
    signing_keys: Sequence[str] = (),
    limits: Mapping[str, Any] = ACCOUNT_LIMITS_UNLIMITED,
    jetstream: Mapping[str, Any] | None = ACCOUNT_JETSTREAM_UNLIMITED,
) -> dict[str, Any]:
    """Claims of an account JWT (signed by the operator), with explicit limits."""
    decode_public_key(account_public_key, KeyKind.ACCOUNT)
    for key in signing_keys:
        decode_public_key(key, KeyKind.ACCOUNT)
    all_limits = dict(limits)
    if jetstream is not None:
        all_limits.update(jetstream)
    return {
        "sub": account_public_key,
        "name": name,
        "nats": {
            "limits": all_limits,
            "signing_keys": list(signing_keys),
            "default_permissions": {"pub": {}, "sub": {}},
            "type": "account",
            "version": CLAIMS_VERSION,
        },
    }


def user_claims(
    user_public_key: str,
    name: str,
    *,
    issuer_account: str | None = None,
    permissions: Mapping[str, Any] | None = None,
    expires_at: int | None = None,
    allowed_connection_types: Sequence[str] | None = None,
    tags: Sequence[str] = (),
    limits: Mapping[str, Any] = USER_LIMITS_UNLIMITED,
) -> dict[str, Any]:
    """Claims of a user JWT (``limits``: ``subs``, ``data``, ``payload``; -1 is unlimited).

    ``issuer_account`` is required when a signing key (not the account key itself)
    signs. ``permissions`` is ``{"pub": {"allow": [...]}, "sub": {"allow": [...]}}``
    (``None``: everything in the account). ``expires_at`` is Unix seconds.
    """
    decode_public_key(user_public_key, KeyKind.USER)
    nats: dict[str, Any] = dict(permissions) if permissions is not None else {"pub": {}, "sub": {}}
    nats.update(USER_LIMITS_UNLIMITED)
    nats.update(limits)
    if issuer_account is not None:
        decode_public_key(issuer_account, KeyKind.ACCOUNT)
        nats["issuer_account"] = issuer_account
    if allowed_connection_types:
        nats["allowed_connection_types"] = list(allowed_connection_types)
    if tags:
        nats["tags"] = list(tags)
    nats["type"] = "user"
    nats["version"] = CLAIMS_VERSION
    claims: dict[str, Any] = {"sub": user_public_key, "name": name, "nats": nats}
    if expires_at is not None:
        claims["exp"] = int(expires_at)
    return claims


def creds_text(jwt: str, seed: str) -> str:
    """The ``.creds`` file content nats-py and the nats CLI read (JWT block, then seed block)."""
    if not seed.startswith("SU"):
        raise JwtError("creds files hold a user seed (SU...)")
    return _CREDS_TEMPLATE.format(jwt=jwt, seed=seed)


@dataclass(frozen=True)
class OperatorSetup:
    """One operator, one account with a signing key, and their JWTs: a self-contained trust chain.

    Plus a system account (``SYS``), which nats-server wants in operator mode for its
    own monitoring subjects. ``server_conf()`` is the nats-server config snippet that
    trusts it all; ``gateway_env()`` the settings the gateway needs to mint users.
    """

    operator: NKey
    operator_jwt: str
    account: NKey
    account_signing: NKey
    account_jwt: str
    system_account: NKey
    system_account_jwt: str

    @classmethod
    def generate(cls, operator_name: str = "natslink", account_name: str = "LINKS") -> OperatorSetup:
        operator = new_key(KeyKind.OPERATOR)
        account = new_key(KeyKind.ACCOUNT)
        signing = new_key(KeyKind.ACCOUNT)
        system = new_key(KeyKind.ACCOUNT)
        op_kp = operator.keypair()
        operator_jwt = encode_jwt(
            operator_claims(operator.public_key, operator_name, system_account=system.public_key), op_kp
        )
        account_jwt = encode_jwt(
            account_claims(account.public_key, account_name, signing_keys=[signing.public_key]), op_kp
        )
        system_jwt = encode_jwt(account_claims(system.public_key, "SYS", jetstream=None), op_kp)
        return cls(operator, operator_jwt, account, signing, account_jwt, system, system_jwt)

    def server_conf(self) -> str:
        """``operator``, ``system_account``, ``resolver: MEMORY`` and ``resolver_preload`` for nats-server."""
        return (
            f"operator: {json.dumps(self.operator_jwt)}\n"
            f"system_account: {self.system_account.public_key}\n"
            "resolver: MEMORY\n"
            "resolver_preload: {\n"
            f"  {self.account.public_key}: {json.dumps(self.account_jwt)}\n"
            f"  {self.system_account.public_key}: {json.dumps(self.system_account_jwt)}\n"
            "}\n"
        )

    def gateway_env(self) -> dict[str, str]:
        """``NATS_OPERATOR_JWT``/``NATS_ACCOUNT_JWT``/``NATS_ACCOUNT_SIGNING_KEY`` for this account."""
        return {
            "NATS_OPERATOR_JWT": self.operator_jwt,
            "NATS_ACCOUNT_JWT": self.account_jwt,
            "NATS_ACCOUNT_SIGNING_KEY": self.account_signing.seed,
        }

    def user_jwt(
        self,
        user_public_key: str,
        name: str,
        *,
        permissions: Mapping[str, Any] | None = None,
        expires_at: int | None = None,
        allowed_connection_types: Sequence[str] | None = None,
    ) -> str:
        """A user JWT signed by the account signing key (``None`` permissions: the whole account)."""
        claims = user_claims(
            user_public_key,
            name,
            issuer_account=self.account.public_key,
            permissions=permissions,
            expires_at=expires_at,
            allowed_connection_types=allowed_connection_types,
        )
        return encode_jwt(claims, self.account_signing.keypair())

    def user_creds(self, name: str, **kwargs: Any) -> str:
        """Creds-file text for a fresh user key (e.g. the gateway's own, unrestricted connection)."""
        user = new_key(KeyKind.USER)
        return creds_text(self.user_jwt(user.public_key, name, **kwargs), user.seed)

    def __repr__(self) -> str:
        return f"OperatorSetup(operator={self.operator.public_key!r}, account={self.account.public_key!r})"
