"""Shared pieces for the tunnel integration tests (real nats-server, real nats-py clients).

Each test opens its own connections: one for the server side, one for the caller side,
each with an ``error_cb`` that records every asynchronous nats-py error, so a test can
prove that nothing (slow consumer, permission violation, ...) went wrong on the wire.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import nats
from nats.aio.client import Client

import tunnel
from cli.nats_server import NatsServer
from tunnel import _codec as codec
from tunnel import _frames as frames
from tunnel._events import Publish
from tunnel._subjects import DEFAULT_PREFIX, parse_request_subject

KiB = 1024
MiB = 1024 * 1024
# Every wait in these tests is on a local server: seconds are already very generous.
EVENT_TIMEOUT = 5.0


@dataclass
class Peers:
    """The two sides of a test, each on its own NATS connection."""

    server_nc: Client
    caller_nc: Client
    errors: list[Exception] = field(default_factory=list)
    extra: list[Client] = field(default_factory=list)

    async def connect(self, url: str, name: str) -> Client:
        """One more connection (e.g. a second server) sharing the error list; closed with the rest."""
        nc = await _connect(url, name, self.errors)
        self.extra.append(nc)
        return nc


async def _connect(url: str, name: str, errors: list[Exception]) -> Client:
    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    return await nats.connect(url, name=name, error_cb=on_error, connect_timeout=EVENT_TIMEOUT)


@asynccontextmanager
async def connect_peers(server: NatsServer) -> AsyncIterator[Peers]:
    errors: list[Exception] = []
    server_nc = await _connect(server.url, "tunnel-server", errors)
    caller_nc = await _connect(server.url, "tunnel-caller", errors)
    peers = Peers(server_nc, caller_nc, errors)
    try:
        yield peers
    finally:
        for nc in [caller_nc, *peers.extra, server_nc]:
            await nc.close()


@asynccontextmanager
async def serving(
    nc: Client, hostname: str, handler: tunnel.Handler, **kwargs: Any
) -> AsyncIterator[tunnel.TunnelServer]:
    server = await tunnel.serve(nc, hostname, handler, **kwargs)
    try:
        yield server
    finally:
        await server.close(timeout=1.0)


class WireLog:
    """A pass-through ``wire_tap`` that decodes and keeps every frame one end publishes."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = prefix
        self.published: list[Publish] = []

    def __call__(self, pub: Publish) -> Iterable[Publish]:
        self.published.append(pub)
        return [pub]

    def frames(self) -> list[frames.Frame]:
        out = []
        for pub in self.published:
            parsed = parse_request_subject(pub.subject, self.prefix)
            out.append(codec.decode_frame(pub.payload, parsed[1] if parsed else None))
        return out

    def types(self) -> list[str]:
        return [frame.type for frame in self.frames()]

    def max_payload(self) -> int:
        return max((len(pub.payload) for pub in self.published), default=0)


def pattern_chunks(total: int, chunk_size: int = MiB) -> Iterator[bytes]:
    """``total`` bytes of random-looking data made lazily, ``chunk_size`` at a time.

    Each chunk starts with its index, so a lost, repeated or reordered chunk changes the hash.
    """
    block = os.urandom(chunk_size)
    sent = 0
    index = 0
    while sent < total:
        n = min(chunk_size, total - sent)
        yield (index.to_bytes(8, "big") + block[8:])[:n]
        sent += n
        index += 1


async def hashed_body(total: int, digest: Any, chunk_size: int = MiB) -> AsyncIterator[bytes]:
    """An async request/response body of ``total`` bytes that feeds ``digest`` as it yields."""
    for chunk in pattern_chunks(total, chunk_size):
        digest.update(chunk)
        yield chunk


def sha256() -> Any:
    return hashlib.sha256()


def log_writes(nc: Client) -> list[bytes]:
    """Every write ``nc`` makes to its socket from now on, in order (the commands on the wire)."""
    written: list[bytes] = []
    transport: Any = nc._transport
    write, writelines = transport.write, transport.writelines

    def logged_write(data: bytes) -> None:
        written.append(bytes(data))
        write(data)

    def logged_writelines(chunks: list[bytes]) -> None:
        written.extend(bytes(c) for c in chunks)
        writelines(chunks)

    transport.write, transport.writelines = logged_write, logged_writelines
    return written
