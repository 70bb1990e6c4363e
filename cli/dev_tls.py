"""Certificates for ``linkctl dev --tls``: a private CA and a server certificate, kept in the state dir.

Why: the dev stack shows the production shape locally (``tls://`` and ``wss://`` with a CA the
clients trust by setting, never by process-wide variables). Made once with ``cryptography``
(part of the gateway extra, which the stack needs anyway, so it is imported only here, inside
the function) and reused while valid, so a ``LINKCTL_NATS_CA`` exported from ``dev.env`` keeps
working across restarts::

    tls/ca.pem        the dev CA (trust it: --nats-ca / LINKCTL_NATS_CA / LINKD_NATS_CA / NATS_CA)
    tls/ca.key        its key (0600), to sign a new server certificate when the old one expires
    tls/server.pem    nats-server's certificate for localhost and 127.0.0.1
    tls/server.key    its key (0600)
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

__all__ = ["DevCerts", "ensure_dev_certs"]

# The CA outlives many server certificates; a server certificate is renewed when it has less than
# RENEW_BEFORE left, so a long-running stack never meets an expired one.
CA_LIFETIME: Final = dt.timedelta(days=3650)
SERVER_LIFETIME: Final = dt.timedelta(days=90)
RENEW_BEFORE: Final = dt.timedelta(days=7)
SERVER_NAMES: Final = ("localhost",)
SERVER_IPS: Final = ("127.0.0.1", "::1")


@dataclass(frozen=True)
class DevCerts:
    ca: Path
    server_cert: Path
    server_key: Path


def ensure_dev_certs(directory: Path) -> DevCerts:
    """The dev CA and a valid server certificate in ``directory`` (made or renewed as needed)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    certs = DevCerts(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    ca_key_path = directory / "ca.key"
    now = dt.datetime.now(dt.UTC)

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    def write_key(path: Path, key: Any) -> None:
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)

    def valid(path: Path, margin: dt.timedelta) -> x509.Certificate | None:
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
        except (OSError, ValueError):
            return None
        # not_valid_after_utc: cryptography >= 42; the naive UTC value before that.
        after = getattr(cert, "not_valid_after_utc", None) or cert.not_valid_after.replace(tzinfo=dt.UTC)
        return cert if after - margin > now else None

    ca_cert = valid(certs.ca, SERVER_LIFETIME)
    ca_key: Any = None
    if ca_cert is not None:
        try:
            ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
        except (OSError, ValueError):
            ca_cert = None
    if ca_cert is None or ca_key is None:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(name("linkctl dev CA"))
            .issuer_name(name("linkctl dev CA"))
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        write_key(ca_key_path, ca_key)
        certs.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        certs.server_cert.unlink(missing_ok=True)  # signed by the old CA: make a new one below

    server = valid(certs.server_cert, RENEW_BEFORE)
    if server is not None and server.issuer == ca_cert.subject and certs.server_key.is_file():
        return certs
    key = ec.generate_private_key(ec.SECP256R1())
    alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in SERVER_NAMES]
    alt_names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in SERVER_IPS]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("localhost"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + SERVER_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    write_key(certs.server_key, key)
    certs.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return certs
