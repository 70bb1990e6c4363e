"""``linkctl services``: the NATS micro services this credential may see (desktops, gateways).

PING first, then INFO and STATS of each instance that answered (``$SRV`` subjects, answered
by ``nats.micro`` in linkd and the gateway: :mod:`contract.discovery`).

Which PING: a desktop credential (a ``.creds`` from ``linkctl session``, tagged with its
host) may only name its own desktop and the gateway, so it asks ``$SRV.PING.linkd-<host
token>`` and ``$SRV.PING.studio-gateway`` (its replies come back under its own host's
inbox prefix, the only inbox it may read); any other credential broadcasts ``$SRV.PING``
and lists whoever answers within ``--timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Final

import typer
from nats.aio.client import Client as NATS

import tunnel
from contract.discovery import GATEWAY_SERVICE, SRV_PREFIX, desktop_service_name
from contract.nats_jwt import JwtError, decode_jwt
from contract.run_protocol import uplink_inbox_prefix
from tunnel.connect import parse_creds

from . import exitcodes
from .common import (
    DEFAULT_NATS_URL,
    CliError,
    CredsOpt,
    NatsCaOpt,
    NatsCertOpt,
    NatsKeyOpt,
    NatsOptions,
    NatsUrlOpt,
    PrefixOpt,
    TokenOpt,
    nats_connection,
    run,
)

__all__ = ["Instance", "credential_host", "discover", "register"]

DEFAULT_TIMEOUT: Final = 1.0
HOST_TAG: Final = "host:"

EPILOG: Final = """\b
Examples:
  linkctl services                                  # every service this credential may see
  linkctl services --creds alice.creds              # a desktop credential: its desktop and the gateway
  linkctl services --json | jq '.[].name'
  linkctl services --timeout 3                      # wait longer for answers

\b
Exit status:
     0  at least one service answered
     1  none answered within --timeout
     2  error: bad flag, NATS unreachable or refusing the credentials
"""


@dataclass
class Instance:
    """One service instance that answered PING, with its INFO and STATS when they came."""

    name: str
    id: str
    version: str
    metadata: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] | None = None
    stats: dict[str, Any] | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "id": self.id,
            "version": self.version,
            "metadata": self.metadata,
            "description": (self.info or {}).get("description"),
            "endpoints": (self.info or {}).get("endpoints", []),
            "stats": self.stats,
        }

    def totals(self) -> tuple[int, int, float | None]:
        """Requests, errors and mean processing time (ms) over every endpoint of STATS."""
        endpoints = (self.stats or {}).get("endpoints") or []
        requests = sum(int(e.get("num_requests") or 0) for e in endpoints)
        errors = sum(int(e.get("num_errors") or 0) for e in endpoints)
        spent = sum(int(e.get("processing_time") or 0) for e in endpoints)
        return requests, errors, (spent / requests / 1e6 if requests else None)


def credential_host(creds: Path | None) -> str | None:
    """The host a desktop credential serves (its JWT's ``host:`` tag); None for any other."""
    if creds is None:
        return None
    try:
        jwt, _ = parse_creds(creds.read_text(encoding="utf-8"))
        claims = decode_jwt(jwt)
    except (OSError, ValueError, JwtError):
        return None
    nats = claims.get("nats")
    tags = nats.get("tags") if isinstance(nats, dict) else None
    for tag in tags if isinstance(tags, list) else []:
        if isinstance(tag, str) and tag.startswith(HOST_TAG):
            return tag.removeprefix(HOST_TAG)
    return None


async def _gather(
    nc: NATS, subject: str, timeout: float, *, first_only: bool = False
) -> list[dict[str, Any]]:
    """Every JSON reply to one request on ``subject`` within ``timeout`` (a broadcast has many)."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    replies: list[dict[str, Any]] = []
    try:
        await nc.publish(subject, b"", reply=inbox)
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                msg = await sub.next_msg(timeout=remaining)
            except TimeoutError:
                break
            with contextlib.suppress(ValueError):
                doc = json.loads(msg.data)
                if isinstance(doc, dict):
                    replies.append(doc)
                    if first_only:
                        break
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return replies


async def discover(nc: NATS, *, own_host: str | None, timeout: float) -> list[Instance]:
    """PING (named for a desktop credential, else broadcast), then INFO and STATS of each answer."""
    if own_host is None:
        pings = await _gather(nc, f"{SRV_PREFIX}.PING", timeout)
    else:
        named = (desktop_service_name(own_host), GATEWAY_SERVICE)
        batches = await asyncio.gather(*(_gather(nc, f"{SRV_PREFIX}.PING.{n}", timeout) for n in named))
        pings = [ping for batch in batches for ping in batch]
    instances: dict[tuple[str, str], Instance] = {}
    for ping in pings:
        name, sid = str(ping.get("name", "")), str(ping.get("id", ""))
        if name and sid and (name, sid) not in instances:
            metadata = ping.get("metadata")
            instances[(name, sid)] = Instance(
                name,
                sid,
                str(ping.get("version", "")),
                {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {},
            )

    async def details(instance: Instance) -> None:
        # A desktop credential may ask the gateway's PING and INFO only (contract.discovery).
        verbs = ("INFO",) if own_host is not None and instance.name == GATEWAY_SERVICE else ("INFO", "STATS")
        for verb in verbs:
            found = await _gather(
                nc, f"{SRV_PREFIX}.{verb}.{instance.name}.{instance.id}", timeout, first_only=True
            )
            if found:
                setattr(instance, verb.lower(), found[0])

    await asyncio.gather(*(details(i) for i in instances.values()))
    return sorted(instances.values(), key=lambda i: (i.name != GATEWAY_SERVICE, i.name, i.id))


def _connection(options: NatsOptions, own_host: str | None) -> contextlib.AbstractAsyncContextManager[NATS]:
    """The command's connection; a desktop credential hears replies on its own inbox prefix only."""
    inbox = None
    if own_host is not None:
        inbox = uplink_inbox_prefix(tunnel.HostSubjects.for_host(own_host, options.prefix))
    return nats_connection(options, "linkctl services", inbox_prefix=inbox)


def _table(instances: Sequence[Instance]) -> str:
    rows = [("NAME", "HOST", "VERSION", "ID", "ENDPOINTS", "REQUESTS", "ERRORS", "AVG MS")]
    for i in instances:
        requests, errors, mean = i.totals()
        endpoints = ",".join(str(e.get("name")) for e in (i.info or {}).get("endpoints", []))
        have_stats = i.stats is not None
        rows.append(
            (
                i.name,
                i.metadata.get("hostname", "-"),
                i.version,
                i.id,
                endpoints or "-",
                str(requests) if have_stats else "-",
                str(errors) if have_stats else "-",
                f"{mean:.2f}" if mean is not None else "-",
            )
        )
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def register(app: typer.Typer) -> None:
    @app.command("services", epilog=EPILOG)
    def services(
        nats: NatsUrlOpt = DEFAULT_NATS_URL,
        creds: CredsOpt = None,
        token: TokenOpt = None,
        prefix: PrefixOpt = tunnel.DEFAULT_PREFIX,
        nats_ca: NatsCaOpt = None,
        nats_cert: NatsCertOpt = None,
        nats_key: NatsKeyOpt = None,
        timeout: Annotated[
            float,
            typer.Option("--timeout", metavar="SECONDS", min=0.05, help="How long to wait for answers."),
        ] = DEFAULT_TIMEOUT,
        as_json: Annotated[bool, typer.Option("--json", help="One JSON array of the instances.")] = False,
    ) -> None:
        """List the NATS micro services (linked desktops, gateways) this credential may see."""
        options = NatsOptions.from_flags(
            nats, creds, token, prefix, nats_ca=nats_ca, nats_cert=nats_cert, nats_key=nats_key
        )
        own_host = credential_host(options.creds)

        async def main() -> list[Instance]:
            async with _connection(options, own_host) as nc:
                return await discover(nc, own_host=own_host, timeout=timeout)

        found = run(main())
        if as_json:
            sys.stdout.write(json.dumps([i.as_json() for i in found], indent=2) + "\n")
        elif found:
            sys.stdout.write(_table(found) + "\n")
        if not found:
            scope = f"desktop {own_host} and the gateway" if own_host else "any service"
            raise CliError(f"no answer from {scope} within {timeout:g} s", exitcodes.OFFLINE)
