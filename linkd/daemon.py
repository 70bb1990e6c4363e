"""The lifecycle of ``linkd up``: session -> NATS -> serve, and keep it that way until stopped.

::

    connecting ──> online ──(NATS drop)──> reconnecting ──> online
        ^            │ refresh before expiry: new session, NEW connection + server, then
        │            │   the old one stops taking requests and drains (stays online)
        │            │ gateway or NATS trouble at refresh time: keep serving, retry until expiry
        │            v
        └─ offline: <reason> <── connection closed (credentials expired, refused, ...)
                     (retry with backoff; a new session and a new connection)

- A session is requested with the daemon's own public key; the credential it
  carries is refreshed ahead of expiry (see :func:`refresh_delay`), make-before-break:
  a new connection with the new credential, a new tunnel server for the session's
  hostname on it (the NATS server knows its subscriptions before we go on), then the
  switch (uplink and ``on_connection`` get the new connection), and only then does the
  old server stop taking requests. Both serve the host's queue group meanwhile, so no
  start frame finds nobody; requests in flight on the old connection (their body and
  credit frames go to that server's own subjects) finish there, for up to the old
  credential's remaining lifetime (minus a margin, at most :data:`MAX_DRAIN`), then the
  old connection closes. A credential is never swapped under a live connection: that
  left a window without subscriptions in which callers' frames were lost.
- If the new connection cannot be made, the old one keeps serving (it is valid until
  it expires) and the refresh is retried with backoff. A session for another hostname
  is served the same way: the new host goes online, the old one drains.
- nats-py reconnects by itself after a drop (server restart, network change) and
  replays the tunnel server's subscriptions, with the connection's own credential.
  When the server *closes* the connection (an expired credential: nats-py does not
  reconnect then), the daemon starts over with a new session and a new connection.
- Stop (SIGINT/SIGTERM): stop taking requests, let in-flight ones finish up to the
  drain timeout while every run is cancelled (each ends ``cancelled``), close.

Restarts and sleep (docs/runs.md, "Daemon restarts"): with a journaled uplink, ``run()``
first queues what the journal held unacknowledged (same message ids), then resumes or ends
(``daemon_restarted``) the runs it found unfinished, before connecting. A periodic check
notices the machine's own sleep (:mod:`linkd.sleep`): "woke after N s of sleep", then a
credential that expired meanwhile is replaced (a new session), a valid one is refreshed at
once (a new connection: make-before-break), and the uplink retries at once.

Every state change is one log line on ``linkd.state`` (see :mod:`linkd.logs`),
and the status file (``linkd status``) is rewritten.

Run events: with an ``uplink`` (:class:`~linkd.uplink.JetStreamUplink`, what ``linkd up``
uses) the daemon hands it each connection once it serves (``attach(nc, subjects)``: after
a refresh, the new connection; what was unacked goes again there with the same ids) and
``attach(None)`` when the connection is discarded (nats-py's own reconnects keep the same
object, so no call then). ``on_connection(nc | None)`` is called at the same moments. At
shutdown, after every run wrote its ``done``, the uplink gets what is left of the drain
deadline to deliver the outbox, then the sink's ``aclose()`` (if it has one) is awaited,
all before the connection closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import inspect
import logging
import os
import platform
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError

import tunnel
from tunnel.backoff import Backoff
from tunnel.connect import NatsAuthError, NatsConnectError
from tunnel.tls import TLSProblem, classify_tls_error

from . import __version__
from .access_log import subscribe_access_log
from .config import Settings
from .connection import Identity, open_connection, reconnect_policy
from .credentials_store import public_key_of
from .discovery import DesktopDiscovery
from .errors import LinkdError
from .inspector.daemon_side import DaemonInspector
from .logs import STATE_LOGGER
from .metrics import LinkdMetrics
from .routes import LinkRoutes
from .run_events import EventSink, MemoryEventSink
from .runners import build_runners
from .runners.base import WorkItem
from .runs import RunManager, item_to_dict
from .session import GatewayClient, GatewayError, LinkSession
from .sleep import CHECK_INTERVAL, SleepDetector
from .status_file import remove_status, write_status
from .tls import CA_HINT, CERT_HINT, nats_tls, tls_error_line
from .traffic import Traffic
from .uplink import JetStreamUplink
from .upstream import UpstreamProxy

__all__ = ["LinkDaemon", "State", "StateChange", "drain_budget", "refresh_delay"]

log = logging.getLogger(STATE_LOGGER)
detail_log = logging.getLogger("linkd.daemon")

# Refresh this far before expiry: a quarter of the lifetime, within [1 s, 5 min] ...
REFRESH_FRACTION: Final = 0.25
MIN_REFRESH_MARGIN: Final = 1.0
MAX_REFRESH_MARGIN: Final = 300.0
# ... minus a random share of the time before that, so a fleet does not refresh at once: up to
# half the margin, or REFRESH_SPREAD of the span from REFRESH_FRACTION of the lifetime to the latest
# refresh point if that is longer. The margin is capped, the span is not: 10,000 desktops given
# one-hour credentials at the same moment (a mass start, an outage) refresh over 12 minutes
# (~14/s), not 2.5 (~67/s), for ~10% more refreshes; a day-long credential spreads over hours.
REFRESH_JITTER: Final = 0.5
REFRESH_SPREAD: Final = 0.3
# After a refresh the old connection finishes its in-flight requests for at most this long, and
# never closer than EXPIRY_SAFETY to its credential's expiry (the server closes it then).
MAX_DRAIN: Final = 30.0
EXPIRY_SAFETY: Final = 0.25
# A short-lived credential is refreshed early enough to leave its connection this share of the
# lifetime to drain (never earlier than REFRESH_FRACTION of the lifetime).
DRAIN_FRACTION: Final = 0.75
# A barrier: the new connection's subscriptions are known to the server within this long.
SUBSCRIBE_BARRIER: Final = 5
# Waiting for the status of in-flight work to change: rewrite the status file this often.
STATUS_INTERVAL: Final = 2.0
# Retrying a session, a connection or a refresh: from RETRY_INITIAL doubling up to RETRY_CAP, plus jitter.
RETRY_INITIAL: Final = 1.0
RETRY_CAP: Final = 30.0
# A connection that lived this long was fine: losing it restarts the retry backoff.
STABLE_AFTER: Final = 30.0
# After its expiry a credential's connection is closed by the server within moments; we look again after this.
EXPIRY_GRACE: Final = 1.0
# At shutdown the run uplink gets at least this long to deliver its outbox, even past the drain deadline.
MIN_UPLINK_FLUSH: Final = 0.25


class State(enum.StrEnum):
    STARTING = "starting"
    CONNECTING = "connecting"
    ONLINE = "online"
    RECONNECTING = "reconnecting"
    OFFLINE = "offline"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass(frozen=True)
class StateChange:
    state: State
    message: str
    event: str = "state"  # or "credentials_refreshed", "refresh_failed"
    at: float = field(default_factory=time.time)


def refresh_delay(lifetime: float, *, rng: random.Random | None = None) -> float:
    """Seconds after receipt at which to refresh a credential valid for ``lifetime`` seconds.

    The lead before expiry is the larger of a margin for gateway trouble (a quarter of the
    lifetime, within [1 s, 5 min]) and the room the old connection needs to drain after the
    switch (up to :data:`MAX_DRAIN`; for short lifetimes, most of the lifetime), plus jitter that
    grows with the lifetime (:data:`REFRESH_SPREAD`), so a fleet's refreshes stay spread out.
    """
    margin = min(max(lifetime * REFRESH_FRACTION, MIN_REFRESH_MARGIN), MAX_REFRESH_MARGIN)
    drain_room = min(MAX_DRAIN + EXPIRY_SAFETY, lifetime * DRAIN_FRACTION)
    latest = lifetime - max(margin, drain_room)
    earliest = lifetime * REFRESH_FRACTION
    spread = max(margin * REFRESH_JITTER, (latest - earliest) * REFRESH_SPREAD)
    jitter = (rng or random).uniform(0.0, spread)
    return max(latest - jitter, earliest)


def drain_budget(session: LinkSession) -> float:
    """How long a replaced connection may finish its requests: until shortly before its expiry."""
    remaining = session.remaining()
    if remaining is None:
        return MAX_DRAIN
    return max(0.0, min(MAX_DRAIN, remaining - EXPIRY_SAFETY))


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts))


def _closed_reason(nc: NATS, session: LinkSession | None) -> str:
    error = nc.last_error
    text = str(error or "").strip().strip("'")
    lowered = text.lower()
    if "authentication expired" in lowered:
        return "the NATS credentials expired"
    if "authorization violation" in lowered:
        return "NATS refused the credentials (authorization violation)"
    remaining = session.remaining() if session is not None else None
    if remaining is not None and remaining <= 0:
        return "the NATS credentials expired"
    return f"the NATS connection was closed ({text})" if text else "the NATS connection was closed"


async def _wait_any(*events: asyncio.Event, timeout: float | None = None) -> None:
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


@dataclass(eq=False)
class _Serving:
    """One session's connection and tunnel server: the current one, or one draining after a refresh."""

    session: LinkSession
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    nc: NATS | None = None
    server: tunnel.TunnelServer | None = None

    @property
    def in_flight(self) -> int:
        return self.server.in_flight if self.server is not None else 0


class LinkDaemon:
    """``linkd up`` as an object: ``await run()`` until :meth:`request_stop`."""

    def __init__(
        self,
        settings: Settings,
        gateway: GatewayClient,
        *,
        own_seed: str | None,
        sink: EventSink | None = None,
        uplink: JetStreamUplink | None = None,
        on_change: Callable[[StateChange], None] | None = None,
        on_connection: Callable[[NATS | None], Awaitable[None] | None] | None = None,
        machine_name: Callable[[], str] = platform.node,
        retry_backoff: Backoff | None = None,
        write_status_file: bool = True,
    ) -> None:
        self.settings = settings
        self.gateway = gateway
        self.uplink = uplink
        self.sink: EventSink = (
            sink if sink is not None else uplink if uplink is not None else MemoryEventSink()
        )
        self.on_change = on_change
        self.on_connection = on_connection
        self.write_status_file = write_status_file
        self.runs = RunManager(
            build_runners(settings.runners),
            self.sink,
            heartbeat_interval=settings.runners.heartbeat_interval,
            max_concurrent=settings.runners.max_concurrent,
            on_change=self._write_status,
            on_start=self._journal_run,
        )
        self.upstream = UpstreamProxy(settings.upstream_url) if settings.upstream_url else None
        self.routes = LinkRoutes(self.runs, upstream=self.upstream, machine_name=machine_name)
        # Every tunnelled request recorded (linkd.traffic); bodies only when a viewer wants them
        # (the inspector sets traffic.capture_bodies). The access log is one observer.
        self.traffic = Traffic(capture_bodies=False)
        subscribe_access_log(self.traffic)
        self.handler = self.traffic.wrap(self.routes)
        # Prometheus metrics (linkd.metrics): the traffic, and this daemon's state when scraped.
        self.metrics = LinkdMetrics(self.traffic, self)
        # NATS micro discovery for this host (linkd.discovery), on the current connection.
        self.discovery = DesktopDiscovery(
            traffic=self.metrics.stats,
            status=self.status_document,
            machine=machine_name(),
            version=__version__,
        )
        # The request inspector (linkd.inspector): a loopback page over the recent requests.
        self.inspector = (
            DaemonInspector(
                self.traffic,
                port=settings.inspect_port,
                size=settings.inspect_size,
                upstream_url=settings.upstream_url,
                metrics=self.metrics.exposition,
            )
            if settings.inspect
            else None
        )
        self.own_seed = own_seed
        self.public_key = public_key_of(own_seed) if own_seed else None
        self.retry_backoff = (
            retry_backoff if retry_backoff is not None else Backoff(initial=RETRY_INITIAL, cap=RETRY_CAP)
        )
        self.state = State.STARTING
        self.message = "starting"
        self.since = time.time()
        self.started_at = time.time()
        self.history: list[StateChange] = []
        self.session: LinkSession | None = None
        self.nc: NATS | None = None
        self.server: tunnel.TunnelServer | None = None
        self.refreshes = 0
        self.reconnects = 0  # NATS reconnects and new connections after the first
        self.sleeps = 0
        self._connections = 0
        self._woke = asyncio.Event()
        self._slept = 0.0
        self._stop = asyncio.Event()
        self._stop_reason = "stop requested"
        self._current: _Serving | None = None  # what self.session/nc/server describe
        self._draining: dict[asyncio.Task[None], _Serving] = {}  # replaced, finishing their requests
        self._last_note: str | None = None

    # ------------------------------------------------------------------ public

    def request_stop(self, reason: str = "stop requested") -> None:
        if not self._stop.is_set():
            self._stop_reason = reason
            self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def run(self) -> None:
        if self.inspector is not None:
            await self.inspector.start()
        status_task = asyncio.ensure_future(self._status_loop())
        sleep_task = asyncio.ensure_future(self._sleep_watch())
        try:
            await self._recover()
            await self._lifecycle()
        finally:
            status_task.cancel()
            sleep_task.cancel()
            await self._shutdown()
            await self.discovery.close()
            if self.inspector is not None:
                await self.inspector.close()

    # ------------------------------------------------------------------ restarts and sleep

    async def _recover(self) -> None:
        """What a previous daemon left in the journal: its unacked events go again, its runs go on or end."""
        uplink = self.uplink
        journal = uplink.journal if uplink is not None else None
        if uplink is None or journal is None:
            return
        uplink.restore()
        runs = journal.unfinished_runs()
        if runs:
            await self.runs.recover(runs)

    def _journal_run(self, item: WorkItem, execution: str, resumable: bool) -> None:
        journal = self.uplink.journal if self.uplink is not None else None
        if journal is not None:
            journal.start_run(item_to_dict(item), item.fence, execution, resumable=resumable)

    async def _sleep_watch(self) -> None:
        detector = SleepDetector(time.monotonic(), time.time())
        while True:
            await asyncio.sleep(CHECK_INTERVAL)
            slept = detector.check(time.monotonic(), time.time())
            if slept is not None:
                self._on_wake(slept)

    def _on_wake(self, slept: float) -> None:
        self.sleeps += 1
        self._slept = slept
        log.info("woke after %.0f s of sleep", slept, extra={"event": "woke", "slept": round(slept, 1)})
        self._woke.set()
        if self.uplink is not None:
            self.uplink.wake()

    # ------------------------------------------------------------------ reporting

    def _set(self, state: State, message: str, **fields: Any) -> None:
        if state == self.state and message == self.message:
            return
        self.state, self.message, self.since = state, message, time.time()
        self._emit(StateChange(state, message), fields)
        self._write_status()

    def _note(self, event: str, message: str, *, once: bool = False, **fields: Any) -> None:
        """A line that is not a state change (credentials refreshed, a refresh failed)."""
        if once and message == self._last_note:
            return
        self._last_note = message
        self._emit(StateChange(self.state, message, event), fields)
        self._write_status()

    def _emit(self, change: StateChange, fields: dict[str, Any]) -> None:
        self.history.append(change)
        extra = {"event": change.event, "state": change.state.value, **fields}
        if self.session is not None:
            extra.setdefault("tunnel_hostname", self.session.hostname)
        log.info("%s", change.message, extra=extra)
        if self.on_change is not None:
            try:
                self.on_change(change)
            except Exception:
                detail_log.exception("state change callback failed")

    def status_document(self) -> dict[str, Any]:
        session = self.session
        nc = self.nc
        url = nc.connected_url if nc is not None and nc.is_connected else None
        return {
            "pid": os.getpid(),
            "version": __version__,
            "state": self.state.value,
            "message": self.message,
            "since": _iso(self.since),
            "startedAt": _iso(self.started_at),
            "updatedAt": _iso(time.time()),
            "gateway": self.gateway.base_url,
            "tunnelHostname": session.hostname if session is not None else None,
            "natsUrl": f"{url.scheme}://{url.netloc}" if url is not None else None,
            "credentialsExpireAt": _iso(session.expires_at) if session is not None else None,
            "credentialRefreshes": self.refreshes,
            "upstream": self.settings.upstream_url,
            "capabilities": self.routes.capabilities(),
            "inFlightRequests": self._in_flight(),
            "runs": [info.summary() for info in self.runs.active()],
            "uplink": self.uplink.status() if self.uplink is not None else None,
            # Why the daemon is not online (a certificate problem names its fix); None while online.
            "offlineReason": self._offline_reason(),
            "reconnects": self.reconnects,
            "sleeps": self.sleeps,
            "inspector": self.inspector.status() if self.inspector is not None else None,
            "runsResumed": self.runs.resumes,
            "runsEndedDaemonRestarted": self.runs.restart_failures,
        }

    def _offline_reason(self) -> str | None:
        for state in (State.OFFLINE, State.RECONNECTING):
            if self.state is state:
                return self.message.removeprefix(f"{state.value}: ")
        return None

    def _in_flight(self) -> int:
        """Requests being served: on the current connection and on those still draining."""
        current = self.server.in_flight if self.server is not None else 0
        return current + sum(serving.in_flight for serving in self._draining.values())

    def _write_status(self) -> None:
        if not self.write_status_file or self.state is State.STOPPED:
            return
        try:
            write_status(self.settings.status_file, self.status_document())
        except OSError as exc:
            detail_log.warning("cannot write the status file %s: %s", self.settings.status_file, exc)

    async def _status_loop(self) -> None:
        last: tuple[int, int, int] | None = None
        while True:
            await asyncio.sleep(STATUS_INTERVAL)
            current = (
                self._in_flight(),
                len(self.runs.active()),
                len(self.uplink.outbox) if self.uplink is not None else 0,
            )
            if current != last:
                last = current
                self._write_status()

    # ------------------------------------------------------------------ lifecycle

    async def _lifecycle(self) -> None:
        cause: str | None = None  # why we lost the last connection, for the offline line
        while not self._stop.is_set():
            try:
                cause = await self._connect_and_serve(cause)
            except Exception as exc:  # a bug must not end the daemon: report it, start over
                detail_log.exception("unexpected error in the connection lifecycle")
                await self._discard_connection()
                self._set(State.OFFLINE, f"offline: internal error ({type(exc).__name__}: {exc}); retrying")
                await self._pause(self.retry_backoff.next())

    async def _connect_and_serve(self, cause: str | None) -> str | None:
        """One session + connection + serving, until it ends; returns why it ended (None: no connection)."""
        if self.state is not State.OFFLINE:
            self._set(State.CONNECTING, f"connecting to {self.gateway.base_url}")
        try:
            session = await self._interruptible(self.gateway.request_session(self.public_key))
        except GatewayError as exc:
            self._set(State.OFFLINE, f"offline: {cause + '; ' if cause else ''}{exc.reason}")
            await self._pause(self.retry_backoff.next())
            return cause
        if session is None:
            return None  # stopping
        self.session = session
        try:
            serving = await self._interruptible(self._open(session))
        except (NatsConnectError, LinkdError, ValueError) as exc:
            self._set(State.OFFLINE, f"offline: {_connect_failure(exc)}")
            await self._pause(self.retry_backoff.next())
            return None
        except tunnel.TunnelError as exc:
            self._set(State.OFFLINE, f"offline: cannot serve {session.hostname} ({exc})")
            await self._pause(self.retry_backoff.next())
            return None
        if serving is None:
            return None
        await self._make_current(serving)
        self._connections += 1
        if self._connections > 1:
            self.reconnects += 1
        online_at = time.monotonic()
        self._set(State.ONLINE, f"online as {session.hostname}", expires_at=_iso(session.expires_at))
        reason = await self._supervise(serving)
        if self._stop.is_set():
            return None
        await self._discard_connection()
        self._set(State.OFFLINE, f"offline: {reason}")
        # After a good run, start over at once; a connection that keeps dying young backs off.
        if time.monotonic() - online_at >= STABLE_AFTER:
            self.retry_backoff.reset()
            await self._pause(random.uniform(0.0, 0.25))
        else:
            await self._pause(self.retry_backoff.next())
        return reason

    async def _make_current(self, serving: _Serving) -> None:
        """From now on ``serving`` is what the daemon reports and hands out."""
        self._current = serving
        self.session, self.nc, self.server = serving.session, serving.nc, serving.server
        await self._connection_changed(serving.nc)

    async def _connection_changed(self, nc: NATS | None) -> None:
        """Tell the uplink, discovery and ``on_connection`` which connection is current."""
        if self.uplink is not None:
            session = self.session
            if nc is None or session is None:
                self.uplink.attach(None)
            else:
                self.uplink.attach(nc, tunnel.HostSubjects.for_host(session.hostname, session.prefix))
        await self.discovery.attach(nc, self.session)
        if self.on_connection is None:
            return
        try:
            result = self.on_connection(nc)
            if inspect.isawaitable(result):
                await result
        except Exception:
            detail_log.exception("on_connection callback failed")

    async def _interruptible(self, coro: Any) -> Any:
        """Await ``coro`` unless stop is requested first (then cancel it and return None)."""
        task = asyncio.ensure_future(coro)
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait([task, stop], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            result = await task
            if isinstance(result, _Serving):
                await self._close_serving(result, drain=0.0)
        return None

    async def _pause(self, seconds: float) -> None:
        if seconds > 0:
            await _wait_any(self._stop, timeout=seconds)

    async def _open(self, session: LinkSession) -> _Serving:
        """A connection with ``session``'s credential, serving its hostname, subscriptions known to NATS.

        Raises ``NatsConnectError``/``LinkdError``/``ValueError`` (no connection) or
        ``tunnel.TunnelError`` (no server on it; the connection is closed again).
        """
        serving = _Serving(session)

        def current() -> bool:
            return serving is self._current and not self._stop.is_set()

        async def disconnected() -> None:
            nc = serving.nc
            if current() and nc is not None and not nc.is_closed:
                self._set(State.RECONNECTING, "reconnecting: lost the connection to NATS")

        async def reconnected() -> None:
            if current():
                self.reconnects += 1
                self._set(State.ONLINE, f"online as {serving.session.hostname}")

        async def on_closed() -> None:
            serving.closed.set()

        async def on_error(exc: Exception) -> None:
            text = str(exc) or type(exc).__name__
            problem = classify_tls_error(exc)
            if problem is not None and current() and self.state is State.RECONNECTING:
                where = _server_url(serving.nc)
                self._set(State.RECONNECTING, f"reconnecting: {_tls_line(where, problem)}")
            if "permissions violation" in text.lower():
                detail_log.warning("NATS refused an operation: %s", text)

        # Each connection presents its own credential at every (re)connect, so a replaced
        # connection that reconnects while draining still uses its own, valid one.
        serving.nc = await open_connection(
            session,
            Identity(self.own_seed),
            reconnect_policy(),
            transport=self.settings.nats_transport,
            tls=nats_tls(self.settings),
            name=f"linkd {session.hostname}",
            disconnected_cb=disconnected,
            reconnected_cb=reconnected,
            closed_cb=on_closed,
            error_cb=on_error,
        )
        try:
            serving.server = await tunnel.serve(
                serving.nc, session.hostname, self.handler, prefix=session.prefix
            )
            # serve() returns once NATS knows the subscriptions; one more round trip costs
            # little and makes that certain (a flush can be overtaken by the SUB it should follow).
            await asyncio.sleep(0)
            await serving.nc.flush(SUBSCRIBE_BARRIER)
        except (tunnel.TunnelError, NatsError, OSError, TimeoutError) as exc:
            await self._close_serving(serving, drain=0.0)
            if isinstance(exc, tunnel.TunnelError):
                raise
            raise tunnel.TunnelConnectionError(f"the subscriptions were not confirmed ({exc!r})") from exc
        except BaseException:
            await self._close_serving(serving, drain=0.0)
            raise
        return serving

    def _refreshed(self, previous: LinkSession) -> None:
        self.refreshes += 1
        session = self.session
        until = f" (valid until {_clock(session.expires_at)})" if session and session.expires_at else ""
        moved = (
            f"; now serving {session.hostname} (was {previous.hostname})"
            if session is not None and session.hostname.lower() != previous.hostname.lower()
            else ""
        )
        self._note("credentials_refreshed", f"credentials refreshed{until}{moved}", refreshes=self.refreshes)

    async def _supervise(self, serving: _Serving) -> str:
        """Keep the current connection serving, refreshing it; returns why it stopped."""
        retry = Backoff(initial=RETRY_INITIAL, cap=RETRY_CAP)
        refresh_at = _refresh_at(serving.session)
        while True:
            session, nc = serving.session, serving.nc
            assert nc is not None
            now = time.monotonic()
            expiry = session.expires_monotonic
            wakeups = [
                t for t in (refresh_at, None if expiry is None else expiry + EXPIRY_GRACE) if t is not None
            ]
            timeout = max(0.0, min(wakeups) - now) if wakeups else None
            await _wait_any(self._stop, serving.closed, self._woke, timeout=timeout)
            if self._stop.is_set():
                return self._stop_reason
            if self._woke.is_set():
                # Monotonic deadlines stood still during the sleep: judge the credential by the wall clock.
                self._woke.clear()
                expires_at = serving.session.expires_at
                if expires_at is not None and time.time() >= expires_at - EXPIRY_GRACE:
                    return f"the NATS credentials expired during {self._slept:.0f} s of sleep"
                refresh_at = time.monotonic()  # a new credential and a new connection now
            if serving.closed.is_set() or nc.is_closed:
                return _closed_reason(nc, session)
            now = time.monotonic()
            if expiry is not None and now >= expiry + EXPIRY_GRACE and not nc.is_connected:
                return "the NATS credentials expired while reconnecting"
            if refresh_at is None or now < refresh_at:
                continue
            outcome = await self._refresh(serving)
            if isinstance(outcome, str):
                return outcome
            if isinstance(outcome, _Serving):
                serving = outcome
                retry.reset()
                refresh_at = _refresh_at(serving.session)
                continue
            # No new connection yet: keep serving on this one, try again before it runs out.
            remaining = session.remaining()
            wait = retry.next()
            if remaining is not None and remaining > 0:
                wait = min(wait, max(0.5, remaining / 2))
            refresh_at = time.monotonic() + wait

    async def _refresh(self, old: _Serving) -> _Serving | str | None:
        """Make-before-break: the new connection serving (now current), a reason to start over
        (str), or None (failed; the old connection keeps serving, retry later)."""
        session = old.session
        request = asyncio.ensure_future(self.gateway.request_session(self.public_key))
        stop = asyncio.ensure_future(self._stop.wait())
        lost = asyncio.ensure_future(old.closed.wait())
        try:
            await asyncio.wait([request, stop, lost], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            lost.cancel()
        if not request.done():
            request.cancel()
            with contextlib.suppress(asyncio.CancelledError, GatewayError):
                await request
            assert old.nc is not None
            return self._stop_reason if self._stop.is_set() else _closed_reason(old.nc, session)
        try:
            new = request.result()
        except GatewayError as exc:
            self._refresh_failed(session, exc.reason)
            return None
        try:
            serving: _Serving | None = await self._interruptible(self._open(new))
        except (NatsConnectError, LinkdError, ValueError) as exc:
            self._refresh_failed(session, f"cannot connect with the new credentials: {_connect_failure(exc)}")
            return None
        except tunnel.TunnelError as exc:
            self._refresh_failed(session, f"cannot serve {new.hostname} on the new connection ({exc})")
            return None
        if serving is None:
            return self._stop_reason  # stopping
        # Both servers are in the host's queue group now; switch, then retire the old one.
        self._last_note = None
        await self._make_current(serving)
        self._refreshed(session)
        self._set(State.ONLINE, f"online as {new.hostname}")
        self._retire(old)
        return serving

    def _refresh_failed(self, session: LinkSession, reason: str) -> None:
        expires = session.expires_at
        until = f"; still online until {_clock(expires)}" if expires else ""
        self._note("refresh_failed", f"credentials refresh failed: {reason}{until}", once=True)

    def _retire(self, old: _Serving) -> None:
        """The replaced connection takes no new requests, finishes what it has, then closes."""
        budget = drain_budget(old.session)
        if old.in_flight:
            detail_log.info(
                "the previous connection finishes %d request(s), for up to %.1fs", old.in_flight, budget
            )
        task = asyncio.ensure_future(self._close_serving(old, drain=budget))
        self._draining[task] = old
        task.add_done_callback(self._drained)

    def _drained(self, task: asyncio.Task[None]) -> None:
        self._draining.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            detail_log.warning("closing a replaced connection failed: %r", task.exception())

    async def _close_serving(self, serving: _Serving, *, drain: float) -> None:
        """Stop taking requests, let in-flight ones finish for up to ``drain`` s, close the connection."""
        server, nc = serving.server, serving.nc
        if server is not None:
            with contextlib.suppress(Exception):
                await server.close(timeout=drain)
        if nc is not None and not nc.is_closed:
            if nc.is_connected:  # the last response frames go out before the socket closes
                with contextlib.suppress(Exception):
                    await nc.flush(1)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), 2.0)

    async def _discard_connection(self) -> None:
        serving, self._current = self._current, None
        self.server = None
        self.nc = None
        if serving is not None:
            await self._connection_changed(None)
            await self._close_serving(serving, drain=0.0)

    async def _finish_draining(self, timeout: float) -> None:
        """Wait (bounded) for replaced connections still finishing requests; close what is left."""
        tasks = list(self._draining)
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, timeout))
        for task in pending:
            task.cancel()
        for task in pending:
            serving = self._draining.pop(task, None)
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            if serving is not None:
                await self._close_serving(serving, drain=0.0)

    async def _shutdown(self) -> None:
        drain = self.settings.drain_timeout
        deadline = time.monotonic() + drain
        server, nc = self.server, self.nc
        in_flight = self._in_flight()
        runs = len(self.runs.active())
        self._set(
            State.STOPPING,
            f"stopping ({self._stop_reason}): finishing {in_flight} request(s), cancelling {runs} run(s), "
            f"up to {drain:g}s",
        )
        steps = [self.runs.shutdown(drain), self._finish_draining(drain)]
        if server is not None:
            steps.append(server.close(timeout=drain))
        results = await asyncio.gather(*steps, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                detail_log.warning("during shutdown: %s", result)
        self.server = None
        self._current = None  # the connection's callbacks no longer change the state
        # The uplink gets the connection's last moments to deliver what the runs just wrote.
        if self.uplink is not None:
            budget = max(MIN_UPLINK_FLUSH, deadline - time.monotonic())
            try:
                await asyncio.wait_for(self.uplink.aclose(budget), budget + 1.0)
            except Exception as exc:
                detail_log.warning("the run uplink did not close cleanly: %s", exc)
        sink_close = getattr(self.sink, "aclose", None)
        if callable(sink_close):
            try:
                await asyncio.wait_for(sink_close(), max(0.5, drain / 2))
            except Exception as exc:
                detail_log.warning("the run event sink did not close cleanly: %s", exc)
        if nc is not None:
            await self._connection_changed(None)
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), 2.0)
        self.nc = None
        if self.upstream is not None:
            await self.upstream.aclose()
        await self.gateway.aclose()
        self._set(State.STOPPED, "stopped")
        if self.write_status_file:
            remove_status(self.settings.status_file, os.getpid())


def _refresh_at(session: LinkSession) -> float | None:
    lifetime = session.lifetime
    return None if lifetime is None else session.received_at + refresh_delay(lifetime)


def _server_url(nc: NATS | None) -> str:
    """scheme://host:port of the server nats-py is (re)connecting to, without user info."""
    srv = getattr(nc, "_current_server", None) if nc is not None else None
    uri = getattr(srv, "uri", None)
    if uri is None or uri.hostname is None:
        return "NATS"
    return f"{uri.scheme}://{uri.hostname}:{uri.port}" if uri.port else f"{uri.scheme}://{uri.hostname}"


def _tls_line(where: str, problem: TLSProblem) -> str:
    return f"nats {where}: {problem.reason}: {problem.fix(ca=CA_HINT, cert=CERT_HINT)}"


def _connect_failure(exc: BaseException) -> str:
    tls_line = tls_error_line(exc)
    if tls_line is not None:
        return tls_line
    if isinstance(exc, NatsAuthError):
        return "NATS refused the credentials from the gateway (authorization violation)"
    return str(exc)
