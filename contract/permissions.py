"""What one host's daemon may do on NATS, and nothing more: the gateway grants it, the daemon needs it.

A daemon credential is confined to its own host prefix ``P`` (see docs/protocol.md):

- subscribe ``P.request`` (request starts, in its queue group), ``P.req.*.abort``,
  ``P.req.*.body`` (plain v1 request bodies) and ``P.req.*.up.*`` (extension
  body/credit frames addressed to one server instance);
- publish ``P.req.*.reply`` and ``P.req.*.reply.*`` (its answers, to reference
  and shared-reply callers);
- subscribe the host's readiness subject ``<prefix>_ready.<token>``, the one subject
  outside ``P`` (on purpose: a monitoring tap on the prefix must not hide it; callers
  ask NATS whether it is held to tell an offline host from a slow one).

Everything else is denied by omission: allow-lists only, so another host's
subjects, ``>`` and ``_INBOX.>`` are all out of reach. The callers' own reply
subjects live under the caller's chosen host ``P`` too, so no ``resp`` grant is needed.

Run uplink (:func:`uplink_grant`, part of every minted session by default via
:data:`DEFAULT_GRANTS`): publish ``P.runs.*`` (its own runs' events, a JetStream
publish) and subscribe ``P.inbox.>`` (the daemon's nats-py ``inbox_prefix``, where the
JetStream acks arrive). Both under the host's own prefix, so a daemon can neither
forge another host's run events nor read another host's acks.

Extension point: later features add a :class:`PermissionGrant` provider to
:func:`daemon_permissions`'s ``extra`` instead of editing the tunnel rules here.

In a user JWT (:mod:`contract.nats_jwt`) a grant is the ``pub``/``sub`` part of the
``nats`` claims (:meth:`PermissionGrant.as_claims`, read back by :meth:`PermissionGrant.from_claims`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import tunnel
from contract.run_protocol import uplink_publish_grant

__all__ = [
    "DEFAULT_GRANTS",
    "GrantProvider",
    "PermissionGrant",
    "daemon_permissions",
    "tunnel_grant",
    "uplink_grant",
]


@dataclass(frozen=True, slots=True)
class PermissionGrant:
    """Subjects a credential may publish to and subscribe to (allow-lists; order kept, no repeats)."""

    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()

    def __add__(self, other: PermissionGrant) -> PermissionGrant:
        return PermissionGrant(
            tuple(dict.fromkeys(self.publish + other.publish)),
            tuple(dict.fromkeys(self.subscribe + other.subscribe)),
        )

    def as_claims(self) -> dict[str, Any]:
        """The ``pub``/``sub`` part of a NATS user JWT's ``nats`` claims."""
        return {"pub": {"allow": list(self.publish)}, "sub": {"allow": list(self.subscribe)}}

    @classmethod
    def from_claims(cls, nats: Mapping[str, Any]) -> PermissionGrant:
        """The allow-lists of a user JWT's ``nats`` claims, as they are (empty when absent or malformed)."""

        def allowed(direction: str) -> tuple[str, ...]:
            rules = nats.get(direction, {})
            allow = rules.get("allow") if isinstance(rules, dict) else None
            return tuple(str(s) for s in allow) if isinstance(allow, list) else ()

        return cls(allowed("pub"), allowed("sub"))


# Given the host's subjects, the extra grants one feature needs (e.g. run uplink subjects).
GrantProvider = Callable[[tunnel.HostSubjects], PermissionGrant]


def tunnel_grant(subjects: tunnel.HostSubjects) -> PermissionGrant:
    """Exactly what ``tunnel.serve`` needs for one host (nothing of any other host)."""
    base = subjects.base
    return PermissionGrant(
        publish=(f"{base}.req.*.reply", f"{base}.req.*.reply.*"),
        subscribe=(
            subjects.request,
            subjects.all_aborts,
            f"{base}.req.*.body",
            f"{base}.req.*.up.*",
            subjects.ready,
        ),
    )


def uplink_grant(subjects: tunnel.HostSubjects) -> PermissionGrant:
    """The run uplink: publish its own run events, receive the JetStream acks in its own inbox."""
    publish, subscribe = uplink_publish_grant(subjects)
    return PermissionGrant(publish=publish, subscribe=subscribe)


# What every minted daemon credential gets on top of the tunnel rules.
DEFAULT_GRANTS: tuple[GrantProvider, ...] = (uplink_grant,)


def daemon_permissions(
    hostname: str, prefix: str = tunnel.DEFAULT_PREFIX, *, extra: Iterable[GrantProvider] = ()
) -> PermissionGrant:
    """The full grant of the daemon serving ``hostname``: the tunnel rules plus each ``extra`` provider.

    Every extra subject must stay under the host's own prefix, so a provider cannot
    widen a credential to another host by mistake.
    """
    subjects = tunnel.HostSubjects.for_host(hostname, prefix)
    grant = tunnel_grant(subjects)
    for provider in extra:
        more = provider(subjects)
        for subject in (*more.publish, *more.subscribe):
            if not subjects.owns(subject):
                raise ValueError(f"grant {subject!r} is outside host prefix {subjects.base!r}")
        grant = grant + more
    return grant
