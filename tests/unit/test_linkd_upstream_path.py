"""The upstream proxy's pure request checks: target normaliser, Content-Length, response head."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from linkd.upstream_body import BodyLengthMismatch, declared_length, length_checked
from linkd.upstream_path import InvalidTarget, check_target, decoded_paths
from linkd.upstream_response import BadUpstreamResponse, checked_response_headers


@pytest.mark.parametrize(
    "target",
    [
        "/..",
        "/.",
        "/a/./b",
        "/a/../b",
        "/%2e%2e/x",
        "/%2E%2e/x",
        "/.%2e/x",
        "/%2e%2e%2fx",
        "/a/%2e%2e%2f%2e%2e%2fx",
        "/%252e%252e/x",
        "/%25252e%25252e/x",
        "/..\\x",
        "/\\..\\x",
        "/a/..%5c..%5cx",
        "/%5C",
        "/%00",
        "/x%00y",
        "/x%0d%0aHost:%20evil",
        "/x%7f",
        "/%2500",
        "/..;/x",
        "/%2e%2e;jsessionid=1/x",
        "//evil.example/x",
        "///evil/x",
        "http://evil/x",
        "x",
        "*",
        "",
        "/x y",
        "/x\ty",
        "/x#frag",
        "/x\x00",
        "/\ud800",
        "/%2525252e%2525252e/x",  # nested deeper than anyone legitimate encodes
    ],
)
def test_unsafe_targets_are_refused(target: str) -> None:
    with pytest.raises(InvalidTarget):
        check_target(target)


@pytest.mark.parametrize(
    ("target", "raw"),
    [
        ("/", b"/"),
        ("/x?y=1", b"/x?y=1"),
        ("/a/b.c/..d/e..", b"/a/b.c/..d/e.."),
        ("/files/a%2Fb", b"/files/a%2Fb"),  # an encoded slash without dots is a legitimate name
        ("/x?next=/../../y", b"/x?next=/../../y"),  # the query is opaque
        ("/x?re=\\d", b"/x?re=\\d"),
        ("/@evil.example/x", b"/@evil.example/x"),
        ("/http://evil/x", b"/http://evil/x"),
        ("/caf\xe9", b"/caf%C3%A9"),
        ("/100%", b"/100%"),
    ],
)
def test_safe_targets_pass_unchanged_but_for_non_ascii(target: str, raw: bytes) -> None:
    assert check_target(target) == raw


def test_decoded_paths_lists_each_decoding_until_stable() -> None:
    assert decoded_paths("/a") == [b"/a"]
    assert decoded_paths("/%252e") == [b"/%252e", b"/%2e", b"/."]


def test_declared_length() -> None:
    assert declared_length([(b"Accept", b"*/*")]) is None
    assert declared_length([(b"content-length", b" 12 ")]) == 12
    for bad in ([b"-1"], [b"1e3"], [b"+5"], [b"\xd9\xa1"], [b"9" * 19], [b"1", b"1"]):
        with pytest.raises(ValueError):
            declared_length([(b"Content-Length", v) for v in bad])


async def _blocks(*blocks: bytes) -> AsyncIterator[bytes]:
    for block in blocks:
        yield block


async def _drain(stream: AsyncIterator[bytes]) -> list[bytes]:
    out: list[bytes] = []
    try:
        async for block in stream:
            out.append(block)
    except BodyLengthMismatch:
        out.append(b"<mismatch>")
    return out


async def test_length_checked_passes_an_exact_body_and_never_completes_a_wrong_one() -> None:
    assert await _drain(length_checked(_blocks(b"ab", b"", b"c"), 3)) == [b"ab", b"c"]
    assert await _drain(length_checked(None, 0)) == []
    assert await _drain(length_checked(None, 2)) == [b"<mismatch>"]
    assert await _drain(length_checked(_blocks(b"ab"), 3)) == [b"ab", b"<mismatch>"]
    # Longer: the block that would complete the declared length is never handed on.
    assert await _drain(length_checked(_blocks(b"ab", b"c", b"d"), 3)) == [b"ab", b"<mismatch>"]
    assert await _drain(length_checked(_blocks(b"abcd"), 3)) == [b"<mismatch>"]


def test_response_heads_the_tunnel_cannot_carry_are_refused() -> None:
    ok = [("Content-Type", "text/plain"), ("X-Latin", "caf\xe9")]
    assert checked_response_headers(ok) == ok
    for bad in (
        [(f"X-{i}", "v") for i in range(513)],
        [("X-Huge", "v" * (64 * 1024 + 1))],
        [("Bad Name", "v")],
        [("X-Nul", "a\x00b")],
    ):
        with pytest.raises(BadUpstreamResponse):
            checked_response_headers(bad)
