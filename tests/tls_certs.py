"""Certificates for TLS tests, made with ``cryptography`` in a temp dir (EC keys: milliseconds).

One private CA signs: a server certificate for ``localhost``/``127.0.0.1``, a client certificate
(mTLS), an expired server certificate and one for another host name. A second, unrelated CA
("other") exists so a test can trust the wrong one::

    certs = make_certs(tmp_path)
    NatsServerConfig(tls=NatsTLS(cert=certs.server_cert, key=certs.server_key))
    TLSConfig(ca=certs.ca)
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["TestCerts", "make_certs"]

_DAY = dt.timedelta(days=1)


@dataclass(frozen=True)
class TestCerts:
    """Paths of the PEM files (keys unencrypted)."""

    __test__ = False  # not a pytest test class

    ca: Path
    ca_key: Path
    other_ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    expired_cert: Path
    expired_key: Path
    wrong_host_cert: Path
    wrong_host_key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _ca(common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _DAY)
        .not_valid_after(now + 30 * _DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    common_name: str,
    *,
    dns: list[str],
    ips: list[str],
    client: bool = False,
    expired: bool = False,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_cert, ca_key = ca
    key = _key()
    now = dt.datetime.now(dt.UTC)
    before, after = (now - 10 * _DAY, now - _DAY) if expired else (now - _DAY, now + 30 * _DAY)
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(before)
        .not_valid_after(after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _write(
    directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> tuple[Path, Path]:
    cert_path = directory / f"{stem}.pem"
    key_path = directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def make_certs(directory: Path) -> TestCerts:
    """Write the whole set into ``directory`` (created if missing)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = _ca("natslink test CA")
    other = _ca("some other CA")
    ca_path, ca_key_path = _write(directory, "ca", *ca)
    other_path, _ = _write(directory, "other-ca", *other)
    local = {"dns": ["localhost"], "ips": ["127.0.0.1"]}
    server = _write(directory, "server", *_leaf(ca, "localhost", **local))  # type: ignore[arg-type]
    client = _write(directory, "client", *_leaf(ca, "desktop client", dns=[], ips=[], client=True))
    expired = _write(directory, "expired", *_leaf(ca, "localhost", expired=True, **local))  # type: ignore[arg-type]
    wrong = _write(directory, "wrong-host", *_leaf(ca, "nats.example.com", dns=["nats.example.com"], ips=[]))
    return TestCerts(
        ca=ca_path,
        ca_key=ca_key_path,
        other_ca=other_path,
        server_cert=server[0],
        server_key=server[1],
        client_cert=client[0],
        client_key=client[1],
        expired_cert=expired[0],
        expired_key=expired[1],
        wrong_host_cert=wrong[0],
        wrong_host_key=wrong[1],
    )
