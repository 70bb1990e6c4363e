"""studio_gateway.hostnames: deterministic, lowercase, DNS-safe, collision-resistant tunnel hostnames."""

from __future__ import annotations

import re

import pytest

import tunnel
from studio_gateway.hostnames import tunnel_hostname

DNS_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


@pytest.mark.parametrize(
    "user_id",
    [
        "alice",
        "Alice@Example.COM",
        "auth0|5f7c8ec7c33c6c004bbafe82",
        "Zoë Ünïcode",
        "日本語のユーザー",
        "----",
        "a" * 500,
        "x.y_z~!@#$%^&*()",
        " spaced  out ",
    ],
)
def test_hostnames_are_single_lowercase_dns_labels_usable_as_tunnel_hosts(user_id: str) -> None:
    host = tunnel_hostname(user_id)
    assert DNS_LABEL.fullmatch(host), host
    assert host == host.lower() and len(host) <= 63
    tunnel.HostSubjects.for_host(host)  # a valid tunnel hostname
    assert tunnel_hostname(user_id) == host  # deterministic


def test_the_slug_keeps_hostnames_readable() -> None:
    assert tunnel_hostname("Alice@Example.com").startswith("alice-example-com-")
    assert tunnel_hostname("日本語").startswith("user-")


def test_ids_that_slug_alike_still_get_different_hosts() -> None:
    ids = ["alice", "Alice", "ALICE", "alice.", "alice!", "al-ice", "al_ice", "a" * 100, "a" * 101]
    hosts = {tunnel_hostname(i) for i in ids}
    assert len(hosts) == len(ids)


def test_no_collisions_among_many_users() -> None:
    hosts = {tunnel_hostname(f"user-{n}") for n in range(20_000)}
    assert len(hosts) == 20_000


@pytest.mark.parametrize("bad", ["", None, 42])
def test_an_empty_or_non_string_user_id_is_refused(bad: object) -> None:
    with pytest.raises(ValueError):
        tunnel_hostname(bad)  # type: ignore[arg-type]
