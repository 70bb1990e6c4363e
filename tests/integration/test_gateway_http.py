"""The gateway's HTTP surface: bearer-token auth, JSON errors, 503s when sessions are unavailable.

None of this needs NATS to be up (``wait_nats=False``): auth and the "sessions are
disabled" answers come before any NATS work.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from studio_gateway.app import create_app
from studio_gateway.config import ConfigError, GatewayConfig
from studio_gateway.nats_jwt import OperatorSetup
from tests.integration.gateway_harness import SECRET, base_env, running_gateway

AUDIENCE = "studio-gateway"
PROTECTED = [("POST", "/api/links/session"), ("GET", "/api/links/me")]
UNREACHABLE_NATS = "nats://127.0.0.1:1"


def hs_token(claims: dict[str, Any], secret: str = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(claims, secret, algorithm=algorithm)


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {"sub": "alice", "aud": AUDIENCE, "iat": now, "exp": now + 300}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def unsigned_token(payload: dict[str, Any]) -> str:
    return jwt.encode(payload, "", algorithm="none")


BAD_TOKENS: list[tuple[str, Any, str]] = [
    ("missing", None, "missing_token"),
    ("expired", lambda: hs_token(claims(exp=int(time.time()) - 60)), "token_expired"),
    ("wrong audience", lambda: hs_token(claims(aud="someone-else")), "invalid_audience"),
    ("no audience", lambda: hs_token(claims(aud=None)), "invalid_audience"),
    (
        "bad signature",
        lambda: hs_token(claims(), secret="another-secret-0123456789abcdef0123456789"),
        "invalid_token",
    ),
    ("alg none", lambda: unsigned_token(claims()), "invalid_token"),
    ("no exp", lambda: hs_token(claims(exp=None)), "invalid_token"),
    ("no sub", lambda: hs_token(claims(sub=None)), "invalid_token"),
    ("empty sub", lambda: hs_token(claims(sub="  ")), "invalid_token"),
    ("garbage", lambda: "not.a.jwt", "invalid_token"),
]


@pytest.mark.parametrize(("case", "make_token", "code"), BAD_TOKENS, ids=[c[0] for c in BAD_TOKENS])
async def test_missing_or_invalid_bearer_tokens_are_a_json_401(case: str, make_token: Any, code: str) -> None:
    env = base_env(NATS_URL=UNREACHABLE_NATS)
    async with running_gateway(env, wait_nats=False) as gw:
        for method, path in PROTECTED:
            headers = {} if make_token is None else {"Authorization": f"Bearer {make_token()}"}
            resp = await gw.client.request(method, path, headers=headers)
            assert resp.status == 401, case
            assert resp.content_type == "application/json"
            body = await resp.json()
            assert body["error"]["code"] == code, body
            assert "Traceback" not in await resp.text()
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")


async def test_non_bearer_authorization_is_missing_token() -> None:
    async with running_gateway(base_env(NATS_URL=UNREACHABLE_NATS), wait_nats=False) as gw:
        resp = await gw.client.get("/api/links/me", headers={"Authorization": "Basic YWxpY2U6cHc="})
        assert resp.status == 401 and (await resp.json())["error"]["code"] == "missing_token"


async def test_public_key_tokens_es256_accepted_and_hs256_signed_with_the_public_key_refused() -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    pem = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    env = {"GATEWAY_JWT_PUBLIC_KEY": pem, "NATS_URL": UNREACHABLE_NATS}
    async with running_gateway(env, wait_nats=False) as gw:
        good = jwt.encode(claims(), private, algorithm="ES256")
        resp = await gw.client.get("/api/links/me", headers={"Authorization": f"Bearer {good}"})
        assert resp.status == 200
        assert (await resp.json())["online"] is False
        # Algorithm confusion: an HS256 token keyed with the (public) PEM must not pass.
        forged = _hs_with_pem(pem)
        resp = await gw.client.get("/api/links/me", headers={"Authorization": f"Bearer {forged}"})
        assert resp.status == 401 and (await resp.json())["error"]["code"] == "invalid_token"


def _hs_with_pem(pem: str) -> str:
    """HS256 keyed with the public PEM, built by hand (pyjwt refuses to do it, rightly)."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims()).encode())
    sig = hmac.new(pem.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


async def test_healthz_needs_no_auth_and_unknown_routes_are_json() -> None:
    async with running_gateway(base_env(NATS_URL=UNREACHABLE_NATS), wait_nats=False) as gw:
        resp = await gw.client.get("/healthz")
        assert resp.status == 200
        health = await resp.json()
        assert health["status"] == "ok" and health["nats"] == "disconnected"
        assert health["runs"] == "unavailable" and "NATS" in health["runsReason"]
        resp = await gw.client.get("/nope")
        assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"
        resp = await gw.client.get("/api/links/session", headers=gw.headers("alice"))
        assert resp.status == 405 and (await resp.json())["error"]["code"] == "method_not_allowed"
        assert "POST" in resp.headers["Allow"]


@pytest.mark.parametrize(
    ("env_overrides", "code", "variable"),
    [
        ({"NATS_TUNNEL_PUBLIC_ENABLED": "false"}, "tunnel_disabled", "NATS_TUNNEL_PUBLIC_ENABLED"),
        ({"NATS_PUBLIC_URL": ""}, "no_public_url", "NATS_PUBLIC_URL"),
        ({"NATS_TOKEN": ""}, "tunnel_not_configured", "NATS_TOKEN"),
    ],
)
async def test_sessions_answer_503_with_a_clear_reason_when_unavailable(
    env_overrides: dict[str, str], code: str, variable: str
) -> None:
    env = base_env(NATS_URL=UNREACHABLE_NATS, NATS_TOKEN="t", NATS_PUBLIC_URL="wss://nats.example.com")
    env.update(env_overrides)
    async with running_gateway(env, wait_nats=False) as gw:
        status, body = await gw.session("alice")
        assert status == 503
        assert body["error"]["code"] == code
        assert variable in body["error"]["message"]


async def test_an_operator_mode_session_needs_a_live_nats_connection() -> None:
    setup = OperatorSetup.generate()
    env = base_env(NATS_URL=UNREACHABLE_NATS, NATS_PUBLIC_URL="wss://nats.example.com", **setup.gateway_env())
    async with running_gateway(env, wait_nats=False) as gw:
        status, body = await gw.session("alice")
        assert status == 503 and body["error"]["code"] == "nats_unavailable"


@pytest.mark.parametrize(
    "content", ["", "not creds at all", "-----BEGIN NATS USER JWT-----\nabc\n------END NATS USER JWT------\n"]
)
def test_unusable_gateway_creds_are_a_start_up_error(tmp_path: Path, content: str) -> None:
    creds = tmp_path / "gateway.creds"
    creds.write_text(content, encoding="utf-8")
    config = GatewayConfig.from_env(base_env(NATS_CREDS=str(creds)))
    with pytest.raises(ConfigError) as info:
        create_app(config)
    assert info.value.variable == "NATS_CREDS"
