"""TLS for NATS connections: a private CA and client certificates by setting, and clear errors.

Why here: every NATS client of the project (``tunnel.connect``, linkd, linkctl, the gateway)
must trust a private CA through an explicit setting, never through process-wide environment
variables such as ``SSL_CERT_FILE``, and must turn a failed handshake into one line that says
what is wrong. One place builds the ``ssl.SSLContext`` and one function classifies the errors::

    cfg = TLSConfig(ca="ca.pem", cert="client.pem", key="client.key")
    nc = await tunnel.connect.connect("tls://nats.example:4222", tls=cfg)

    problem = classify_tls_error(exc)      # None: not a TLS problem
    if problem is not None:
        print(f"{url}: {problem.reason}: {problem.fix(ca='--nats-ca FILE (or LINKD_NATS_CA)')}")

nats-py takes one ``ssl.SSLContext`` (``tls=``) for ``tls://`` and for ``wss://`` (its websocket
transport hands the same context to aiohttp), so one context serves both URL kinds.
"""

from __future__ import annotations

import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

__all__ = [
    "TLSConfig",
    "TLSProblem",
    "TLSProblemKind",
    "classify_tls_error",
    "quiet_asyncio_tls_eof_warning",
    "tls_context",
]

TLSProblemKind = Literal[
    "unknown_ca",
    "hostname_mismatch",
    "expired",
    "not_yet_valid",
    "client_cert_required",
    "client_cert_rejected",
    "not_tls",
    "handshake_failed",
]

# OpenSSL X509_V_ERR_* codes (ssl.SSLCertVerificationError.verify_code) we explain.
_X509_NOT_YET_VALID: Final = 9
_X509_EXPIRED: Final = 10
_X509_UNKNOWN_CA: Final = frozenset({2, 18, 19, 20, 21})
_X509_HOSTNAME: Final = frozenset({62, 64})

# What each problem means, in words a user can act on.
_REASONS: Final[dict[TLSProblemKind, str]] = {
    "unknown_ca": "certificate signed by an unknown CA",
    "hostname_mismatch": "the server's certificate is not valid for this host name",
    "expired": "the server's certificate has expired",
    "not_yet_valid": "the server's certificate is not valid yet (check the clock)",
    "client_cert_required": "the server requires a client certificate (mTLS) and we sent none",
    "client_cert_rejected": "the server rejected our client certificate",
    "not_tls": "the server does not speak TLS on this port",
    "handshake_failed": "the TLS handshake failed",
}


# asyncio logs this at WARNING whenever a TLS peer closes a connection read through a
# StreamReaderProtocol (which nats-py's TLS transport is): harmless, and on a CLI's stderr it
# reads like an error after a request that worked.
_ASYNCIO_TLS_EOF_NOISE: Final = "returning true from eof_received() has no effect when using ssl"


class _DropTLSEofNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != _ASYNCIO_TLS_EOF_NOISE


_EOF_FILTER: Final = _DropTLSEofNoise()


def quiet_asyncio_tls_eof_warning() -> None:
    """Drop asyncio's one harmless warning about TLS connections closed by the peer (idempotent)."""
    logger = logging.getLogger("asyncio")
    if _EOF_FILTER not in logger.filters:
        logger.addFilter(_EOF_FILTER)


@dataclass(frozen=True)
class TLSConfig:
    """Which CA to trust and which client certificate to present (all optional).

    ``ca``: a PEM file of CA certificates trusted *instead of* the system store (a private CA);
    None: the system store. ``cert``/``key``: a client certificate for servers that require one
    (mTLS); ``key`` may be omitted when ``cert`` holds the key too. ``hostname``: the name to
    verify the server's certificate against when it differs from the URL's host.
    """

    ca: str | os.PathLike[str] | None = None
    cert: str | os.PathLike[str] | None = None
    key: str | os.PathLike[str] | None = None
    hostname: str | None = None

    def __post_init__(self) -> None:
        if self.key is not None and self.cert is None:
            raise ValueError("a TLS client key needs its certificate (give cert as well)")

    @property
    def is_default(self) -> bool:
        """True when nothing is set: nats-py's own default context does the same."""
        return self.ca is None and self.cert is None and self.hostname is None

    def context(self) -> ssl.SSLContext:
        """A new client ``SSLContext`` (``ValueError`` naming an unreadable or bad file)."""
        return tls_context(ca=self.ca, cert=self.cert, key=self.key)


def tls_context(
    *,
    ca: str | os.PathLike[str] | None = None,
    cert: str | os.PathLike[str] | None = None,
    key: str | os.PathLike[str] | None = None,
) -> ssl.SSLContext:
    """A verifying client context: ``ca`` alone is trusted when given, plus an optional client cert.

    File problems are a ``ValueError`` with one line naming the file, so a CLI can print it.
    """
    if ca is not None:
        ca_path = _readable(ca, "CA file")
        try:
            context = ssl.create_default_context(cafile=str(ca_path))
        except ssl.SSLError as exc:
            raise ValueError(f"CA file {ca_path} holds no usable PEM certificate ({exc.reason})") from None
    else:
        context = ssl.create_default_context()
    if cert is not None:
        cert_path = _readable(cert, "client certificate")
        key_path = _readable(key, "client key") if key is not None else None
        try:
            context.load_cert_chain(str(cert_path), str(key_path) if key_path is not None else None)
        except ssl.SSLError as exc:
            raise ValueError(
                f"client certificate {cert_path} / key {key_path or cert_path} cannot be used ({exc.reason})"
            ) from None
    elif key is not None:
        raise ValueError("a TLS client key needs its certificate (give cert as well)")
    return context


def _readable(path: str | os.PathLike[str], what: str) -> Path:
    resolved = Path(path).expanduser()
    try:
        with resolved.open("rb"):
            pass
    except OSError as exc:
        raise ValueError(f"cannot read the TLS {what} {resolved}: {exc.strerror}") from None
    return resolved


@dataclass(frozen=True)
class TLSProblem:
    """A TLS failure in words: what went wrong (``reason``) and which setting fixes it (``fix``)."""

    kind: TLSProblemKind
    reason: str
    detail: str = ""

    @classmethod
    def of(cls, kind: TLSProblemKind, detail: str = "") -> TLSProblem:
        return cls(kind, _REASONS[kind], detail)

    def fix(self, *, ca: str, cert: str, hostname: str = "") -> str:
        """The fix, naming the caller's own settings.

        ``ca``: how to name the CA setting, e.g. ``"--nats-ca FILE (or LINKD_NATS_CA)"``;
        ``cert``: the same for the client certificate and key.
        """
        if self.kind == "unknown_ca":
            return f"pass {ca} with the CA that signed the server's certificate"
        if self.kind == "hostname_mismatch":
            other = f" (or {hostname})" if hostname else ""
            return f"connect with a host name the server's certificate lists{other}"
        if self.kind == "expired":
            return "renew the server's certificate"
        if self.kind == "not_yet_valid":
            return "fix this computer's clock, or wait until the certificate is valid"
        if self.kind == "client_cert_required":
            return f"pass {cert}"
        if self.kind == "client_cert_rejected":
            return f"pass {cert} signed by a CA the server trusts"
        if self.kind == "not_tls":
            return "use a nats:// or ws:// URL for this port, or the server's TLS port"
        return f"check the server's TLS settings and {ca}"

    def line(self, url: str, *, ca: str, cert: str, hostname: str = "") -> str:
        """``"<url>: <reason>: <fix>"``, the one line a CLI prints."""
        return f"{url}: {self.reason}: {self.fix(ca=ca, cert=cert, hostname=hostname)}"


def classify_tls_error(exc: BaseException | None) -> TLSProblem | None:
    """The TLS problem behind ``exc`` (looking through causes and aiohttp's wrappers), or None.

    Handles ``ssl.SSLCertVerificationError`` (by ``verify_code``), ``ssl.SSLError`` alerts from
    the server (client certificate required or rejected, not TLS at all) and aiohttp's
    ``ClientConnectorCertificateError``/``ClientSSLError`` (``wss://``), which nats-py passes on.
    """
    seen: set[int] = set()
    todo: list[BaseException] = [exc] if exc is not None else []
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        carried = getattr(current, "problem", None)  # tunnel.connect.NatsTLSError
        if isinstance(carried, TLSProblem):
            return carried
        problem = _classify_one(current)
        if problem is not None:
            return problem
        for attr in ("certificate_error", "os_error"):  # aiohttp's connector errors
            inner = getattr(current, attr, None)
            if isinstance(inner, BaseException):
                todo.append(inner)
        for inner in (current.__cause__, current.__context__):
            if inner is not None:
                todo.append(inner)
    return None


def _classify_one(exc: BaseException) -> TLSProblem | None:
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = getattr(exc, "verify_code", None)
        message = str(getattr(exc, "verify_message", "") or "")
        if code is None and not message:
            return None  # aiohttp's wrapper: the real error is its certificate_error
        return _problem(_verify_kind(code, message), message)
    if isinstance(exc, ssl.SSLError):
        reason = str(getattr(exc, "reason", "") or "").upper()
        text = f"{reason} {exc}".upper()
        if "CERTIFICATE_VERIFY_FAILED" in text and not reason.endswith("ALERT_BAD_CERTIFICATE"):
            return _problem(_verify_kind(None, str(exc)), str(exc))
        if "CERTIFICATE_REQUIRED" in text or "PEER DID NOT RETURN A CERTIFICATE" in text:
            return _problem("client_cert_required", reason)
        if (
            "BAD_CERTIFICATE" in text
            or "UNKNOWN_CA" in text
            or "CERTIFICATE_UNKNOWN" in text
            or "CERTIFICATE_EXPIRED" in text
        ):
            return _problem("client_cert_rejected", reason)
        if "WRONG_VERSION_NUMBER" in text or "RECORD_LAYER_FAILURE" in text or "PACKET_LENGTH" in text:
            return _problem("not_tls", reason)
        if reason or "SSL" in text:
            return _problem("handshake_failed", reason or str(exc))
    return None


def _verify_kind(code: int | None, message: str) -> TLSProblemKind:
    lowered = message.lower()
    if code == _X509_EXPIRED or "expired" in lowered:
        return "expired"
    if code == _X509_NOT_YET_VALID or "not yet valid" in lowered:
        return "not_yet_valid"
    if code in _X509_HOSTNAME or "mismatch" in lowered or "hostname" in lowered:
        return "hostname_mismatch"
    if code in _X509_UNKNOWN_CA or "issuer" in lowered or "self" in lowered:
        return "unknown_ca"
    return "handshake_failed"


def _problem(kind: TLSProblemKind, detail: str) -> TLSProblem:
    return TLSProblem.of(kind, detail)
