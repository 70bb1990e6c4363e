"""Shared pieces of the ``linkctl`` tests.

- :class:`Desktop`: a fake desktop, ``tunnel.serve`` in a background thread (below);
- :func:`dev_stack`: ``linkctl dev --json`` as a subprocess until ready, stopped afterwards, and
  :func:`live_pids_mentioning` to prove nothing was left running;
- :class:`ContractGateway`: a stand-in for the gateway's runs API (the contract in the brief),
  to test ``linkctl runs`` client logic (resume after a cut connection) with full control.

A fake desktop for the ``linkctl`` tests: ``tunnel.serve`` in a background thread.

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
def dev_stack(state_dir: Path, *args: str, env_vars: dict[str, str] | None = None) -> Iterator[DevStack]:
    """``linkctl dev --json --state-dir DIR`` until ready; stopped (and checked empty) afterwards.

    The environment is ours without ``LINKCTL_*``/``LINKD_*``, plus ``env_vars``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LINKCTL_", "LINKD_"))}
    env.update(env_vars or {})
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


# -- a stand-in for the gateway's runs API (the contract in the project brief) ---------------
#
# For the client logic of `linkctl runs` (resume after a cut connection, exit statuses) with
# full control over timing: it produces mock-runner events itself and records every events
# request (``after`` and ``Last-Event-ID``), so a test can cut the connection at a chosen
# event. The real gateway is exercised by the end-to-end tests (`linkctl demo`, runs e2e).

CONTRACT_TOKEN = "contract-test-token"


@dataclass
class ContractRun:
    state: dict[str, Any]
    events: list[dict[str, Any]]
    changed: asyncio.Event
    cancel: asyncio.Event


@dataclass
class EventsRequest:
    after: str | None
    last_event_id: str | None
    sent: int = 0


class ContractGateway:
    """``POST /api/runs``, ``GET /api/runs/{id}``, ``/events`` (SSE), ``POST /cancel``."""

    def __init__(self) -> None:
        from aiohttp import web

        self.runs: dict[str, ContractRun] = {}
        self.requests: list[EventsRequest] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._ids = 0
        app = web.Application()
        app.router.add_post("/api/runs", self._create)
        app.router.add_get("/api/runs/{id}", self._show)
        app.router.add_get("/api/runs/{id}/events", self._events)
        app.router.add_post("/api/runs/{id}/cancel", self._cancel)
        self.app = app
        self._runner: Any = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        from aiohttp import web

        from cli.nats_server import free_port

        self.port = free_port()
        self._runner = web.AppRunner(self.app, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()

    @staticmethod
    def _error(status: int, code: str, message: str) -> Any:
        from aiohttp import web

        return web.json_response({"error": {"code": code, "message": message}}, status=status)

    def _authorized(self, request: Any) -> bool:
        return bool(request.headers.get("Authorization") == f"Bearer {CONTRACT_TOKEN}")

    async def _create(self, request: Any) -> Any:
        from aiohttp import web

        if not self._authorized(request):
            return self._error(401, "invalid_token", "bad token")
        body = await request.json()
        if body.get("runner") not in ("mock", "echo"):
            return self._error(422, "unknown_runner", f"no runner {body.get('runner')!r}")
        self._ids += 1
        run_id = f"run-{self._ids}"
        now = 1_700_000_000_000
        state = {
            "runId": run_id, "threadId": body.get("threadId") or f"thread-{self._ids}", "userId": "u",
            "hostname": "desk", "runner": body["runner"], "title": body.get("title"),
            "status": "dispatching", "stage": None, "fence": 1, "seq": 0, "finalSeq": None,
            "outputBytes": 0, "failureKind": None, "failureReason": None, "createdAt": now,
            "updatedAt": now, "lastEventAt": None, "finishedAt": None,
        }  # fmt: skip
        run = ContractRun(state, [], asyncio.Event(), asyncio.Event())
        self.runs[run_id] = run
        task = asyncio.ensure_future(self._produce(run, body.get("input") or {}))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return web.json_response(
            {"runId": run_id, "threadId": state["threadId"], "status": "dispatching"}, status=202
        )

    def _emit(self, run: ContractRun, *, state_lags: bool = False, **event: Any) -> None:
        """Append one event; ``state_lags``: a ``done`` the run state does not show yet."""
        seq = len(run.events) + 1
        run.events.append({"runId": run.state["runId"], "fence": 1, "seq": seq, "ts": 0, **event})
        run.state["seq"] = seq
        run.state["status"] = "in_progress"
        if event["type"] == "output":
            run.state["outputBytes"] += len(event["data"].encode())
        if event["type"] == "done" and not state_lags:
            run.state.update(status=event["status"], finalSeq=seq, finishedAt=1_700_000_001_000)
            if event["status"] == "failed":
                run.state.update(failureKind="run_failed", failureReason=event.get("reason"))
        run.changed.set()

    async def _produce(self, run: ContractRun, spec: dict[str, Any]) -> None:
        self._emit(run, type="stage", stage="starting-run")
        for index in range(int(spec.get("count", 3))):
            if spec.get("delayMs"):
                with suppress(TimeoutError):
                    await asyncio.wait_for(run.cancel.wait(), spec["delayMs"] / 1000)
            if run.cancel.is_set():
                self._emit(run, type="done", status="cancelled", reason="cancelled by the user")
                return
            self._emit(run, type="output", stream="stdout", data=f"chunk {index}\n")
        if spec.get("fail"):
            lags = bool(spec.get("stateLags"))
            self._emit(run, state_lags=lags, type="done", status="failed", reason=spec["fail"])
        else:
            self._emit(run, type="done", status="completed")

    async def _show(self, request: Any) -> Any:
        from aiohttp import web

        if not self._authorized(request):
            return self._error(401, "invalid_token", "bad token")
        run = self.runs.get(request.match_info["id"])
        if run is None:
            return self._error(404, "not_found", "no such run")
        return web.json_response(run.state)

    async def _cancel(self, request: Any) -> Any:
        from aiohttp import web

        run = self.runs.get(request.match_info["id"])
        if run is None:
            return self._error(404, "not_found", "no such run")
        if run.state["status"] in ("completed", "failed", "cancelled"):
            return self._error(409, "run_finished", "the run has already finished")
        run.cancel.set()
        return web.json_response({"runId": run.state["runId"], "status": run.state["status"]}, status=202)

    async def _events(self, request: Any) -> Any:
        from aiohttp import web

        if not self._authorized(request):
            return self._error(401, "invalid_token", "bad token")
        run = self.runs.get(request.match_info["id"])
        if run is None:
            return self._error(404, "not_found", "no such run")
        record = EventsRequest(request.query.get("after"), request.headers.get("Last-Event-ID"))
        self.requests.append(record)
        after = int(record.after or record.last_event_id or 0)
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"}
        )
        await response.prepare(request)
        await response.write(b": keepalive\n\n")
        sent = after
        while True:
            while sent < len(run.events):
                event = run.events[sent]
                await response.write(
                    f"id: {event['seq']}\nevent: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()
                )
                sent += 1
                record.sent += 1
            if run.events and run.events[-1]["type"] == "done":
                await response.write(f"event: end\ndata: {json.dumps(run.state)}\n\n".encode())
                await response.write_eof()
                return response
            run.changed.clear()
            await run.changed.wait()
