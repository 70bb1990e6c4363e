"""The inspector's loopback HTTP server: the page, its JSON API, the stream, replay, /metrics.

Only this machine may use it: it binds 127.0.0.1 by default and answers only requests whose
``Host`` is a loopback name (``127.0.0.1``, ``localhost``, ``*.localhost``, ``[::1]``), so a
web page on another origin that rebinds its DNS name to 127.0.0.1 reads nothing; a
``POST`` (replay) must also come without an ``Origin`` or from the inspector's own origin,
and carry ``Content-Type: application/json`` (a cross-origin form cannot). Answers are
never cached and the page may not be framed.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final
from urllib.parse import urlsplit

from aiohttp import web

from .page import PAGE
from .recorder import Recorder
from .replay import ReplayEdits, Replayer, ReplayRefused
from .views import Filter, detail, summary

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "InspectorServer", "MetricsSource", "host_allowed"]

log = logging.getLogger("linkd.inspector")

DEFAULT_HOST: Final = "127.0.0.1"
# ngrok's inspector is 4040; ours sits next to it so both can run.
DEFAULT_PORT: Final = 4041
MAX_LIMIT: Final = 1000
KEEPALIVE_INTERVAL: Final = 15.0
# The stream writes at most this often: what happened meanwhile goes in one write, each exchange
# once in its latest state (a busy link costs the daemon a few writes a second, not three per
# request; the page is still live well within a second).
STREAM_BATCH: Final = 0.1
MAX_REPLAY_BODY: Final = 1024 * 1024
_LOOPBACK_NAMES: Final = frozenset({"127.0.0.1", "localhost", "::1"})
_SECURITY_HEADERS: Final = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_PAGE_CSP: Final = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)

# linkd's metrics: called with the scrape's Accept header, returns (body, content type).
MetricsSource = Callable[[str | None], tuple[bytes, str]]


def _hostname(value: str) -> tuple[str, int | None] | None:
    try:
        parts = urlsplit(f"//{value}")
        return (parts.hostname or "").lower(), parts.port
    except ValueError:
        return None


def host_allowed(host_header: str | None, extra: frozenset[str] = frozenset()) -> bool:
    """Is ``Host`` a loopback name (or one of ``extra``)? The DNS-rebinding guard."""
    if not host_header:
        return False
    parsed = _hostname(host_header.strip())
    if parsed is None:
        return False
    name = parsed[0]
    return name in _LOOPBACK_NAMES or name.endswith(".localhost") or name in extra


def _problem(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


class InspectorServer:
    """``await start()`` (raises ``OSError`` when the port is taken), then ``await close()``."""

    def __init__(
        self,
        recorder: Recorder,
        *,
        upstream_url: str | None,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        metrics: MetricsSource | None = None,
        replayer: Replayer | None = None,
    ) -> None:
        self.recorder = recorder
        self.host = host
        self.port = port
        self.metrics = metrics
        self.replayer = (
            replayer if replayer is not None else (Replayer(upstream_url) if upstream_url else None)
        )
        extra = {host.lower()} if host not in ("0.0.0.0", "::") else set()
        self._extra_hosts = frozenset(extra)
        self._runner: web.AppRunner | None = None
        self._streams: set[asyncio.Task[Any]] = set()

    @property
    def url(self) -> str:
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{shown}:{self.port}/"

    def status(self) -> dict[str, Any]:
        return {"url": self.url, "size": self.recorder.size, "kept": len(self.recorder)}

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=MAX_REPLAY_BODY)
        app.router.add_get("/", self._page)
        app.router.add_get("/api/requests", self._list)
        app.router.add_get("/api/requests/stream", self._stream)
        app.router.add_get("/api/requests/{id}", self._detail)
        app.router.add_post("/api/requests/{id}/replay", self._replay)
        if self.metrics is not None:
            app.router.add_get("/metrics", self._metrics)
        return app

    async def start(self) -> str:
        runner = web.AppRunner(self.app(), handle_signals=False, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        if self.port == 0:  # the port the OS chose
            self.port = int(runner.addresses[0][1])
        return self.url

    async def close(self) -> None:
        for task in list(self._streams):
            task.cancel()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        if self.replayer is not None:
            await self.replayer.aclose()

    # ------------------------------------------------------------------ guard

    @web.middleware
    async def _guard(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if not host_allowed(request.headers.get("Host"), self._extra_hosts):
            return _problem(403, "forbidden_host", "the inspector answers only loopback Host names")
        if request.method not in ("GET", "HEAD"):
            origin = request.headers.get("Origin")
            if origin is not None and not self._same_origin(origin):
                return _problem(403, "forbidden_origin", "the inspector takes changes only from its own page")
            if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
                return _problem(403, "forbidden_origin", "the inspector takes changes only from its own page")
        response = await handler(request)
        for name, value in _SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    def _same_origin(self, origin: str) -> bool:
        parts = urlsplit(origin)
        if parts.scheme != "http" or not host_allowed(parts.netloc, self._extra_hosts):
            return False
        return (parts.port or 80) == self.port

    # ------------------------------------------------------------------ handlers

    async def _page(self, request: web.Request) -> web.Response:
        return web.Response(
            text=PAGE,
            content_type="text/html",
            charset="utf-8",
            headers={"Content-Security-Policy": _PAGE_CSP},
        )

    def _filter(self, request: web.Request) -> Filter:
        try:
            return Filter.parse(request.query.get("status"), request.query.get("path"))
        except ValueError as exc:
            raise web.HTTPBadRequest(
                text=json.dumps({"error": {"code": "invalid_filter", "message": str(exc)}}),
                content_type="application/json",
            ) from None

    async def _list(self, request: web.Request) -> web.Response:
        where = self._filter(request)
        try:
            limit = int(request.query.get("limit", str(self.recorder.size)))
        except ValueError:
            return _problem(400, "invalid_limit", "limit: a whole number")
        limit = max(0, min(limit, MAX_LIMIT))
        rows = [summary(e.exchange, e.replay_of) for e in self.recorder.newest(where, limit)]
        return web.json_response({"requests": rows, "size": self.recorder.size})

    async def _detail(self, request: web.Request) -> web.Response:
        entry = self.recorder.get(request.match_info["id"])
        if entry is None:
            return _problem(
                404, "unknown_request", "no such request (the inspector keeps the most recent ones)"
            )
        return web.json_response(detail(entry.exchange, entry.replay_of))

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: ``event: exchange`` with a summary each time one starts, answers or ends."""
        where = self._filter(request)
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"}
        )
        watcher = self.recorder.watch()
        task = asyncio.current_task()
        if task is not None:
            self._streams.add(task)
        try:
            await response.prepare(request)
            await response.write(b"retry: 1000\n: connected\n\n")
            while True:
                try:
                    first = await asyncio.wait_for(watcher.queue.get(), KEEPALIVE_INTERVAL)
                except TimeoutError:
                    await response.write(b": keepalive\n\n")
                    continue
                await asyncio.sleep(STREAM_BATCH)
                ids = [first]
                while not watcher.queue.empty():
                    ids.append(watcher.queue.get_nowait())
                if None in ids:
                    await response.write(b"event: overrun\ndata: {}\n\n")
                    break
                chunks: list[bytes] = []
                for exchange_id in dict.fromkeys(ids):
                    entry = self.recorder.get(exchange_id) if exchange_id else None
                    if entry is None or not where.matches(entry.exchange):
                        continue
                    data = json.dumps(summary(entry.exchange, entry.replay_of), separators=(",", ":"))
                    chunks.append(f"event: exchange\ndata: {data}\n\n".encode())
                if chunks:
                    await response.write(b"".join(chunks))
        except (asyncio.CancelledError, ConnectionResetError):
            pass
        finally:
            self.recorder.unwatch(watcher)
            if task is not None:
                self._streams.discard(task)
        return response

    async def _replay(self, request: web.Request) -> web.Response:
        entry = self.recorder.get(request.match_info["id"])
        if entry is None:
            return _problem(
                404, "unknown_request", "no such request (the inspector keeps the most recent ones)"
            )
        if self.replayer is None:
            return _problem(409, "not_replayable", "this daemon has no --upstream to replay to")
        raw = await request.read()
        if raw.strip() and request.content_type != "application/json":
            return _problem(415, "unsupported_media_type", "send the edits as application/json")
        try:
            payload = json.loads(raw) if raw.strip() else None
        except ValueError:
            return _problem(400, "invalid_edit", "the body must be JSON")
        try:
            edits = ReplayEdits.parse(payload)
            method, target, headers, body = self.replayer.prepare(entry.exchange, edits)
            replay_id = self.recorder.next_replay_id()
            original_id = entry.replay_of or entry.exchange.id
            record = await self.replayer.send(replay_id, method, target, headers, body, original_id)
        except ReplayRefused as exc:
            return _problem(exc.status, exc.code, str(exc))
        self.recorder.add_replay(record, original_id)
        log.info("replayed %s as %s: %s", original_id, replay_id, record.status or record.error)
        return web.json_response(detail(record, original_id))

    async def _metrics(self, request: web.Request) -> web.Response:
        assert self.metrics is not None
        body, content_type = self.metrics(request.headers.get("Accept"))
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response
