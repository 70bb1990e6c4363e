"""Link sessions: parsing, refresh timing, drain budget, URLs, reconnect policy, identity, proxy helpers."""

from __future__ import annotations

import base64
import json
import random
import time
from typing import Any

import httpx
import nkeys
import pytest

from linkd.connection import Identity, choose_urls
from linkd.credentials_store import generate_seed, public_key_of
from linkd.daemon import drain_budget, refresh_delay
from linkd.errors import LinkdError
from linkd.session import GatewayClient, GatewayError, LinkSession, parse_session
from linkd.upstream import filter_headers, upstream_url
from tunnel.backoff import ReconnectPolicy


def fake_jwt(**claims: Any) -> str:
    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'ed25519-nkey'})}.{part(claims)}.c2ln"


def body(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "connection": {
            "urls": ["nats://n1:4222", "wss://n1:443"],
            "allowedConnectionTypes": ["STANDARD", "WEBSOCKET"],
            "tunnelPrefix": "_tunnel.v1",
        },
        "credentials": {"jwt": fake_jwt(iat=1000, exp=1600)},
        "expiresAt": "1970-01-01T00:26:40Z",
        "tunnelHostname": "alice-abc",
    }
    doc.update(overrides)
    return doc


def test_parse_session_with_own_key_takes_lifetime_from_the_jwt() -> None:
    session = parse_session(body(), sent_public_key=True, received_at=50.0)
    assert session.hostname == "alice-abc" and session.prefix == "_tunnel.v1"
    assert session.lifetime == 599.0  # exp - iat, minus one second of iat rounding
    assert session.expires_monotonic == 649.0 and session.expires_at == 1600.0
    assert session.seed is None and session.token is None


def test_parse_session_with_gateway_creds_and_token_mode() -> None:
    seed = generate_seed()
    jwt = fake_jwt(iat=10, exp=15)
    creds = (
        f"-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
    )
    session = parse_session(body(credentials={"jwt": jwt, "creds": creds}), sent_public_key=False)
    assert (session.jwt, session.seed, session.lifetime) == (jwt, seed, 4.0)
    token = parse_session(body(credentials=None, token="s3cret", expiresAt=None), sent_public_key=True)
    assert token.token == "s3cret" and token.lifetime is None and token.remaining() is None


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ({"connection": None}, "no connection"),
        ({"connection": {"urls": []}}, "no NATS URLs"),
        ({"connection": {"urls": ["http://x"]}}, "unsupported NATS URL"),
        ({"tunnelHostname": ""}, "no tunnel hostname"),
        ({"tunnelHostname": "bad host"}, "unusable tunnel hostname"),
        ({"credentials": {"nojwt": 1}}, "no JWT"),
        ({"credentials": None}, "neither credentials nor a token"),
        ({"credentials": {"jwt": "x.y"}}, "malformed"),
        ({"expiresAt": "tomorrow"}, "malformed expiresAt"),
    ],
)
def test_parse_session_refuses_malformed_answers(override: dict[str, Any], fragment: str) -> None:
    with pytest.raises(GatewayError, match=fragment):
        parse_session(body(**override), sent_public_key=True)


def test_a_bare_jwt_needs_our_key() -> None:
    with pytest.raises(GatewayError, match="did not send ours"):
        parse_session(body(), sent_public_key=False)


def test_refresh_delay_leaves_a_margin_with_jitter() -> None:
    rng = random.Random(1)
    for _ in range(200):
        one_hour = refresh_delay(3600, rng=rng)
        # Jitter: 30% of the span from a quarter of the lifetime (tests/unit/test_refresh_spread.py).
        assert 3600 - 300 - 720 <= one_hour <= 3600 - 300
        # Short lifetimes: refreshed early, so the replaced connection has most of it to drain.
        short = refresh_delay(4.0, rng=rng)
        assert short == pytest.approx(1.0)
        minute = refresh_delay(60.0, rng=rng)
        assert 60 - 30.25 - 7.5 <= minute <= 60 - 30.25
        tiny = refresh_delay(1.0, rng=rng)
        assert 0.25 <= tiny < 1.0


def test_drain_budget_ends_before_the_old_credential_expires() -> None:
    def session(lifetime: float | None, age: float) -> LinkSession:
        return LinkSession(
            hostname="h.example",
            urls=("nats://n:4222",),
            allowed_connection_types=("STANDARD",),
            lifetime=lifetime,
            received_at=time.monotonic() - age,
        )

    assert drain_budget(session(4.0, 1.0)) == pytest.approx(2.75, abs=0.05)  # remaining 3 s minus 0.25
    assert drain_budget(session(3600.0, 3200.0)) == 30.0  # capped
    assert drain_budget(session(4.0, 5.0)) == 0.0  # already expired: nothing to wait for
    assert drain_budget(session(None, 0.0)) == 30.0  # a token never expires


def session_with(urls: list[str], types: list[str]) -> LinkSession:
    return parse_session(
        body(connection={"urls": urls, "allowedConnectionTypes": types}), sent_public_key=True
    )


def test_choose_urls_follows_allowed_types_and_never_mixes_kinds() -> None:
    both = session_with(["nats://a:1", "wss://a:2", "nats://b:1"], ["STANDARD", "WEBSOCKET"])
    assert choose_urls(both) == ["nats://a:1", "nats://b:1"]
    assert choose_urls(both, "websocket") == ["wss://a:2"]
    ws_first = session_with(["wss://a:2", "nats://a:1"], ["STANDARD", "WEBSOCKET"])
    assert choose_urls(ws_first) == ["wss://a:2"]
    ws_only = session_with(["nats://a:1", "wss://a:2"], ["WEBSOCKET"])
    assert choose_urls(ws_only) == ["wss://a:2"]
    with pytest.raises(LinkdError, match="do not allow standard"):
        choose_urls(ws_only, "standard")
    with pytest.raises(LinkdError, match="no NATS URL usable"):
        choose_urls(session_with(["nats://a:1"], ["WEBSOCKET"]))


def test_reconnect_policy_forced_backoff_and_jitter() -> None:
    class Srv:
        def __init__(self, reconnects: int) -> None:
            self.reconnects = reconnects

    policy = ReconnectPolicy(initial=0.5, cap=3.0, jitter=1.0, first_jitter=0.25)
    assert 0.0 <= policy([Srv(0)], {})[1] <= 0.25
    assert 0.5 <= policy([Srv(1)], {})[1] <= 1.5
    assert 3.0 <= policy([Srv(10)], {})[1] <= 4.0


def test_identity_swaps_jwt_and_signs_with_the_right_seed() -> None:
    own = generate_seed()
    identity = Identity(own)
    first = parse_session(body(credentials={"jwt": fake_jwt(iat=1, exp=9)}), sent_public_key=True)
    identity.update(first)
    assert identity.jwt_cb() == first.jwt.encode()  # type: ignore[union-attr]
    signature = base64.b64decode(identity.signature_cb("nonce-1"))
    verifier = (
        nkeys.from_public_key(public_key_of(own).encode()) if hasattr(nkeys, "from_public_key") else None
    )
    keypair = nkeys.from_seed(bytearray(own.encode()))
    assert keypair.verify(b"nonce-1", signature)
    if verifier is not None:
        assert verifier.verify(b"nonce-1", signature)
    second = parse_session(body(credentials={"jwt": fake_jwt(iat=2, exp=10)}), sent_public_key=True)
    identity.update(second)
    assert identity.jwt_cb() == second.jwt.encode()  # type: ignore[union-attr]


async def test_gateway_client_errors_are_one_clear_line() -> None:
    answers: dict[str, httpx.Response] = {
        "401": httpx.Response(
            401, json={"error": {"code": "token_expired", "message": "the bearer token has expired"}}
        ),
        "503": httpx.Response(503, json={"error": {"code": "tunnel_disabled", "message": "links are off"}}),
        "500": httpx.Response(500, text="<html>oops</html>"),
        "200": httpx.Response(200, json=body()),
    }
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answers[request.headers["authorization"].split()[-1]]

    def client(token: str | None) -> GatewayClient:
        return GatewayClient("https://gw.example/", lambda: token, transport=httpx.MockTransport(handler))

    with pytest.raises(GatewayError, match="not logged in") as info:
        await client(None).request_session("UKEY")
    assert info.value.auth
    with pytest.raises(
        GatewayError, match=r"refused the API token \(token_expired.*run 'linkd login' again"
    ) as info:
        await client("401").request_session("UKEY")
    assert info.value.auth and info.value.status == 401
    with pytest.raises(GatewayError, match="answered 503 tunnel_disabled: links are off") as info:
        await client("503").request_session("UKEY")
    assert not info.value.auth
    with pytest.raises(GatewayError, match="answered 500: <html>oops</html>"):
        await client("500").request_session("UKEY")
    session = await client("200").request_session("UKEY")
    assert session.hostname == "alice-abc"
    assert seen[-1].url == "https://gw.example/api/links/session"
    assert json.loads(seen[-1].content) == {"publicKey": "UKEY"}
    unreachable = GatewayClient("http://127.0.0.1:9", lambda: "t")
    with pytest.raises(GatewayError, match="unreachable"):
        await unreachable.request_session(None)
    await unreachable.aclose()


def test_hop_by_hop_headers_are_dropped_and_order_kept() -> None:
    headers = [
        ("Connection", "keep-alive, X-Secret-Hop"),
        ("X-Secret-Hop", "1"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Authorization", "Basic x"),
        ("Proxy-Foo", "1"),
        ("TE", "trailers"),
        ("Trailer", "X"),
        ("Transfer-Encoding", "chunked"),
        ("Upgrade", "websocket"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("Content-Type", "text/plain"),
    ]
    assert filter_headers(headers) == [
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("Content-Type", "text/plain"),
    ]


def test_upstream_url_keeps_the_host() -> None:
    base = httpx.URL("http://127.0.0.1:3000/app/")
    assert str(upstream_url(base, "/x?y=1")) == "http://127.0.0.1:3000/app/x?y=1"
    for target in ("/@evil.example/", "/a?b=../../c"):
        url = upstream_url(base, target)
        assert (url.host, url.port) == ("127.0.0.1", 3000), target
        assert url.raw_path.startswith(b"/app/"), target
    for bad in (
        "http://evil.example/",
        "evil",
        "/a\r\nHost: x",
        "/a#frag",
        "/a/../../b",
        "/%2e%2E/x",
        "/./x",
        "//evil.example/x",  # refused since linkd/upstream_path.py (H-upstream)
        "/..%2f..%2fetc/passwd",
    ):
        with pytest.raises(ValueError):
            upstream_url(base, bad)


def test_time_is_monotonic_based() -> None:
    session = parse_session(body(), sent_public_key=True)
    remaining = session.remaining()
    assert remaining is not None and 598 < remaining <= 599
    assert session.received_at <= time.monotonic()
