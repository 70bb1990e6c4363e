"""Subject naming: host tokens, the per-host prefix, wildcards and subject parsing."""

from __future__ import annotations

import base64
import re
from typing import Any

import pytest

from tunnel._errors import LocalProtocolError
from tunnel._subjects import (
    DEFAULT_PREFIX,
    LEGACY_PREFIX,
    MAX_HOSTNAME_LENGTH,
    HostSubjects,
    client_reply_wildcard,
    host_token,
    hostname_from_token,
    is_valid_request_id,
    new_endpoint_id,
    new_request_id,
    normalize_hostname,
    parse_request_subject,
    validate_prefix,
)

RID = "0123456789abcdef0123456789abcdef"
OTHER_RID = "fedcba9876543210fedcba9876543210"
CLIENT = "c0ffee00c0ffee00"
SERVER = "5e4e4e4e5e4e4e4e"
TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]+$")


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` is one token, a final ``>`` is one or more tokens."""
    pattern_tokens, subject_tokens = pattern.split("."), subject.split(".")
    for i, token in enumerate(pattern_tokens):
        if token == ">":
            return len(subject_tokens) > i
        if i >= len(subject_tokens) or (token != "*" and token != subject_tokens[i]):
            return False
    return len(pattern_tokens) == len(subject_tokens)


def test_subject_matcher_helper_follows_nats_rules() -> None:
    assert subject_matches("a.*.c", "a.b.c")
    assert not subject_matches("a.*.c", "a.b.c.d")
    assert subject_matches("a.>", "a.b.c")
    assert not subject_matches("a.>", "a")
    assert not subject_matches("a.b", "a.c")


# --------------------------------------------------------------------------- host tokens


@pytest.mark.parametrize(
    ("hostname", "token"),
    [
        ("desk.example", "ZGVzay5leGFtcGxl"),
        ("a", "YQ"),
        ("ab", "YWI"),
        ("abc", "YWJj"),
        ("aa~", "YWF-"),  # standard base64 would be "YWF+"
        ("\u043f\u0440\u0438", "0L_RgNC4"),  # standard base64 would be "0L/RgNC4"
    ],
)
def test_host_token_is_base64url_of_utf8_without_padding(hostname: str, token: str) -> None:
    assert host_token(hostname) == token


@pytest.mark.parametrize(
    "hostname",
    ["desk.example", "my-laptop.local", "b\u00fccher.example", "x" * MAX_HOSTNAME_LENGTH, "a.b.c.d"],
)
def test_host_token_is_subject_safe_and_reversible(hostname: str) -> None:
    token = host_token(hostname)
    assert TOKEN_RE.match(token)
    assert "=" not in token and "." not in token
    expected = base64.urlsafe_b64encode(hostname.lower().encode("utf-8")).rstrip(b"=").decode()
    assert token == expected
    assert hostname_from_token(token) == hostname.lower()


def test_host_token_is_case_insensitive() -> None:
    tokens = {host_token(name) for name in ("desk.example", "Desk.Example", "DESK.EXAMPLE", "dEsK.eXaMpLe")}
    assert tokens == {host_token("desk.example")}
    assert HostSubjects.for_host("Desk.Example") == HostSubjects.for_host("desk.example")
    assert host_token("B\u00dcCHER.example") == host_token("b\u00fccher.example")


@pytest.mark.parametrize(
    "hostname",
    [
        "",
        " ",
        "   \t ",
        "\n",
        "desk\x00example",
        "desk\nexample",
        "desk\rexample",
        "desk\x7fexample",
        "desk\x1bexample",
        "de sk",
        "desk/example",
        "desk?x",
        "desk#x",
        "user@desk",
        "x" * (MAX_HOSTNAME_LENGTH + 1),
    ],
)
def test_empty_blank_or_control_character_hostnames_are_rejected(hostname: str) -> None:
    with pytest.raises(LocalProtocolError):
        host_token(hostname)
    with pytest.raises(LocalProtocolError):
        HostSubjects.for_host(hostname)


@pytest.mark.parametrize("hostname", [None, 123, b"desk.example"])
def test_non_string_hostnames_are_rejected(hostname: Any) -> None:
    with pytest.raises(LocalProtocolError):
        normalize_hostname(hostname)


def test_invalid_host_token_cannot_be_reversed() -> None:
    with pytest.raises(LocalProtocolError):
        hostname_from_token("_w")  # decodes to a byte that is not UTF-8


# --------------------------------------------------------------------------- prefixes and builders


def test_default_prefix_is_the_reference_one() -> None:
    assert DEFAULT_PREFIX == "tunnel.v1"  # the current reference; older ones used LEGACY_PREFIX


@pytest.mark.parametrize(
    "prefix", ["", ".", "a.", ".a", "a..b", "a.*", "a.>", "a b", "a\nb", "tunnel.v1\n", "tunnel.v1.*"]
)
def test_invalid_prefixes_are_rejected(prefix: str) -> None:
    with pytest.raises(LocalProtocolError):
        validate_prefix(prefix)
    with pytest.raises(LocalProtocolError):
        HostSubjects.for_host("desk.example", prefix)


def test_subject_builders_follow_the_reference_layout() -> None:
    s = HostSubjects.for_host("desk.example")
    p = "tunnel.v1.host.ZGVzay5leGFtcGxl"
    assert s.base == p
    assert HostSubjects.for_host("desk.example", LEGACY_PREFIX).base == "_" + p
    assert s.request == f"{p}.request"
    assert s.queue_group == "tunnel_v1_host_ZGVzay5leGFtcGxl"
    assert s.body(RID) == f"{p}.req.{RID}.body"
    assert s.reply(RID) == f"{p}.req.{RID}.reply"
    assert s.abort(RID) == f"{p}.req.{RID}.abort"
    assert s.all_aborts == f"{p}.req.*.abort"
    assert s.client_reply(RID, CLIENT) == f"{p}.req.{RID}.reply.{CLIENT}"
    assert s.server_up(RID, SERVER) == f"{p}.req.{RID}.up.{SERVER}"
    assert s.all_server_up(SERVER) == f"{p}.req.*.up.{SERVER}"
    assert s.all_subjects == f"{p}.>"


def test_prefix_without_leading_underscore_is_supported() -> None:
    s = HostSubjects.for_host("desk.example", "tunnel.v1")
    assert s.request == "tunnel.v1.host.ZGVzay5leGFtcGxl.request"
    assert s.abort(RID) == f"tunnel.v1.host.ZGVzay5leGFtcGxl.req.{RID}.abort"


def _all_subjects(s: HostSubjects, rid: str = RID) -> list[str]:
    return [
        s.request,
        s.body(rid),
        s.reply(rid),
        s.abort(rid),
        s.client_reply(rid, CLIENT),
        s.server_up(rid, SERVER),
    ]


def test_every_subject_of_a_host_is_covered_by_its_one_wildcard() -> None:
    s = HostSubjects.for_host("desk.example")
    for subject in _all_subjects(s):
        assert subject_matches(s.all_subjects, subject), subject
    other = HostSubjects.for_host("other.example")
    for subject in _all_subjects(other):
        assert not subject_matches(s.all_subjects, subject), subject


def test_abort_and_up_wildcards_match_their_subjects_only() -> None:
    s = HostSubjects.for_host("desk.example")
    assert subject_matches(s.all_aborts, s.abort(RID))
    assert subject_matches(s.all_aborts, s.abort(OTHER_RID))
    assert not subject_matches(s.all_aborts, s.reply(RID))
    assert subject_matches(s.all_server_up(SERVER), s.server_up(RID, SERVER))
    assert not subject_matches(s.all_server_up(SERVER), s.server_up(RID, "someoneelse"))
    assert not subject_matches(s.all_server_up(SERVER), s.body(RID))


# --------------------------------------------------------------------------- client reply wildcard


def test_client_reply_wildcard_matches_its_replies_for_every_host_and_request() -> None:
    wildcard = client_reply_wildcard(DEFAULT_PREFIX, CLIENT)
    for hostname in ("desk.example", "other.example", "b\u00fccher.example"):
        s = HostSubjects.for_host(hostname)
        for rid in (RID, OTHER_RID, new_request_id()):
            assert subject_matches(wildcard, s.client_reply(rid, CLIENT))


def test_client_reply_wildcard_matches_nothing_else() -> None:
    wildcard = client_reply_wildcard(DEFAULT_PREFIX, CLIENT)
    s = HostSubjects.for_host("desk.example")
    assert not subject_matches(wildcard, s.client_reply(RID, "anotherclient"))
    for subject in (s.request, s.body(RID), s.reply(RID), s.abort(RID), s.server_up(RID, CLIENT)):
        assert not subject_matches(wildcard, subject), subject
    other_prefix = HostSubjects.for_host("desk.example", LEGACY_PREFIX)
    assert not subject_matches(wildcard, other_prefix.client_reply(RID, CLIENT))


# --------------------------------------------------------------------------- parsing


def test_parse_request_subject_splits_every_per_request_subject() -> None:
    s = HostSubjects.for_host("desk.example")
    token = s.token
    assert parse_request_subject(s.body(RID), DEFAULT_PREFIX) == (token, RID, "body")
    assert parse_request_subject(s.reply(RID), DEFAULT_PREFIX) == (token, RID, "reply")
    assert parse_request_subject(s.abort(RID), DEFAULT_PREFIX) == (token, RID, "abort")
    assert parse_request_subject(s.client_reply(RID, CLIENT), DEFAULT_PREFIX) == (token, RID, "reply")
    assert parse_request_subject(s.server_up(RID, SERVER), DEFAULT_PREFIX) == (token, RID, "up")


def test_parse_request_subject_with_a_custom_prefix() -> None:
    s = HostSubjects.for_host("desk.example", LEGACY_PREFIX)
    assert parse_request_subject(s.abort(RID), LEGACY_PREFIX) == (s.token, RID, "abort")
    assert parse_request_subject(s.abort(RID), DEFAULT_PREFIX) is None


@pytest.mark.parametrize(
    "subject",
    [
        "tunnel.v1.host.ZGVzay5leGFtcGxl.request",
        "tunnel.v1.host.ZGVzay5leGFtcGxl",
        "tunnel.v1.host.ZGVzay5leGFtcGxl.req",
        f"tunnel.v1.host.ZGVzay5leGFtcGxl.req.{RID}",
        f"tunnel.v1.host.ZGVzay5leGFtcGxl.rq.{RID}.reply",
        f"other.v1.host.ZGVzay5leGFtcGxl.req.{RID}.reply",
        f"tunnel.v1.hosts.ZGVzay5leGFtcGxl.req.{RID}.reply",
        "",
    ],
)
def test_parse_request_subject_rejects_other_shapes(subject: str) -> None:
    assert parse_request_subject(subject, DEFAULT_PREFIX) is None


# --------------------------------------------------------------------------- ownership


def test_owns_every_subject_under_the_host_prefix() -> None:
    s = HostSubjects.for_host("desk.example")
    for subject in _all_subjects(s):
        assert s.owns(subject), subject


def test_owns_nothing_outside_the_host_prefix() -> None:
    s = HostSubjects.for_host("desk.example")
    longer = HostSubjects(s.prefix, s.token + "x")  # a token that merely starts with ours
    other_prefix = HostSubjects.for_host("desk.example", LEGACY_PREFIX)
    for subject in [
        s.base,
        s.base + "x.req.a.reply",
        *_all_subjects(HostSubjects.for_host("other.example")),
        *_all_subjects(longer),
        *_all_subjects(other_prefix),
        "_INBOX.abc",
        "",
    ]:
        assert not s.owns(subject), subject


# --------------------------------------------------------------------------- ids


def test_request_and_endpoint_ids_are_random_and_subject_safe() -> None:
    ids = {new_request_id() for _ in range(100)}
    assert len(ids) == 100
    for rid in ids:
        assert re.fullmatch(r"[0-9a-f]{32}", rid)
        assert is_valid_request_id(rid)
    endpoints = {new_endpoint_id() for _ in range(100)}
    assert len(endpoints) == 100
    assert all(TOKEN_RE.match(e) for e in endpoints)


@pytest.mark.parametrize("rid", ["", "a.b", "a*", ">", "a b", "a\n", "x" * 129, None, 5, ["a"]])
def test_invalid_request_ids_are_refused(rid: Any) -> None:
    assert not is_valid_request_id(rid)


@pytest.mark.parametrize("rid", ["a", "A-z_0", "x" * 128, RID])
def test_valid_request_ids_are_accepted(rid: str) -> None:
    assert is_valid_request_id(rid)


def test_a_reply_subject_is_the_requests_reply_or_reply_with_one_token() -> None:
    subjects = HostSubjects.for_host("desk.example")
    rid = "0123456789abcdef0123456789abcdef"
    base = f"{subjects.base}.req.{rid}"
    for ok in (
        f"{base}.reply",
        f"{base}.reply.c11e47",
        subjects.client_reply(rid, "c1"),
        subjects.reply(rid),
    ):
        assert subjects.reply_subject_ok(ok, rid), ok
    for bad in (
        f"{base}.abort",  # the request's own abort subject: every server would read the answer
        f"{base}.body",
        f"{base}.up.s1",
        f"{base}.reply.a.b",
        f"{base}.reply.*",
        f"{base}.replyx",
        f"{subjects.base}.req.other.reply",
        "_INBOX.x",
    ):
        assert not subjects.reply_subject_ok(bad, rid), bad
