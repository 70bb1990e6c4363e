"""``linkd doctor``'s clock check, line format and crash guard, with JWTs the test makes (no network)."""

from __future__ import annotations

import json

import pytest

import linkd.doctor as doctor_module
from contract.nats_jwt import b64url
from linkd.config import Settings
from linkd.doctor import CHECKS, CLOCK_FIX, Check, clock_check, run_checks
from tests.linkd_support import MemoryKeyring, isolated_env

__all__ = ["isolated_env"]

NOW = 1_800_000_000.0


def jwt(**claims: object) -> str:
    """An unsigned JWT with these claims: the check only reads iat and exp."""
    header = b64url(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    return f"{header}.{b64url(json.dumps(claims).encode())}.sig"


def test_an_iat_in_the_future_means_the_local_clock_is_behind() -> None:
    check = clock_check(jwt(iat=int(NOW) + 3600, exp=int(NOW) + 7200), None, NOW)
    assert check.status == "fail" and check.fix == CLOCK_FIX
    assert check.detail.startswith("this computer's clock is 3600 s behind the gateway's (the session JWT")


def test_an_old_iat_means_the_local_clock_is_ahead_and_small_skew_is_ok() -> None:
    ahead = clock_check(jwt(iat=int(NOW) - 120, exp=int(NOW) + 3600), None, NOW)
    assert ahead.status == "fail" and "120 s ahead of" in ahead.detail
    warn = clock_check(jwt(iat=int(NOW) - 30, exp=int(NOW) + 3600), None, NOW)
    assert warn.status == "warn" and warn.fix == CLOCK_FIX
    ok = clock_check(jwt(iat=int(NOW) - 1, exp=int(NOW) + 3600), None, NOW)
    assert ok == Check("clock", "ok", "within 1 s of the gateway's clock")


def test_an_expired_fresh_credential_fails() -> None:
    check = clock_check(jwt(iat=int(NOW) - 5, exp=int(NOW) - 1), None, NOW)
    assert check.status == "fail" and "already expired" in check.detail


def test_the_date_header_counts_too_and_the_elapsed_time_is_taken_off() -> None:
    check = clock_check(None, NOW + 600, NOW)
    assert check.status == "fail" and "600 s behind the gateway's HTTP Date header" in check.detail
    # The Date arrived 100 s before "now" (a slow check): not skew.
    assert clock_check(None, NOW - 100, NOW, date_offset=100).status == "ok"
    # The larger of the two offsets decides.
    both = clock_check(jwt(iat=int(NOW)), NOW - 900, NOW)
    assert both.status == "fail" and "ahead of the gateway's HTTP Date header" in both.detail


def test_nothing_to_compare_is_a_skip() -> None:
    assert clock_check(None, None, NOW).status == "skip"
    assert clock_check("not a jwt", None, NOW).status == "skip"


def test_one_line_per_check() -> None:
    assert Check("upstream", "warn", "down", "start it").line() == "WARN  upstream  down; fix: start it"
    assert Check("login", "ok", "fine").line() == "ok    login     fine"


async def test_a_crashing_check_is_a_failed_line_and_the_rest_still_run(
    isolated_env: MemoryKeyring, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> tuple[bool, str]:
        raise RuntimeError("keyring exploded")

    monkeypatch.setattr(doctor_module, "keyring_usable", broken)
    checks = await run_checks(Settings())
    assert [c.name for c in checks] == list(CHECKS)
    assert checks[0] == Check(
        "keyring", "fail", "the check itself failed (RuntimeError: keyring exploded)", "report this"
    )
    assert checks[1].status == "fail" and checks[1].detail == "no gateway URL: not logged in"
    assert {c.status for c in checks[2:]} == {"skip"}
