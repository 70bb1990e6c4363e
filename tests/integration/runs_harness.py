"""Real processes for the end-to-end runs tests and ``scripts/bench_runs.py``.

Everything here is a separate OS process, as in production, and every process can
be SIGKILLed and started again:

- :class:`JetStreamNats`: an operator/JWT-mode nats-server (``OperatorSetup``, system
  account) with JetStream on a file store in a directory we own, so a restart on the
  same port keeps the streams and key-value buckets;
- :class:`JetStreamCluster`: the same trust chain on an N-node cluster
  (:class:`cli.nats_cluster.NatsCluster`, clustered JetStream), each node killable and
  restartable on its ports with its store, plus who leads which stream or consumer (and
  moving a leader by a graceful stepdown), which node holds a named client connection, and
  whether every replica of some streams and their consumers is current again;
- :class:`GatewayProcess`: ``studio-gateway serve`` (``python -m studio_gateway.cli``) on a
  free port, ready once ``/healthz`` reports its NATS connection;
- :class:`LinkdProcess`: ``linkd login`` (token on stdin, secrets in the insecure file
  store under a private directory, never the user's keyring) then ``linkd up --json-logs``,
  online once it logs the ``online`` state; its run events are also appended to a JSONL
  file (``--events-file``), which is the desktop-side truth the tests compare against;
- :class:`RunsApi`: the gateway runs HTTP API (``/api/runs``), including an SSE/NDJSON
  event-stream reader;
- :class:`RunsStack`: all of the above together, on one server or (``cluster=N``) on an
  N-node cluster whose every URL the gateways and daemons get, with runs replicated
  (``RUNS_REPLICAS`` = min(N, 3)).

No pytest import: the benchmark uses this module too. Process output goes to log files
(never pipes nobody reads), shown by :meth:`RunsStack.diagnostics` when a test fails.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Generic, Self, overload

import httpx
from typing_extensions import TypeVar

from cli.nats_cluster import NatsCluster
from cli.nats_server import NatsServer, NatsServerConfig, free_port
from studio_gateway.auth import issue_token
from studio_gateway.config import AuthConfig
from studio_gateway.nats_jwt import OperatorSetup
from tests.helpers import wait_until, wait_until_sync

__all__ = [
    "SECRET",
    "ApiError",
    "GatewayProcess",
    "JetStreamCluster",
    "JetStreamNats",
    "LinkdProcess",
    "RunsApi",
    "RunsStack",
    "SseMessage",
]

REPO_ROOT: Final = Path(__file__).resolve().parent.parent.parent
PYTHON: Final = sys.executable
# 48 bytes of HS256 secret for the gateway's API tokens (the gateway wants >= 32).
SECRET: Final = "runs-e2e-secret-0123456789abcdef0123456789abcdef"
# Cold Python start of a CLI on a loaded 2-core machine is part of these.
START_TIMEOUT: Final = 30.0
STOP_TIMEOUT: Final = 10.0
KILL_TIMEOUT: Final = 5.0
LOG_TAIL_LINES: Final = 60
HTTP_TIMEOUT: Final = 15.0


# Per-request access log lines drown what matters in a failure report.
_NOISE: Final = ('"aiohttp.access"',)


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return "(no log)"
    kept = [line for line in text.splitlines() if not any(noise in line for noise in _NOISE)]
    return "\n".join(kept[-lines:])


def _clean_env(**extra: str) -> dict[str, str]:
    """The current environment without our products' settings, the repo importable, plus ``extra``."""
    prefixes = ("LINKD_", "NATS_", "GATEWAY_", "TUNNEL_", "RUNS_", "STUDIO_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.pop("PYTHON_KEYRING_BACKEND", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


# ------------------------------------------------------------------------------ processes


# Processes that may still run; the atexit hook kills them so no test run leaks one.
_LIVE: set[ManagedProcess] = set()


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_LIVE):
        with contextlib.suppress(Exception):
            proc.kill()


class ManagedProcess:
    """A subprocess whose stdout+stderr go to one log file; SIGKILL-able and restartable."""

    def __init__(self, name: str, log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def _spawn(self, argv: list[str], env: Mapping[str, str]) -> None:
        if self.running:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"--- {self.name}: start #{self.starts + 1}: {' '.join(argv[:4])} ...\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                argv,
                env=dict(env),
                cwd=str(REPO_ROOT),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a test's Ctrl-C is not delivered to it twice
            )
        self.starts += 1
        _LIVE.add(self)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, like a crash (no goodbye to anyone), and reap it."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=KILL_TIMEOUT)
        _LIVE.discard(self)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, escalating to SIGKILL after ``timeout``; returns the exit status."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return proc.returncode

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return _tail(self.log_path, lines)

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(
                f"{self.name} exited with status {self.proc.returncode}\n--- log tail ---\n{self.log_tail()}"
            )


@dataclass
class JetStreamNats:
    """An operator-mode nats-server with JetStream on a file store that survives restarts."""

    setup: OperatorSetup
    server: NatsServer
    store_dir: Path
    gateway_creds: Path

    @classmethod
    def start(cls, workdir: Path, *, websocket: bool = False) -> JetStreamNats:
        setup = OperatorSetup.generate()
        store = workdir / "jetstream"
        store.mkdir(parents=True, exist_ok=True)
        server = NatsServer(
            NatsServerConfig(
                jetstream=True,
                store_dir=str(store),
                extra_conf=setup.server_conf(),
                websocket_port=0 if websocket else None,
            )
        )
        try:
            server.start(timeout=START_TIMEOUT)
        except BaseException:
            server.close()
            raise
        creds = workdir / "gateway.creds"
        creds.write_text(setup.user_creds("studio-gateway"), encoding="utf-8")
        creds.chmod(0o600)
        return cls(setup, server, store, creds)

    @property
    def url(self) -> str:
        return self.server.url

    def admin_creds(self, name: str = "e2e-admin") -> str:
        """Creds text for an unrestricted user of the account (what a test or benchmark inspects with)."""
        return self.setup.user_creds(name)

    def kill(self) -> None:
        self.server.kill()

    def restart(self) -> None:
        """Start again on the same port with the same store (stop first if still running)."""
        self.server.restart(timeout=START_TIMEOUT)

    def close(self) -> None:
        self.server.close()


@dataclass
class JetStreamCluster:
    """An operator-mode nats-server cluster with clustered JetStream; the surface of :class:`JetStreamNats`
    plus per-node ``kill``/``restart`` and leader lookups (node indexes, 0-based)."""

    setup: OperatorSetup
    cluster: NatsCluster
    gateway_creds: Path

    @classmethod
    def start(cls, workdir: Path, *, size: int = 3, websocket: bool = False) -> JetStreamCluster:
        """Nodes ``n1``..``nN`` under ``workdir/nats-cluster``; blocks until routed with a meta leader."""
        setup = OperatorSetup.generate()
        cluster = NatsCluster(
            size,
            operator_conf=setup.server_conf(),
            websocket=websocket,
            workdir=workdir / "nats-cluster",
        )
        try:
            cluster.start(timeout=START_TIMEOUT)
        except BaseException:
            cluster.close()
            raise
        creds = workdir / "gateway.creds"
        creds.write_text(setup.user_creds("studio-gateway"), encoding="utf-8")
        creds.chmod(0o600)
        return cls(setup, cluster, creds)

    @property
    def url(self) -> str:
        """Every node's client URL, comma-joined (what ``NATS_URL`` takes)."""
        return self.cluster.url

    @property
    def urls(self) -> list[str]:
        return self.cluster.urls

    @property
    def nodes(self) -> list[NatsServer]:
        return self.cluster.nodes

    @property
    def account(self) -> str:
        """The account's public key: how ``/jsz`` names the account holding the run streams."""
        return self.setup.account.public_key

    def admin_creds(self, name: str = "e2e-admin") -> str:
        """Creds text for an unrestricted user of the account (what a test or benchmark inspects with)."""
        return self.setup.user_creds(name)

    def kill(self, index: int) -> None:
        """SIGKILL node ``index`` (0-based), like a crash."""
        self.cluster.kill(index)

    def restart(self, index: int, *, wait: bool = True) -> None:
        """Start node ``index`` again on its ports with its store; with ``wait``, until it rejoined."""
        self.cluster.restart(index, START_TIMEOUT, wait=wait)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Running nodes all routed to each other and agreeing on a JetStream meta leader."""
        self.cluster.wait_ready(timeout)

    def meta_leader(self) -> int | None:
        return self.cluster.meta_leader()

    def stream_leader(self, stream: str, account: str | None = None) -> int | None:
        """Node leading ``stream`` (default account: this setup's), None during an election."""
        return self.cluster.stream_leader(stream, account or self.account)

    def consumer_leader(self, stream: str, consumer: str, account: str | None = None) -> int | None:
        return self.cluster.consumer_leader(stream, consumer, account or self.account)

    def wait_consumer_leader(
        self, stream: str, consumer: str, *, timeout: float = START_TIMEOUT, not_on: int | None = None
    ) -> int:
        return self.cluster.wait_consumer_leader(
            stream, consumer, self.account, timeout=timeout, not_on=not_on
        )

    def wait_stream_leader(
        self, stream: str, *, timeout: float = START_TIMEOUT, not_on: int | None = None
    ) -> int:
        return self.cluster.wait_stream_leader(stream, self.account, timeout=timeout, not_on=not_on)

    async def move_leader(
        self, nc: Any, stream: str, to: int, *, consumer: str | None = None, timeout: float = 15.0
    ) -> None:
        """Make node ``to`` the leader of ``stream`` (or of its ``consumer``): a leader stepdown with
        that node preferred (``$JS.API.*.LEADER.STEPDOWN``), asked again until it is so. ``nc`` is a
        connection of an account user (e.g. :meth:`admin_creds`). A graceful hand-over: the old
        leader steps down at once, no election timeout."""
        subject = (
            f"$JS.API.CONSUMER.LEADER.STEPDOWN.{stream}.{consumer}"
            if consumer is not None
            else f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}"
        )
        what = f"{stream} > {consumer}" if consumer is not None else stream
        body = json.dumps({"placement": {"preferred": NatsCluster.node_name(to)}}).encode()
        loop = asyncio.get_running_loop()
        asked_at: float | None = None
        leader: int | None = None

        async def moved() -> bool:
            nonlocal asked_at, leader
            leader = await asyncio.to_thread(self._leader_of, stream, consumer)
            if leader == to:
                return True
            now = loop.time()
            if leader is not None and (asked_at is None or now - asked_at >= 1.0):
                asked_at = now
                with contextlib.suppress(Exception):  # an election in progress: ask again
                    await nc.request(subject, body, timeout=2.0)
            return False

        await wait_until(
            moved,
            timeout,
            interval=0.05,
            message=lambda: (
                f"the leader of {what} is {'none' if leader is None else NatsCluster.node_name(leader)}, "
                f"not {NatsCluster.node_name(to)}"
            ),
        )

    def _leader_of(self, stream: str, consumer: str | None) -> int | None:
        return self.stream_leader(stream) if consumer is None else self.consumer_leader(stream, consumer)

    def client_node(self, name_prefix: str) -> int | None:
        """The running node holding the one client connection whose name starts with
        ``name_prefix`` (``/connz``; linkd names its connection ``linkd <hostname>``), or None
        (no such connection right now, e.g. mid-reconnect, or more than one)."""
        holders: list[int] = []
        for i in self.cluster.running():
            try:
                connz = self.nodes[i].monitor_json("connz?limit=4096")
            except (OSError, ValueError):
                continue
            for conn in connz.get("connections") or []:
                name = conn.get("name") if isinstance(conn, dict) else None
                if isinstance(name, str) and name.startswith(name_prefix):
                    holders.append(i)
        return holders[0] if len(holders) == 1 else None

    def out_of_sync(self, streams: Sequence[str]) -> list[str]:
        """Why ``streams`` (and their consumers) are not fully replicated right now: no leader,
        a replica missing or not current. Empty when every raft group has all its peers in step.
        Each group is judged by its own leader (a follower's view of the other followers is stale)."""
        views: dict[int, dict[str, Any] | None] = {}

        def view(node: int) -> dict[str, Any] | None:
            if node not in views:
                try:
                    views[node] = self.nodes[node].monitor_json(_JSZ_DETAIL)
                except (OSError, ValueError):
                    views[node] = None
            return views[node]

        names = {NatsCluster.node_name(i): i for i in range(len(self.nodes))}
        problems: list[str] = []
        for stream in streams:
            leader = self.stream_leader(stream)
            jsz = view(leader) if leader is not None else None
            detail = _stream_detail(jsz, stream, self.account) if jsz is not None else None
            if detail is None:
                problems.append(f"{stream}: no leader")
                continue
            problems.extend(_group_problems(stream, detail))
            for item in detail.get("consumer_detail") or []:
                if not isinstance(item, dict) or _replicas_of(item) < 2:
                    continue
                name = f"{stream} > {item.get('name')}"
                group = item.get("cluster")
                leader_name = group.get("leader") if isinstance(group, dict) else None
                claimed = names.get(leader_name) if isinstance(leader_name, str) else None
                own = view(claimed) if claimed is not None else None
                own_detail = _stream_detail(own, stream, self.account) if own is not None else None
                mine = [
                    c
                    for c in (own_detail or {}).get("consumer_detail") or []
                    if isinstance(c, dict) and c.get("name") == item.get("name")
                ]
                cluster = mine[0].get("cluster") if mine else None
                if not mine or not isinstance(cluster, dict) or cluster.get("leader") != leader_name:
                    problems.append(f"{name}: no leader")
                else:
                    problems.extend(_group_problems(name, mine[0]))
        return problems

    def wait_in_sync(self, streams: Sequence[str], timeout: float = START_TIMEOUT) -> None:
        """Block until :meth:`out_of_sync` is empty (e.g. a restarted node caught up)."""
        problems: list[str] = []

        def in_sync() -> bool:
            nonlocal problems
            problems = self.out_of_sync(streams)
            return not problems

        wait_until_sync(in_sync, timeout, interval=0.1, message=lambda: f"not in sync: {'; '.join(problems)}")

    def pids(self) -> dict[str, int | None]:
        """Process id of every node by name (None while a node is down)."""
        return {
            NatsCluster.node_name(i): (node.pid if node.is_running else None)
            for i, node in enumerate(self.nodes)
        }

    def log_tails(self) -> str:
        return self.cluster.log_tails(LOG_TAIL_LINES)

    def close(self) -> None:
        self.cluster.close()


_JSZ_DETAIL: Final = "jsz?accounts=true&streams=true&consumers=true&config=true"


def _stream_detail(jsz: Mapping[str, Any], stream: str, account: str) -> dict[str, Any] | None:
    for acc in jsz.get("account_details") or []:
        if not isinstance(acc, dict) or account not in (acc.get("id"), acc.get("name")):
            continue
        for detail in acc.get("stream_detail") or []:
            if isinstance(detail, dict) and detail.get("name") == stream:
                return detail
    return None


def _group_problems(name: str, detail: Mapping[str, Any]) -> list[str]:
    """What keeps a raft group (as its leader reports it) from being whole and current."""
    raw = detail.get("cluster")
    cluster: dict[str, Any] = raw if isinstance(raw, dict) else {}
    peers = [r for r in cluster.get("replicas") or [] if isinstance(r, dict)]
    wanted = _replicas_of(detail)
    if not cluster.get("leader"):
        return [f"{name}: no leader"]
    if len(peers) < wanted - 1:
        return [f"{name}: {len(peers) + 1} of {wanted} replicas"]
    lagging = [str(r.get("name")) for r in peers if not r.get("current") or r.get("offline")]
    return [f"{name}: {', '.join(lagging)} not current"] if lagging else []


def _replicas_of(detail: Mapping[str, Any]) -> int:
    config = detail.get("config")
    wanted = config.get("num_replicas") if isinstance(config, dict) else None
    return wanted if isinstance(wanted, int) and wanted > 0 else 1


class GatewayProcess(ManagedProcess):
    """``studio-gateway serve`` on a fixed loopback port (kept across restarts)."""

    def __init__(self, name: str, env: Mapping[str, str], log_path: Path, probe_token: str) -> None:
        super().__init__(name, log_path)
        self.probe_token = probe_token
        self.port = free_port()
        self.env = _clean_env(**env, GATEWAY_HOST="127.0.0.1", GATEWAY_PORT=str(self.port))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spawn(self) -> None:
        self._spawn([PYTHON, "-m", "studio_gateway.cli", "serve", "--log-level", "info"], self.env)

    # Ready = connected to NATS (``/healthz``) and the runs machinery up: an unknown run is a 404
    # then, while the gateway still sets up its streams and buckets it answers 503.
    _PROBE_PATH: Final = "/api/runs/readiness-probe"

    def _judge(self, health: httpx.Response, probe: httpx.Response | None) -> bool:
        if health.status_code != 200 or health.json().get("nats") != "connected":
            return False
        return probe is not None and probe.status_code == 404

    def _ready_now(self) -> bool:
        self._check_alive()
        try:
            health = httpx.get(f"{self.url}/healthz", timeout=1.0)
            probe = httpx.get(
                f"{self.url}{self._PROBE_PATH}",
                headers={"Authorization": f"Bearer {self.probe_token}"},
                timeout=1.0,
            )
        except httpx.HTTPError:
            return False
        return self._judge(health, probe)

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Spawn and block until ``/healthz`` says the gateway is connected to NATS."""
        self.spawn()
        self.block_until_ready(timeout)

    def block_until_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Block until the spawned gateway is ready (see :meth:`wait_ready` for the async form)."""
        wait_until_sync(
            self._ready_now,
            timeout,
            interval=0.05,
            message=lambda: f"{self.name} never became ready:\n{self.log_tail()}",
        )

    async def astart(self, timeout: float = START_TIMEOUT) -> None:
        """Spawn and wait (without blocking the event loop) until ready."""
        self.spawn()
        await self.wait_ready(timeout)

    async def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        async with httpx.AsyncClient(timeout=1.0) as http:

            async def ready() -> bool:
                self._check_alive()
                try:
                    health = await http.get(f"{self.url}/healthz")
                    probe = await http.get(
                        f"{self.url}{self._PROBE_PATH}",
                        headers={"Authorization": f"Bearer {self.probe_token}"},
                    )
                except httpx.HTTPError:
                    return False
                return self._judge(health, probe)

            await wait_until(ready, timeout, interval=0.05, message=f"{self.name} never became ready")

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=HTTP_TIMEOUT).text


class LinkdProcess(ManagedProcess):
    """``linkd up`` for one user, its secrets and config in a private directory."""

    def __init__(
        self,
        name: str,
        home: Path,
        gateway_url: str,
        token: str,
        *,
        config_toml: str = "",
        env: Mapping[str, str] | None = None,
        events_file: bool = True,
    ) -> None:
        super().__init__(name, home / "linkd.log")
        self.home = home
        # The desktop-side truth tests compare against; a benchmark leaves it out (a write per event).
        self.events_file = events_file
        self.gateway_url = gateway_url
        self.token = token
        self.events_path = home / "events.jsonl"
        home.mkdir(parents=True, exist_ok=True)
        config = home / "linkd.toml"
        config.write_text(config_toml, encoding="utf-8")
        self.env = _clean_env(
            LINKD_CONFIG_DIR=str(home / "config"),
            LINKD_RUNTIME_DIR=str(home / "run"),
            LINKD_CONFIG=str(config),
            LINKD_INSECURE_FILE_STORE="1",
            # The fail backend: secrets can only go to the file store in ``home``, never a real keyring.
            PYTHON_KEYRING_BACKEND="keyring.backends.fail.Keyring",
            **(env or {}),
        )
        self._hostname: str | None = None
        self._online_seen = 0

    def login(self) -> None:
        """``linkd login`` with the token on stdin, checked with the gateway."""
        done = subprocess.run(
            [PYTHON, "-m", "linkd.cli", "login", "--gateway", self.gateway_url],
            input=(self.token + "\n").encode(),
            env=self.env,
            cwd=str(REPO_ROOT),
            capture_output=True,
            timeout=START_TIMEOUT,
            check=False,
        )
        if done.returncode != 0:
            raise AssertionError(f"linkd login failed ({done.returncode}): {done.stderr.decode()}")

    def spawn(self) -> None:
        self._hostname = None
        self._online_seen = self._state_count("online")
        events = ["--events-file", str(self.events_path)] if self.events_file else []
        self._spawn([PYTHON, "-m", "linkd.cli", "up", "--json-logs", *events], self.env)

    def log_records(self) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if isinstance(record, dict):
                        records.append(record)
        return records

    def states(self) -> list[dict[str, Any]]:
        return [r for r in self.log_records() if r.get("event") == "state"]

    def _state_count(self, state: str) -> int:
        return sum(1 for r in self.states() if r.get("state") == state)

    def _online_now(self) -> str | None:
        self._check_alive()
        online = [r for r in self.states() if r.get("state") == "online"]
        if len(online) <= self._online_seen:
            return None
        host = online[-1].get("tunnel_hostname")
        return host if isinstance(host, str) else None

    def start(self, timeout: float = START_TIMEOUT) -> str:
        """Spawn and block until online; returns the tunnel hostname."""
        self.spawn()
        host: str = wait_until_sync(
            self._online_now,
            timeout,
            interval=0.05,
            message=lambda: f"{self.name} never came online:\n{self.log_tail()}",
        )
        self._hostname = host
        return host

    async def astart(self, timeout: float = START_TIMEOUT) -> str:
        self.spawn()
        host: str = await wait_until(
            self._online_now, timeout, interval=0.02, message=f"{self.name} never came online"
        )
        self._hostname = host
        return host

    @property
    def hostname(self) -> str:
        assert self._hostname is not None, f"{self.name} has not been online yet"
        return self._hostname

    def events(self, run_id: str | None = None) -> list[dict[str, Any]]:
        """The run events this daemon produced (its ``--events-file``), optionally of one run."""
        try:
            text = self.events_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        events: list[dict[str, Any]] = []
        for line in text.splitlines():
            with contextlib.suppress(ValueError):  # a line being written right now
                event = json.loads(line)
                if isinstance(event, dict) and (run_id is None or event.get("runId") == run_id):
                    events.append(event)
        return events


# ------------------------------------------------------------------------------ the HTTP API


class ApiError(AssertionError):
    """An unexpected HTTP status from the runs API (with the body, for the test report)."""


@dataclass(frozen=True, slots=True)
class SseMessage:
    id: str | None
    event: str
    data: Any


class RunsApi:
    """The runs HTTP API of one gateway instance, as one user."""

    def __init__(self, base_url: str, token: str, http: httpx.AsyncClient) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.http = http

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def with_base(self, base_url: str) -> RunsApi:
        """The same user on another gateway instance."""
        return RunsApi(base_url, self.token, self.http)

    async def create(self, runner: str, input: Any = None, **extra: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"runner": runner, **extra}
        if input is not None:
            body["input"] = input
        resp = await self.http.post(f"{self.base_url}/api/runs", json=body, headers=self.headers)
        if resp.status_code != 202:
            raise ApiError(f"POST /api/runs -> {resp.status_code}: {resp.text}")
        doc: dict[str, Any] = resp.json()
        return doc

    async def get(self, run_id: str) -> dict[str, Any]:
        resp = await self.http.get(f"{self.base_url}/api/runs/{run_id}", headers=self.headers)
        if resp.status_code != 200:
            raise ApiError(f"GET /api/runs/{run_id} -> {resp.status_code}: {resp.text}")
        doc: dict[str, Any] = resp.json()
        return doc

    async def wait_state(
        self, run_id: str, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str
    ) -> dict[str, Any]:
        last: dict[str, Any] = {}

        async def check() -> dict[str, Any] | None:
            nonlocal last
            resp = await self.http.get(f"{self.base_url}/api/runs/{run_id}", headers=self.headers)
            if resp.status_code == 503:  # NATS or JetStream briefly away (a restart): ask again
                return None
            if resp.status_code != 200:
                raise ApiError(f"GET /api/runs/{run_id} -> {resp.status_code}: {resp.text}")
            last = resp.json()
            return last if predicate(last) else None

        try:
            state: dict[str, Any] = await wait_until(check, timeout, interval=0.05, message=what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last state: {json.dumps(last, sort_keys=True)}") from None
        return state

    async def wait_terminal(self, run_id: str, timeout: float) -> dict[str, Any]:
        return await self.wait_state(
            run_id,
            lambda s: s.get("status") in ("completed", "failed", "cancelled"),
            timeout,
            f"run {run_id} never ended",
        )

    async def cancel(self, run_id: str) -> httpx.Response:
        return await self.http.post(f"{self.base_url}/api/runs/{run_id}/cancel", headers=self.headers)

    async def export(self, run_id: str) -> list[dict[str, Any]]:
        resp = await self.http.get(f"{self.base_url}/api/runs/{run_id}/export", headers=self.headers)
        if resp.status_code != 200:
            raise ApiError(f"GET /api/runs/{run_id}/export -> {resp.status_code}: {resp.text}")
        return [json.loads(line) for line in resp.text.splitlines() if line.strip()]

    @contextlib.asynccontextmanager
    async def sse(
        self, run_id: str, *, after: int | None = None, last_event_id: int | None = None
    ) -> AsyncIterator[AsyncIterator[SseMessage]]:
        """The run's event stream (``text/event-stream``) as parsed messages; keep-alives skipped."""
        params = {"after": str(after)} if after is not None else None
        headers = {**self.headers, "Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = str(last_event_id)
        async with self.http.stream(
            "GET",
            f"{self.base_url}/api/runs/{run_id}/events",
            params=params,
            headers=headers,
            timeout=httpx.Timeout(HTTP_TIMEOUT, read=60.0),
        ) as resp:
            if resp.status_code != 200:
                await resp.aread()
                raise ApiError(f"GET /api/runs/{run_id}/events -> {resp.status_code}: {resp.text}")
            ctype = resp.headers.get("content-type", "")
            if not ctype.startswith("text/event-stream"):
                raise ApiError(f"events content-type is {ctype!r}, not text/event-stream")
            yield parse_sse(resp.aiter_lines())

    async def ndjson(self, run_id: str, *, after: int | None = None) -> AsyncIterator[dict[str, Any]]:
        params = {"after": str(after)} if after is not None else None
        headers = {**self.headers, "Accept": "application/x-ndjson"}
        async with self.http.stream(
            "GET",
            f"{self.base_url}/api/runs/{run_id}/events",
            params=params,
            headers=headers,
            timeout=httpx.Timeout(HTTP_TIMEOUT, read=60.0),
        ) as resp:
            if resp.status_code != 200:
                await resp.aread()
                raise ApiError(f"GET /api/runs/{run_id}/events -> {resp.status_code}: {resp.text}")
            async for line in resp.aiter_lines():
                if line.strip():
                    yield json.loads(line)


async def parse_sse(lines: AsyncIterator[str]) -> AsyncIterator[SseMessage]:
    """SSE framing: ``field: value`` lines, a blank line ends a message; ``:`` lines are comments."""
    msg_id: str | None = None
    event = "message"
    data: list[str] = []
    async for raw in lines:
        line = raw.rstrip("\r")
        if not line:
            if data:
                text = "\n".join(data)
                try:
                    value: Any = json.loads(text)
                except ValueError:
                    value = text
                yield SseMessage(msg_id, event, value)
            msg_id, event, data = None, "message", []
            continue
        if line.startswith(":"):
            continue
        name, _, value_text = line.partition(":")
        value_text = value_text.removeprefix(" ")
        if name == "id":
            msg_id = value_text
        elif name == "event":
            event = value_text
        elif name == "data":
            data.append(value_text)


# ------------------------------------------------------------------------------ the whole stack


# Gateway settings for fast, deterministic tests: short liveness timeout (the reaper), short
# dispatch timeouts. Names as in studio_gateway/config.py (runs settings).
DEFAULT_LINKD_TOML: Final = "drain_timeout = 3\n[runners]\nheartbeat_interval = 0.5\nmax_concurrent = 32\n"


def stack_env(
    nats: JetStreamNats | JetStreamCluster, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Gateway environment for ``nats`` (every node's URL for a cluster) plus ``extra``."""
    return {
        "GATEWAY_JWT_SECRET": SECRET,
        "NATS_URL": nats.url,
        "NATS_CREDS": str(nats.gateway_creds),
        "NATS_PUBLIC_URL": nats.url,
        "NATS_TUNNEL_SESSION_TTL_SECONDS": "3600",
        **nats.setup.gateway_env(),
        **(extra or {}),
    }


# What a RunsStack runs on; a plain ``RunsStack`` annotation means one nats-server.
NatsT = TypeVar("NatsT", bound="JetStreamNats | JetStreamCluster", default=JetStreamNats)


@dataclass
class RunsStack(Generic[NatsT]):
    """One JetStream nats-server (or an N-node cluster), gateway processes and linkd daemons."""

    workdir: Path
    nats: NatsT
    gateway_env: dict[str, str]
    gateways: list[GatewayProcess] = field(default_factory=list)
    daemons: list[LinkdProcess] = field(default_factory=list)

    @overload
    @classmethod
    def start(
        cls,
        workdir: Path,
        *,
        gateways: int = ...,
        gateway_env: Mapping[str, str] | None = ...,
        websocket: bool = ...,
        cluster: None = ...,
    ) -> RunsStack[JetStreamNats]: ...

    @overload
    @classmethod
    def start(
        cls,
        workdir: Path,
        *,
        gateways: int = ...,
        gateway_env: Mapping[str, str] | None = ...,
        websocket: bool = ...,
        cluster: int,
    ) -> RunsStack[JetStreamCluster]: ...

    @classmethod
    def start(
        cls,
        workdir: Path,
        *,
        gateways: int = 2,
        gateway_env: Mapping[str, str] | None = None,
        websocket: bool = False,
        cluster: int | None = None,
    ) -> RunsStack[JetStreamNats] | RunsStack[JetStreamCluster]:
        """Start nats-server and ``gateways`` gateway processes (in parallel; blocks until ready).

        ``cluster=N`` (N >= 2): an N-node :class:`JetStreamCluster` instead of the single server;
        the gateways get every node's URL (``NATS_URL``, and ``NATS_PUBLIC_URL`` for the daemons)
        and ``RUNS_REPLICAS`` = min(N, 3). ``gateway_env`` overrides any of it.
        """
        if cluster is not None and cluster < 2:
            raise ValueError(f"a cluster has at least 2 nodes (got {cluster}); None for one server")
        if cluster is None:
            single = JetStreamNats.start(workdir, websocket=websocket)
            return RunsStack(workdir, single, stack_env(single, gateway_env)).start_gateways(gateways)
        nodes = JetStreamCluster.start(workdir, size=cluster, websocket=websocket)
        env = stack_env(nodes, {"RUNS_REPLICAS": str(min(cluster, 3)), **(gateway_env or {})})
        return RunsStack(workdir, nodes, env).start_gateways(gateways)

    def start_gateways(self, count: int) -> Self:
        """Add ``count`` gateways and start them in parallel (blocks until ready); on failure
        everything of the stack is closed."""
        try:
            for _ in range(count):
                self.add_gateway(start=False)
            for gateway in self.gateways[-count:] if count else []:
                gateway.spawn()
            for gateway in self.gateways[-count:] if count else []:
                gateway.block_until_ready()
        except BaseException:
            self.close()
            raise
        return self

    def add_gateway(self, *, start: bool = True) -> GatewayProcess:
        index = len(self.gateways)
        gateway = GatewayProcess(
            f"gateway-{index}",
            self.gateway_env,
            self.workdir / f"gateway-{index}.log",
            probe_token=self.token("readiness-probe@example.com"),
        )
        self.gateways.append(gateway)
        if start:
            gateway.start()
        return gateway

    def token(self, user: str, ttl: int = 3600) -> str:
        """An API bearer token for ``user`` (as ``studio-gateway issue-token`` prints it)."""
        return issue_token(AuthConfig.from_env({"GATEWAY_JWT_SECRET": SECRET}), user, ttl)

    def daemon(
        self,
        user: str,
        *,
        gateway: int = 0,
        config_toml: str = DEFAULT_LINKD_TOML,
        start: bool = True,
        events_file: bool = True,
    ) -> LinkdProcess:
        """Log ``user``'s desktop in (through gateway ``gateway``) and, with ``start``, bring it online."""
        safe = "".join(c if c.isalnum() else "-" for c in user)
        daemon = LinkdProcess(
            f"linkd-{safe}-{len(self.daemons)}",
            self.workdir / f"linkd-{safe}-{len(self.daemons)}",
            self.gateways[gateway].url,
            self.token(user),
            config_toml=config_toml,
            events_file=events_file,
        )
        self.daemons.append(daemon)
        daemon.login()
        if start:
            daemon.start()
        return daemon

    def api(self, user: str, http: httpx.AsyncClient, gateway: int = 0) -> RunsApi:
        return RunsApi(self.gateways[gateway].url, self.token(user), http)

    def diagnostics(self) -> str:
        """Log tails of every process, for a failed test's report."""
        parts = []
        for proc in [*self.gateways, *self.daemons]:
            parts.append(
                f"===== {proc.name} (pid {proc.pid}, running={proc.running}) =====\n{proc.log_tail()}"
            )
        if isinstance(self.nats, JetStreamCluster):
            parts.append(f"===== nats-server cluster =====\n{self.nats.log_tails()}")
        else:
            parts.append(
                f"===== nats-server =====\n{_tail(self.nats.server.log_path or Path('/nonexistent'))}"
            )
        return "\n".join(parts)

    def close(self) -> None:
        """Kill every process we started and remove the server's temp dir; never raises."""
        for proc in [*self.daemons, *self.gateways]:
            with contextlib.suppress(Exception):
                proc.kill()
        with contextlib.suppress(Exception):
            self.nats.close()
