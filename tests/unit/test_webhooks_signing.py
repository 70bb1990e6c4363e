"""Webhook pieces without I/O: signatures, the URL guard, the retry schedule, anchor keys."""

from __future__ import annotations

import hashlib
import hmac
import random
import time

import pytest

from studio_gateway.runs.processors.anchors import anchor_key
from studio_gateway.runs.processors.base import check_name
from studio_gateway.webhooks.processor import delivery_id
from studio_gateway.webhooks.scheduler import retry_delay
from studio_gateway.webhooks.signing import new_secret, sign, verify
from studio_gateway.webhooks.urls import UrlRefused, check_url, is_public_address


def test_signature_is_hmac_sha256_over_timestamp_dot_body() -> None:
    secret, body = new_secret(), b'{"id":"whd_1","type":"done"}'
    header = sign(secret, body, timestamp=1_700_000_000)
    expected = hmac.new(secret.encode(), b"1700000000." + body, hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={expected}"


def test_verify_accepts_a_fresh_signature_and_refuses_changes() -> None:
    secret, body = new_secret(), b'{"a":1}'
    header = sign(secret, body)
    assert verify(secret, body, header)
    assert not verify(secret, body + b" ", header)
    assert not verify(new_secret(), body, header)
    assert not verify(secret, body, header.replace("v1=", "v1=0"))
    assert not verify(secret, body, "garbage")
    old = sign(secret, body, timestamp=int(time.time()) - 3600)
    assert not verify(secret, body, old)  # a replay from an hour ago


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/x",
        "https://127.0.0.1/x",
        "https://localhost:8443/x",
        "https://api.localhost/x",
        "https://10.0.0.1/x",
        "https://192.168.1.1/x",
        "https://169.254.169.254/latest/meta-data",
        "https://[::1]/x",
        "https://[fd00::1]/x",
        "https://[::ffff:127.0.0.1]/x",
        "https://0.0.0.0/x",
        "https://user:pw@example.com/x",
        "gopher://example.com/",
        "https:///nohost",
        "",
    ],
)
def test_the_guard_refuses_by_default(url: str) -> None:
    with pytest.raises(UrlRefused):
        check_url(url, allow_http=False, allow_private=False)


def test_the_guard_accepts_public_https_and_what_the_settings_allow() -> None:
    assert check_url("https://hooks.example.com/x?y=1", allow_http=False, allow_private=False)
    assert check_url("https://93.184.216.34/x", allow_http=False, allow_private=False)
    assert check_url("http://127.0.0.1:9/x", allow_http=True, allow_private=True)
    with pytest.raises(UrlRefused):
        check_url("http://127.0.0.1:9/x", allow_http=False, allow_private=True)
    assert is_public_address("8.8.8.8") and not is_public_address("100.64.0.1")


def test_retry_delays_double_with_jitter_up_to_the_cap() -> None:
    rng = random.Random(7)
    for attempts, full in ((1, 5.0), (2, 10.0), (3, 20.0), (10, 600.0)):
        for _ in range(50):
            delay = retry_delay(attempts, 5.0, 600.0, rng)
            assert full / 2 <= delay <= full


def test_ids_and_keys_are_stable_and_kv_safe() -> None:
    assert delivery_id("wh_1", "run_a.1.3") == delivery_id("wh_1", "run_a.1.3")
    assert delivery_id("wh_1", "run_a.1.3") != delivery_id("wh_2", "run_a.1.3")
    assert anchor_key("counting", "run_a.1.3") == "counting.run_a.1.3"
    hashed = anchor_key("counting", "has space/ and * >")
    assert hashed.startswith("counting.h.") and " " not in hashed and "*" not in hashed
    assert check_name("webhooks") == "webhooks"
    with pytest.raises(ValueError):
        check_name("Bad.Name")
