#!/usr/bin/env python3
"""One process of simulated desktops for ``scripts/scale.py``: many real ``LinkDaemon``s.

Each desktop is the daemon ``linkd up`` runs (:class:`linkd.daemon.LinkDaemon`): its own
nkey seed, its own gateway-minted link session (``POST /api/links/session`` with its own
user's API token), its own NATS connection presenting that JWT, the daemon's routes
(status, work, control) served on its own host, the mock runner, run events through the
JetStream uplink (no on-disk journal: thousands of SQLite files measure the disk, not the
link), credentials refreshed make-before-break as the real daemon does. Only the request
inspector and the status file are off (both are per-machine loopback conveniences).

The daemons share one HTTP connection pool to the gateway (a real desktop has its own; here
10,000 keep-alive connections would only measure the gateway's socket table).

Protocol with the parent (JSON lines; commands on stdin, answers on stdout, logs on stderr):

- ``{"cmd": "grow", "to": K, "deadline": S}``: start desktops until K run here, wait (up to S
  seconds) until every one of them is online; answers ``{"desktops", "online", "seconds",
  "not_online": {message: count}}``;
- ``{"cmd": "stats", "reset_lag": bool}``: ``{"desktops", "online", "states", "refreshes", "refresh_failed",
  "reconnects", "not_online"}``;
- ``{"cmd": "stop"}``: answers ``{"stopped": true}`` and exits (the parent SIGKILLs anyway).

Environment: ``SCALE_GATEWAY`` (URL), ``SCALE_JWT_SECRET`` (the gateway's API token secret),
``SCALE_WORKER`` (this worker's index: users are ``scale-w<worker>-<i>@example.com``),
``SCALE_TOKEN_TTL``, ``SCALE_CONNECT_WINDOW`` (desktops connecting at once), ``SCALE_STATE_DIR``
(a directory the parent owns and removes).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import json
import logging
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Final

REPO: Final = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from linkd.config import RunnerSettings, Settings  # noqa: E402
from linkd.credentials_store import generate_seed  # noqa: E402
from linkd.daemon import LinkDaemon, State, StateChange  # noqa: E402
from linkd.session import GatewayClient  # noqa: E402
from linkd.uplink import JetStreamUplink  # noqa: E402
from studio_gateway.auth import issue_token  # noqa: E402
from studio_gateway.config import AuthConfig  # noqa: E402

__all__ = ["raise_nofile", "user_id"]

DEFAULT_CONNECT_WINDOW: Final = 100
# Event-loop lag: one timer every LAG_TICK seconds, the last LAG_SAMPLES kept (~1 minute).
LAG_TICK: Final = 0.1
LAG_SAMPLES: Final = 600
POOL_CONNECTIONS: Final = 64


def user_id(worker: int, index: int) -> str:
    """The gateway user (and so the tunnel host) of desktop ``index`` of worker ``worker``."""
    return f"scale-w{worker}-{index}@example.com"


def raise_nofile() -> int:
    """Raise this process's open-file limit to the hard limit (one fd per NATS connection)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


class _SharedTransport(httpx.AsyncBaseTransport):
    """One connection pool for every desktop's GatewayClient; closing a client leaves it open."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        return None


class Desktop:
    """One simulated desktop: a LinkDaemon, its task, and what it went through."""

    def __init__(self, fleet: Fleet, index: int) -> None:
        self.fleet = fleet
        self.index = index
        self.online = asyncio.Event()
        user = user_id(fleet.worker, index)
        token = issue_token(fleet.auth, user, fleet.token_ttl)
        uplink = JetStreamUplink(journal=None)
        self.daemon = LinkDaemon(
            fleet.settings,
            GatewayClient(fleet.gateway, lambda: token, transport=fleet.transport),
            own_seed=generate_seed(),
            uplink=uplink,
            on_change=self._changed,
            machine_name=lambda: f"scale-w{fleet.worker}-{index}",
            write_status_file=False,
        )
        self.task: asyncio.Task[None] | None = None

    def _changed(self, change: StateChange) -> None:
        self.fleet.events[change.event] += 1
        if change.state is State.ONLINE:
            self.online.set()

    def start(self) -> None:
        self.task = asyncio.ensure_future(self.daemon.run())


class Fleet:
    """The desktops of this worker."""

    def __init__(self) -> None:
        self.worker = int(os.environ["SCALE_WORKER"])
        self.gateway = os.environ["SCALE_GATEWAY"]
        self.auth = AuthConfig.from_env({"GATEWAY_JWT_SECRET": os.environ["SCALE_JWT_SECRET"]})
        self.token_ttl = int(os.environ.get("SCALE_TOKEN_TTL", "7200"))
        self.window = int(os.environ.get("SCALE_CONNECT_WINDOW", str(DEFAULT_CONNECT_WINDOW)))
        # The parent's temp dir: it removes it, whatever happens to us.
        self.state_dir = Path(os.environ["SCALE_STATE_DIR"])
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.settings = Settings(
            gateway_url=self.gateway,
            drain_timeout=2.0,
            status_file=self.state_dir / "status.json",
            uplink=True,
            journal=False,
            state_dir=self.state_dir,
            runners=RunnerSettings(mock=True),
            inspect=False,
        )
        self.transport = _SharedTransport(
            httpx.AsyncHTTPTransport(
                limits=httpx.Limits(
                    max_connections=POOL_CONNECTIONS, max_keepalive_connections=POOL_CONNECTIONS
                )
            )
        )
        self.desktops: list[Desktop] = []
        self.events: collections.Counter[str] = collections.Counter()
        self.lags: collections.deque[float] = collections.deque(maxlen=LAG_SAMPLES)

    async def watch_loop_lag(self) -> None:
        """How late a timer fires here: the lag every desktop of this process sees (its flushes
        time out when it nears their 5 s, see linkd.daemon.SUBSCRIBE_BARRIER)."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + LAG_TICK
            await asyncio.sleep(LAG_TICK)
            self.lags.append(max(0.0, loop.time() - due))

    def lag_ms(self, q: float) -> float | None:
        if not self.lags:
            return None
        ordered = sorted(self.lags)
        return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)

    async def grow(self, target: int, deadline: float) -> dict[str, Any]:
        started = time.monotonic()
        end = started + deadline
        fresh: list[Desktop] = []
        connecting: set[asyncio.Task[bool]] = set()
        while len(self.desktops) < target and time.monotonic() < end:
            while len(connecting) >= self.window:
                _, connecting = await asyncio.wait(
                    connecting, timeout=max(0.0, end - time.monotonic()), return_when=asyncio.FIRST_COMPLETED
                )
                if time.monotonic() >= end:
                    break
            desktop = Desktop(self, len(self.desktops))
            self.desktops.append(desktop)
            fresh.append(desktop)
            desktop.start()
            connecting.add(asyncio.ensure_future(desktop.online.wait()))
        if connecting:
            _, pending = await asyncio.wait(connecting, timeout=max(0.0, end - time.monotonic()))
            for waiter in pending:
                waiter.cancel()
        seconds = time.monotonic() - started
        # Thousands of daemons in one heap: a full GC pass over them stalls every desktop of this
        # process for up to seconds (a real desktop's heap is one daemon). Objects that exist now
        # live as long as the run: out of the collector's sight.
        gc.collect()
        gc.freeze()
        not_online = collections.Counter(d.daemon.message for d in fresh if not d.online.is_set())
        return {
            "desktops": len(self.desktops),
            "online": sum(1 for d in self.desktops if d.daemon.state is State.ONLINE),
            "seconds": round(seconds, 3),
            "not_online": dict(not_online.most_common(5)),
        }

    def stats(self) -> dict[str, Any]:
        states = collections.Counter(d.daemon.state.value for d in self.desktops)
        return {
            "desktops": len(self.desktops),
            "online": states.get(State.ONLINE.value, 0),
            "states": dict(states),
            "refreshes": sum(d.daemon.refreshes for d in self.desktops),
            "refresh_failed": self.events["refresh_failed"],
            "reconnects": sum(d.daemon.reconnects for d in self.desktops),
            "loop_lag_p50_ms": self.lag_ms(0.5),
            "loop_lag_p99_ms": self.lag_ms(0.99),
            "loop_lag_max_ms": self.lag_ms(1.0),
            "not_online": dict(
                collections.Counter(
                    d.daemon.message for d in self.desktops if d.daemon.state is not State.ONLINE
                ).most_common(5)
            ),
        }


async def _stdin_lines() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


def _answer(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


async def main() -> None:
    raise_nofile()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    fleet = Fleet()
    lag_watch = asyncio.ensure_future(fleet.watch_loop_lag())
    reader = await _stdin_lines()
    while True:
        line = await reader.readline()
        if not line:
            break
        command = json.loads(line)
        cmd = command.get("cmd")
        if cmd == "grow":
            _answer(await fleet.grow(int(command["to"]), float(command.get("deadline", 600))))
        elif cmd == "stats":
            _answer(fleet.stats())
            if command.get("reset_lag"):  # a measurement window starts: lag from now on only
                fleet.lags.clear()
        elif cmd == "stop":
            _answer({"stopped": True})
            break
        else:
            _answer({"error": f"unknown command {cmd!r}"})
    # The parent kills us; a graceful stop of thousands of daemons is not what is measured.
    lag_watch.cancel()
    os._exit(0)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
