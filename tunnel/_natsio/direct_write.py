"""Publishes that go to the socket at once when nothing else is waiting to be written.

nats-py's ``publish`` appends the command to a pending list and kicks a flusher task through
an ``asyncio.Queue`` with a fresh future; the flusher writes in a later event-loop pass. That
batches well under load, but a lone message (a request's start, a small response) waits for
the queue, the future and that extra pass: a measurable part of a small request's latency.

:class:`DirectWriter` writes the first publish of each event-loop pass straight to the
connection's transport when nats-py has nothing pending (so the order of everything written
stays the order of the publishes) and the connection is plainly connected. Every other
publish of that pass goes through nats-py as usual and is batched by its flusher, so a busy
loop makes at most one extra write per pass.

nats-py has no public call for this. The private details used are the client's ``_status``,
``_pending_data_size``, ``_transport`` (a ``TcpTransport``, plain or TLS) and ``_max_payload``,
and ``nats.protocol.command.pub_cmd``; :meth:`DirectWriter.for_client` checks them and returns
None (every publish then goes through nats-py) if a nats-py release changes them.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from nats.aio.client import Client
from nats.protocol.command import pub_cmd

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS

__all__ = ["DirectWriter"]

_CONNECTED: Any = getattr(Client, "CONNECTED", None)
_NEEDED = ("_status", "_pending_data_size", "_transport", "_max_payload", "stats")


class DirectWriter:
    """Writes one publish per event-loop pass straight to ``nc``'s socket when it is idle."""

    __slots__ = ("_loop", "_nc", "_wrote_this_pass")

    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wrote_this_pass = False

    @classmethod
    def for_client(cls, nc: NATS) -> DirectWriter | None:
        """A writer for ``nc``, or None if nats-py's internals are not the ones known here."""
        if _CONNECTED is None or not all(hasattr(nc, name) for name in _NEEDED):
            return None
        return cls(nc)

    def try_write(self, subject: str, reply: str | None, payload: bytes) -> bool:
        """Write the publish now if nothing is pending and none was written this pass;
        False: the caller publishes through nats-py instead."""
        if self._wrote_this_pass:
            return False
        nc: Any = self._nc
        if nc._status != _CONNECTED or nc._pending_data_size or len(payload) > nc._max_payload:
            return False
        transport = nc._transport
        if type(transport).__name__ != "TcpTransport":
            return False  # the WebSocket transport queues writes itself: leave it to nats-py
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        transport.write(pub_cmd(subject, reply or "", payload))
        stats = nc.stats
        stats["out_msgs"] += 1
        stats["out_bytes"] += len(payload)
        self._wrote_this_pass = True
        loop.call_soon(self._next_pass)
        return True

    def _next_pass(self) -> None:
        self._wrote_this_pass = False
