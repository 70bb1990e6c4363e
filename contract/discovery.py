"""NATS micro service discovery: the names, subjects and permissions linkd, the gateway and linkctl share.

linkd answers as service ``linkd-<host token>`` (:func:`desktop_service_name`: the tunnel's
base64url host token, so every host has its own name and no two hosts share one), the
gateway as ``studio-gateway`` (:data:`GATEWAY_SERVICE`). ``nats.micro`` subscribes each
service to ``$SRV.<VERB>``, ``$SRV.<VERB>.<name>`` and ``$SRV.<VERB>.<name>.<id>`` for the
verbs PING, INFO and STATS.

Tenancy (operator mode; :func:`discovery_grant` is added to every minted credential):

- a desktop credential may *subscribe* the broadcast verbs (``$SRV.PING`` ...), its own
  name's subjects (``$SRV.*.<name>`` and ``$SRV.*.<name>.*``: two wildcards, not six subjects,
  because the whole JWT must fit nats-server's 4 KiB CONNECT line) and its own status
  endpoint: it answers operators (whose credentials may publish anything) and its own tenant,
  and it can be sent nothing about another host;
- it may *publish* only its own name's subjects and the gateway's PING/INFO: a tenant's
  ``linkctl services`` (the same credential) can ask about its own desktop and the gateway,
  never broadcast (``$SRV.PING`` is denied: no other desktop ever hears the tenant) and
  never name another host;
- replies go to the requester's inbox through NATS's response permission
  (:data:`RESPONSE_PERMISSION`: one reply per request received, for a short while), so no
  inbox subject of anyone else is ever granted.

What a broadcast returns to an operator is self-reported (a tenant could answer one under
any name); a named request (``$SRV.PING.linkd-<token>``) reaches only that host's credential.
"""

from __future__ import annotations

import re
from typing import Any, Final

import tunnel
from contract.permissions import PermissionGrant

__all__ = [
    "DESKTOP_SERVICE_PREFIX",
    "GATEWAY_HEALTH_SUBJECT",
    "GATEWAY_SERVICE",
    "RESPONSE_PERMISSION",
    "SRV_PREFIX",
    "VERBS",
    "desktop_service_name",
    "discovery_grant",
    "service_version",
    "status_subject",
]

SRV_PREFIX: Final = "$SRV"
VERBS: Final = ("PING", "INFO", "STATS")
DESKTOP_SERVICE_PREFIX: Final = "linkd-"
GATEWAY_SERVICE: Final = "studio-gateway"
# The gateway's health endpoint (request/reply, any payload): what GET /healthz says.
GATEWAY_HEALTH_SUBJECT: Final = "studio.gateway.health"
# One reply per request a desktop receives, within 10 s (nanoseconds in a user JWT).
_SEMVER: Final = re.compile(r"^\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")
RESPONSE_PERMISSION: Final[dict[str, Any]] = {"max": 1, "ttl": 10_000_000_000}


def desktop_service_name(hostname: str) -> str:
    """``linkd-<host token>``: a valid micro name (``[A-Za-z0-9_-]``) unique to the host."""
    return DESKTOP_SERVICE_PREFIX + tunnel.host_token(hostname)


def service_version(version: str) -> str:
    """micro wants semantic versions: ours when it is one, else ``0.0.0+<ours, sanitised>``."""
    if _SEMVER.match(version):
        return version
    return "0.0.0+" + (re.sub(r"[^0-9A-Za-z.-]", "-", version).strip(".-") or "unknown")


def status_subject(subjects: tunnel.HostSubjects) -> str:
    """The desktop's ``status`` endpoint: under its own host prefix."""
    return f"{subjects.base}.svc.status"


def discovery_grant(hostname: str, prefix: str = tunnel.DEFAULT_PREFIX) -> PermissionGrant:
    """What a desktop credential needs to answer discovery, and to ask about itself and the gateway."""
    name = desktop_service_name(hostname)
    # Its own name under any verb: two subjects instead of six. Each holds the host token, and
    # the whole user JWT travels in the CONNECT line, which nats-server caps at 4 KiB by default.
    own = (f"{SRV_PREFIX}.*.{name}", f"{SRV_PREFIX}.*.{name}.*")
    broadcast = tuple(f"{SRV_PREFIX}.{verb}" for verb in VERBS)
    gateway = tuple(
        s
        for verb in ("PING", "INFO")
        for s in (f"{SRV_PREFIX}.{verb}.{GATEWAY_SERVICE}", f"{SRV_PREFIX}.{verb}.{GATEWAY_SERVICE}.*")
    )
    status = status_subject(tunnel.HostSubjects.for_host(hostname, prefix))
    return PermissionGrant(publish=(*own, *gateway, status), subscribe=(*broadcast, *own, status))
