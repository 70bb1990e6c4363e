"""A small headless-Chromium driver over the DevTools protocol, for tests that need a real browser.

No browser-automation dependency: Chromium is started with ``--remote-debugging-port=0``, the
port it chose is read from ``<profile>/DevToolsActivePort``, and the page's DevTools WebSocket
is driven with aiohttp's client (aiohttp is already a dependency). What a test needs is
``navigate`` and ``evaluate`` (read the DOM); console messages and uncaught exceptions are
kept so a failure can say what the page saw.

``async with Chromium.launch() as browser:`` always ends the browser (its whole process
group) and removes its profile directory. A missing browser is an error that names the fix,
never a skip: CI installs it (``.ci/run``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import tempfile
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import aiohttp

from tests.helpers import wait_until

__all__ = ["BrowserError", "Chromium", "Page", "find_chromium"]

CANDIDATES: Final = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL_HINT: Final = "install it: apt-get install -y chromium (or set CHROMIUM=/path/to/chromium)"
START_TIMEOUT: Final = 30.0  # a cold start on a loaded 2-core machine is slow
COMMAND_TIMEOUT: Final = 15.0
STOP_TIMEOUT: Final = 5.0
# Headless in a container: no sandbox (no user namespaces as root), no /dev/shm reliance,
# nothing that talks to the network on its own.
FLAGS: Final = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-extensions",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--metrics-recording-only",
    "--password-store=basic",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
)
_STDERR_LINES: Final = 40
# Chromium's stderr lines that say nothing about a test (no D-Bus in a container).
_STDERR_NOISE: Final = ("dbus/", "unexpected operator")
_PAGE_LOG_LINES: Final = 200


class BrowserError(AssertionError):
    """The browser or page failed; the message carries what the browser printed."""


def find_chromium() -> str:
    """Path of the browser binary: ``$CHROMIUM``, else the first of :data:`CANDIDATES` on PATH."""
    explicit = os.environ.get("CHROMIUM")
    if explicit:
        if shutil.which(explicit) is None:
            raise BrowserError(f"CHROMIUM={explicit} is not an executable; {INSTALL_HINT}")
        return explicit
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    raise BrowserError(f"no Chromium found (tried {', '.join(CANDIDATES)} on PATH); {INSTALL_HINT}")


class Page:
    """One tab, driven over its DevTools WebSocket (one command at a time per id, events kept)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, browser: Chromium) -> None:
        self._ws = ws
        self.browser = browser
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._loaded: set[str] = set()  # loader ids whose document fired its load event
        self.log: deque[str] = deque(maxlen=_PAGE_LOG_LINES)
        self._reader = asyncio.create_task(self._read(), name="cdp-reader")

    async def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """One DevTools command; its ``result``, or BrowserError with the protocol's error."""
        ident = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[ident] = future
        try:
            await self._ws.send_str(json.dumps({"id": ident, "method": method, "params": params or {}}))
            async with asyncio.timeout(COMMAND_TIMEOUT):
                reply = await future
        except TimeoutError:
            raise BrowserError(
                self.browser.describe(f"{method}: no reply in {COMMAND_TIMEOUT:g} s")
            ) from None
        finally:
            self._pending.pop(ident, None)
        if "error" in reply:
            raise BrowserError(self.browser.describe(f"{method} failed: {reply['error']}"))
        result: dict[str, Any] = reply.get("result", {})
        return result

    async def navigate(self, url: str, timeout: float = COMMAND_TIMEOUT) -> None:
        """Open ``url`` and wait for the load event of that navigation's document (redirects
        included), so nothing is evaluated in the page being left; BrowserError if it failed."""
        result = await self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise BrowserError(self.browser.describe(f"navigating to {url}: {result['errorText']}"))
        loader = result.get("loaderId")
        await wait_until(
            lambda: loader in self._loaded,
            timeout,
            message=lambda: self.browser.describe(f"{url} did not finish loading"),
        )

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited; JSON values only)."""
        result = await self.send(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True}
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(self.browser.describe(f"evaluating {expression!r}: {text}"))
        return result.get("result", {}).get("value")

    async def text(self, element_id: str) -> str:
        """The text content of the element with this id ("" if there is none)."""
        value = await self.evaluate(f"document.getElementById({json.dumps(element_id)})?.textContent ?? ''")
        return str(value)

    async def wait_for_text(self, element_id: str, expected: str, timeout: float = COMMAND_TIMEOUT) -> None:
        """Poll the element's text until it is ``expected``; on timeout, say what the page showed."""

        async def shows() -> bool:
            return await self.text(element_id) == expected

        await wait_until(
            shows, timeout, message=lambda: self.browser.describe(f"#{element_id} never showed {expected!r}")
        )

    async def _read(self) -> None:
        """Route replies to their commands; keep console lines, exceptions and load events."""
        try:
            async for message in self._ws:
                if message.type is not aiohttp.WSMsgType.TEXT:
                    break
                data = json.loads(message.data)
                if "id" in data:
                    future = self._pending.get(data["id"])
                    if future is not None and not future.done():
                        future.set_result(data)
                    continue
                self._event(data.get("method", ""), data.get("params", {}))
        finally:
            error = BrowserError(self.browser.describe("the DevTools connection closed"))
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(error)

    def _event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Page.lifecycleEvent" and params.get("name") == "load":
            self._loaded.add(params.get("loaderId", ""))
        elif method == "Runtime.consoleAPICalled":
            args = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            self.log.append(f"console.{params.get('type')}: {args}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description") or details.get("text")
            self.log.append(f"uncaught: {text}")
        elif method == "Log.entryAdded":
            entry = params.get("entry", {})
            self.log.append(f"log.{entry.get('level')}: {entry.get('text')} {entry.get('url', '')}".rstrip())

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        await self._ws.close()


class Chromium:
    """A running headless Chromium with one page; use :meth:`launch`."""

    def __init__(self, proc: asyncio.subprocess.Process, profile: Path) -> None:
        self.proc = proc
        self.profile = profile
        self.stderr: deque[str] = deque(maxlen=_STDERR_LINES)
        self.page: Page | None = None
        self._session: aiohttp.ClientSession | None = None
        self._stderr_task = asyncio.create_task(self._read_stderr(), name="chromium-stderr")

    @classmethod
    @asynccontextmanager
    async def launch(cls, extra_args: Sequence[str] = ()) -> AsyncIterator[Page]:
        """Start the browser, yield its page (at about:blank); stop it and delete its profile after."""
        binary = find_chromium()
        profile = Path(tempfile.mkdtemp(prefix="natslink-chromium-"))
        try:
            proc = await asyncio.create_subprocess_exec(
                binary,
                *FLAGS,
                f"--user-data-dir={profile}",
                *extra_args,
                "about:blank",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,  # its own process group: every helper process is ended with it
            )
        except BaseException:
            shutil.rmtree(profile, ignore_errors=True)
            raise
        browser = cls(proc, profile)
        try:
            browser.page = await browser._attach()
            yield browser.page
        finally:
            await browser.close()

    def describe(self, what: str) -> str:
        """``what`` followed by the page's console/exception log and the browser's last stderr lines."""
        parts = [what]
        if self.page is not None and self.page.log:
            parts.append("page log:\n  " + "\n  ".join(self.page.log))
        if self.proc.returncode is not None:
            parts.append(f"chromium exited with status {self.proc.returncode}")
        if self.stderr:
            parts.append("chromium stderr (last lines):\n  " + "\n  ".join(self.stderr))
        return "\n".join(parts)

    async def _attach(self) -> Page:
        port_file = self.profile / "DevToolsActivePort"

        def port() -> int | None:
            if self.proc.returncode is not None:
                raise BrowserError(self.describe("chromium exited before it was ready"))
            lines = port_file.read_text().split() if port_file.exists() else []
            return int(lines[0]) if lines and lines[0].isdigit() else None

        devtools_port: int = await wait_until(
            port, START_TIMEOUT, message=lambda: self.describe("chromium did not write DevToolsActivePort")
        )
        self._session = aiohttp.ClientSession()
        base = f"http://127.0.0.1:{devtools_port}"

        async def page_target() -> str | None:
            async with self._session.get(f"{base}/json/list") as response:  # type: ignore[union-attr]
                targets = await response.json()
            urls = [t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page"]
            return urls[0] if urls else None

        ws_url: str = await wait_until(
            page_target, START_TIMEOUT, message=lambda: self.describe("no page target in /json/list")
        )
        ws = await self._session.ws_connect(ws_url, max_msg_size=0)
        page = Page(ws, self)
        self.page = page
        for domain in ("Page.enable", "Runtime.enable", "Log.enable"):
            await page.send(domain)
        await page.send("Page.setLifecycleEventsEnabled", {"enabled": True})
        return page

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            if line and not any(noise in line for noise in _STDERR_NOISE):
                self.stderr.append(line)

    async def close(self) -> None:
        """End the browser (gracefully, then its process group by force) and delete its profile."""
        try:
            if self.page is not None:
                with contextlib.suppress(Exception):
                    await self.page.send("Browser.close")
                await self.page.close()
            if self._session is not None:
                await self._session.close()
            if not await self._exited(STOP_TIMEOUT):
                self._signal_group(signal.SIGTERM)
                if not await self._exited(STOP_TIMEOUT):
                    self._signal_group(signal.SIGKILL)
                    await self.proc.wait()
            self._signal_group(signal.SIGKILL)  # helper processes left behind by the main one
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stderr_task, STOP_TIMEOUT)
        finally:
            if not self._stderr_task.done():
                self._stderr_task.cancel()
            shutil.rmtree(self.profile, ignore_errors=True)

    async def _exited(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)
