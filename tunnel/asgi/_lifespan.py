"""The ASGI lifespan protocol: startup before serving, shutdown after the drain."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from .. import asgi
from ._types import ASGIApp, LifespanMode, Message, Scope

log = logging.getLogger("tunnel.asgi")


class LifespanError(RuntimeError):
    """The application's lifespan startup (or shutdown) failed."""


class _Lifespan:
    """The ASGI lifespan protocol, as uvicorn runs it ("auto": an app without it is fine)."""

    def __init__(self, app: ASGIApp, mode: LifespanMode, state: dict[str, Any]) -> None:
        self.app = app
        self.mode = mode
        self.state = state
        self._queue: asyncio.Queue[Message] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._started = asyncio.Event()
        self._shut_down = asyncio.Event()
        self._startup_failed: str | None = None
        self._shutdown_failed: str | None = None
        self._error: BaseException | None = None
        self._returned = False  # the app returned without answering lifespan.startup
        self._running = False

    async def startup(self) -> None:
        if self.mode == "off" or self._task is not None:
            return
        scope: Scope = {
            "type": "lifespan",
            "asgi": {"version": "3.0", "spec_version": "2.0"},
            "state": self.state,
        }
        self._task = asyncio.get_running_loop().create_task(self._main(scope))
        await self._queue.put({"type": "lifespan.startup"})
        await self._started.wait()
        if self._startup_failed is not None:
            raise LifespanError(f"ASGI lifespan startup failed: {self._startup_failed}")
        if self._returned and self.mode == "on":
            raise LifespanError("the application returned from lifespan without completing startup")
        if self._error is not None:
            if self.mode == "on":
                raise LifespanError(
                    f"ASGI lifespan startup raised {type(self._error).__name__}: {self._error}"
                ) from self._error
            log.info("ASGI 'lifespan' protocol appears unsupported by the application")
            return
        self._running = not self._returned

    async def shutdown(self) -> None:
        if not self._running:
            return
        self._running = False
        await self._queue.put({"type": "lifespan.shutdown"})
        await self._shut_down.wait()
        task = self._task
        if task is not None and not task.done():
            await asyncio.wait({task}, timeout=asgi.LIFESPAN_EXIT_GRACE)
            task.cancel()
        if self._shutdown_failed is not None:
            raise LifespanError(f"ASGI lifespan shutdown failed: {self._shutdown_failed}")
        if self._error is not None:
            raise LifespanError(
                f"ASGI lifespan shutdown raised {type(self._error).__name__}: {self._error}"
            ) from self._error

    async def _main(self, scope: Scope) -> None:
        try:
            await self.app(scope, self._receive, self._send)
            if not self._started.is_set():
                self._returned = True
                log.debug("the application returned from lifespan without starting up")
        except BaseException as exc:
            self._error = exc
            if self._startup_failed is None and self._shutdown_failed is None:
                if self.mode == "auto" and not self._started.is_set():
                    log.debug("lifespan not supported by the application", exc_info=True)
                else:
                    log.error("Exception in ASGI lifespan", exc_info=True)
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            self._started.set()
            self._shut_down.set()

    async def _receive(self) -> Message:
        return await self._queue.get()

    async def _send(self, message: Message) -> None:
        mtype = message["type"]
        if mtype == "lifespan.startup.complete":
            self._check(not self._started.is_set(), mtype)
            self._started.set()
        elif mtype == "lifespan.startup.failed":
            self._check(not self._started.is_set(), mtype)
            self._startup_failed = str(message.get("message", "")) or "no message"
            self._started.set()
        elif mtype == "lifespan.shutdown.complete":
            self._check(self._started.is_set() and not self._shut_down.is_set(), mtype)
            self._shut_down.set()
        elif mtype == "lifespan.shutdown.failed":
            self._check(self._started.is_set() and not self._shut_down.is_set(), mtype)
            self._shutdown_failed = str(message.get("message", "")) or "no message"
            self._shut_down.set()
        else:
            raise RuntimeError(f"Unexpected ASGI lifespan message type '{mtype}'.")

    @staticmethod
    def _check(ok: bool, mtype: str) -> None:
        if not ok:
            raise RuntimeError(f"Unexpected ASGI lifespan message '{mtype}' at this point.")
