"""``tunnel.connect`` over ``tls://`` and ``wss://`` with a private CA, mTLS and each certificate problem.

Real nats-server processes with TLS on the client port and the websocket listener; the
certificates are made per test session by tests/tls_certs.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import tunnel
from cli.nats_server import NatsServer, NatsServerTLS
from tests.helpers import NatsServerFactory
from tests.tls_certs import TestCerts, make_certs
from tunnel.connect import NatsConnectError, NatsTLSError, connect
from tunnel.tls import TLSConfig, classify_tls_error

# A failing handshake ends the first connect in well under a second; this only catches a hang.
HANG_GUARD = 10.0


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> TestCerts:
    return make_certs(tmp_path_factory.mktemp("tls"))


def tls_server(
    factory: NatsServerFactory, cert: Path, key: Path, *, ca: Path | None = None, verify: bool = False
) -> NatsServer:
    tls = NatsServerTLS(str(cert), str(key), ca=str(ca) if ca is not None else None, verify=verify)
    return factory(websocket_port=0, tls=tls)


def urls(server: NatsServer) -> list[str]:
    assert server.websocket_url is not None
    return [server.url, server.websocket_url]


async def hello(request: tunnel.Request) -> tunnel.Response:
    return tunnel.Response(200, [("content-type", "text/plain")], b"hello over " + request.path.encode())


async def fetch_through(serve_tls: TLSConfig, call_tls: TLSConfig, url: str) -> bytes:
    """A served host and a caller, each on its own connection to ``url``; the response body."""
    served_nc = await connect(url, tls=serve_tls, name="served")
    caller_nc = await connect(url, tls=call_tls, name="caller")
    try:
        server = await tunnel.serve(served_nc, "desk.example", hello)
        try:
            async with await tunnel.fetch(caller_nc, "tunnel://desk.example/tls") as resp:
                assert resp.status == 200
                return await resp.read()
        finally:
            await server.close()
    finally:
        await caller_nc.close()
        await served_nc.close()


def test_server_urls_name_tls_and_wss(nats_server_factory: NatsServerFactory, certs: TestCerts) -> None:
    server = tls_server(nats_server_factory, certs.server_cert, certs.server_key)
    assert server.url.startswith("tls://127.0.0.1:")
    assert server.websocket_url is not None and server.websocket_url.startswith("wss://127.0.0.1:")
    assert "tls {" in (server.conf_path.read_text() if server.conf_path else "")


@pytest.mark.parametrize("kind", ["tls", "wss"])
async def test_a_fetch_goes_through_with_the_private_ca(
    nats_server_factory: NatsServerFactory, certs: TestCerts, kind: str
) -> None:
    server = tls_server(nats_server_factory, certs.server_cert, certs.server_key)
    url = server.url if kind == "tls" else server.websocket_url
    assert url is not None and url.startswith(f"{kind}://")
    body = await fetch_through(TLSConfig(ca=certs.ca), TLSConfig(ca=certs.ca), url)
    assert body == b"hello over /tls"
    # The server saw TLS connections, not plain ones.
    conns = server.monitor_json("connz?auth=1")["connections"]
    assert conns == [] or all(c.get("tls_version") for c in conns)


@pytest.mark.parametrize("kind", ["tls", "wss"])
async def test_mtls_with_a_client_certificate_works_and_without_one_says_so(
    nats_server_factory: NatsServerFactory, certs: TestCerts, kind: str
) -> None:
    server = tls_server(nats_server_factory, certs.server_cert, certs.server_key, ca=certs.ca, verify=True)
    url = server.url if kind == "tls" else server.websocket_url
    assert url is not None
    with_cert = TLSConfig(ca=certs.ca, cert=certs.client_cert, key=certs.client_key)
    assert await fetch_through(with_cert, with_cert, url) == b"hello over /tls"

    with pytest.raises(NatsTLSError) as caught:
        await connect(url, tls=TLSConfig(ca=certs.ca))
    assert caught.value.problem.kind == "client_cert_required"
    assert str(caught.value) == (
        f"cannot connect to NATS at {url}: the server requires a client certificate (mTLS) and we sent none"
    )
    assert caught.value.problem.fix(ca="--ca", cert="--cert FILE --key FILE") == "pass --cert FILE --key FILE"


@pytest.mark.parametrize(
    ("server_cert", "trust", "kind", "reason"),
    [
        ("server", "other_ca", "unknown_ca", "certificate signed by an unknown CA"),
        ("server", None, "unknown_ca", "certificate signed by an unknown CA"),
        ("wrong_host", "ca", "hostname_mismatch", "the server's certificate is not valid for this host name"),
        ("expired", "ca", "expired", "the server's certificate has expired"),
    ],
)
async def test_each_certificate_problem_is_named(
    nats_server_factory: NatsServerFactory,
    certs: TestCerts,
    server_cert: str,
    trust: str | None,
    kind: str,
    reason: str,
) -> None:
    cert = getattr(certs, f"{server_cert}_cert")
    key = getattr(certs, f"{server_cert}_key")
    server = tls_server(nats_server_factory, cert, key)
    tls = TLSConfig(ca=getattr(certs, trust)) if trust is not None else None
    for url in urls(server):
        with pytest.raises(NatsTLSError) as caught:
            await connect(url, tls=tls)
        err = caught.value
        assert isinstance(err, NatsConnectError)  # callers that catch the base still catch it
        assert err.problem.kind == kind, (url, err.problem)
        assert err.where == url
        assert str(err) == f"cannot connect to NATS at {url}: {reason}"
        assert classify_tls_error(err) is not None


async def test_the_host_name_can_be_given_for_an_address_the_certificate_does_not_list(
    nats_server_factory: NatsServerFactory, certs: TestCerts
) -> None:
    server = tls_server(nats_server_factory, certs.wrong_host_cert, certs.wrong_host_key)
    nc = await connect(server.url, tls=TLSConfig(ca=certs.ca, hostname="nats.example.com"))
    try:
        assert nc.is_connected
    finally:
        await nc.close()


def test_unreadable_files_are_a_value_error_naming_the_file(tmp_path: Path, certs: TestCerts) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(ValueError, match=f"cannot read the TLS CA file {missing}"):
        TLSConfig(ca=missing).context()
    not_pem = tmp_path / "junk.pem"
    not_pem.write_text("junk")
    with pytest.raises(ValueError, match="holds no usable PEM certificate"):
        TLSConfig(ca=not_pem).context()
    with pytest.raises(ValueError, match="cannot be used"):
        TLSConfig(cert=certs.client_cert, key=certs.server_key).context()  # key of another cert
    with pytest.raises(ValueError, match="needs its certificate"):
        TLSConfig(key=certs.client_key)
