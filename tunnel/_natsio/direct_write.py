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

Frames of many requests may also share a message when the peer said it takes them: compact
starts to one host (``startBatches``, :mod:`tunnel._start_batch`), complete responses to one
caller (``replyBatches``, :mod:`tunnel._reply_batch`). One that comes right after another of
its batch, while that one still waits in nats-py's buffer as its last command, is merged into
it. Only the last command is ever rewritten, so nothing changes order; whatever else is
appended (any publish, a PING, a SUB) or a write ends the batch. A batch holds at most a burst.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, TypeVar

from nats.aio.client import Client
from nats.protocol.command import pub_cmd

from .. import _batches as batches

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
#: It is also the most frames a batch holds (the buffer is written then): at 32-way, batches
#: of 32 made the two sides take turns again (0.35 of raw), batches of 8 cost more messages.
BURST_PUBLISHES = 16
Owner = TypeVar("Owner")
_NEEDED = ("_status", "_pending", "_pending_data_size", "_transport", "_max_payload", "stats")


def _plain_subject(subject: str) -> bool:
    """Not empty, and no whitespace or control character (they would break the protocol line;
    nats-py refuses some itself): anything else goes through nats-py. String methods, not a
    regex: searching ``\\s|^$`` took 2 us for a 70-character subject, on every publish."""
    return bool(subject) and subject.isprintable() and " " not in subject


class DirectWriter:
    """Writes ``nc``'s publishes itself: once per event-loop pass, or at once when quiet."""

    __slots__ = ("_batch", "_in_pass", "_loop", "_nc", "_quiet")

    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Publishes in the current pass (0: none yet, and no end-of-pass callback scheduled).
        self._in_pass = 0
        #: The last pass that published had one publish only.
        self._quiet = True
        #: The batch that may still grow: nats-py's last pending command when it is one.
        self._batch: _OpenBatch | None = None

    @classmethod
    def for_client(cls, nc: NATS) -> DirectWriter | None:
        """A writer for ``nc``, or None if nats-py's internals are not the ones known here."""
        if _CONNECTED is None or not all(hasattr(nc, name) for name in _NEEDED):
            return None
        return cls(nc)

    def try_write(self, subject: str, reply: str | None, payload: bytes) -> bool:
        """Take the publish (written now or when the pass ends); False: publish it through
        nats-py instead (see the module docstring for when)."""
        return self._take(subject, reply, payload) is not None

    def try_write_batched(
        self,
        subject: str,
        reply: str | None,
        payload: bytes,
        *,
        kind: int,
        key: str,
        label: str,
        owner: Owner,
        size_limit: int | None = None,
    ) -> Owner | None:
        """Take a frame that may share a message with those just before it: a compact start
        to the same host (``kind`` start batch, ``key`` its subject, ``label`` its reply), a
        complete response to the same caller (reply batch, ``key`` the reply subject's tail,
        ``label`` the request id). See the module docstring. ``size_limit``: the most the
        batch may hold besides NATS's own limit (the largest frame the receiver takes).

        Returns the ``owner`` given with the first frame of the message this one went in
        (``owner`` itself when it goes first or alone): a batch goes on that frame's subject,
        with its reply subject. None: publish it through nats-py instead (so ``owner`` must
        not be None).
        """
        batch = self._batch
        nc: Any = self._nc
        if (
            batch is not None
            and batch.kind == kind
            and batch.key == key
            and batch.is_last_of(nc._pending)
            and self._writable(subject, reply, len(payload))
            and batch.add(label, payload, min(SMALL_PAYLOAD, nc._max_payload, size_limit or SMALL_PAYLOAD))
        ):
            payload = batch.payload()
            command = pub_cmd(batch.subject, batch.reply or "", payload)
            nc._pending_data_size += len(command) - len(batch.command)
            nc._pending[-1] = batch.command = command
            nc.stats["out_bytes"] += len(payload) - batch.payload_size
            batch.payload_size = len(payload)
            head: Owner = batch.owner
            self._count_publish()
            return head
        taken = self._take(subject, reply, payload)
        if taken is None:
            return None
        pending = nc._pending
        self._batch = (
            _OpenBatch(kind, key, subject, reply, label, payload, taken, pending, owner)
            if pending and pending[-1] is taken
            else None
        )
        return owner

    def _writable(self, subject: str, reply: str | None, size: int) -> bool:
        nc: Any = self._nc
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
        # The socket is behind: leave the waiting to nats-py.
        return writer is not None and not writer.transport.get_write_buffer_size()

    def _take(self, subject: str, reply: str | None, payload: bytes) -> bytes | None:
        """The publish's command once taken (written now, or pending), or None."""
        size = len(payload)
        if not self._writable(subject, reply, size):
            return None
        nc: Any = self._nc
        command = pub_cmd(subject, reply or "", payload)
        if self._in_pass == 0 and self._quiet and not nc._pending_data_size:
            nc._transport._io_writer.write(command)
        else:
            nc._pending.append(command)
            nc._pending_data_size += len(command)
        stats = nc.stats
        stats["out_msgs"] += 1
        stats["out_bytes"] += size
        self._count_publish()
        return command

    def _count_publish(self) -> None:
        """One more publish in this pass (its first schedules the pass's end)."""
        if self._in_pass == 0:
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            loop.call_soon(self._end_pass)
        self._in_pass += 1
        if self._in_pass % BURST_PUBLISHES == 0 and self._nc._pending_data_size:
            self._write_pending()

    def _end_pass(self) -> None:
        """Write what nats-py holds, as its flusher would (unless it did already)."""
        self._quiet = self._in_pass == 1
        self._in_pass = 0
        self._batch = None  # a batch never outlives its pass (nor holds its first request on)
        nc: Any = self._nc
        if not nc._pending_data_size or nc._status != _CONNECTED:
            return  # written already, or kept by nats-py to resend after a reconnect
        self._write_pending()

    def _write_pending(self) -> None:
        nc: Any = self._nc
        self._batch = None
        pending = nc._pending
        nc._pending = []
        nc._pending_data_size = 0
        if len(pending) == 1:
            nc._transport.write(pending[0])
        else:
            nc._transport.writelines(pending)


class _OpenBatch:
    """A batch still open: its first frame's details and the command now pending."""

    __slots__ = (
        "_first_label",
        "command",
        "entries",
        "key",
        "kind",
        "owner",
        "payload_size",
        "pending",
        "reply",
        "size",
        "subject",
    )

    def __init__(
        self,
        kind: int,
        key: str,
        subject: str,
        reply: str | None,
        label: str,
        first: bytes,
        command: bytes,
        pending: list[bytes],
        owner: Any,
    ) -> None:
        self.kind = kind
        self.key = key
        self.subject = subject  # the batch goes on the first frame's subject and reply
        self.reply = reply
        self.command = command
        self.pending = pending  # nats-py's buffer it waits in (replaced when written)
        self.owner = owner
        # The first frame's entry is made when a second one joins (most frames stay alone).
        self.entries: list[bytes] = [first]
        self._first_label = label
        self.size = 0  # of the entries as a batch, once it is one
        self.payload_size = len(first)  # of the message pending now

    def is_last_of(self, pending: list[bytes]) -> bool:
        """Still nats-py's last pending command (not written, nothing appended since)?"""
        return pending is self.pending and bool(pending) and pending[-1] is self.command

    def add(self, label: str, frame: bytes, size_limit: int) -> bool:
        """Join ``frame``; False when the batch is full (a burst of frames, or ``size_limit``
        bytes: NATS's payload limit, and the size written directly)."""
        entries = self.entries
        if len(entries) >= BURST_PUBLISHES:
            return False
        if len(entries) == 1:
            entries[0] = batches.entry(self._first_label, entries[0])
            self.size = batches.PREFIX_LENGTH + len(entries[0])
        entry = batches.entry(label, frame)
        if self.size + len(entry) > size_limit:
            return False
        entries.append(entry)
        self.size += len(entry)
        return True

    def payload(self) -> bytes:
        return batches.encode(self.kind, self.entries)
