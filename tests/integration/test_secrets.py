"""Secrets never reach logs, error messages or reprs.

The flows that handle secrets run for real (operator-mode nats-server, the gateway app, the
linkd daemon in-process and as a process, the gateway as a process) with every log record
captured at DEBUG (pytest's caplog, formatted with the gateway's JSON formatter so ``extra``
fields and tracebacks count too) and every subprocess's stdout and stderr. Each test knows the
exact secrets in play (operator/account/signing/user nkey seeds, creds text, gateway bearer
tokens, the gateway's JWT secret, NATS tokens) and also looks for any nkey seed or creds block
by shape, so a secret the test did not think of is still caught.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

import httpx
import pytest
from nats.errors import Error as NatsError

from cli.nats_server import free_port
from contract.logs import JsonFormatter
from linkd.daemon import State
from linkd.session import GatewayClient, GatewayError, parse_session
from studio_gateway.auth import issue_token
from studio_gateway.config import ConfigError, GatewayConfig
from studio_gateway.nats_jwt import KeyKind, OperatorSetup, creds_text, new_key
from tests.helpers import NatsServerFactory, wait_until
from tests.integration.gateway_harness import (
    SECRET,
    OperatorServer,
    base_env,
    connect_daemon,
    creds_auth,
    running_gateway,
    serve_status,
    start_operator_server,
)
from tests.integration.linkd_harness import daemon_settings, live_gateway, running_daemon
from tests.linkd_support import subprocess_env
from tunnel.connect import NatsConnectError, connect, parse_creds

pytestmark = pytest.mark.timeout(90)

# Any nkey seed (user, account, operator) and any creds-file block, whoever made it.
SEED_SHAPE: Final = re.compile(r"S[UAO][A-Z2-7]{56}")
CREDS_SHAPE: Final = re.compile(r"-----BEGIN (NATS USER JWT|USER NKEY SEED)-----\s*[A-Za-z0-9._-]{20,}")
GATEWAY_CLI: Final = [sys.executable, "-m", "studio_gateway.cli"]
LINKD_CLI: Final = [sys.executable, "-m", "linkd.cli"]
PROCESS_TIMEOUT: Final = 20.0


class Secrets:
    """The secrets of one test; :meth:`check` names every one found in a text (redacted)."""

    def __init__(self, *values: str) -> None:
        self.values: set[str] = set()
        self.add(*values)

    def add(self, *values: str | None) -> None:
        for value in values:
            if value:
                self.values.add(value)

    def found(self, text: str) -> list[str]:
        hits = [f"{v[:4]}...({len(v)} chars)" for v in self.values if v in text]
        hits += [f"seed-shaped {m.group()[:4]}..." for m in SEED_SHAPE.finditer(text)]
        hits += [f"creds block {m.group()!r}" for m in CREDS_SHAPE.finditer(text)]
        return hits

    def check(self, text: str, where: str) -> None:
        hits = self.found(text)
        assert not hits, f"secrets in {where}: {hits}"


def log_text(records: Iterable[logging.LogRecord]) -> str:
    """Every record as the gateway would write it: message, extra fields, traceback."""
    formatter = JsonFormatter()
    return "\n".join(formatter.format(record) for record in records)


def setup_secrets(op: OperatorServer) -> Secrets:
    setup = op.setup
    _, gateway_seed = parse_creds(op.gateway_creds.read_text())
    return Secrets(
        setup.operator.seed,
        setup.account.seed,
        setup.account_signing.seed,
        setup.system_account.seed,
        gateway_seed,
        SECRET,
    )


@pytest.fixture
def op(nats_server_factory: NatsServerFactory, tmp_path: Path) -> OperatorServer:
    return start_operator_server(nats_server_factory, tmp_path)


# ------------------------------------------------------------------ gateway, in-process


async def test_gateway_session_minting_and_auth_failures_log_and_echo_no_secret(
    op: OperatorServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secrets = setup_secrets(op)
    error_bodies: list[str] = []
    async with running_gateway(op.env(NATS_TUNNEL_SESSION_TTL_SECONDS="600")) as gw:
        token = issue_token(gw.config.auth, "alice", 300)
        secrets.add(token)
        auth = {"Authorization": f"Bearer {token}"}
        # Gateway-made key pair: the response carries a seed (by design), the logs must not.
        minted = await gw.ok_session("alice")
        secrets.add(parse_creds(minted["credentials"]["creds"])[1])
        # The daemon's own key: its seed never leaves the test, and must not appear anywhere.
        own = new_key(KeyKind.USER)
        secrets.add(own.seed)
        assert "creds" not in (await gw.ok_session("alice", {"publicKey": own.public_key}))["credentials"]
        # A user pasting a seed where the public key belongs: refused without echoing it.
        for wrong in (own.seed, op.setup.account_signing.seed, "x" * 20 + own.seed):
            resp = await gw.client.post("/api/links/session", headers=auth, json={"publicKey": wrong})
            assert resp.status == 400
            error_bodies.append(await resp.text())
        resp = await gw.client.post(
            "/api/links/session", headers=auth, data=("{" + own.seed * 400).encode()
        )  # too big and not JSON
        assert resp.status == 400
        error_bodies.append(await resp.text())
        # Refused bearer tokens: the token is not echoed, logged or put in a header.
        expired = issue_token(gw.config.auth, "alice", -60)
        secrets.add(expired)
        for bad in (expired, token + "x", token[:-5], f"{token} {token}"):
            resp = await gw.client.get("/api/links/me", headers={"Authorization": f"Bearer {bad}"})
            assert resp.status == 401
            error_bodies.append(await resp.text() + json.dumps(dict(resp.headers)))
        # (A token in a query string is checked with the real access logger, in the process test:
        # aiohttp's default access log, which TestServer uses, logs whole request lines.)
        # Presence, offline then online through the minted credential.
        assert (await gw.me("alice"))["online"] is False
        daemon = await connect_daemon(op.server.url, **creds_auth(minted["credentials"]["creds"]))
        server = await serve_status(daemon.nc, minted["tunnelHostname"])
        assert (await gw.me("alice"))["online"] is True
        await server.close()
        await daemon.nc.close()
    for body in error_bodies:
        secrets.check(body, "an error response")
    assert caplog.records, "nothing was logged at all (capture broken?)"
    secrets.check(log_text(caplog.records), "the gateway's logs")


async def test_token_mode_gateway_logs_no_nats_token(
    nats_server_factory: NatsServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    nats_token = "nats-token-" + os.urandom(12).hex()
    server = nats_server_factory(token=nats_token)
    env = base_env(NATS_URL=server.url, NATS_TOKEN=nats_token, NATS_PUBLIC_URL=server.url)
    async with running_gateway(env) as gw:
        session = await gw.ok_session("tina")
        assert session["token"] == nats_token  # handed to the daemon by design...
        daemon = await connect_daemon(server.url, token=nats_token)
        tunnel_server = await serve_status(daemon.nc, session["tunnelHostname"])
        assert (await gw.me("tina"))["online"] is True
        await tunnel_server.close()
        await daemon.nc.close()
        # ... and a wrong one is refused without being repeated.
        with pytest.raises(NatsError) as refused:
            await connect_daemon(server.url, token=nats_token + "-wrong")
        assert nats_token not in str(refused.value)
        assert nats_token not in repr(gw.config)
    secrets = Secrets(nats_token, SECRET)
    secrets.check(log_text(caplog.records), "the gateway's logs")  # ... but never logged


# ------------------------------------------------------------------ config objects and errors


def test_config_reprs_and_config_errors_hold_no_secret(op: OperatorServer) -> None:
    secrets = setup_secrets(op)
    user = new_key(KeyKind.USER)
    secrets.add(user.seed)
    env = op.env()
    config = GatewayConfig.from_env(env)
    for obj in (config, config.auth, config.operator, op.setup, op.setup.account_signing, user):
        secrets.check(repr(obj), f"repr({type(obj).__name__})")
        secrets.check(str(obj), f"str({type(obj).__name__})")
    token_config = GatewayConfig.from_env(base_env(NATS_TOKEN="tok-" + "9" * 30))
    assert "tok-" + "9" * 30 not in repr(token_config)

    # Wrong secrets in the wrong places: the error names the variable, never the value.
    bad_envs: dict[str, dict[str, str]] = {
        "user seed as signing key": {**env, "NATS_ACCOUNT_SIGNING_KEY": user.seed},
        "operator seed as signing key": {**env, "NATS_ACCOUNT_SIGNING_KEY": op.setup.operator.seed},
        "foreign account seed": {**env, "NATS_ACCOUNT_SIGNING_KEY": OperatorSetup.generate().account.seed},
        "truncated signing key": {**env, "NATS_ACCOUNT_SIGNING_KEY": op.setup.account_signing.seed[:-3]},
        "token and creds": {**env, "NATS_TOKEN": "tok-" + "9" * 30},
        "short jwt secret": {**env, "GATEWAY_JWT_SECRET": "tok-" + "9" * 20},
    }
    secrets.add(
        "tok-" + "9" * 30, "tok-" + "9" * 20, *(e["NATS_ACCOUNT_SIGNING_KEY"] for e in bad_envs.values())
    )
    for case, bad in bad_envs.items():
        with pytest.raises(ConfigError) as caught:
            GatewayConfig.from_env(bad)
        secrets.check(str(caught.value) + repr(caught.value), f"the ConfigError for {case}")


def test_linkd_session_objects_and_parse_errors_hold_no_secret() -> None:
    setup = OperatorSetup.generate()
    user = new_key(KeyKind.USER)
    jwt = setup.user_jwt(user.public_key, "linkd x", expires_at=int(time.time()) + 60)
    creds = creds_text(jwt, user.seed)
    secrets = Secrets(user.seed, "tok-" + "7" * 30)
    base: dict[str, Any] = {"connection": {"urls": ["nats://127.0.0.1:4222"]}, "tunnelHostname": "h-1"}
    session = parse_session({**base, "credentials": {"jwt": jwt, "creds": creds}}, sent_public_key=False)
    assert session.seed == user.seed
    secrets.check(repr(session), "repr(LinkSession)")
    token_session = parse_session({**base, "token": "tok-" + "7" * 30}, sent_public_key=False)
    secrets.check(repr(token_session), "repr(LinkSession) in token mode")
    broken = [
        creds.replace(user.seed, user.seed[:-2] + "AA"),  # checksum
        creds.replace(user.seed, user.seed[:30]),  # truncated
        creds.replace("-----BEGIN USER NKEY SEED-----", ""),  # no seed block
        creds.replace(jwt, "not-a-jwt " + user.seed),
    ]
    for text in broken:
        with pytest.raises(GatewayError) as caught:
            parse_session({**base, "credentials": {"jwt": jwt, "creds": text}}, sent_public_key=False)
        secrets.check(str(caught.value), "a session parse error")
    assert repr(daemon_settings(Path("/tmp")))  # Settings hold no secrets at all (no fields for them)


# ------------------------------------------------------------------ linkd, in-process


async def test_linkd_login_up_refresh_and_refused_token_log_no_secret(
    op: OperatorServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secrets = setup_secrets(op)
    async with live_gateway(op.env(NATS_TUNNEL_SESSION_TTL_SECONDS="3")) as gw:
        token = gw.token("alice")
        secrets.add(token)
        seed = new_key(KeyKind.USER).seed
        secrets.add(seed)
        async with running_daemon(tmp_path, gw.url, token, seed=seed) as d:
            # Rotation happens within the 3 s lifetime: the refresh path runs for real.
            await wait_until(lambda: d.daemon.refreshes >= 1, 10.0, message="no credential refresh")
            secrets.check(json.dumps(d.daemon.status_document()), "the status document")
            secrets.check((tmp_path / "linkd-status.json").read_text(), "the status file")
        # Gateway-made keys (no own seed): the minted seed lives in memory only.
        async with running_daemon(tmp_path / "made", gw.url, token, seed=None) as d:
            assert d.daemon.session is not None and d.daemon.session.seed is not None
            secrets.add(d.daemon.session.seed)
        # A refused API token: offline with a reason, the token not in it.
        wrong = issue_token(gw.config.auth, "alice", -60)
        secrets.add(wrong)
        async with running_daemon(tmp_path / "refused", gw.url, wrong, wait_online=False) as d:
            await d.wait_state(State.OFFLINE, contains="refused")
            messages = "\n".join(d.messages())
        client = GatewayClient(gw.url, lambda: "garbage." + token)
        with pytest.raises(GatewayError) as caught:
            await client.request_session(None)
        await client.aclose()
        secrets.check(str(caught.value), "a GatewayError")
    secrets.check(messages, "the daemon's state messages")
    secrets.check(log_text(caplog.records), "the logs")


# ------------------------------------------------------------------ processes


async def run_process(argv: list[str], env: dict[str, str], stdin: str = "") -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), PROCESS_TIMEOUT)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace") + err.decode(errors="replace")


async def test_linkd_cli_login_failure_and_up_with_rotation_print_no_secret(
    op: OperatorServer, tmp_path: Path
) -> None:
    secrets = setup_secrets(op)
    env = subprocess_env(tmp_path)
    async with live_gateway(op.env(NATS_TUNNEL_SESSION_TTL_SECONDS="3")) as gw:
        # A mistyped token at login: refused, not repeated.
        bad = gw.token("alice")[:-4] + "AAAA"
        secrets.add(bad)
        code, output = await run_process([*LINKD_CLI, "login", "--gateway", gw.url], env, bad + "\n")
        assert code != 0, output
        secrets.check(output, "linkd login's output")
        token = gw.token("alice")
        secrets.add(token)
        code, output = await run_process([*LINKD_CLI, "login", "--gateway", gw.url], env, token + "\n")
        assert code == 0, output
        secrets.check(output, "linkd login's output")
        stored = json.loads((tmp_path / "keyring.json").read_text())
        secrets.add(*(v for v in stored.values() if v.startswith("SU")))
        # linkd up, verbose JSON logs, until a credential refresh happened.
        proc = await asyncio.create_subprocess_exec(
            *LINKD_CLI,
            "up",
            "--json-logs",
            "--verbose",
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        lines: list[str] = []

        async def pump(stream: asyncio.StreamReader | None) -> None:
            assert stream is not None
            async for raw in stream:
                lines.append(raw.decode(errors="replace"))

        pumps = [asyncio.ensure_future(pump(proc.stdout)), asyncio.ensure_future(pump(proc.stderr))]
        try:
            await wait_until(
                lambda: any("credentials refreshed" in line for line in lines),
                PROCESS_TIMEOUT,
                message="linkd up never refreshed its credentials",
            )
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), PROCESS_TIMEOUT) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await asyncio.gather(*pumps, return_exceptions=True)
        secrets.check("".join(lines), "linkd up's output")
        # LINKD_TOKEN from the environment, refused: reported without the token.
        wrong_env = {**env, "LINKD_TOKEN": bad, "LINKD_CONFIG_DIR": str(tmp_path / "other")}
        proc = await asyncio.create_subprocess_exec(
            *LINKD_CLI,
            "up",
            "--gateway",
            gw.url,
            env=wrong_env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        lines = []
        pumps = [asyncio.ensure_future(pump(proc.stdout)), asyncio.ensure_future(pump(proc.stderr))]
        try:
            await wait_until(lambda: any("refused" in line for line in lines), PROCESS_TIMEOUT)
        finally:
            proc.kill()
            await proc.wait()
            await asyncio.gather(*pumps, return_exceptions=True)
        secrets.check("".join(lines), "linkd up's output with a refused LINKD_TOKEN")


async def test_gateway_process_debug_logs_and_start_up_errors_print_no_secret(
    nats_server_factory: NatsServerFactory, tmp_path: Path
) -> None:
    op = start_operator_server(nats_server_factory, tmp_path, jetstream=True)  # runs work too
    secrets = setup_secrets(op)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "GATEWAY_", "TUNNEL_"))}
    env.update(op.env(NATS_TUNNEL_SESSION_TTL_SECONDS="60"))
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        *GATEWAY_CLI,
        "serve",
        "--port",
        str(port),
        "--log-level",
        "debug",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        config = GatewayConfig.from_env(env)
        token = issue_token(config.auth, "zoe", 300)
        secrets.add(token)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False) as http:

            async def ready() -> bool:
                try:
                    return bool((await http.get("/healthz")).json()["nats"] == "connected")
                except httpx.TransportError:
                    return False

            await wait_until(ready, PROCESS_TIMEOUT, interval=0.05, message="gateway never ready")
            auth = {"Authorization": f"Bearer {token}"}
            minted = (await http.post("/api/links/session", headers=auth)).json()
            secrets.add(parse_creds(minted["credentials"]["creds"])[1])
            await http.get(f"/api/links/me?token={token}", headers=auth)
            await http.get("/api/links/me", headers={"Authorization": f"Bearer {token}x"})
            await http.post("/api/links/session", headers=auth, json={"publicKey": op.setup.account.seed})
            # A run (no desktop: it fails at once, desktop_unreachable), read back and exported.

            async def run_accepted() -> bool:
                resp = await http.post("/api/runs", headers=auth, json={"runner": "echo", "input": "hi"})
                return resp.status_code == 202

            await wait_until(run_accepted, PROCESS_TIMEOUT, interval=0.1, message="runs never ready")
            runs = (await http.get("/metrics")).text
            assert "studio_runs_created_total" in runs
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), PROCESS_TIMEOUT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    output = out.decode() + err.decode()
    assert '"aiohttp.access"' in output, "no access log: the capture is broken"
    secrets.check(output, "the gateway process's output")

    # Start-up errors with secrets in the wrong place.
    user = new_key(KeyKind.USER)
    secrets.add(user.seed)
    code, output = await run_process(
        [*GATEWAY_CLI, "serve", "--port", "0"], {**env, "NATS_ACCOUNT_SIGNING_KEY": user.seed}
    )
    assert code != 0 and "NATS_ACCOUNT_SIGNING_KEY" in output, output
    assert "Traceback" not in output
    secrets.check(output, "the gateway's start-up error")


async def test_linkctl_refused_credentials_are_reported_without_the_secret(
    nats_server_factory: NatsServerFactory, tmp_path: Path
) -> None:
    nats_token = "linkctl-token-" + os.urandom(8).hex()
    server = nats_server_factory(token=nats_token)
    user = new_key(KeyKind.USER)
    setup = OperatorSetup.generate()
    good_creds = creds_text(setup.user_jwt(user.public_key, "x"), user.seed)
    broken = tmp_path / "broken.creds"
    broken.write_text(good_creds.replace(user.seed, user.seed[:-3] + "AAA"), encoding="utf-8")
    foreign = tmp_path / "foreign.creds"  # well-formed, but this server does not trust its operator
    foreign.write_text(good_creds, encoding="utf-8")
    secrets = Secrets(nats_token, nats_token + "-wrong", user.seed)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINKCTL_")}
    linkctl = [sys.executable, "-m", "cli"]
    for args, extra_env in (
        (["status", "some-host", "--nats", server.url, "--token", nats_token + "-wrong"], {}),
        (["status", "some-host", "--nats", server.url], {"LINKCTL_NATS_TOKEN": nats_token + "-wrong"}),
        (["status", "some-host", "--nats", server.url, "--creds", str(broken)], {}),
        (["fetch", "tunnel://some-host/x", "--nats", server.url, "--creds", str(foreign)], {}),
    ):
        code, output = await run_process([*linkctl, *args], {**env, **extra_env})
        assert code != 0, (args, output)
        assert "Traceback" not in output, output
        secrets.check(output, f"linkctl {args[0]} output ({'env' if extra_env else args[-2]})")


async def test_credentials_inside_a_nats_url_are_not_logged(
    nats_server_factory: NatsServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """``nats://<token>@host`` is a common way to configure a NATS client: the token stays out of logs."""
    caplog.set_level(logging.DEBUG)
    nats_token = "urltoken" + os.urandom(8).hex()
    server = nats_server_factory(token=nats_token)
    url = server.url.replace("nats://", f"nats://{nats_token}@")
    async with running_gateway(base_env(NATS_URL=url)) as gw:
        assert gw.nats.available
    Secrets(nats_token).check(log_text(caplog.records), "the gateway's logs")


async def test_credentials_inside_a_nats_url_are_not_in_connect_errors() -> None:
    url = f"nats://alice:pw-{os.urandom(6).hex()}@127.0.0.1:{free_port()}"
    with pytest.raises(NatsConnectError) as caught:
        await connect([url], connect_timeout=1.0)
    Secrets(url.split(":")[2].split("@")[0]).check(str(caught.value), "the connect error")
