"""studio_gateway.nats_jwt and contract.nats_jwt: NATS JWT encoding and decoding, key checks and the
operator trust chain (no server)."""

from __future__ import annotations

import base64
import json
import re

import pytest

from contract.nats_jwt import JWT_HEADER, JwtError, KeyKind, decode_jwt, decode_public_key, is_public_key
from studio_gateway.nats_jwt import (
    OperatorSetup,
    account_claims,
    creds_text,
    encode_jwt,
    keypair_from_seed,
    new_key,
    user_claims,
)
from tunnel.connect import parse_creds


def b64decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def test_new_keys_have_the_role_prefix_and_their_seed_gives_back_the_public_key() -> None:
    for kind, letter in ((KeyKind.OPERATOR, "O"), (KeyKind.ACCOUNT, "A"), (KeyKind.USER, "U")):
        key = new_key(kind)
        assert key.seed.startswith("S" + letter) and key.public_key.startswith(letter)
        assert len(key.public_key) == 56
        assert keypair_from_seed(key.seed).public_key.decode() == key.public_key
        assert key.seed not in repr(key)


def test_encoded_jwt_has_the_nats_header_no_padding_and_verifies() -> None:
    account = new_key(KeyKind.ACCOUNT)
    user = new_key(KeyKind.USER)
    token = encode_jwt(user_claims(user.public_key, "u", expires_at=2_000_000_000), account.keypair())
    parts = token.split(".")
    assert len(parts) == 3 and "=" not in token
    assert json.loads(b64decode(parts[0])) == JWT_HEADER
    claims = decode_jwt(token)
    assert claims["iss"] == account.public_key
    assert claims["sub"] == user.public_key
    assert claims["exp"] == 2_000_000_000
    assert isinstance(claims["iat"], int)
    assert re.fullmatch(r"[A-Z2-7]{52}", claims["jti"])
    assert claims["nats"]["type"] == "user" and claims["nats"]["version"] == 2
    # Omitted limits mean 0 to nats-server: every one is spelled out as unlimited.
    assert (claims["nats"]["subs"], claims["nats"]["data"], claims["nats"]["payload"]) == (-1, -1, -1)


def test_a_tampered_or_foreign_signature_is_rejected() -> None:
    account = new_key(KeyKind.ACCOUNT)
    token = encode_jwt(user_claims(new_key(KeyKind.USER).public_key, "u"), account.keypair())
    head, body, sig = token.split(".")
    claims = json.loads(b64decode(body))
    claims["name"] = "admin"
    forged_body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with pytest.raises(JwtError, match="signature"):
        decode_jwt(f"{head}.{forged_body}.{sig}")
    claims["iss"] = new_key(KeyKind.ACCOUNT).public_key
    other_body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with pytest.raises(JwtError, match="signature"):
        decode_jwt(f"{head}.{other_body}.{sig}")
    assert decode_jwt(f"{head}.{forged_body}.{sig}", verify=False)["name"] == "admin"
    for junk in ("", "a.b", "a.b.c", "!!.!!.!!"):
        with pytest.raises(JwtError):
            decode_jwt(junk)


def test_distinct_claims_get_distinct_jtis() -> None:
    kp = new_key(KeyKind.ACCOUNT).keypair()
    jtis = {
        decode_jwt(encode_jwt(user_claims(new_key(KeyKind.USER).public_key, "u"), kp))["jti"]
        for _ in range(20)
    }
    assert len(jtis) == 20


def test_public_key_validation_checks_role_length_alphabet_and_checksum() -> None:
    user = new_key(KeyKind.USER)
    assert len(decode_public_key(user.public_key, KeyKind.USER)) == 32
    assert is_public_key(user.public_key, KeyKind.USER)
    assert not is_public_key(user.public_key, KeyKind.ACCOUNT)
    assert not is_public_key(new_key(KeyKind.ACCOUNT).public_key, KeyKind.USER)
    assert not is_public_key(user.seed, KeyKind.USER)
    assert not is_public_key(user.public_key.lower(), KeyKind.USER)
    assert not is_public_key(user.public_key[:-1], KeyKind.USER)
    assert not is_public_key(None, KeyKind.USER)
    flipped = user.public_key[:20] + ("B" if user.public_key[20] != "B" else "C") + user.public_key[21:]
    with pytest.raises(JwtError, match="checksum"):
        decode_public_key(flipped, KeyKind.USER)


def test_claim_builders_refuse_keys_of_the_wrong_role() -> None:
    with pytest.raises(JwtError):
        user_claims(new_key(KeyKind.ACCOUNT).public_key, "u")
    with pytest.raises(JwtError):
        user_claims(new_key(KeyKind.USER).public_key, "u", issuer_account=new_key(KeyKind.USER).public_key)
    with pytest.raises(JwtError):
        account_claims(new_key(KeyKind.USER).public_key, "a")
    with pytest.raises(JwtError):
        account_claims(new_key(KeyKind.ACCOUNT).public_key, "a", signing_keys=["nope"])


def test_user_claims_carry_permissions_issuer_account_and_connection_types() -> None:
    user, account = new_key(KeyKind.USER), new_key(KeyKind.ACCOUNT)
    perms = {"pub": {"allow": ["a.>"]}, "sub": {"allow": ["b.*"]}}
    claims = user_claims(
        user.public_key,
        "daemon",
        issuer_account=account.public_key,
        permissions=perms,
        expires_at=123,
        allowed_connection_types=["WEBSOCKET"],
        tags=["host:x"],
    )
    nats = claims["nats"]
    assert nats["pub"] == perms["pub"] and nats["sub"] == perms["sub"]
    assert nats["issuer_account"] == account.public_key
    assert nats["allowed_connection_types"] == ["WEBSOCKET"]
    assert nats["tags"] == ["host:x"]
    assert claims["exp"] == 123


def test_account_claims_have_unlimited_limits_jetstream_and_signing_keys() -> None:
    account, signing = new_key(KeyKind.ACCOUNT), new_key(KeyKind.ACCOUNT)
    nats = account_claims(account.public_key, "A", signing_keys=[signing.public_key])["nats"]
    limits = nats["limits"]
    for key in ("conn", "subs", "data", "payload", "imports", "exports", "leaf"):
        assert limits[key] == -1, key
    assert limits["wildcards"] is True
    assert {limits[k] for k in ("mem_storage", "disk_storage", "streams", "consumer")} == {-1}
    assert nats["signing_keys"] == [signing.public_key]


def test_creds_text_is_what_nats_clients_parse() -> None:
    user = new_key(KeyKind.USER)
    token = encode_jwt(user_claims(user.public_key, "u"), new_key(KeyKind.ACCOUNT).keypair())
    text = creds_text(token, user.seed)
    assert text.startswith("-----BEGIN NATS USER JWT-----\n" + token + "\n------END NATS USER JWT------\n")
    assert "-----BEGIN USER NKEY SEED-----\n" + user.seed + "\n------END USER NKEY SEED------\n" in text
    assert parse_creds(text) == (token, user.seed)
    with pytest.raises(JwtError):
        creds_text(token, new_key(KeyKind.ACCOUNT).seed)


def test_operator_setup_is_a_consistent_trust_chain_with_a_server_config() -> None:
    setup = OperatorSetup.generate()
    operator = decode_jwt(setup.operator_jwt)
    account = decode_jwt(setup.account_jwt)
    system = decode_jwt(setup.system_account_jwt)
    assert operator["iss"] == operator["sub"] == setup.operator.public_key
    assert operator["nats"]["system_account"] == setup.system_account.public_key
    assert account["iss"] == system["iss"] == setup.operator.public_key
    assert account["sub"] == setup.account.public_key
    assert account["nats"]["signing_keys"] == [setup.account_signing.public_key]
    conf = setup.server_conf()
    assert "resolver: MEMORY" in conf
    assert f'operator: "{setup.operator_jwt}"' in conf
    assert f'{setup.account.public_key}: "{setup.account_jwt}"' in conf
    assert f"system_account: {setup.system_account.public_key}" in conf
    assert setup.gateway_env()["NATS_ACCOUNT_SIGNING_KEY"] == setup.account_signing.seed
    assert setup.account_signing.seed not in repr(setup)
    user_jwt, seed = parse_creds(setup.user_creds("svc"))
    claims = decode_jwt(user_jwt)
    assert claims["iss"] == setup.account_signing.public_key
    assert claims["nats"]["issuer_account"] == setup.account.public_key
    assert keypair_from_seed(seed).public_key.decode() == claims["sub"]
