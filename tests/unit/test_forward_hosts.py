"""linkctl forward's Host check (DNS rebinding): which names pass, with and without --allow-host."""

from __future__ import annotations

import h11
import pytest

from cli.local_proxy import _unexpected_host


def request(host: str) -> h11.Request:
    return h11.Request(method="GET", target="/", headers=[("Host", host)])


@pytest.mark.parametrize(
    "host", ["localhost", "LOCALHOST:3000", "vite.localhost:5173", "127.0.0.1", "[::1]:80", "10.0.0.7"]
)
def test_loopback_names_and_ip_literals_always_pass(host: str) -> None:
    assert _unexpected_host(request(host), frozenset()) is None


def test_other_names_are_refused_unless_allowed() -> None:
    assert _unexpected_host(request("Dev.Example:8080"), frozenset()) == "dev.example"
    assert _unexpected_host(request("dev.example:8080"), frozenset({"dev.example"})) is None
    assert _unexpected_host(request("anything.example"), frozenset({"*"})) is None
