"""studio_gateway.preview.tokens: signed tickets and cookies, and the one-time ticket ledger."""

from __future__ import annotations

import base64
import json

import pytest

from studio_gateway.preview.tokens import MAX_TOKEN_LENGTH, TicketLedger, TokenError, TokenSigner

KEY = b"k" * 32
NOW = 1_900_000_000.0


def signer() -> TokenSigner:
    return TokenSigner(KEY)


def test_a_ticket_verifies_with_its_user_label_path_and_expiry() -> None:
    ticket = signer().ticket("alice", "plabel", "/app?x=1", now=NOW, ttl=60)
    grant = signer().verify(ticket, "ticket", now=NOW + 59)
    assert (grant.kind, grant.user, grant.label, grant.path) == ("ticket", "alice", "plabel", "/app?x=1")
    assert grant.expires == NOW + 60 and grant.nonce


def test_every_ticket_has_its_own_nonce() -> None:
    first = signer().verify(signer().ticket("a", "l", "/", now=NOW, ttl=60), "ticket", now=NOW)
    second = signer().verify(signer().ticket("a", "l", "/", now=NOW, ttl=60), "ticket", now=NOW)
    assert first.nonce != second.nonce


def test_expired_tokens_are_refused_as_expired() -> None:
    ticket = signer().ticket("alice", "l", "/", now=NOW, ttl=60)
    with pytest.raises(TokenError) as caught:
        signer().verify(ticket, "ticket", now=NOW + 60)
    assert caught.value.reason == "expired"
    cookie = signer().cookie("alice", "l", now=NOW, ttl=3600)
    with pytest.raises(TokenError, match="expired"):
        signer().verify(cookie, "cookie", now=NOW + 3600)


def test_a_cookie_is_no_ticket_and_a_ticket_no_cookie() -> None:
    cookie = signer().cookie("alice", "l", now=NOW, ttl=3600)
    ticket = signer().ticket("alice", "l", "/", now=NOW, ttl=60)
    for token, wrong in ((cookie, "ticket"), (ticket, "cookie")):
        with pytest.raises(TokenError) as caught:
            signer().verify(token, wrong, now=NOW)  # type: ignore[arg-type]
        assert caught.value.reason == "invalid"


def _forge(token: str, **changes: object) -> str:
    version, payload, mac = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims.update(changes)
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{version}.{forged}.{mac}"


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: _forge(t, u="bob"),  # another user, old MAC
        lambda t: _forge(t, e=NOW + 10**9),  # a later expiry
        lambda t: TokenSigner(b"x" * 32).cookie("alice", "l", now=NOW, ttl=3600),  # another key
        lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"),  # a changed MAC
        lambda t: "v2" + t[2:],
        lambda t: t.split(".", 1)[1],
        lambda t: "",
        lambda t: "v1..",
        lambda t: "v1.bm90IGpzb24.é",  # non-ASCII MAC
        lambda t: t + "A" * MAX_TOKEN_LENGTH,
    ],
    ids=["user", "expiry", "key", "mac", "version", "no-version", "empty", "hollow", "non-ascii", "huge"],
)
def test_forged_or_malformed_cookies_are_invalid(mangle: object) -> None:
    cookie = signer().cookie("alice", "l", now=NOW, ttl=3600)
    with pytest.raises(TokenError) as caught:
        signer().verify(mangle(cookie), "cookie", now=NOW)  # type: ignore[operator]
    assert caught.value.reason == "invalid"


def test_the_ledger_takes_a_ticket_once_and_forgets_it_after_expiry() -> None:
    ledger = TicketLedger()
    grant = signer().verify(signer().ticket("alice", "l", "/", now=NOW, ttl=60), "ticket", now=NOW)
    ledger.redeem(grant, now=NOW)
    with pytest.raises(TokenError) as caught:
        ledger.redeem(grant, now=NOW + 30)
    assert caught.value.reason == "used"
    other = signer().verify(signer().ticket("alice", "l", "/", now=NOW + 61, ttl=60), "ticket", now=NOW + 61)
    ledger.redeem(other, now=NOW + 61)
    assert len(ledger) == 1  # the first one's nonce is gone: its ticket can no longer verify anyway
