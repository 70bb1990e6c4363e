"""The discovery names and grant (contract.discovery) and linkd's check of a credential for them."""

from __future__ import annotations

from nats.micro.service import NAME_REGEX, SEMVER_REGEX

import tunnel
from contract.discovery import (
    GATEWAY_SERVICE,
    desktop_service_name,
    discovery_grant,
    service_version,
    status_subject,
)
from contract.permissions import daemon_permissions
from linkd.discovery import discovery_permitted
from linkd.session import LinkSession
from studio_gateway import nats_jwt
from tests.unit.test_gateway_permissions import allowed


def test_service_names_are_valid_micro_names_and_one_per_host() -> None:
    names = {desktop_service_name(h) for h in ("alice-k3v9", "bob-x1", "desk.example", "Desk.Example")}
    assert len(names) == 3  # hostnames are case-insensitive, as the tunnel's
    assert all(NAME_REGEX.match(n) for n in names)


def test_a_desktop_may_publish_only_its_own_name_and_the_gateways_ping_and_info() -> None:
    alice, bob = discovery_grant("alice-1"), discovery_grant("bob-2")
    mine, theirs = desktop_service_name("alice-1"), desktop_service_name("bob-2")
    assert set(alice.publish) & set(bob.publish) == {s for s in alice.publish if GATEWAY_SERVICE in s}
    assert all(
        mine in s or GATEWAY_SERVICE in s or s.startswith(tunnel.DEFAULT_PREFIX) for s in alice.publish
    )
    assert not any(theirs in s for s in (*alice.publish, *alice.subscribe))
    # No broadcast publish (it would reach every desktop), no gateway STATS (all tenants' counts).
    assert not {"$SRV.PING", "$SRV.INFO", "$SRV.STATS", ">", "$SRV.>"} & set(alice.publish)
    assert not any(s.startswith(f"$SRV.STATS.{GATEWAY_SERVICE}") for s in alice.publish)
    # It answers broadcasts (operators) and its own name; its status endpoint is under its host.
    assert {"$SRV.PING", "$SRV.INFO", "$SRV.STATS"} <= set(alice.subscribe)
    for subject in (f"$SRV.PING.{mine}", f"$SRV.INFO.{mine}.x", f"$SRV.STATS.{mine}.*"):
        assert allowed(alice.subscribe, subject) and allowed(alice.publish, subject), subject
        assert not allowed(bob.subscribe, subject) and not allowed(bob.publish, subject), subject
    status = status_subject(tunnel.HostSubjects.for_host("alice-1"))
    assert tunnel.HostSubjects.for_host("alice-1").owns(status) and status in alice.subscribe


def test_service_versions_are_semver() -> None:
    assert service_version("1.2.3") == "1.2.3"
    for odd in ("0.1.dev3+g1234", "unknown", "2.0"):
        assert SEMVER_REGEX.match(service_version(odd)), odd


def _session(permissions: dict[str, object] | None, hostname: str = "alice-1") -> LinkSession:
    key = nats_jwt.new_key(nats_jwt.KeyKind.USER)
    account = nats_jwt.new_key(nats_jwt.KeyKind.ACCOUNT)
    claims = nats_jwt.user_claims(key.public_key, "t", permissions=permissions)
    jwt = nats_jwt.encode_jwt(claims, account.keypair())
    return LinkSession(hostname, ("nats://x:4222",), (), jwt=jwt)


def test_linkd_serves_discovery_only_with_a_credential_that_allows_it() -> None:
    old = daemon_permissions("alice-1")
    assert not discovery_permitted(_session(old.as_claims()))
    assert discovery_permitted(_session((discovery_grant("alice-1") + old).as_claims()))
    assert not discovery_permitted(_session((discovery_grant("bob-2") + old).as_claims()))
    assert discovery_permitted(_session(None))  # everything in the account
    assert discovery_permitted(LinkSession("alice-1", ("nats://x:4222",), (), token="t"))  # token mode
