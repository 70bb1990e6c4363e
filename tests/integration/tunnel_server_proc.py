"""A tunnel server in its own process, so tests can SIGKILL it like a crashed desktop daemon.

Run as ``python -m tests.integration.tunnel_server_proc <nats-url> <hostname>`` from the repo root.
Prints ``ready`` on stdout once ``tunnel.serve`` returned (the subscriptions are live), then
serves until killed. Handlers:

- ``/hello``: a small complete response (``hello <url>``), for sanity checks;
- ``/hang-before-start``: publishes a raw NATS message on ``test.<hostname>.started`` (so
  the test knows the handler runs; the server's ack of a body-less request follows a few ms
  later, see DEFERRED_ACK_DELAY), then never answers;
- ``/stream-forever``: sends a first chunk, publishes ``test.<hostname>.started``, then keeps
  streaming small chunks slowly, forever.

The handlers pace themselves with sleeps on purpose: this is the peer's behaviour under
test, not synchronisation (the tests synchronise on the ``started`` message).
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from typing import Final

import nats
from nats.aio.client import Client

import tunnel

# Chunk size and pace of /stream-forever: slow enough to be "a trickle", fast enough that the
# caller's idle timer only ever fires because the process died.
STREAM_CHUNK: Final = b"s" * 256
STREAM_INTERVAL: Final = 0.05


def started_subject(hostname: str) -> str:
    """The raw NATS subject a handler announces itself on once it is running."""
    return f"test.{hostname}.started"


def make_handler(nc: Client, hostname: str) -> tunnel.Handler:
    subject = started_subject(hostname)

    async def announce() -> None:
        await nc.publish(subject, b"started")
        await nc.flush()

    async def stream_forever() -> AsyncIterator[bytes]:
        yield STREAM_CHUNK
        # The server asks for the next piece only after the first one was published.
        await announce()
        while True:
            await asyncio.sleep(STREAM_INTERVAL)
            yield STREAM_CHUNK

    async def handler(req: tunnel.Request) -> tunnel.Response:
        if req.path == "/hang-before-start":
            await announce()
            await asyncio.Event().wait()  # never set: only a SIGKILL ends this
        if req.path == "/stream-forever":
            return tunnel.Response(200, [("content-type", "application/octet-stream")], stream_forever())
        if req.path == "/hello":
            return tunnel.Response(200, [("content-type", "text/plain")], f"hello {req.url}")
        return tunnel.Response(404, [], b"no such test endpoint")

    return handler


async def main(url: str, hostname: str) -> None:
    nc = await nats.connect(url, max_reconnect_attempts=0)
    server = await tunnel.serve(nc, hostname, make_handler(nc, hostname))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await server.close(timeout=1.0)
    await nc.close()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m tests.integration.tunnel_server_proc <nats-url> <hostname>")
    asyncio.run(main(sys.argv[1], sys.argv[2]))
