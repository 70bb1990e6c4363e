"""``tunnel.connect.redact_url``: server URLs in logs and errors never carry their user info."""

from __future__ import annotations

import pytest

from tunnel.connect import redact_url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("nats://alice:pw@host:4222", "nats://***@host:4222"),
        ("nats://s3cr3t-token@host", "nats://***@host"),
        ("tls://user@[::1]:4222", "tls://***@[::1]:4222"),
        ("ws://tok@host/path@odd", "ws://***@host/path@odd"),
        ("user:pw@host:4222", "***@host:4222"),
        ("nats://host:4222", "nats://host:4222"),
        ("host:4222", "host:4222"),
    ],
)
def test_user_info_is_replaced_and_the_rest_kept(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_a_password_containing_at_signs_is_fully_hidden() -> None:
    redacted = redact_url("nats://u:p@ss@word@host:4222")
    assert redacted == "nats://***@host:4222"
    assert "ss" not in redacted and "word" not in redacted
