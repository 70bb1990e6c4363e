"""``linkctl`` over ``tls://`` and ``wss://``: ``--nats-ca`` / ``LINKCTL_NATS_CA``, mTLS, and one line per
certificate problem with exit status 29 (separate processes, a real nats-server in TLS mode)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

import tunnel
from cli import exitcodes
from cli.nats_server import NatsServer, NatsServerTLS
from tests.helpers import NatsServerFactory
from tests.tls_certs import TestCerts, make_certs
from tunnel.connect import connect
from tunnel.tls import TLSConfig

pytestmark = pytest.mark.timeout(60)

LINKCTL = [sys.executable, "-m", "cli.main"]
RUN_TIMEOUT = 30.0
HOST = "desk.test"
STATUS = {"hostname": "tls-desktop", "capabilities": ["fetch"], "cliVersion": "9.9.9"}
CA_FIX = "pass --nats-ca FILE (or LINKCTL_NATS_CA) with the CA that signed the server's certificate"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> TestCerts:
    return make_certs(tmp_path_factory.mktemp("tls"))


def tls_server(
    factory: NatsServerFactory, certs: TestCerts, which: str = "server", *, mtls: bool = False
) -> NatsServer:
    cert, key = getattr(certs, f"{which}_cert"), getattr(certs, f"{which}_key")
    return factory(websocket_port=0, tls=NatsServerTLS(str(cert), str(key), ca=str(certs.ca), verify=mtls))


async def handler(request: tunnel.Request) -> tunnel.Response:
    if request.path == "/api/links/status":
        return tunnel.Response(200, [("content-type", "application/json")], json.dumps(STATUS).encode())
    return tunnel.Response(200, [("content-type", "text/plain")], b"over tls " + request.path.encode())


@asynccontextmanager
async def desktop(url: str, tls: TLSConfig) -> AsyncIterator[None]:
    nc = await connect(url, tls=tls, name="desktop")
    server = await tunnel.serve(nc, HOST, handler)
    try:
        yield
    finally:
        await server.close()
        await nc.close()


async def linkctl(*args: str, **env: str) -> tuple[int, str, str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LINKCTL_")}
    full_env.update(env)
    proc = await asyncio.create_subprocess_exec(
        *LINKCTL,
        *args,
        env=full_env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), RUN_TIMEOUT)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.parametrize(("kind", "mtls"), [("tls", False), ("wss", True)])
async def test_status_and_fetch_over_tls_with_the_private_ca(
    nats_server_factory: NatsServerFactory, certs: TestCerts, kind: str, mtls: bool
) -> None:
    server = tls_server(nats_server_factory, certs, mtls=mtls)
    url = server.url if kind == "tls" else server.websocket_url
    assert url is not None
    client = (
        TLSConfig(ca=certs.ca, cert=certs.client_cert, key=certs.client_key)
        if mtls
        else TLSConfig(ca=certs.ca)
    )
    cert_flags = ["--nats-cert", str(certs.client_cert), "--nats-key", str(certs.client_key)] if mtls else []
    async with desktop(url, client):
        code, out, err = await linkctl("status", HOST, "--nats", url, "--nats-ca", str(certs.ca), *cert_flags)
        assert code == exitcodes.OK, err
        assert "online" in out and "tls-desktop" in out
        # The same through the environment variables, for fetch.
        env = {"LINKCTL_NATS_URL": url, "LINKCTL_NATS_CA": str(certs.ca)}
        if mtls:
            env.update(LINKCTL_NATS_CERT=str(certs.client_cert), LINKCTL_NATS_KEY=str(certs.client_key))
        code, out, err = await linkctl("fetch", f"tunnel://{HOST}/hello", **env)
        assert code == exitcodes.OK, err
        assert out == "over tls /hello"
        assert err == ""  # not even asyncio's warning about the server closing the TLS stream


@pytest.mark.parametrize(
    ("which", "trust", "mtls", "problem"),
    [
        ("server", None, False, f"certificate signed by an unknown CA: {CA_FIX}"),
        ("server", "other_ca", False, f"certificate signed by an unknown CA: {CA_FIX}"),
        (
            "wrong_host",
            "ca",
            False,
            "the server's certificate is not valid for this host name: "
            "connect with a host name the server's certificate lists",
        ),
        ("expired", "ca", False, "the server's certificate has expired: renew the server's certificate"),
        (
            "server",
            "ca",
            True,
            "the server requires a client certificate (mTLS) and we sent none: "
            "pass --nats-cert FILE --nats-key FILE (or LINKCTL_NATS_CERT and LINKCTL_NATS_KEY)",
        ),
    ],
)
async def test_each_certificate_problem_is_one_line_and_exit_29(
    nats_server_factory: NatsServerFactory,
    certs: TestCerts,
    which: str,
    trust: str | None,
    mtls: bool,
    problem: str,
) -> None:
    server = tls_server(nats_server_factory, certs, which, mtls=mtls)
    ca_flags = ["--nats-ca", str(getattr(certs, trust))] if trust is not None else []
    urls = [server.url, server.websocket_url]
    results = await asyncio.gather(*(linkctl("status", HOST, "--nats", str(url), *ca_flags) for url in urls))
    for url, (code, out, err) in zip(urls, results, strict=True):
        assert code == exitcodes.TLS_ERROR == 29, (out, err)
        assert err == f"linkctl: error: nats {url}: {problem}\n", err
        assert "Traceback" not in err and out == ""


async def test_an_unreadable_ca_file_is_a_usage_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    code, _, err = await linkctl("status", HOST, "--nats", "tls://127.0.0.1:9", "--nats-ca", str(missing))
    assert code == exitcodes.USAGE
    assert (
        err
        == f"linkctl: error: --nats-ca: cannot read the TLS CA file {missing}: No such file or directory\n"
    )


async def test_services_over_tls_trusts_the_private_ca_and_names_a_missing_one(
    nats_server_factory: NatsServerFactory, certs: TestCerts
) -> None:
    """`linkctl services` takes the same TLS flags: with the CA it connects (nothing answers on a
    bare server: exit 'offline'), without it the certificate line and exit 29."""
    server = tls_server(nats_server_factory, certs)
    code, out, err = await linkctl(
        "services", "--nats", server.url, "--nats-ca", str(certs.ca), "--timeout", "0.2"
    )
    assert code == exitcodes.OFFLINE, (out, err)
    assert "no answer" in err and "Traceback" not in err
    code, out, err = await linkctl("services", "--nats", server.url, "--timeout", "0.2")
    assert code == exitcodes.TLS_ERROR, (out, err)
    assert err == f"linkctl: error: nats {server.url}: certificate signed by an unknown CA: {CA_FIX}\n"
