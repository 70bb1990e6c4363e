"""The daemon's NATS TLS settings and how it explains a failed handshake.

Why a module of its own: ``linkd up`` (the daemon's connection) and ``linkd doctor`` (its
"NATS reachable with TLS verified" check) must build the same ``ssl.SSLContext`` from the same
settings (``nats_ca``, ``nats_cert``, ``nats_key``: flags, ``LINKD_NATS_*``, linkd.toml) and word
a certificate problem the same way, naming linkd's own flags in the fix::

    tls = nats_tls(settings)             # None: nothing set, the system CA store
    line = tls_error_line(exc)           # None: not a TLS problem
    reason_fix = explain_tls_error(exc)  # (reason, fix) or None
"""

from __future__ import annotations

from typing import Final

from tunnel.connect import NatsTLSError
from tunnel.tls import TLSConfig, TLSProblem, classify_tls_error

from .config import Settings
from .errors import LinkdError

__all__ = ["CA_HINT", "CERT_HINT", "explain_tls_error", "nats_tls", "tls_error_line"]

CA_HINT: Final = "--nats-ca FILE (or LINKD_NATS_CA, nats_ca in linkd.toml)"
CERT_HINT: Final = "--nats-cert FILE --nats-key FILE (or LINKD_NATS_CERT and LINKD_NATS_KEY)"


def nats_tls(settings: Settings) -> TLSConfig | None:
    """The TLS settings for NATS connections, checked now (``LinkdError`` naming a bad file)."""
    if settings.nats_ca is None and settings.nats_cert is None and settings.nats_key is None:
        return None
    if settings.nats_key is not None and settings.nats_cert is None:
        raise LinkdError("--nats-key needs --nats-cert (LINKD_NATS_CERT): the client certificate")
    config = TLSConfig(ca=settings.nats_ca, cert=settings.nats_cert, key=settings.nats_key)
    try:
        config.context()  # read the files once at start-up: a typo fails here, not at connect
    except ValueError as exc:
        raise LinkdError(str(exc)) from None
    return config


def explain_tls_error(exc: BaseException) -> tuple[str, str] | None:
    """(reason, fix) for a TLS failure behind ``exc``, the fix naming linkd's settings; None otherwise."""
    problem = exc.problem if isinstance(exc, NatsTLSError) else classify_tls_error(exc)
    if problem is None:
        return None
    return problem.reason, _fix(problem)


def tls_error_line(exc: BaseException) -> str | None:
    """``"nats tls://host:4222: <reason>: <fix>"`` for a failed connect, or None when not TLS."""
    if not isinstance(exc, NatsTLSError):
        return None
    return f"nats {exc.where}: {exc.problem.reason}: {_fix(exc.problem)}"


def _fix(problem: TLSProblem) -> str:
    return problem.fix(ca=CA_HINT, cert=CERT_HINT)
