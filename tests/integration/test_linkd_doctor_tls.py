"""``linkd doctor``'s NATS check over ``tls://`` with a private CA made by the test
(tests/tls_certs.py): verified with ``--nats-ca``, and the unknown-CA failure with its fix.

A real operator-mode nats-server with TLS on its client port; the session comes from the
stand-in gateway of tests/integration/doctor_support.py (the real gateway would itself need to
reach this TLS server), its JWT signed by the real account key.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from cli.nats_server import NatsServerTLS
from linkd.doctor import EXIT_CHECK_FAILED
from studio_gateway.nats_jwt import OperatorSetup
from tests.helpers import NatsServerFactory
from tests.integration.doctor_support import (
    diagnose,
    doctor,
    lines,
    remember_login,
    stand_in_gateway,
    store_login,
)
from tests.integration.gateway_harness import OperatorServer
from tests.linkd_support import MemoryKeyring, isolated_env, subprocess_env
from tests.tls_certs import TestCerts, make_certs

__all__ = ["isolated_env"]

pytestmark = [pytest.mark.timeout(90), pytest.mark.skipif(sys.platform == "win32", reason="POSIX")]


@pytest.fixture
def certs(tmp_path: Path) -> TestCerts:
    return make_certs(tmp_path / "tls")


@pytest.fixture
def tls_op(nats_server_factory: NatsServerFactory, tmp_path: Path, certs: TestCerts) -> OperatorServer:
    setup = OperatorSetup.generate()
    server = nats_server_factory(
        extra_conf=setup.server_conf(), tls=NatsServerTLS(str(certs.server_cert), str(certs.server_key))
    )
    creds = tmp_path / "gateway.creds"
    creds.write_text(setup.user_creds("studio-gateway"), encoding="utf-8")
    return OperatorServer(setup, server, creds)


async def test_tls_verified_with_the_private_ca_and_unknown_ca_without_it(
    tls_op: OperatorServer, certs: TestCerts, tmp_path: Path, isolated_env: MemoryKeyring
) -> None:
    assert tls_op.server.url.startswith("tls://")
    port = tls_op.server.url.rsplit(":", 1)[1]
    async with stand_in_gateway(tls_op) as url:
        remember_login(isolated_env, url, "any-token")
        code, out, _ = await diagnose(nats_ca=str(certs.ca))
        assert code == 0, out
        assert lines(out)["nats"] == f"ok    nats      connected to tls://127.0.0.1:{port} with TLS verified"

        code, _, checks = await diagnose(nats_ca=str(certs.other_ca))  # the wrong CA
        assert code == EXIT_CHECK_FAILED
        assert checks["nats"]["status"] == "fail" and "unknown CA" in checks["nats"]["detail"]
        assert checks["nats"]["fix"].startswith("pass --nats-ca FILE")

        # As the user runs it, without --nats-ca: the system CA store does not know the test's CA.
        env = subprocess_env(tmp_path)
        store_login(tmp_path, env, url, "any-token")
        code, out, err = await doctor(env)
        assert code == EXIT_CHECK_FAILED and err == ""
        assert lines(out)["nats"] == (
            f"FAIL  nats      tls://127.0.0.1:{port}: certificate signed by an unknown CA; fix: pass "
            "--nats-ca FILE (or LINKD_NATS_CA, nats_ca in linkd.toml) with the CA that signed the "
            "server's certificate"
        )
