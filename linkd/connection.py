"""The daemon's NATS connection: which URLs, which credential, how to reconnect.

One connection per credential: a refresh opens a new connection next to the old
one (make-before-break, see :mod:`linkd.daemon`) instead of swapping the credential
under a live connection, which would leave a moment without subscriptions in which
callers' frames are lost. nats-py asks the connection's :class:`Identity` for the
user JWT and the nonce signature at every (re)connect, so a connection that
reconnects after a drop presents its own credential.

:func:`reconnect_policy` is nats-py's ``reconnect_to_server_handler`` (a
:class:`tunnel.backoff.ReconnectPolicy`): after a drop the first attempt waits a little
jitter, then capped exponential backoff with jitter.

Request inboxes (JetStream publish acks of the run uplink) live under the host's own
subjects (:func:`contract.run_protocol.uplink_inbox_prefix`), which the daemon's credential
may subscribe to; it is never granted ``_INBOX.>``.
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from typing import Any, Final
from urllib.parse import urlsplit

import nkeys
from nats.aio.client import Client as NATS

import tunnel
from contract.nats_jwt import CONNECTION_TYPE_STANDARD, CONNECTION_TYPE_WEBSOCKET
from contract.run_protocol import uplink_inbox_prefix
from tunnel.backoff import ReconnectPolicy
from tunnel.connect import connect
from tunnel.tls import TLSConfig

from .config import Transport
from .errors import LinkdError
from .session import NATS_SCHEMES, LinkSession

__all__ = ["Identity", "choose_urls", "open_connection", "reconnect_policy"]

RECONNECT_FIRST_JITTER: Final = 0.25
RECONNECT_INITIAL: Final = 0.5
RECONNECT_CAP: Final = 3.0
RECONNECT_JITTER: Final = 1.0

Callback = Callable[[], Awaitable[None]]
ErrorCallback = Callable[[Exception], Awaitable[None]]


class Identity:
    """The credential a connection presents at each (re)connect (set by :meth:`update`)."""

    def __init__(self, own_seed: str | None) -> None:
        self.own_seed = own_seed
        self._jwt: str | None = None
        self._seed: str | None = None

    def update(self, session: LinkSession) -> None:
        if session.jwt is None:
            raise ValueError("a token session has no JWT identity")
        seed = session.seed if session.seed is not None else self.own_seed
        if seed is None:
            raise ValueError("the session's JWT is for our own key, but we have no seed")
        self._jwt, self._seed = session.jwt, seed

    def jwt_cb(self) -> bytes:
        if self._jwt is None:
            raise RuntimeError("no credential yet")
        return self._jwt.encode("ascii")

    def signature_cb(self, nonce: str) -> bytes:
        if self._seed is None:
            raise RuntimeError("no credential yet")
        keypair = nkeys.from_seed(bytearray(self._seed.encode("ascii")))
        try:
            return base64.b64encode(keypair.sign(nonce.encode("ascii")))
        finally:
            keypair.wipe()


def choose_urls(session: LinkSession, transport: Transport = "auto") -> list[str]:
    """The session's URLs we may and want to use: one kind only (nats-py cannot mix them).

    ``auto``: the kind of the gateway's first allowed URL (its preference order).
    """
    allowed = set(session.allowed_connection_types) or {CONNECTION_TYPE_STANDARD, CONNECTION_TYPE_WEBSOCKET}
    usable = [u for u in session.urls if NATS_SCHEMES.get(urlsplit(u).scheme) in allowed]
    if transport != "auto":
        wanted = transport.upper()
        if wanted not in allowed:
            raise LinkdError(
                f"this gateway's credentials do not allow {transport} NATS connections "
                f"(allowed: {', '.join(sorted(allowed)).lower()}); use --nats-transport auto"
            )
        usable = [u for u in usable if NATS_SCHEMES[urlsplit(u).scheme] == wanted]
    if not usable:
        raise LinkdError(
            f"the gateway offered no NATS URL usable with connection types {sorted(allowed)}: "
            f"{list(session.urls)}"
        )
    kind = NATS_SCHEMES[urlsplit(usable[0]).scheme]
    return [u for u in usable if NATS_SCHEMES[urlsplit(u).scheme] == kind]


def reconnect_policy() -> ReconnectPolicy:
    """The daemon's reconnect policy: from RECONNECT_INITIAL doubling up to RECONNECT_CAP, plus jitter."""
    return ReconnectPolicy(
        initial=RECONNECT_INITIAL,
        cap=RECONNECT_CAP,
        jitter=RECONNECT_JITTER,
        first_jitter=RECONNECT_FIRST_JITTER,
    )


async def open_connection(
    session: LinkSession,
    identity: Identity,
    policy: ReconnectPolicy,
    *,
    transport: Transport = "auto",
    tls: TLSConfig | None = None,
    name: str = "linkd",
    disconnected_cb: Callback | None = None,
    reconnected_cb: Callback | None = None,
    closed_cb: Callback | None = None,
    error_cb: ErrorCallback | None = None,
) -> NATS:
    """Connect for ``session`` (raises ``tunnel.connect.NatsConnectError`` / ``NatsAuthError`` /
    ``NatsTLSError``); ``tls`` trusts a private CA and presents a client certificate (linkd.tls)."""
    urls = choose_urls(session, transport)
    subjects = tunnel.HostSubjects.for_host(session.hostname, session.prefix)
    options: dict[str, Any] = {
        "name": name,
        "inbox_prefix": uplink_inbox_prefix(subjects),
        "reconnect_to_server_handler": policy,
        "disconnected_cb": disconnected_cb,
        "reconnected_cb": reconnected_cb,
        "closed_cb": closed_cb,
        "error_cb": error_cb,
        "tls": tls,
    }
    if session.token is not None:
        return await connect(urls, token=session.token, **options)
    identity.update(session)
    # Callbacks, not a fixed seed or creds: the seed is read (and wiped) only to sign a nonce.
    return await connect(urls, user_jwt_cb=identity.jwt_cb, signature_cb=identity.signature_cb, **options)
