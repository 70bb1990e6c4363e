"""A fake desktop for the ``linkctl`` tests: ``tunnel.serve`` in a background thread.

The CLI runs ``asyncio.run`` itself (in-process through typer's ``CliRunner``, or as a
subprocess), so the desktop cannot share the test's event loop: it gets its own loop in
a thread, with its own NATS connection. Routes:

- ``GET /api/links/status``: the status document (``STATUS``);
- ``/echo``: JSON of what arrived: method, url, headers (order kept), body length and sha256;
- ``/download?size=N[&chunked=1]``: N bytes of :func:`pattern`, streamed, with a
  content-length unless ``chunked=1``;
- ``/status/CODE``: that status, body ``status CODE``, two ``set-cookie`` headers;
- ``/fail``: the handler raises (``tunnel_handler_error``);
- ``/broken-download?size=N``: N bytes with a content-length of 2N, then the handler raises;
- ``/hang``: never answers (until the caller's deadline cancels it).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import nats

import tunnel

KiB: Final = 1024
MiB: Final = 1024 * KiB
CHUNK: Final = 256 * KiB
HOSTNAME: Final = "desk.test"
STATUS: Final = {"hostname": "test-desktop", "capabilities": ["fetch", "runs"], "cliVersion": "9.9.9"}
_BLOCK: Final = random.Random(0).randbytes(CHUNK)


def pattern(size: int) -> Iterator[bytes]:
    """``size`` deterministic bytes in CHUNK pieces; each piece starts with its index."""
    index = 0
    sent = 0
    while sent < size:
        n = min(CHUNK, size - sent)
        yield (index.to_bytes(8, "big") + _BLOCK[8:])[:n]
        sent += n
        index += 1


def pattern_sha256(size: int) -> str:
    digest = hashlib.sha256()
    for piece in pattern(size):
        digest.update(piece)
    return digest.hexdigest()


async def desktop_handler(request: tunnel.Request) -> tunnel.Response:
    path = request.path
    if path == "/api/links/status":
        return tunnel.Response(200, [("content-type", "application/json")], json.dumps(STATUS))
    if path == "/echo":
        digest = hashlib.sha256()
        length = 0
        async for chunk in request.stream():
            digest.update(chunk)
            length += len(chunk)
        document = {
            "method": request.method,
            "url": request.url,
            "headers": request.headers,
            "bodyLength": length,
            "bodySha256": digest.hexdigest(),
        }
        return tunnel.Response(200, [("content-type", "application/json")], json.dumps(document))
    if path == "/download":
        query = dict(request.query)
        size = int(query.get("size", "0"))
        headers = [("content-type", "application/octet-stream")]
        if query.get("chunked") != "1":
            headers.append(("content-length", str(size)))

        async def body() -> AsyncIterator[bytes]:
            for piece in pattern(size):
                yield piece

        return tunnel.Response(200, headers, body())
    if path.startswith("/status/"):
        code = int(path.rsplit("/", 1)[1])
        headers = [("content-type", "text/plain"), ("set-cookie", "a=1"), ("set-cookie", "b=2")]
        return tunnel.Response(code, headers, f"status {code}")
    if path == "/fail":
        raise RuntimeError("the handler broke on purpose")
    if path == "/broken-download":
        size = int(dict(request.query).get("size", "0"))

        async def broken() -> AsyncIterator[bytes]:
            for piece in pattern(size):
                yield piece
            raise RuntimeError("the body broke on purpose")

        return tunnel.Response(200, [("content-length", str(2 * size))], broken())
    if path == "/hang":
        await request.cancelled.wait()
        return tunnel.Response(204)
    return tunnel.Response(404, [("content-type", "text/plain")], "no such route")


class Desktop:
    """Serves HOSTNAME on ``nats_url`` from a thread with its own event loop."""

    def __init__(
        self,
        nats_url: str,
        hostname: str = HOSTNAME,
        *,
        handler: tunnel.Handler = desktop_handler,
        prefix: str = tunnel.DEFAULT_PREFIX,
    ) -> None:
        self.nats_url = nats_url
        self.hostname = hostname
        self.handler = handler
        self.prefix = prefix
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-desktop", daemon=True)
        self._nc: Any = None
        self._server: tunnel.TunnelServer | None = None

    def _call(self, coro: Any, timeout: float = 10.0) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout)

    def start(self) -> Desktop:
        self._thread.start()
        self._call(self._start())
        return self

    async def _start(self) -> None:
        self._nc = await nats.connect(self.nats_url, name="fake-desktop")
        self._server = await tunnel.serve(self._nc, self.hostname, self.handler, prefix=self.prefix)

    def stop(self) -> None:
        """Stop serving (the host goes offline) and close the connection."""
        if self._nc is not None:
            self._call(self._stop())
            self._nc = None

    async def _stop(self) -> None:
        if self._server is not None:
            await self._server.close(timeout=1.0)
            self._server = None
        await self._nc.close()

    def close(self) -> None:
        try:
            self.stop()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            if not self._thread.is_alive():
                self._loop.close()


# -- the local stack (`linkctl dev`) as a subprocess ------------------------------------------

LINKCTL = [sys.executable, "-m", "cli"]
# A cold start of three Python/Go processes on a loaded 2-core machine.
STACK_READY_TIMEOUT = 90.0


def live_pids_mentioning(text: str) -> list[int]:
    """Pids (not zombies, not us) whose command line contains ``text``: what a stack left behind."""
    found: list[int] = []
    needle = text.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if needle in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


@dataclass
class DevStack:
    """A running ``linkctl dev --json``: its process and the summary it printed."""

    proc: subprocess.Popen[str]
    info: dict[str, Any]
    state_dir: Path

    @property
    def gateway(self) -> str:
        return str(self.info["gateway"]["url"])

    @property
    def token(self) -> str:
        return str(self.info["token"])

    @property
    def hostname(self) -> str:
        return str(self.info["tunnelHostname"])

    def child_pids(self) -> dict[str, int]:
        return {
            "nats-server": self.info["nats"]["pid"],
            "gateway": self.info["gateway"]["pid"],
            "linkd": self.info["linkd"]["pid"],
        }

    def stop(self, timeout: float = 30.0) -> tuple[int, str]:
        """SIGTERM; (exit status, stderr)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, err


@contextmanager
def dev_stack(state_dir: Path, *args: str) -> Iterator[DevStack]:
    """``linkctl dev --json --state-dir DIR`` until ready; stopped (and checked empty) afterwards."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LINKCTL_", "LINKD_"))}
    proc = subprocess.Popen(
        [*LINKCTL, "dev", "--json", "--state-dir", str(state_dir), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        ready: Future[str] = Future()
        threading.Thread(target=lambda: ready.set_result(proc.stdout.readline()), daemon=True).start()  # type: ignore[union-attr]
        try:
            line = ready.result(STACK_READY_TIMEOUT)
        except TimeoutError:
            line = ""
        if not line:
            proc.kill()
            _, err = proc.communicate(timeout=10)
            raise AssertionError(f"linkctl dev never became ready (status {proc.returncode}):\n{err}")
        yield DevStack(proc, json.loads(line), state_dir)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid in live_pids_mentioning(str(state_dir)):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
