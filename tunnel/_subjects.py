"""Subject naming: every subject of one host lives under one prefix.

``P = <prefix>.host.<b64url(hostname)>``; the reference ``tunnel.v1`` subjects
are ``P.request`` (queue group ``tunnel_v1_host_<token>``), ``P.req.<id>.body``,
``P.req.<id>.reply`` and ``P.req.<id>.abort``. Our extensions stay under
``P.req.<id>.`` too, so one permission rule (``P.>``) confines a daemon:

- ``P.req.<id>.reply.<clientId>``: replies to a client that demultiplexes all its
  requests from one wildcard subscription ``<prefix>.host.*.req.*.reply.<clientId>``;
- ``P.req.<id>.up.<serverId>``: body and credit frames to the one server that
  acked the request, read from one wildcard subscription ``P.req.*.up.<serverId>``.

One subject lies outside the prefix on purpose: the readiness subject
``<prefix>_ready.<token>``, which each of our servers holds while it takes requests.
A monitoring tap on ``<prefix>.>`` (which hides NATS's no-responders answer) does
not match it, so a caller can still ask NATS whether a server is there.

Hostnames are case-insensitive (DNS rules), so the token is built from the
lowercased name: ``Desk.Example`` and ``desk.example`` are the same host.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from dataclasses import dataclass, field
from typing import Final

from ._errors import LocalProtocolError

# The current reference's prefix. Older reference versions (and deployments made with them) use
# "_tunnel.v1": pass prefix="_tunnel.v1" (linkctl --prefix, the gateway's TUNNEL_PREFIX) for those.
DEFAULT_PREFIX: Final = "tunnel.v1"
LEGACY_PREFIX: Final = "_tunnel.v1"
# Hostnames longer than a DNS name are almost certainly a mistake or an attack.
MAX_HOSTNAME_LENGTH: Final = 253
# Request ids are random; this bounds what we accept from the network.
MAX_REQUEST_ID_LENGTH: Final = 128

_ID_RE: Final = re.compile(r"^[A-Za-z0-9_-]+$")
_PREFIX_TOKEN_RE: Final = re.compile(r"^[A-Za-z0-9_-]+$")
_REPLY_TAIL_RE: Final = re.compile(r"reply(?:\.[A-Za-z0-9_-]+)?")
_HOST_FORBIDDEN_RE: Final = re.compile(r"[\s\x00-\x1f\x7f/?#@]")


def normalize_hostname(hostname: str) -> str:
    """Validate and lowercase a tunnel hostname."""
    if not isinstance(hostname, str):
        raise LocalProtocolError("hostname must be a string")
    name = hostname.strip().lower()
    if not name:
        raise LocalProtocolError("hostname is empty")
    if len(name) > MAX_HOSTNAME_LENGTH:
        raise LocalProtocolError(f"hostname longer than {MAX_HOSTNAME_LENGTH} characters")
    if _HOST_FORBIDDEN_RE.search(name):
        raise LocalProtocolError(f"hostname {hostname!r} contains a forbidden character")
    return name


def host_token(hostname: str) -> str:
    """The subject-safe token of a hostname: base64url of its UTF-8, no padding."""
    raw = normalize_hostname(hostname).encode("utf-8")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def hostname_from_token(token: str) -> str:
    """Inverse of :func:`host_token` (for diagnostics); raises on a bad token."""
    try:
        padded = token + "=" * (-len(token) % 4)
        return base64.urlsafe_b64decode(padded.encode("ascii")).decode("utf-8")
    except (binascii.Error, UnicodeError, ValueError) as exc:
        raise LocalProtocolError(f"invalid host token {token!r}") from exc


def validate_prefix(prefix: str) -> str:
    """A prefix is one or more dot-separated subject tokens without wildcards."""
    tokens = prefix.split(".")
    if not prefix or not all(_PREFIX_TOKEN_RE.fullmatch(t) for t in tokens):
        raise LocalProtocolError(f"invalid subject prefix {prefix!r}")
    return prefix


def is_valid_request_id(request_id: object) -> bool:
    return (
        isinstance(request_id, str)
        and 0 < len(request_id) <= MAX_REQUEST_ID_LENGTH
        and _ID_RE.fullmatch(request_id) is not None
    )


def new_request_id() -> str:
    """32 hex characters, as the reference peers use."""
    return secrets.token_hex(16)


def new_endpoint_id() -> str:
    """Random id of one client or one server instance, used in subjects."""
    return secrets.token_hex(8)


@dataclass(frozen=True, slots=True)
class HostSubjects:
    """All subjects of one host under one prefix."""

    prefix: str
    token: str
    # Derived once: every request builds several subjects from these (hot path).
    base: str = field(init=False, repr=False, compare=False)
    request: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        base = f"{self.prefix}.host.{self.token}"
        object.__setattr__(self, "base", base)
        object.__setattr__(self, "request", f"{base}.request")

    @classmethod
    def for_host(cls, hostname: str, prefix: str = DEFAULT_PREFIX) -> HostSubjects:
        return cls(validate_prefix(prefix), host_token(hostname))

    @property
    def ready(self) -> str:
        """The readiness subject: held by each of our servers of this host while it serves."""
        return f"{self.prefix}_ready.{self.token}"

    @property
    def queue_group(self) -> str:
        return f"tunnel_v1_host_{self.token}"

    @property
    def all_aborts(self) -> str:
        return f"{self.base}.req.*.abort"

    @property
    def all_subjects(self) -> str:
        """The one wildcard that covers everything of this host (for permissions)."""
        return f"{self.base}.>"

    def body(self, request_id: str) -> str:
        return f"{self.base}.req.{request_id}.body"

    def reply(self, request_id: str) -> str:
        return f"{self.base}.req.{request_id}.reply"

    def abort(self, request_id: str) -> str:
        return f"{self.base}.req.{request_id}.abort"

    def client_reply(self, request_id: str, client_id: str) -> str:
        return f"{self.base}.req.{request_id}.reply.{client_id}"

    def server_up(self, request_id: str, server_id: str) -> str:
        return f"{self.base}.req.{request_id}.up.{server_id}"

    @property
    def all_bodies(self) -> str:
        return f"{self.base}.req.*.body"

    def all_server_up(self, server_id: str) -> str:
        return f"{self.base}.req.*.up.{server_id}"

    def reply_subject_ok(self, subject: str, request_id: str, head: str | None = None) -> bool:
        """A reply subject of this request: ``P.req.<id>.reply`` or ``P.req.<id>.reply.<token>``.

        ``head``: ``P.req.<id>.`` when the caller already built it (saves a string per request).
        """
        if head is None:
            head = f"{self.base}.req.{request_id}."
        return subject.startswith(head) and _REPLY_TAIL_RE.fullmatch(subject, len(head)) is not None

    def owns(self, subject: str) -> bool:
        """True when ``subject`` lies under this host's prefix."""
        return subject.startswith(self.base + ".")


def unheld_ready_subject(prefix: str) -> str:
    """A readiness subject no server holds: interest there means the readiness subjects are
    tapped too, so interest in a host's own says nothing."""
    return f"{prefix}_ready.probe-{new_endpoint_id()}"


def reference_reply_wildcard(prefix: str) -> str:
    """The reference reply subject of every request to any host (``P.req.<id>.reply``): where a
    server that may publish nothing else (the reference daemon permissions) answers."""
    return f"{prefix}.host.*.req.*.reply"


def client_reply_wildcard(prefix: str, client_id: str) -> str:
    """One subscription for the replies of every request of one client, any host."""
    return f"{prefix}.host.*.req.*.reply.{client_id}"


def parse_request_subject(subject: str, prefix: str) -> tuple[str, str, str] | None:
    """Split ``<prefix>.host.<token>.req.<id>.<kind>[.<endpoint>]``.

    Returns ``(host_token, request_id, kind)`` or None when the subject is not of
    that shape. Used to demultiplex wildcard subscriptions.
    """
    head = prefix + ".host."
    if not subject.startswith(head):
        return None
    parts = subject[len(head) :].split(".")
    if len(parts) < 4 or parts[1] != "req":
        return None
    return parts[0], parts[2], parts[3]
