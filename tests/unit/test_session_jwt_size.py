"""A minted desktop credential must fit in nats-server's CONNECT line.

nats-py sends the whole user JWT in CONNECT, and nats-server refuses a control line over
``max_control_line`` (4 KiB by default) with "maximum control line exceeded": the daemon then
never connects. Every grant repeats the host token, so the longest hostname the gateway makes
(a 40-character slug and a 12-character tag) is the worst case. Found when the readiness
subject pushed a 46-character hostname over the limit (scripts/bench_runs.py).
"""

from __future__ import annotations

import json

from contract.discovery import discovery_grant
from contract.permissions import DEFAULT_GRANTS, daemon_permissions
from studio_gateway import nats_jwt
from studio_gateway.hostnames import HASH_LENGTH, MAX_SLUG_LENGTH, tunnel_hostname
from studio_gateway.sessions import DAEMON_USER_LIMITS, RESPONSE_PERMISSION

NATS_SERVER_DEFAULT_MAX_CONTROL_LINE = 4096
# Room for what a client may add to CONNECT beyond the fields below (a longer name, TLS flags).
MARGIN = 256


def _connect_line(hostname: str) -> str:
    """The CONNECT line nats-py sends with the credential the gateway mints for ``hostname``."""
    account = nats_jwt.new_key(nats_jwt.KeyKind.ACCOUNT)
    user = nats_jwt.new_key(nats_jwt.KeyKind.USER)
    grant = discovery_grant(hostname) + daemon_permissions(hostname, extra=DEFAULT_GRANTS)
    claims = nats_jwt.user_claims(
        user.public_key,
        f"linkd {hostname}",
        issuer_account=account.public_key,
        permissions=grant.as_claims(),
        expires_at=2_000_000_000,
        allowed_connection_types=["STANDARD", "WEBSOCKET"],
        tags=[f"host:{hostname}"],
        limits=DAEMON_USER_LIMITS,
    )
    claims["nats"]["resp"] = dict(RESPONSE_PERMISSION)
    options = {
        "verbose": False,
        "pedantic": False,
        "lang": "python3",
        "version": "2.16.0",
        "protocol": 1,
        "headers": True,
        "no_responders": True,
        "echo": True,
        "tls_required": False,
        "name": f"linkd {hostname}",
        "jwt": nats_jwt.encode_jwt(claims, account.keypair()),
        "sig": "s" * 86,  # an Ed25519 signature of the nonce, base64url
    }
    return f"CONNECT {json.dumps(options, sort_keys=True)}\r\n"  # nats-py's separators


def test_the_longest_gateway_hostname_fits_a_default_connect_line() -> None:
    hostname = tunnel_hostname("a" * 80 + "@example.com")
    assert len(hostname) == MAX_SLUG_LENGTH + 1 + HASH_LENGTH
    line = _connect_line(hostname)
    assert len(line) <= NATS_SERVER_DEFAULT_MAX_CONTROL_LINE - MARGIN, len(line)
