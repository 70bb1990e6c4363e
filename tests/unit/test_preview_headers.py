"""studio_gateway.preview.headers and the close codes of ws_relay: what crosses the gateway."""

from __future__ import annotations

import jwt
import pytest

import tunnel
from studio_gateway.preview.headers import (
    cookie_values,
    is_gateway_token,
    request_headers,
    response_headers,
    without_our_cookie,
)
from studio_gateway.preview.http_relay import declared_length, tunnel_failure_page
from studio_gateway.preview.ws_relay import BAD_GATEWAY, wire_code

AUDIENCE = "studio-gateway"


def token(aud: str = AUDIENCE) -> str:
    return jwt.encode({"sub": "alice", "aud": aud, "exp": 1}, "x" * 32, algorithm="HS256")


def forward(headers: list[tuple[str, str]], *, websocket: bool = False) -> list[tuple[str, str]]:
    return request_headers(
        headers,
        audience=AUDIENCE,
        forwarded_host="p.preview.localhost:8080",
        forwarded_proto="http",
        forwarded_for="10.0.0.7",
        websocket=websocket,
    )


def test_our_cookie_is_cut_out_and_the_pages_cookies_stay() -> None:
    value = "a=1; natslink_preview=v1.x.y; __Host-natslink_preview=v1.z; b=2"
    assert without_our_cookie(value) == "a=1; b=2"
    assert without_our_cookie("natslink_preview=v1.x.y") == ""
    assert cookie_values([("Cookie", value), ("cookie", "natslink_preview=second")]) == [
        "v1.x.y",
        "v1.z",
        "second",
    ]


def test_the_gateways_token_is_recognised_however_it_is_signed() -> None:
    assert is_gateway_token(f"Bearer {token()}", AUDIENCE)
    assert is_gateway_token(f"bearer  {token([AUDIENCE, 'other'])}", AUDIENCE)  # type: ignore[arg-type]
    assert not is_gateway_token(f"Bearer {token('my-app')}", AUDIENCE)
    assert not is_gateway_token("Bearer not-a-jwt", AUDIENCE)
    assert not is_gateway_token("Basic dXNlcjpwYXNz", AUDIENCE)


def test_request_headers_towards_the_desktop() -> None:
    sent = forward(
        [
            ("Host", "p.preview.localhost:8080"),
            ("Connection", "keep-alive, X-Hop"),
            ("X-Hop", "1"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Transfer-Encoding", "chunked"),
            ("Proxy-Authorization", "Basic x"),
            ("Upgrade", "h2c"),
            ("X-Forwarded-For", "6.6.6.6"),
            ("Forwarded", "for=6.6.6.6"),
            ("Authorization", f"Bearer {token()}"),
            ("Cookie", "natslink_preview=v1.a.b; theme=dark"),
            ("Accept", "text/html"),
            ("Content-Length", "5"),
        ]
    )
    assert sent == [
        ("Cookie", "theme=dark"),
        ("Accept", "text/html"),
        ("Content-Length", "5"),
        ("X-Forwarded-Host", "p.preview.localhost:8080"),
        ("X-Forwarded-Proto", "http"),
        ("X-Forwarded-For", "10.0.0.7"),
    ]


def test_an_apps_own_authorization_and_other_cookies_reach_the_desktop() -> None:
    sent = dict(forward([("Authorization", "Basic dXNlcjpwYXNz"), ("Cookie", "natslink_preview=v1")]))
    assert sent["Authorization"] == "Basic dXNlcjpwYXNz"
    assert "Cookie" not in sent


def test_websocket_handshake_headers_are_the_relays_own() -> None:
    sent = forward(
        [
            ("Sec-WebSocket-Key", "abc"),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Protocol", "vite-hmr"),
            ("Sec-WebSocket-Extensions", "permessage-deflate"),
            ("Origin", "http://p.preview.localhost:8080"),
        ],
        websocket=True,
    )
    assert [name for name, _ in sent] == [
        "Origin",
        "X-Forwarded-Host",
        "X-Forwarded-Proto",
        "X-Forwarded-For",
    ]


def test_response_headers_towards_the_browser() -> None:
    got = response_headers(
        [
            ("Content-Type", "text/html"),
            ("Connection", "close, X-Drop"),
            ("X-Drop", "1"),
            ("Transfer-Encoding", "chunked"),
            ("Set-Cookie", "session=1; Path=/"),
            ("Set-Cookie", "natslink_preview=forged; Path=/"),
            ("set-cookie", "__Host-natslink_preview=forged; Path=/; Secure"),
            ("Content-Length", "12"),
        ]
    )
    assert got == [
        ("Content-Type", "text/html"),
        ("Set-Cookie", "session=1; Path=/"),
        ("Content-Length", "12"),
    ]


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (1000, 1000),
        (4001, 4001),
        (1011, 1011),
        (1005, 1000),
        (1006, BAD_GATEWAY),
        (1015, 1000),
        (999, 1000),
        (None, 1000),
    ],
)
def test_close_codes_fit_for_the_wire(code: int | None, expected: int) -> None:
    assert wire_code(code, vanished=BAD_GATEWAY) == expected


@pytest.mark.parametrize(
    ("error", "status", "words"),
    [
        (tunnel.TunnelUnreachable("nobody serves it"), 502, "tunnel_unreachable"),
        (tunnel.NoFirstFrameTimeout("no first frame"), 504, "tunnel_no_first_frame"),
        (tunnel.IdleTimeout("silent"), 504, "tunnel_idle_timeout"),
        (tunnel.RemoteProtocolError("gap"), 502, "tunnel_protocol_error"),
        (tunnel.LocalProtocolError("bad header"), 400, "tunnel_bad_request"),
    ],
)
def test_tunnel_failures_are_text_pages_naming_the_cause(
    error: tunnel.TunnelError, status: int, words: str
) -> None:
    response = tunnel_failure_page(error, "alice-host")
    assert response.status == status
    assert response.content_type == "text/plain"
    assert response.text is not None and words in response.text
    assert response.headers["Cache-Control"] == "no-store"


def test_declared_length_is_one_non_negative_integer() -> None:
    assert declared_length([("X", "1")]) is None
    assert declared_length([("content-length", "10")]) == 10
    assert declared_length([("Content-Length", "10, 10"), ("content-length", "10")]) == 10
    for bad in (["10, 11"], ["10", "11"], ["-1"], ["1e3"], [""], ["١٢"]):
        with pytest.raises(ValueError):
            declared_length([("Content-Length", value) for value in bad])
