"""contract.permissions: a daemon's grant covers exactly its own host's tunnel subjects."""

from __future__ import annotations

import pytest

import tunnel
from contract.permissions import PermissionGrant, daemon_permissions, tunnel_grant


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` one token, ``>`` one or more trailing tokens."""
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s) or (token != "*" and token != s[i]):
            return False
    return len(p) == len(s)


def allowed(patterns: tuple[str, ...], subject: str) -> bool:
    return any(matches(p, subject) for p in patterns)


def test_the_grant_is_exactly_the_tunnel_servers_subjects() -> None:
    subjects = tunnel.HostSubjects.for_host("desk-1")
    base = subjects.base
    grant = daemon_permissions("desk-1")
    assert grant.publish == (f"{base}.req.*.reply", f"{base}.req.*.reply.*")
    assert grant.subscribe == (
        f"{base}.request",
        f"{base}.req.*.abort",
        f"{base}.req.*.body",
        f"{base}.req.*.up.*",
        f"tunnel.v1_ready.{subjects.token}",  # outside the prefix on purpose (a tap must not hide it)
    )
    assert grant.as_claims() == {
        "pub": {"allow": list(grant.publish)},
        "sub": {"allow": list(grant.subscribe)},
    }


def test_what_a_server_does_for_its_own_host_is_allowed() -> None:
    subjects = tunnel.HostSubjects.for_host("desk-1")
    grant = daemon_permissions("desk-1")
    rid, server_id, client_id = "0123abcd", "s1", "c1"
    for subject in (
        subjects.request,
        subjects.all_aborts,
        subjects.body(rid),
        subjects.all_server_up(server_id),
        subjects.ready,
    ):
        assert allowed(grant.subscribe, subject), subject
    for subject in (subjects.reply(rid), subjects.client_reply(rid, client_id)):
        assert allowed(grant.publish, subject), subject


def test_nothing_of_another_host_or_outside_the_tunnel_is_allowed() -> None:
    other = tunnel.HostSubjects.for_host("desk-2")
    grant = daemon_permissions("desk-1")
    rid = "0123abcd"
    for subject in (
        other.request,
        other.abort(rid),
        other.body(rid),
        other.server_up(rid, "s1"),
        other.reply(rid),
        other.client_reply(rid, "c1"),
        other.ready,
        "_INBOX.abc",
        "$JS.API.INFO",
        "runs.x",
    ):
        assert not allowed(grant.subscribe, subject), subject
        assert not allowed(grant.publish, subject), subject
    # A daemon cannot publish requests (it would be calling, not serving) or aborts.
    own = tunnel.HostSubjects.for_host("desk-1")
    assert not allowed(grant.publish, own.request)
    assert not allowed(grant.publish, own.abort(rid))
    assert not any(">" in p for p in grant.publish + grant.subscribe)


def test_hostnames_are_case_insensitive_and_the_prefix_is_respected() -> None:
    assert daemon_permissions("Desk-1") == daemon_permissions("desk-1")
    custom = daemon_permissions("desk-1", "acme.tunnel")
    assert all(
        s.startswith(("acme.tunnel.host.", "acme.tunnel_ready.")) for s in custom.publish + custom.subscribe
    )


def test_extension_providers_add_subjects_under_the_hosts_own_prefix_only() -> None:
    def run_uplink(subjects: tunnel.HostSubjects) -> PermissionGrant:
        return PermissionGrant(publish=(f"{subjects.base}.runs.*.events",))

    grant = daemon_permissions("desk-1", extra=[run_uplink])
    base = tunnel.HostSubjects.for_host("desk-1").base
    assert grant.publish[-1] == f"{base}.runs.*.events"
    assert grant.subscribe == tunnel_grant(tunnel.HostSubjects.for_host("desk-1")).subscribe

    def escaping(_: tunnel.HostSubjects) -> PermissionGrant:
        return PermissionGrant(subscribe=("_tunnel.v1.host.*.request",))

    with pytest.raises(ValueError, match="outside host prefix"):
        daemon_permissions("desk-1", extra=[escaping])


def test_grants_merge_without_repeats() -> None:
    a = PermissionGrant(("x.a", "x.b"), ("y.a",))
    b = PermissionGrant(("x.b", "x.c"), ("y.a", "y.b"))
    assert a + b == PermissionGrant(("x.a", "x.b", "x.c"), ("y.a", "y.b"))
