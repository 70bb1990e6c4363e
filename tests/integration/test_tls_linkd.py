"""``linkd up`` over ``tls://`` and ``wss://`` with a private CA (and mTLS), as separate processes.

The gateway (in-process, its own NATS connection over TLS with ``NATS_CA``) hands out
operator-mode sessions whose public URL is ``tls://`` or ``wss://``; the daemon trusts the
private CA through ``--nats-ca`` / ``LINKD_NATS_CA``. A certificate problem keeps the daemon
offline, retrying, with the reason and its fix in ``linkd status``.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from cli.nats_server import NatsServer, NatsServerTLS
from studio_gateway.nats_jwt import OperatorSetup
from tests.helpers import NatsServerFactory, wait_until
from tests.integration.gateway_harness import base_env
from tests.integration.linkd_harness import LiveGateway, live_gateway
from tests.integration.test_linkd_cli_process import TIMEOUT, Daemon, linkd, linkd_up, login
from tests.linkd_support import subprocess_env
from tests.tls_certs import TestCerts, make_certs

pytestmark = [pytest.mark.timeout(90), pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")]

CA_FIX = (
    "pass --nats-ca FILE (or LINKD_NATS_CA, nats_ca in linkd.toml) "
    "with the CA that signed the server's certificate"
)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> TestCerts:
    return make_certs(tmp_path_factory.mktemp("tls"))


@dataclass
class TLSOperator:
    setup: OperatorSetup
    creds: Path
    certs: TestCerts

    def server(
        self,
        factory: NatsServerFactory,
        cert: Path | None = None,
        key: Path | None = None,
        *,
        mtls: bool = False,
    ) -> NatsServer:
        tls = NatsServerTLS(
            str(cert or self.certs.server_cert),
            str(key or self.certs.server_key),
            ca=str(self.certs.ca),
            verify=mtls,
        )
        return factory(extra_conf=self.setup.server_conf(), websocket_port=0, tls=tls)

    def gateway_env(self, server: NatsServer, public_url: str, *, mtls: bool = False) -> dict[str, str]:
        env = base_env(
            NATS_URL=server.url,
            NATS_CREDS=str(self.creds),
            NATS_PUBLIC_URL=public_url,
            NATS_CA=str(self.certs.ca),
            NATS_TUNNEL_SESSION_TTL_SECONDS="600",
        )
        if mtls:
            env.update(NATS_CERT=str(self.certs.client_cert), NATS_KEY=str(self.certs.client_key))
        env.update(self.setup.gateway_env())
        return env


@pytest.fixture
def op(tmp_path: Path, certs: TestCerts) -> Iterator[TLSOperator]:
    setup = OperatorSetup.generate()
    creds = tmp_path / "gateway.creds"
    creds.write_text(setup.user_creds("studio-gateway"), encoding="utf-8")
    yield TLSOperator(setup, creds, certs)


async def me(gw: LiveGateway, token: str) -> dict[str, object]:
    async with httpx.AsyncClient() as http:
        resp = await http.get(f"{gw.url}/api/links/me", headers={"Authorization": f"Bearer {token}"})
        payload: dict[str, object] = resp.json()
        return payload


async def status_json(env: dict[str, str]) -> dict[str, object]:
    _, out, _ = await linkd(env, "status", "--json")
    doc: dict[str, object] = json.loads(out)
    return doc


def status_file(env: dict[str, str]) -> dict[str, object]:
    """The daemon's status document as `linkd status --json` reads it (without a process per poll)."""
    path = Path(env["LINKD_RUNTIME_DIR"]) / "linkd-status.json"
    try:
        doc: dict[str, object] = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return doc


@pytest.mark.parametrize(("kind", "mtls"), [("tls", False), ("wss", True)])
async def test_linkd_goes_online_and_serves_over_tls(
    nats_server_factory: NatsServerFactory, op: TLSOperator, tmp_path: Path, kind: str, mtls: bool
) -> None:
    server = op.server(nats_server_factory, mtls=mtls)
    public = server.url if kind == "tls" else server.websocket_url
    assert public is not None and public.startswith(f"{kind}://")
    env = subprocess_env(tmp_path, LINKD_NATS_CA=str(op.certs.ca))
    args = ["--nats-cert", str(op.certs.client_cert), "--nats-key", str(op.certs.client_key)] if mtls else []
    async with live_gateway(op.gateway_env(server, public, mtls=mtls)) as gw:
        token = await login(gw, env, "alice")
        async with linkd_up(env, "--drain-timeout", "1", *args) as daemon:
            await daemon.wait_state("online")
            # A tunnel request: the gateway probes the desktop's status route through NATS.
            answer = await me(gw, token)
            assert answer["online"] is True, answer
            doc = await status_json(env)
            assert doc["state"] == "online" and doc["offlineReason"] is None
            assert str(doc["natsUrl"]).startswith(f"{kind}://"), doc
            conns = server.monitor_json("connz?auth=1")["connections"]
            assert conns and all(c.get("tls_version") for c in conns)
            assert not daemon.stderr, daemon.stderr


async def wait_offline_reason(env: dict[str, str], daemon: Daemon, fragment: str) -> str:
    def reason() -> str | None:
        doc = status_file(env)
        text = doc.get("offlineReason")
        return text if isinstance(text, str) and fragment in text else None

    found = await wait_until(reason, TIMEOUT, message=lambda: f"{daemon.states()} / {daemon.stderr[-5:]}")
    assert isinstance(found, str)
    return found


@pytest.mark.parametrize("kind", ["wss"])
async def test_an_unknown_ca_keeps_linkd_offline_saying_why_until_the_ca_file_is_fixed(
    nats_server_factory: NatsServerFactory, op: TLSOperator, tmp_path: Path, kind: str
) -> None:
    server = op.server(nats_server_factory)
    public = server.url if kind == "tls" else server.websocket_url
    assert public is not None
    ca_file = tmp_path / "trusted.pem"
    ca_file.write_bytes(op.certs.other_ca.read_bytes())  # the wrong CA
    env = subprocess_env(tmp_path)
    async with live_gateway(op.gateway_env(server, public)) as gw:
        await login(gw, env, "alice")
        async with linkd_up(env, "--nats-ca", str(ca_file)) as daemon:
            reason = await wait_offline_reason(env, daemon, "unknown CA")
            assert reason == f"nats {public}: certificate signed by an unknown CA: {CA_FIX}"
            _, text, _ = await linkd(env, "status")
            assert f"state:       offline: nats {public}: certificate signed by an unknown CA" in text
            # Still retrying: once the file holds the right CA, the daemon comes online by itself.
            ca_file.write_bytes(op.certs.ca.read_bytes())
            await daemon.wait_state("online", timeout=TIMEOUT)
            assert daemon.proc.returncode is None
            assert not any("Traceback" in line for line in daemon.stderr), daemon.stderr


@pytest.mark.parametrize(
    ("which", "reason"),
    [
        # (an expired certificate: see the reconnect test below)
        (
            "wrong_host",
            "the server's certificate is not valid for this host name: "
            "connect with a host name the server's certificate lists",
        ),
    ],
)
async def test_a_bad_server_certificate_is_named_in_linkd_status(
    nats_server_factory: NatsServerFactory, op: TLSOperator, tmp_path: Path, which: str, reason: str
) -> None:
    good = op.server(nats_server_factory)  # the gateway's own connection
    bad = op.server(
        nats_server_factory, getattr(op.certs, f"{which}_cert"), getattr(op.certs, f"{which}_key")
    )
    env = subprocess_env(tmp_path, LINKD_NATS_CA=str(op.certs.ca))
    async with live_gateway(op.gateway_env(good, bad.url)) as gw:
        await login(gw, env, "alice")
        async with linkd_up(env) as daemon:
            found = await wait_offline_reason(env, daemon, reason.split(":")[0])
            assert found == f"nats {bad.url}: {reason}"
            assert daemon.proc.returncode is None  # offline, retrying: not exited
            assert not any("Traceback" in line for line in daemon.stderr), daemon.stderr


async def test_linkd_up_with_an_unreadable_ca_file_fails_at_once_in_one_line(tmp_path: Path) -> None:
    env = subprocess_env(tmp_path)
    missing = tmp_path / "nope.pem"
    code, out, err = await asyncio.wait_for(
        linkd(env, "up", "--gateway", "http://127.0.0.1:9", "--nats-ca", str(missing)), TIMEOUT
    )
    assert code == 2, (out, err)
    assert err.strip() == f"linkd: error: cannot read the TLS CA file {missing}: No such file or directory"


async def test_a_server_certificate_that_expires_under_a_connected_linkd_is_named_while_it_reconnects(
    nats_server_factory: NatsServerFactory, op: TLSOperator, tmp_path: Path
) -> None:
    good = op.server(nats_server_factory)  # the gateway's own connection stays on this one
    served = op.server(nats_server_factory)  # linkd's, restarted with an expired certificate
    env = subprocess_env(tmp_path, LINKD_NATS_CA=str(op.certs.ca))
    async with live_gateway(op.gateway_env(good, served.url)) as gw:
        await login(gw, env, "alice")
        async with linkd_up(env) as daemon:
            await daemon.wait_state("online")
            valid_tls = served.config.tls
            assert valid_tls is not None
            served.stop()
            served.config.tls = NatsServerTLS(
                str(op.certs.expired_cert), str(op.certs.expired_key), ca=str(op.certs.ca)
            )
            served.start()
            found = await wait_offline_reason(env, daemon, "expired")
            assert (
                found
                == f"nats {served.url}: the server's certificate has expired: renew the server's certificate"
            )
            assert status_file(env)["state"] == "reconnecting"
            # Renewed: linkd's own reconnects find it, no restart.
            served.stop()
            served.config.tls = valid_tls
            served.start()
            await wait_until(
                lambda: status_file(env).get("state") == "online",
                TIMEOUT,
                message=lambda: f"{daemon.states()[-3:]} / {daemon.stderr[-5:]}",
            )
            assert status_file(env)["natsUrl"] == served.url
            assert not any("Traceback" in line for line in daemon.stderr), daemon.stderr
