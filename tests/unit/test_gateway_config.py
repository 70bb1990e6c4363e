"""studio_gateway.config: settings from the environment, every mistake a ConfigError naming its variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from studio_gateway.config import (
    DEFAULT_NATS_URL,
    DEFAULT_SESSION_TTL_SECONDS,
    AuthConfig,
    ConfigError,
    CredentialMode,
    GatewayConfig,
    allowed_connection_types,
)
from studio_gateway.nats_jwt import KeyKind, OperatorSetup, account_claims, encode_jwt, new_key

SECRET = "s" * 40


def env(**values: str) -> dict[str, str]:
    return {"GATEWAY_JWT_SECRET": SECRET, **values}


def config_error(environ: dict[str, str]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        GatewayConfig.from_env(environ)
    return info.value


def test_defaults() -> None:
    config = GatewayConfig.from_env(env())
    assert config.nats_urls == (DEFAULT_NATS_URL,)
    assert config.public_urls == ()
    assert config.tunnel_public_enabled is True
    assert config.session_ttl_seconds == DEFAULT_SESSION_TTL_SECONDS
    assert config.tunnel_prefix == "tunnel.v1"
    assert config.credential_mode is CredentialMode.NONE
    assert config.auth == AuthConfig(secret=SECRET, algorithms=("HS256",), audience="studio-gateway")
    assert SECRET not in repr(config)


def test_lists_booleans_and_numbers_are_parsed() -> None:
    config = GatewayConfig.from_env(
        env(
            NATS_URL="nats://a:4222, nats://b:4222",
            NATS_PUBLIC_URL="wss://nats.example.com,tls://nats.example.com:4443",
            NATS_TUNNEL_PUBLIC_ENABLED="no",
            NATS_TUNNEL_SESSION_TTL_SECONDS="120",
            GATEWAY_PORT="9000",
            TUNNEL_PREFIX="acme.tunnel",
        )
    )
    assert config.nats_urls == ("nats://a:4222", "nats://b:4222")
    assert config.public_urls == ("wss://nats.example.com", "tls://nats.example.com:4443")
    assert config.tunnel_public_enabled is False
    assert config.session_ttl_seconds == 120
    assert config.port == 9000
    assert config.tunnel_prefix == "acme.tunnel"


@pytest.mark.parametrize(
    "url",
    [
        "http://nats.example.com",
        "nats://",
        "nats.example.com:4222",
        "ws://:80",
        "nats://h:99999",
        "nats://h:x",
    ],
)
def test_a_malformed_public_url_names_the_variable(url: str) -> None:
    error = config_error(env(NATS_PUBLIC_URL=f"nats://fine:4222,{url}"))
    assert error.variable == "NATS_PUBLIC_URL"
    assert "NATS_PUBLIC_URL" in str(error)


@pytest.mark.parametrize(
    ("urls", "expected"),
    [
        ((), ()),
        (("wss://a",), ("WEBSOCKET",)),
        (("ws://a", "wss://b"), ("WEBSOCKET",)),
        (("nats://a",), ("STANDARD", "WEBSOCKET")),
        (("tls://a",), ("STANDARD", "WEBSOCKET")),
        (("wss://a", "nats://b"), ("STANDARD", "WEBSOCKET")),
    ],
)
def test_allowed_connection_types_follow_the_public_url_schemes(
    urls: tuple[str, ...], expected: tuple[str, ...]
) -> None:
    assert allowed_connection_types(urls) == expected


@pytest.mark.parametrize(
    ("values", "variable"),
    [
        ({"NATS_URL": "redis://x"}, "NATS_URL"),
        ({"NATS_TUNNEL_PUBLIC_ENABLED": "maybe"}, "NATS_TUNNEL_PUBLIC_ENABLED"),
        ({"NATS_TUNNEL_SESSION_TTL_SECONDS": "0"}, "NATS_TUNNEL_SESSION_TTL_SECONDS"),
        ({"NATS_TUNNEL_SESSION_TTL_SECONDS": "1.5"}, "NATS_TUNNEL_SESSION_TTL_SECONDS"),
        ({"NATS_TUNNEL_SESSION_TTL_SECONDS": str(365 * 24 * 3600)}, "NATS_TUNNEL_SESSION_TTL_SECONDS"),
        ({"GATEWAY_PORT": "http"}, "GATEWAY_PORT"),
        ({"TUNNEL_PREFIX": "bad prefix"}, "TUNNEL_PREFIX"),
        ({"TUNNEL_PREFIX": "a.*"}, "TUNNEL_PREFIX"),
        ({"NATS_CREDS": "/does/not/exist.creds"}, "NATS_CREDS"),
        ({"NATS_CREDS": "-----BEGIN x", "NATS_TOKEN": "t"}, "NATS_CREDS"),
        ({"GATEWAY_JWT_SECRET": ""}, "GATEWAY_JWT_SECRET"),
        ({"GATEWAY_JWT_SECRET": "short"}, "GATEWAY_JWT_SECRET"),
        ({"GATEWAY_JWT_ALGORITHMS": "RS256"}, "GATEWAY_JWT_ALGORITHMS"),
        ({"GATEWAY_JWT_ALGORITHMS": "none"}, "GATEWAY_JWT_ALGORITHMS"),
        ({"GATEWAY_JWT_AUDIENCE": " "}, "GATEWAY_JWT_AUDIENCE"),
        ({"GATEWAY_JWT_PUBLIC_KEY": "not a pem"}, "GATEWAY_JWT_SECRET"),
    ],
)
def test_bad_values_name_their_variable(values: dict[str, str], variable: str) -> None:
    assert config_error(env(**values)).variable == variable


def test_public_key_auth_defaults_to_asymmetric_algorithms_and_refuses_hmac() -> None:
    pem = "-----BEGIN PUBLIC KEY-----\nMFkw...\n-----END PUBLIC KEY-----\n"
    auth = AuthConfig.from_env({"GATEWAY_JWT_PUBLIC_KEY": pem})
    assert auth.algorithms == ("RS256", "ES256") and auth.secret is None
    with pytest.raises(ConfigError) as info:
        AuthConfig.from_env({"GATEWAY_JWT_PUBLIC_KEY": pem, "GATEWAY_JWT_ALGORITHMS": "HS256"})
    assert info.value.variable == "GATEWAY_JWT_ALGORITHMS"


def test_secrets_and_jwts_may_be_files(tmp_path: Path) -> None:
    setup = OperatorSetup.generate()
    files = {}
    for name, value in {**setup.gateway_env(), "GATEWAY_JWT_SECRET": SECRET}.items():
        path = tmp_path / name
        path.write_text(value + "\n", encoding="utf-8")
        files[name] = str(path)
    config = GatewayConfig.from_env(files)
    assert config.auth.secret == SECRET
    assert config.operator is not None
    assert config.operator.signing_key_seed == setup.account_signing.seed
    missing = config_error({**files, "NATS_ACCOUNT_JWT": str(tmp_path / "nope")})
    assert missing.variable == "NATS_ACCOUNT_JWT"


def test_operator_mode_checks_the_whole_trust_chain() -> None:
    setup = OperatorSetup.generate()
    config = GatewayConfig.from_env(env(**setup.gateway_env()))
    assert config.credential_mode is CredentialMode.OPERATOR
    assert config.operator is not None
    assert config.operator.account_public_key == setup.account.public_key
    assert config.operator.signing_public_key == setup.account_signing.public_key
    assert setup.account_signing.seed not in repr(config)

    other = OperatorSetup.generate()
    partial = setup.gateway_env()
    del partial["NATS_ACCOUNT_JWT"]
    assert config_error(env(**partial)).variable == "NATS_ACCOUNT_JWT"
    mixed = {**setup.gateway_env(), "NATS_ACCOUNT_SIGNING_KEY": other.account_signing.seed}
    assert config_error(env(**mixed)).variable == "NATS_ACCOUNT_SIGNING_KEY"
    foreign_account = {**setup.gateway_env(), "NATS_ACCOUNT_JWT": other.account_jwt}
    assert config_error(env(**foreign_account)).variable == "NATS_ACCOUNT_JWT"
    user_seed = {**setup.gateway_env(), "NATS_ACCOUNT_SIGNING_KEY": new_key(KeyKind.USER).seed}
    assert config_error(env(**user_seed)).variable == "NATS_ACCOUNT_SIGNING_KEY"
    garbage = {**setup.gateway_env(), "NATS_OPERATOR_JWT": "x.y.z"}
    assert config_error(env(**garbage)).variable == "NATS_OPERATOR_JWT"
    with_token = {**setup.gateway_env(), "NATS_TOKEN": "t"}
    assert config_error(env(**with_token)).variable == "NATS_TOKEN"


def test_the_account_key_itself_may_sign_but_a_scoped_signing_key_may_not() -> None:
    setup = OperatorSetup.generate()
    as_account = {**setup.gateway_env(), "NATS_ACCOUNT_SIGNING_KEY": setup.account.seed}
    config = GatewayConfig.from_env(env(**as_account))
    assert config.operator is not None
    assert config.operator.signing_public_key == config.operator.account_public_key

    claims = account_claims(setup.account.public_key, "LINKS")
    claims["nats"]["signing_keys"] = [
        {"kind": "user_scope", "key": setup.account_signing.public_key, "template": {}}
    ]
    scoped_jwt = encode_jwt(claims, setup.operator.keypair())
    scoped = {**setup.gateway_env(), "NATS_ACCOUNT_JWT": scoped_jwt}
    error = config_error(env(**scoped))
    assert error.variable == "NATS_ACCOUNT_SIGNING_KEY" and "scoped" in error.message


def test_token_mode() -> None:
    config = GatewayConfig.from_env(env(NATS_TOKEN="tok"))
    assert config.credential_mode is CredentialMode.TOKEN
    assert "tok" not in repr(config)
