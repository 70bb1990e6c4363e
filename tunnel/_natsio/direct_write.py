"""Publishes written to the socket by us: at once when the connection is quiet, else once
per event-loop pass.

nats-py's ``publish`` appends the command to its pending buffer and kicks a flusher task
through an ``asyncio.Queue`` with a fresh future; the flusher writes in a later event-loop
pass. A lone message (a request's start, a small response) pays for the queue, the future,
the task step and that extra pass: a measurable part of a small request's latency. Under load,
though, one write for many messages is what keeps CPU low (on loopback a ``send`` costs the
kernel's receive path too, several microseconds).

:class:`DirectWriter` does both. A publish is appended to nats-py's own pending buffer, and
the buffer is written when the pass is over (a ``call_soon`` callback: one ``Handle`` instead
of the queue, future and task step), unless nats-py's flusher wrote it first. The first
publish of a pass is written at once instead when nats-py has nothing pending and the previous
pass that published had only that one: the connection is quiet (one request at a time), and
waiting buys nothing. Since everything else goes through nats-py's one buffer, in order, the
order of publishes is nats-py's, whoever writes.

nats-py takes a publish as usual (``publish``: its limits and its waiting) when the connection
is not plainly connected (reconnecting, draining: its buffer is resent after a reconnect),
when the socket is behind (the transport holds unsent bytes: nats-py's flusher then waits for
it to drain, and its ``pending_size`` limit makes publishers wait too, so the tunnel keeps that
backpressure), for bulk-sized payloads, and for a subject nats-py would refuse.

nats-py has no public call for this. The private details used are the client's ``_status``,
``_pending``, ``_pending_data_size``, ``_transport`` (a ``TcpTransport``, plain or TLS, and its
``_io_writer``) and ``_max_payload``, and ``nats.protocol.command.pub_cmd``;
:meth:`DirectWriter.for_client` checks the client's and returns None (every publish then goes
through nats-py) if a nats-py release changes them; a transport without ``_io_writer`` leaves
each publish to nats-py.
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
#: A pass that publishes more than this writes every this many at once, so the peer starts on
#: them while this side does the rest. Written only when the pass ends, a burst (the answers to
#: 32 requests read together) makes the two sides take turns, each idle while the other works
#: through the whole burst: with it, the 32-way rate of small requests rose ~10% on 2 cores.
BURST_PUBLISHES = 16
_NEEDED = ("_status", "_pending", "_pending_data_size", "_transport", "_max_payload", "stats")


def _plain_subject(subject: str) -> bool:
    """Not empty, and no whitespace or control character (they would break the protocol line;
    nats-py refuses some itself): anything else goes through nats-py. String methods, not a
    regex: searching ``\\s|^$`` took 2 us for a 70-character subject, on every publish."""
    return bool(subject) and subject.isprintable() and " " not in subject


class DirectWriter:
    """Writes ``nc``'s publishes itself: once per event-loop pass, or at once when quiet."""

    __slots__ = ("_in_pass", "_loop", "_nc", "_quiet")

    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self._loop: asyncio.AbstractEventLoop | None = None
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
        nats-py instead (see the module docstring for when)."""
        nc: Any = self._nc
        size = len(payload)
        if (
            nc._status != _CONNECTED
            or size > SMALL_PAYLOAD
            or size > nc._max_payload
            or not _plain_subject(subject)
            or (reply and not _plain_subject(reply))
        ):
            return False
        transport = nc._transport
        if type(transport).__name__ != "TcpTransport":
            return False  # the WebSocket transport queues writes itself
        writer = getattr(transport, "_io_writer", None)
        if writer is None or writer.transport.get_write_buffer_size():
            return False  # the socket is behind: leave the waiting to nats-py
        command = pub_cmd(subject, reply or "", payload)
        first = self._in_pass == 0
        if first:
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            loop.call_soon(self._end_pass)
        if first and self._quiet and not nc._pending_data_size:
            writer.write(command)
        else:
            nc._pending.append(command)
            nc._pending_data_size += len(command)
        self._in_pass += 1
        if self._in_pass % BURST_PUBLISHES == 0 and nc._pending_data_size:
            self._write_pending()
        stats = nc.stats
        stats["out_msgs"] += 1
        stats["out_bytes"] += size
        return True

    def _end_pass(self) -> None:
        """Write what nats-py holds, as its flusher would (unless it did already)."""
        self._quiet = self._in_pass == 1
        self._in_pass = 0
        nc: Any = self._nc
        if not nc._pending_data_size or nc._status != _CONNECTED:
            return  # written already, or kept by nats-py to resend after a reconnect
        self._write_pending()

    def _write_pending(self) -> None:
        nc: Any = self._nc
        pending = nc._pending
        nc._pending = []
        nc._pending_data_size = 0
        if len(pending) == 1:
            nc._transport.write(pending[0])
        else:
            nc._transport.writelines(pending)
