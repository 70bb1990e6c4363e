"""studio_gateway.auth: bearer-token verification and development tokens (no server, no loop)."""

from __future__ import annotations

import time

import jwt
import pytest

from studio_gateway.auth import AuthError, TokenVerifier, issue_token
from studio_gateway.config import AuthConfig, ConfigError

SECRET = "k" * 40
CONFIG = AuthConfig(secret=SECRET)


def test_issued_tokens_verify_and_carry_the_user_id() -> None:
    token = issue_token(CONFIG, "auth0|abc", ttl=60)
    user = TokenVerifier(CONFIG).verify(token)
    assert user.id == "auth0|abc"
    assert user.claims["aud"] == "studio-gateway"
    assert 55 <= user.claims["exp"] - time.time() <= 60


@pytest.mark.parametrize(
    ("claims", "code"),
    [
        ({"sub": "a", "aud": "studio-gateway", "exp": 1}, "token_expired"),
        ({"sub": "a", "aud": "other", "exp": 2**40}, "invalid_audience"),
        ({"sub": "a", "exp": 2**40}, "invalid_audience"),
        ({"sub": "a", "aud": "studio-gateway"}, "invalid_token"),
        ({"aud": "studio-gateway", "exp": 2**40}, "invalid_token"),
        ({"sub": "x" * 300, "aud": "studio-gateway", "exp": 2**40}, "invalid_token"),
    ],
)
def test_bad_claims_have_stable_codes(claims: dict[str, object], code: str) -> None:
    token = jwt.encode(claims, SECRET, algorithm="HS256")
    with pytest.raises(AuthError) as info:
        TokenVerifier(CONFIG).verify(token)
    assert info.value.code == code


def test_a_token_for_another_audience_config_is_refused() -> None:
    token = issue_token(AuthConfig(secret=SECRET, audience="admin-api"), "alice")
    with pytest.raises(AuthError) as info:
        TokenVerifier(CONFIG).verify(token)
    assert info.value.code == "invalid_audience"


def test_issue_token_needs_the_secret_and_a_sane_user_id() -> None:
    with pytest.raises(ConfigError):
        issue_token(AuthConfig(public_key="-----BEGIN PUBLIC KEY-----", algorithms=("RS256",)), "alice")
    with pytest.raises(ValueError):
        issue_token(CONFIG, "")


def test_an_unreadable_public_key_is_a_config_error() -> None:
    bad = AuthConfig(
        public_key="-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n", algorithms=("RS256",)
    )
    with pytest.raises(ConfigError) as info:
        TokenVerifier(bad)
    assert info.value.variable == "GATEWAY_JWT_PUBLIC_KEY"
