"""Shared pieces of the ``linkd doctor`` tests: the CLI as a process or in-process, a stored
login, a stand-in gateway.

The stand-in gateway is a few lines of aiohttp for what the real one cannot be made to do on
purpose (a clock an hour ahead, NATS URLs of a TLS server it does not itself use); its session
JWT is signed with the real operator setup's account key, for the real nats-server.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from aiohttp import web

from cli.nats_server import free_port
from contract.nats_jwt import CONNECTION_TYPE_STANDARD
from linkd.config import load_settings
from linkd.credentials_store import SERVICE_NAME, TOKEN_KEY
from linkd.doctor import CHECKS, report, run_checks
from linkd.login_state import write_login
from studio_gateway.nats_jwt import encode_jwt, user_claims
from tests.integration.gateway_harness import OperatorServer
from tests.linkd_support import MemoryKeyring

TIMEOUT = 30.0  # a cold Python start of the CLI under a loaded machine is part of it


async def doctor(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "linkd.cli",
        "doctor",
        *args,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def doctor_json(env: dict[str, str], *args: str) -> tuple[int, dict[str, dict[str, Any]], bool]:
    """(exit status, checks by name, the document's ok) of ``linkd doctor --json``."""
    code, out, err = await doctor(env, "--json", *args)
    doc = json.loads(out)
    assert [c["name"] for c in doc["checks"]] == list(CHECKS), doc
    assert all(set(c) == {"name", "status", "detail", "fix"} for c in doc["checks"])
    assert err == ""
    return code, {c["name"]: c for c in doc["checks"]}, doc["ok"]


async def diagnose(**flags: object) -> tuple[int, str, dict[str, dict[str, Any]]]:
    """``linkd doctor`` in-process (with the ``isolated_env`` fixture's keyring and dirs; no cold
    start of the CLI): (exit status, the text, the checks of the --json document by name)."""
    checks = await run_checks(load_settings(flags))
    text, code = report(checks)
    doc_text, json_code = report(checks, as_json=True)
    doc = json.loads(doc_text)
    assert json_code == code and doc["ok"] == (code == 0)
    assert [c["name"] for c in doc["checks"]] == list(CHECKS), doc
    assert all(set(c) == {"name", "status", "detail", "fix"} for c in doc["checks"])
    return code, text, {c["name"]: c for c in doc["checks"]}


def remember_login(backend: MemoryKeyring, gateway_url: str, token: str) -> None:
    """``linkd login`` in-process: the URL in login.json, the token in the test's keyring."""
    write_login(gateway_url)
    backend.set_password(SERVICE_NAME, TOKEN_KEY, token)


def store_login(tmp_path: Path, env: dict[str, str], gateway_url: str, token: str | None) -> None:
    """What ``linkd login`` leaves behind: the gateway URL in login.json, the token in the keyring."""
    write_login(gateway_url, env)
    if token is not None:
        keyring = {f"{SERVICE_NAME}/{TOKEN_KEY}": token}
        (tmp_path / "keyring.json").write_text(json.dumps(keyring), encoding="utf-8")


def lines(out: str) -> dict[str, str]:
    """Each check's output line, by check name (the second word)."""
    found = {}
    for line in out.splitlines():
        words = line.split()
        if len(words) > 1 and words[1] in CHECKS:
            found[words[1]] = line
    return found


@asynccontextmanager
async def listening() -> AsyncIterator[str]:
    """A local TCP service standing for the user's dev server."""

    async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


@asynccontextmanager
async def stand_in_gateway(
    op: OperatorServer, *, skew: int = 0, url: str | None = None
) -> AsyncIterator[str]:
    """A stand-in gateway whose clock is ``skew`` seconds ahead: its session JWT (signed by the
    real account key, for the real nats-server at ``url``, default its own) is issued at now + skew."""

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "nats": "connected"})

    async def session(request: web.Request) -> web.Response:
        body = await request.json()
        issued = int(time.time()) + skew
        claims = dict(
            user_claims(
                body["publicKey"],
                "alice",
                issuer_account=op.setup.account.public_key,
                expires_at=issued + 3600,
                allowed_connection_types=[CONNECTION_TYPE_STANDARD],
            )
        )
        claims["iat"] = issued
        jwt = encode_jwt(claims, op.setup.account_signing.keypair())
        return web.json_response(
            {
                "connection": {
                    "urls": [url or op.server.url],
                    "allowedConnectionTypes": [CONNECTION_TYPE_STANDARD],
                },
                "credentials": {"jwt": jwt},
                "tunnelHostname": "alice-skewed",
            }
        )

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/api/links/session", session)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
