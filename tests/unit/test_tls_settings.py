"""TLS settings and error wording without a server: where each command reads its CA and client
certificate, and how an ``ssl``/aiohttp error becomes a reason and a fix (tunnel.tls, linkd.tls)."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from aiohttp.client_exceptions import ClientConnectorCertificateError, ClientConnectorSSLError
from aiohttp.client_reqrep import ConnectionKey

from cli.common import CliError, tls_options
from linkd.config import load_settings
from linkd.errors import LinkdError
from linkd.tls import explain_tls_error, nats_tls
from studio_gateway.config import ConfigError, GatewayConfig
from tests.tls_certs import TestCerts, make_certs
from tunnel.tls import TLSConfig, TLSProblem, classify_tls_error


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> TestCerts:
    return make_certs(tmp_path_factory.mktemp("tls"))


def empty(tmp_path: Path) -> Path:
    """An empty linkd.toml (an explicit config path must exist)."""
    path = tmp_path / "empty.toml"
    path.write_text("")
    return path


def verify_error(code: int, message: str) -> ssl.SSLCertVerificationError:
    exc = ssl.SSLCertVerificationError(
        1, f"[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: {message}"
    )
    exc.verify_code = code
    exc.verify_message = message
    return exc


def ssl_error(reason: str) -> ssl.SSLError:
    exc = ssl.SSLError(1, f"[SSL: {reason}] {reason.lower().replace('_', ' ')}")
    exc.reason = reason
    return exc


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (verify_error(20, "unable to get local issuer certificate"), "unknown_ca"),
        (verify_error(19, "self-signed certificate in certificate chain"), "unknown_ca"),
        (verify_error(10, "certificate has expired"), "expired"),
        (verify_error(9, "certificate is not yet valid"), "not_yet_valid"),
        (verify_error(62, "Hostname mismatch, certificate is not valid for 'x'."), "hostname_mismatch"),
        (
            verify_error(64, "IP address mismatch, certificate is not valid for '127.0.0.1'."),
            "hostname_mismatch",
        ),
        (ssl_error("TLSV13_ALERT_CERTIFICATE_REQUIRED"), "client_cert_required"),
        (ssl_error("SSLV3_ALERT_BAD_CERTIFICATE"), "client_cert_rejected"),
        (ssl_error("WRONG_VERSION_NUMBER"), "not_tls"),
        (ssl_error("SOMETHING_ELSE"), "handshake_failed"),
    ],
)
def test_ssl_errors_are_classified(exc: BaseException, kind: str) -> None:
    problem = classify_tls_error(exc)
    assert problem is not None and problem.kind == kind


def test_causes_and_aiohttp_wrappers_are_looked_through() -> None:
    key = ConnectionKey("127.0.0.1", 443, True, True, None, None, None)
    wrapped = ClientConnectorCertificateError(key, verify_error(10, "certificate has expired"))
    problem = classify_tls_error(wrapped)
    assert problem is not None and problem.kind == "expired"
    ssl_wrapped = ClientConnectorSSLError(key, ssl_error("TLSV13_ALERT_CERTIFICATE_REQUIRED"))
    assert (
        classify_tls_error(ssl_wrapped) or TLSProblem.of("handshake_failed")
    ).kind == "client_cert_required"
    try:
        try:
            raise verify_error(20, "unable to get local issuer certificate")
        except ssl.SSLError as inner:
            raise RuntimeError("no servers") from inner
    except RuntimeError as outer:
        assert (classify_tls_error(outer) or TLSProblem.of("handshake_failed")).kind == "unknown_ca"
    assert classify_tls_error(ConnectionRefusedError(111, "refused")) is None
    assert classify_tls_error(None) is None


def test_each_fix_names_the_callers_settings() -> None:
    ca, cert = "--nats-ca FILE (or X_CA)", "--nats-cert FILE --nats-key FILE"
    assert TLSProblem.of("unknown_ca").line("tls://h:1", ca=ca, cert=cert) == (
        "tls://h:1: certificate signed by an unknown CA: "
        "pass --nats-ca FILE (or X_CA) with the CA that signed the server's certificate"
    )
    assert TLSProblem.of("client_cert_required").fix(ca=ca, cert=cert) == f"pass {cert}"
    assert "renew" in TLSProblem.of("expired").fix(ca=ca, cert=cert)


def test_linkd_reads_the_tls_files_from_flags_env_and_file(tmp_path: Path, certs: TestCerts) -> None:
    conf = tmp_path / "linkd.toml"
    conf.write_text(
        f'nats_ca = "{certs.other_ca}"\nnats_cert = "{certs.client_cert}"\nnats_key = "{certs.client_key}"\n'
    )
    from_file = load_settings({}, {}, config_path=conf)
    assert (from_file.nats_ca, from_file.nats_cert, from_file.nats_key) == (
        certs.other_ca,
        certs.client_cert,
        certs.client_key,
    )
    from_env = load_settings({}, {"LINKD_NATS_CA": str(certs.ca)}, config_path=conf)
    assert from_env.nats_ca == certs.ca
    from_flag = load_settings(
        {"nats_ca": str(certs.server_cert)}, {"LINKD_NATS_CA": str(certs.ca)}, config_path=conf
    )
    assert from_flag.nats_ca == certs.server_cert
    tls = nats_tls(from_env)
    assert isinstance(tls, TLSConfig) and tls.ca == certs.ca and tls.cert == certs.client_cert
    assert nats_tls(load_settings({}, {}, config_path=empty(tmp_path))) is None


def test_linkd_names_a_bad_tls_file(tmp_path: Path, certs: TestCerts) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(LinkdError, match=f"cannot read the TLS CA file {missing}"):
        nats_tls(load_settings({"nats_ca": str(missing)}, {}, config_path=empty(tmp_path)))
    with pytest.raises(LinkdError, match="--nats-key needs --nats-cert"):
        nats_tls(load_settings({"nats_key": str(certs.client_key)}, {}, config_path=empty(tmp_path)))
    reason, fix = explain_tls_error(verify_error(20, "unable to get local issuer certificate")) or ("", "")
    assert reason == "certificate signed by an unknown CA"
    assert fix.startswith("pass --nats-ca FILE (or LINKD_NATS_CA, nats_ca in linkd.toml)")


def test_the_gateway_reads_nats_ca_and_names_a_bad_file(tmp_path: Path, certs: TestCerts) -> None:
    base = {"GATEWAY_JWT_SECRET": "s" * 40}
    config = GatewayConfig.from_env(
        {
            **base,
            "NATS_CA": str(certs.ca),
            "NATS_CERT": str(certs.client_cert),
            "NATS_KEY": str(certs.client_key),
        }
    )
    assert config.nats_tls == TLSConfig(
        ca=str(certs.ca), cert=str(certs.client_cert), key=str(certs.client_key)
    )
    assert GatewayConfig.from_env(base).nats_tls is None
    with pytest.raises(ConfigError) as info:
        GatewayConfig.from_env({**base, "NATS_CA": str(tmp_path / "nope.pem")})
    assert info.value.variable == "NATS_CA"
    with pytest.raises(ConfigError) as info:
        GatewayConfig.from_env({**base, "NATS_KEY": str(certs.client_key)})
    assert info.value.variable == "NATS_KEY"


def test_linkctl_names_the_flag_of_a_bad_tls_file(tmp_path: Path, certs: TestCerts) -> None:
    assert tls_options(None, None, None) is None
    assert tls_options(certs.ca, None, None) == TLSConfig(ca=certs.ca)
    with pytest.raises(CliError, match=r"^--nats-ca: cannot read the TLS CA file"):
        tls_options(tmp_path / "nope.pem", None, None)
    with pytest.raises(CliError, match=r"^--nats-cert: client certificate"):
        tls_options(None, certs.client_cert, certs.server_key)
    with pytest.raises(CliError, match=r"^--nats-key needs --nats-cert"):
        tls_options(None, None, certs.client_key)
