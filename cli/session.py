"""``linkctl session``: ask the gateway for a link session and show what it grants.

The answer of ``POST /api/links/session`` plus the decoded claims of its NATS user JWT:
publish/subscribe allow lists, expiry (relative and absolute), allowed connection types.
Secrets (the seed inside ``creds``, a token-mode ``token``) are masked unless
``--show-secrets``; the JWT alone is not a secret (it is useless without the seed).
"""

from __future__ import annotations

import copy
import json
import sys
import time
from datetime import UTC, datetime
from typing import Annotated, Any, Final

import typer

from contract.nats_jwt import JwtError, decode_jwt
from contract.permissions import PermissionGrant
from contract.routes import SESSION_PATH

from . import exitcodes
from .common import CliError, run
from .gateway_api import (
    DEFAULT_GATEWAY,
    GatewayClient,
    GatewayOpt,
    GatewayOptions,
    GatewayTokenOpt,
    LegacyTokenOpt,
)
from .term import Painter

__all__ = ["decoded_claims", "mask", "masked_session", "register", "relative"]

MASK: Final = "********"

EPILOG: Final = """\b
Examples:
  linkctl session                                   # LINKCTL_GATEWAY and LINKCTL_TOKEN from the environment
  linkctl session --gateway http://127.0.0.1:8080 --json | jq .claims.nats.pub
  linkctl session --public-key UABC...              # sign for a key you keep (no seed in the answer)
  linkctl session --show-secrets --json | jq -r .credentials.creds > desk.creds

\b
Exit status:
     0  the gateway issued a session
     2  usage error; the gateway unreachable or refusing the token; bad --public-key
     3  the gateway answered an error (e.g. 503 tunnel_disabled, nats_unavailable)
"""


def mask(secret: object) -> str:
    if not isinstance(secret, str) or not secret:
        return MASK
    return f"{MASK} ({len(secret)} characters)"


def masked_session(session: dict[str, Any]) -> dict[str, Any]:
    doc = copy.deepcopy(session)
    creds = doc.get("credentials")
    if isinstance(creds, dict):
        for key in ("creds", "seed"):
            if key in creds:
                creds[key] = mask(creds[key])
    if "token" in doc and doc["token"] is not None:
        doc["token"] = mask(doc["token"])
    return doc


def relative(seconds: float) -> str:
    """``in 59 min 58 s`` / ``3 min 2 s ago``."""
    whole = int(abs(seconds))
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{days} d"] if days else []
    if hours:
        parts.append(f"{hours} h")
    if minutes and not days:
        parts.append(f"{minutes} min")
    if not days and not hours:
        parts.append(f"{secs} s")
    text = " ".join(parts)
    return f"in {text}" if seconds >= 0 else f"{text} ago"


def _absolute(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def decoded_claims(session: dict[str, Any]) -> dict[str, Any] | None:
    """The JWT's claims (signature checked against its issuer), or None when there is no JWT."""
    creds = session.get("credentials")
    jwt = creds.get("jwt") if isinstance(creds, dict) else None
    if not isinstance(jwt, str):
        return None
    try:
        return decode_jwt(jwt)
    except JwtError as exc:
        raise CliError(f"the session's JWT cannot be decoded: {exc}", exitcodes.GATEWAY_ERROR) from None


def render(session: dict[str, Any], claims: dict[str, Any] | None, paint: Painter, now: float) -> str:
    conn = session.get("connection") if isinstance(session.get("connection"), dict) else {}
    assert isinstance(conn, dict)
    lines = [f"Link session for {paint(str(session.get('tunnelHostname')), 'bold')}"]

    def row(name: str, value: str) -> None:
        lines.append(f"  {paint(name.ljust(17), 'dim')} {value}")

    row("NATS URLs", ", ".join(map(str, conn.get("urls") or [])) or "-")
    row("connection types", ", ".join(map(str, conn.get("allowedConnectionTypes") or [])) or "-")
    row("tunnel prefix", str(conn.get("tunnelPrefix") or "-"))
    expires = session.get("expiresAt")
    if isinstance(expires, str):
        try:
            moment = datetime.strptime(expires, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
            row("expires", f"{relative(moment - now)} ({expires})")
        except ValueError:
            row("expires", expires)
    else:
        row("expires", "never (token mode)")
    if "token" in session:
        row("NATS token", str(session["token"]))
    creds = session.get("credentials")
    if isinstance(creds, dict):
        if "creds" in creds:
            masked = str(creds["creds"]).startswith(MASK)
            row("creds file", str(creds["creds"]) if masked else "(printed below: JWT + seed)")
        else:
            row("seed", "kept by you (the gateway signed your --public-key)")
    if claims is None:
        return "\n".join(lines)
    nats = claims.get("nats", {})
    lines.append(paint("NATS user JWT claims", "bold"))
    row("subject (user)", str(claims.get("sub")))
    row("name", str(claims.get("name")))
    row("issuer", str(claims.get("iss")))
    if nats.get("issuer_account"):
        row("issuer account", str(nats["issuer_account"]))
    if isinstance(claims.get("iat"), int):
        row("issued", f"{relative(claims['iat'] - now)} ({_absolute(claims['iat'])})")
    if isinstance(claims.get("exp"), int):
        row("expires", f"{relative(claims['exp'] - now)} ({_absolute(claims['exp'])})")
    row("connection types", ", ".join(nats.get("allowed_connection_types") or []) or "any")
    if nats.get("tags"):
        row("tags", ", ".join(map(str, nats["tags"])))
    grant = PermissionGrant.from_claims(nats)
    for allowed, label in ((grant.publish, "publish allow"), (grant.subscribe, "subscribe allow")):
        if not allowed:
            row(label, "(everything in the account)")
        for i, subject in enumerate(allowed):
            row(label if i == 0 else "", subject)
    resp = nats.get("resp")
    if isinstance(resp, dict):
        row("responses", f"max {resp.get('max')}, ttl {resp.get('ttl')}")
    if (
        isinstance(creds, dict)
        and isinstance(creds.get("creds"), str)
        and not creds["creds"].startswith(MASK)
    ):
        lines += ["", creds["creds"].rstrip("\n")]
    return "\n".join(lines)


async def _session(options: GatewayOptions, public_key: str | None) -> dict[str, Any]:
    body = {"publicKey": public_key} if public_key else None
    async with GatewayClient(options) as client:
        return await client.call("POST", SESSION_PATH, body=body)


def session_command(
    as_json: Annotated[
        bool, typer.Option("--json", help="The session and its decoded claims as JSON.")
    ] = False,
    show_secrets: Annotated[
        bool, typer.Option("--show-secrets", help="Print the seed/creds/token instead of masking them.")
    ] = False,
    public_key: Annotated[
        str | None,
        typer.Option(
            "--public-key",
            metavar="U...",
            help="Your own NATS user public key: the gateway signs a JWT for it and sends no seed.",
            show_default=False,
        ),
    ] = None,
    gateway: GatewayOpt = DEFAULT_GATEWAY,
    gateway_token: GatewayTokenOpt = None,
    token: LegacyTokenOpt = None,
) -> None:
    """Request a link session from the gateway and show its NATS credentials and permissions."""
    options = GatewayOptions.from_flags(gateway, gateway_token, token)
    session = run(_session(options, public_key.strip() if public_key else None))
    claims = decoded_claims(session)
    shown = session if show_secrets else masked_session(session)
    if as_json:
        print(json.dumps({**shown, "claims": claims}), flush=True)
    else:
        print(render(shown, claims, Painter.for_stream(sys.stdout), time.time()), flush=True)


def register(app: typer.Typer) -> None:
    app.command("session", epilog=EPILOG)(session_command)
