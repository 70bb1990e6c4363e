"""Blocking file I/O kept off the event loop, so tunnel heartbeats and timers keep running.

A CLI that blocks its loop on a slow pipe (``linkctl fetch ... | less``) would stop
reading NATS messages; after the pause the tunnel's idle timer could fire on a
perfectly live desktop. Reads use one daemon thread per stream (a read blocked on a
terminal's stdin must never keep the process from exiting); writes go through the
default executor.
"""

from __future__ import annotations

import asyncio
import errno
import threading
from collections.abc import AsyncIterator
from typing import BinaryIO, Final

from . import exitcodes
from .common import CliError

__all__ = ["CHUNK_SIZE", "Sink", "read_in_thread"]

# Read size: one tunnel data frame's worth (tunnel.DEFAULT_MAX_CHUNK is 256 KiB).
CHUNK_SIZE: Final = 256 * 1024
# Chunks read ahead of the tunnel: bounds memory to READ_AHEAD * CHUNK_SIZE.
READ_AHEAD: Final = 4


async def read_in_thread(source: BinaryIO, chunk_size: int = CHUNK_SIZE) -> AsyncIterator[bytes]:
    """Yield ``source``'s bytes as they come (``read1``: a pipe's data is not held back).

    A read error is raised from the iterator; leaving the iterator early stops the thread
    after its current read.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes | Exception | None] = asyncio.Queue()
    slots = threading.Semaphore(READ_AHEAD)
    stop = threading.Event()
    read = getattr(source, "read1", source.read)

    def deliver(item: bytes | Exception | None) -> bool:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is reading any more
            return False
        return True

    def reader() -> None:
        while True:
            slots.acquire()
            if stop.is_set():
                return
            try:
                data = read(chunk_size)
            except Exception as exc:
                deliver(exc)
                return
            if not deliver(bytes(data) if data else None) or not data:
                return

    threading.Thread(target=reader, name="linkctl-reader", daemon=True).start()
    try:
        while True:
            item = await queue.get()
            if item is None:
                return
            if isinstance(item, Exception):
                raise item
            slots.release()
            yield item
    finally:
        stop.set()
        slots.release()


class Sink:
    """Where a response body goes: stdout (flushed per chunk, for live output) or a file."""

    def __init__(self, target: BinaryIO, name: str, *, flush_each: bool, close: bool) -> None:
        self.target = target
        self.name = name
        self.flush_each = flush_each
        self._close = close
        self.written = 0

    def _write(self, data: bytes) -> None:
        self.target.write(data)
        if self.flush_each:
            self.target.flush()

    async def write(self, data: bytes) -> None:
        try:
            await asyncio.to_thread(self._write, data)
        except OSError as exc:
            raise self._error(exc) from None
        self.written += len(data)

    def close(self) -> None:
        try:
            if self._close:
                self.target.close()
            else:
                self.target.flush()
        except OSError as exc:
            raise self._error(exc) from None

    def _error(self, exc: OSError) -> Exception:
        if exc.errno == errno.EPIPE:
            return BrokenPipeError(exc.errno, exc.strerror)  # reader went away: quiet exit
        return CliError(f"cannot write {self.name}: {exc.strerror or exc}", exitcodes.WRITE_ERROR)
