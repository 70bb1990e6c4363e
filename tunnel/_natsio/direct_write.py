"""Publishes written to the socket by us: at once when the connection is quiet, else one
write per event-loop pass.

nats-py's ``publish`` appends the command to a pending list and kicks a flusher task through
an ``asyncio.Queue`` with a fresh future; the flusher writes in a later event-loop pass. A lone
message (a request's start, a small response) pays for the queue, the future, the task step
and that extra pass: a measurable part of a small request's latency. Under load, though, one
write for many messages is what keeps CPU low (on loopback a ``send`` costs the kernel's
receive path too, several microseconds).

:class:`DirectWriter` does both. The publishes of one event-loop pass are collected and
written together when the pass is over (a ``call_soon`` callback: one ``Handle`` instead of
the queue, future and task step). The first publish of a pass is written at once instead when
the previous pass that published had only that one: the connection is quiet (one request at a
time), and waiting buys nothing.

Order is kept: a publish goes through nats-py instead whenever nats-py has anything pending,
and what we collected is written before nats-py's flusher runs (our callback was scheduled
first). When the connection is not plainly connected (reconnecting, draining), publishes go
through nats-py, and anything collected when the pass ends goes to the front of nats-py's
reconnect buffer.

nats-py has no public call for this. The private details used are the client's ``_status``,
``_pending``, ``_pending_data_size``, ``_transport`` (a ``TcpTransport``, plain or TLS) and
``_max_payload``, and ``nats.protocol.command.pub_cmd``; :meth:`DirectWriter.for_client`
checks them and returns None (every publish then goes through nats-py) if a nats-py release
changes them.
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
#: Larger payloads (bulk body frames) go through nats-py, whose flusher waits for the socket
#: to drain: written by us they would pile up in the transport's buffer, copied once more.
SMALL_PAYLOAD = 16 * 1024
_NEEDED = ("_status", "_pending", "_pending_data_size", "_transport", "_max_payload", "stats")


class DirectWriter:
    """Writes ``nc``'s publishes itself: one write per event-loop pass, or at once when quiet."""

    __slots__ = ("_collected", "_in_pass", "_loop", "_nc", "_quiet")

    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self._loop: asyncio.AbstractEventLoop | None = None
        self._collected: list[bytes] = []
        #: Publishes in the current pass (0: none yet, and no end-of-pass callback scheduled).
        self._in_pass = 0
        #: The last pass that published had one publish only.
        self._quiet = True

    @classmethod
    def for_client(cls, nc: NATS) -> DirectWriter | None:
        """A writer for ``nc``, or None if nats-py's internals are not the ones known here."""
        if _CONNECTED is None or not all(hasattr(nc, name) for name in _NEEDED):
            return None
        return cls(nc)

    def try_write(self, subject: str, reply: str | None, payload: bytes) -> bool:
        """Take the publish (written now or when the pass ends); False: publish it through
        nats-py instead (not plainly connected, nats-py has something pending, too large)."""
        nc: Any = self._nc
        size = len(payload)
        if (
            nc._status != _CONNECTED
            or nc._pending_data_size
            or size > SMALL_PAYLOAD
            or size > nc._max_payload
        ):
            return False
        transport = nc._transport
        if type(transport).__name__ != "TcpTransport":
            return False  # the WebSocket transport queues writes itself: leave it to nats-py
        command = pub_cmd(subject, reply or "", payload)
        if self._in_pass == 0:
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            loop.call_soon(self._end_pass)
            if self._quiet:
                transport.write(command)
            else:
                self._collected.append(command)
        else:
            self._collected.append(command)
        self._in_pass += 1
        stats = nc.stats
        stats["out_msgs"] += 1
        stats["out_bytes"] += size
        return True

    def _end_pass(self) -> None:
        self._quiet = self._in_pass == 1
        self._in_pass = 0
        collected = self._collected
        if not collected:
            return
        self._collected = []
        nc: Any = self._nc
        if nc._status == _CONNECTED:
            if len(collected) == 1:
                nc._transport.write(collected[0])
            else:
                nc._transport.writelines(collected)
        else:  # published while connected, but the connection is gone now: nats-py resends
            nc._pending[0:0] = collected
            nc._pending_data_size += sum(map(len, collected))
