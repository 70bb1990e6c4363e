"""studio_gateway.preview.labels and .config: preview labels, preview hosts and the domain setting."""

from __future__ import annotations

import re

import pytest

from studio_gateway.config import ConfigError, GatewayConfig
from studio_gateway.hostnames import tunnel_hostname
from studio_gateway.preview.api import check_landing_path
from studio_gateway.preview.config import PreviewDomain, parse_domain
from studio_gateway.preview.labels import (
    LABEL_LENGTH,
    in_preview_domain,
    label_for_host,
    label_for_user,
    preview_label_of,
)

DNS_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
SECRET = "s" * 48


@pytest.mark.parametrize("user", ["alice", "Alice@Example.COM", "日本語", "a" * 256])
def test_labels_are_stable_opaque_dns_labels(user: str) -> None:
    label = label_for_user(user)
    assert DNS_LABEL.fullmatch(label) and len(label) == LABEL_LENGTH
    assert label == label_for_host(tunnel_hostname(user)) == label_for_user(user)
    assert "alice" not in label.lower() and "example" not in label


def test_users_get_different_labels() -> None:
    assert len({label_for_user(u) for u in ("alice", "Alice", "bob", "alice ")}) == 4


def test_preview_hosts_are_one_label_in_front_of_the_domain() -> None:
    label = label_for_user("alice")
    assert preview_label_of(f"{label}.preview.localhost:8080", "preview.localhost") == label
    assert preview_label_of(f"{label.upper()}.Preview.Localhost.", "preview.localhost") == label
    for host in (
        "preview.localhost",
        f"x.{label}.preview.localhost",
        "alice.preview.localhost",
        f"{label}.preview.localhost.evil.example",
        f"{label}preview.localhost",
        "[::1]:8080",
        "",
        None,
    ):
        assert preview_label_of(host, "preview.localhost") is None, host


def test_every_name_under_the_domain_is_preview_territory() -> None:
    assert in_preview_domain("junk.preview.localhost", "preview.localhost")
    assert in_preview_domain("a.b.preview.localhost:1", "preview.localhost")
    assert not in_preview_domain("preview.localhost:1", "preview.localhost")  # the API may live there
    assert not in_preview_domain("localhost:8080", "localhost")
    assert not in_preview_domain("127.0.0.1:8080", "preview.localhost")
    assert not in_preview_domain("notpreview.localhost", "preview.localhost")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("preview.localhost", PreviewDomain("preview.localhost", "http", None)),
        ("preview.localhost:8080", PreviewDomain("preview.localhost", "http", 8080)),
        ("localhost", PreviewDomain("localhost", "http", None)),
        ("preview.example.com", PreviewDomain("preview.example.com", "https", None)),
        ("HTTP://Preview.Example.com:81/", PreviewDomain("preview.example.com", "http", 81)),
        ("https://preview.localhost", PreviewDomain("preview.localhost", "https", None)),
    ],
)
def test_the_domain_setting(raw: str, expected: PreviewDomain) -> None:
    assert parse_domain(raw) == expected


@pytest.mark.parametrize(
    "raw", ["example", "ftp://a.example", "a.example:99999", "a..example", "a.example/x", "-a.b"]
)
def test_a_bad_domain_names_the_variable(raw: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_domain(raw)
    assert caught.value.variable == "GATEWAY_PREVIEW_DOMAIN"


def test_the_gateway_config_carries_the_preview_settings() -> None:
    config = GatewayConfig.from_env(
        {
            "GATEWAY_JWT_SECRET": SECRET,
            "GATEWAY_PREVIEW_DOMAIN": "preview.example.com",
            "GATEWAY_PREVIEW_SECRET": "p" * 32,
            "GATEWAY_PREVIEW_TICKET_TTL_SECONDS": "30",
        }
    )
    assert config.preview.domain == PreviewDomain("preview.example.com")
    assert config.preview.secret == b"p" * 32 and config.preview.ticket_ttl == 30
    assert GatewayConfig.from_env({"GATEWAY_JWT_SECRET": SECRET}).preview.domain is None
    with pytest.raises(ConfigError, match="GATEWAY_PREVIEW_SECRET"):
        GatewayConfig.from_env({"GATEWAY_JWT_SECRET": SECRET, "GATEWAY_PREVIEW_SECRET": "short"})


@pytest.mark.parametrize("path", ["/", "/app?x=1&y=%2F", "/a/b/c.html", "/%E6%97%A5"])
def test_landing_paths_on_the_preview_origin(path: str) -> None:
    assert check_landing_path(path) == path


@pytest.mark.parametrize(
    "path",
    [
        "//evil.example/",
        "/\\evil.example",
        "https://evil.example/",
        "evil",
        "/a b",
        "/%0d%0aSet-Cookie:x",
        "/api/links/status",
        "/API/Links/work",
        "/%61pi/links/status",
        "/__natslink/ticket?t=x",
        "/" + "a" * 3000,
        3,
        None,
    ],
)
def test_other_landing_paths_are_refused(path: object) -> None:
    assert check_landing_path(path) is None
