"""A real multi-node nats-server cluster (routes + clustered JetStream) for tests and ``linkctl dev``.

Why real processes: leader elections, route reconnects, the "no responders" window while a
stream has no leader and a client failing over between URLs are server behaviour we cannot
fake. Each node is a :class:`cli.nats_server.NatsServer` (own config, log, JetStream file
store, fixed ports), so a node can be SIGKILLed and started again on the same ports with the
same store, which is what a crashed and restarted node of a production cluster does.

Readiness is read from the monitoring endpoints of every node: ``/routez`` (each running
node routes to every other running node) and ``/jsz`` (all running nodes agree on a live
JetStream meta leader). Leaders of streams and consumers come from ``/jsz`` too; a node
counts as leader only when it says so itself, so a follower's stale view of a dead leader
is never reported. Synchronous like ``NatsServer``; one owner per ``NatsCluster``.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

from .nats_server import (
    LOOPBACK,
    NatsServer,
    NatsServerConfig,
    NatsServerError,
    NatsServerStartError,
    free_port,
)

__all__ = ["NatsCluster", "NatsClusterError"]

# Monitoring answers in microseconds locally: poll tightly, a node is ready within ~0.5-1 s.
POLL_INTERVAL: Final = 0.02
DEFAULT_TIMEOUT: Final = 15.0
LOG_TAIL_LINES: Final = 30
# First start only: a cluster port taken between picking and binding gets all ports re-picked.
START_ATTEMPTS: Final = 3
_BIND_ERROR_MARKER: Final = "address already in use"
# Everything a monitoring GET can raise while a node starts, stops or is killed.
_MONITOR_ERRORS: Final = (OSError, ValueError, http.client.HTTPException, NatsServerError)
_JSZ_DETAIL: Final = "jsz?accounts=true&streams=true&consumers=true&config=true"


class NatsClusterError(NatsServerError):
    """The cluster did not form (or re-form) in time; the message carries every node's log tail."""


# Clusters whose temp root must go even if the owner never calls close().
_LIVE: set[NatsCluster] = set()


@atexit.register
def _cleanup_all() -> None:
    for cluster in list(_LIVE):
        with contextlib.suppress(Exception):
            cluster.close()


class NatsCluster:
    """``size`` nats-server nodes ``n1``..``nN`` routed into one cluster, JetStream on each.

    Auth: ``operator_conf`` (the text of ``OperatorSetup.server_conf()``: operator JWT, system
    account, which clustered JetStream needs, and resolver) or ``token`` (the same on every
    node) or neither. ``ports``/``websocket_ports`` fix client/websocket ports of the first
    nodes (0 or missing: a free one); ports never move after the first start. ``size=1`` is a
    plain standalone server (nats-server refuses clustered JetStream without routes).
    """

    def __init__(
        self,
        size: int = 3,
        *,
        name: str = "natslink",
        jetstream: bool = True,
        operator_conf: str | None = None,
        token: str | None = None,
        ports: Sequence[int] = (),
        websocket: bool = False,
        websocket_ports: Sequence[int] = (),
        workdir: str | Path | None = None,
        detached: bool = False,
        max_payload: int | None = None,
        debug: bool = False,
        binary: str | None = None,
    ) -> None:
        if size < 1:
            raise ValueError(f"a cluster needs at least one node (got {size})")
        if operator_conf is not None and token is not None:
            raise ValueError("operator_conf and token exclude each other")
        self.size = size
        self.name = name
        self.jetstream = jetstream
        self._owns_root = workdir is None
        self._root = Path(tempfile.mkdtemp(prefix="natslink-cluster-")) if workdir is None else Path(workdir)
        self._root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._base_conf = operator_conf or ""
        self._closed = False
        self._started = False
        self._nodes: list[NatsServer] = []
        _LIVE.add(self)
        try:
            for i in range(size):
                config = NatsServerConfig(
                    port=ports[i] if i < len(ports) else 0,
                    token=token,
                    max_payload=max_payload,
                    jetstream=jetstream,
                    websocket_port=(websocket_ports[i] if i < len(websocket_ports) else 0)
                    if websocket
                    else None,
                    server_name=self.node_name(i),
                    workdir=str(self._root / self.node_name(i)),
                    detached=detached,
                    debug=debug,
                )
                self._nodes.append(NatsServer(config, binary=binary))
        except BaseException:
            self.close()
            raise
        self._cluster_ports: list[int] = []
        self._pick_cluster_ports()

    # ----------------------------------------------------------------- properties

    @staticmethod
    def node_name(index: int) -> str:
        """Server name of node ``index`` (0-based): ``n1``, ``n2``, ..."""
        return f"n{index + 1}"

    @property
    def nodes(self) -> list[NatsServer]:
        return list(self._nodes)

    @property
    def urls(self) -> list[str]:
        """Client URLs of every node (running or not: clients should know them all)."""
        return [node.url for node in self._nodes]

    @property
    def url(self) -> str:
        """All client URLs comma-joined: what ``NATS_URL`` and ``linkctl --nats`` take."""
        return ",".join(self.urls)

    @property
    def websocket_urls(self) -> list[str]:
        return [u for u in (node.websocket_url for node in self._nodes) if u is not None]

    @property
    def monitor_urls(self) -> list[str]:
        return [u for u in (node.monitor_url for node in self._nodes) if u is not None]

    @property
    def cluster_ports(self) -> list[int]:
        """Route ports (empty for a single node, which runs without a cluster block)."""
        return list(self._cluster_ports)

    @property
    def workdir(self) -> Path:
        """Holds ``n1/``..``nN/`` (config, log, JetStream store of each node)."""
        return self._root

    def running(self) -> list[int]:
        """Indexes of the nodes whose process runs."""
        return [i for i, node in enumerate(self._nodes) if node.is_running]

    # ----------------------------------------------------------------- lifecycle

    def start(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Start every node that is not running, then :meth:`wait_ready` (one deadline for both)."""
        if self._closed:
            raise NatsClusterError("NatsCluster is closed")
        deadline = time.monotonic() + timeout
        attempts = START_ATTEMPTS if not self._started else 1
        while True:
            attempts -= 1
            try:
                for node in self._nodes:
                    if not node.is_running:
                        node.start(timeout=max(deadline - time.monotonic(), 0.1))
                break
            except NatsServerStartError as exc:
                # Only before anyone relies on the ports: a stolen route port re-picks them all.
                if attempts <= 0 or _BIND_ERROR_MARKER not in exc.log_tail:
                    self.stop()
                    raise
                self.stop()
                self._pick_cluster_ports()
        self._started = True
        self.wait_ready(max(deadline - time.monotonic(), 0.1))

    def kill(self, index: int) -> None:
        """SIGKILL node ``index``, like a crash (no goodbye to clients or peers). Waits for exit."""
        self._nodes[index].kill()

    def stop_node(self, index: int, timeout: float = 5.0) -> None:
        """Graceful shutdown (SIGTERM) of node ``index``."""
        self._nodes[index].stop(timeout)

    def restart(self, index: int, timeout: float = DEFAULT_TIMEOUT, *, wait: bool = True) -> None:
        """Start node ``index`` again on its ports with its store (stopping it first if running);
        with ``wait``, block until it has rejoined (:meth:`wait_ready`)."""
        deadline = time.monotonic() + timeout
        self._nodes[index].restart(timeout=timeout)
        if wait:
            self.wait_ready(max(deadline - time.monotonic(), 0.1))

    def stop(self) -> None:
        """Graceful shutdown of every node (files kept: :meth:`start` brings them back)."""
        for node in self._nodes:
            node.stop()

    def close(self) -> None:
        """Stop every node and delete what we created (the temp root, not a caller's workdir)."""
        try:
            for node in self._nodes:
                node.close()
        finally:
            if self._owns_root:
                shutil.rmtree(self._root, ignore_errors=True)
            self._closed = True
            _LIVE.discard(self)

    def __enter__(self) -> Self:
        if not self._started:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        running = ",".join(self.node_name(i) for i in self.running())
        return f"<NatsCluster {self.name} size={self.size} running=[{running}]>"

    # ----------------------------------------------------------------- readiness

    def wait_ready(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Block until every running node routes to all other running nodes and (JetStream) all
        running nodes agree on a running meta leader; :class:`NatsClusterError` otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            problems = self._readiness_problems()
            if not problems:
                return
            if time.monotonic() >= deadline:
                raise NatsClusterError(
                    f"cluster {self.name!r} not ready after {timeout:.1f} s: {'; '.join(problems)}\n"
                    + self.log_tails()
                )
            time.sleep(POLL_INTERVAL)

    def _readiness_problems(self) -> list[str]:
        running = self.running()
        if not running:
            return ["no node is running"]
        problems: list[str] = []
        # A node killed or stopped on purpose is not waited for: the others must do without it.
        names = {self.node_name(i) for i in running}
        leaders: set[str | None] = set()
        for i in running:
            me = self.node_name(i)
            if len(self._nodes) > 1:
                routez = self._monitor(i, "routez")
                if routez is None:
                    problems.append(f"{me}: /routez not answering")
                    continue
                peers = {r.get("remote_name") for r in routez.get("routes") or [] if isinstance(r, dict)}
                missing = sorted(names - {me} - peers)
                if missing:
                    problems.append(f"{me}: no route to {', '.join(missing)}")
            if not self.jetstream:
                continue
            jsz = self._monitor(i, "jsz")
            if jsz is None or "config" not in jsz:
                problems.append(f"{me}: JetStream not up (/jsz)")
                continue
            if len(self._nodes) > 1:
                leaders.add(_meta_leader_name(jsz))
        majority = len(self._nodes) // 2 + 1
        if self.jetstream and len(self._nodes) > 1 and len(running) < majority:
            # A lone old meta leader keeps saying it leads for ~10 s (raft's lost-quorum check).
            problems.append(
                f"only {len(running)} of {len(self._nodes)} nodes run: a JetStream meta leader "
                f"needs {majority}"
            )
        if self.jetstream and len(self._nodes) > 1 and not problems:
            leader = next(iter(leaders)) if len(leaders) == 1 else None
            if leader is None or leader not in names:
                views = ", ".join(sorted(str(name) for name in leaders))
                problems.append(f"no agreed running JetStream meta leader (nodes see: {views})")
        return problems

    # ----------------------------------------------------------------- leaders

    def meta_leader(self) -> int | None:
        """Index of the node that says it leads the JetStream meta group (a single node: 0)."""
        if len(self._nodes) == 1:
            return 0 if self._nodes[0].is_running else None
        if len(self.running()) < len(self._nodes) // 2 + 1:
            return None  # no quorum: a surviving old leader's claim is stale
        return self._self_claimed(lambda jsz: _meta_leader_name(jsz), detail=False)

    def stream_leader(self, stream: str, account: str | None = None) -> int | None:
        """Index of the node leading ``stream``'s raft group, None while there is none.

        Like every raft leader in nats-server, a leader that lost its followers keeps claiming
        the role for ~10 s; with a majority of the stream's replicas running that cannot happen.

        ``account``: its name or id as ``/jsz`` shows it (``$G`` without auth; in operator
        mode the account's public key, or its JWT name); None matches any account.
        """

        def leader(jsz: dict[str, Any]) -> str | None:
            detail = _stream_detail(jsz, stream, account)
            return _cluster_leader(detail) if detail is not None else None

        return self._self_claimed(leader, detail=True)

    def consumer_leader(self, stream: str, consumer: str, account: str | None = None) -> int | None:
        """Index of the node leading the consumer's raft group, None while there is none."""

        def leader(jsz: dict[str, Any]) -> str | None:
            detail = _stream_detail(jsz, stream, account)
            if detail is None:
                return None
            for item in detail.get("consumer_detail") or []:
                if isinstance(item, dict) and item.get("name") == consumer:
                    return _cluster_leader(item)
            return None

        return self._self_claimed(leader, detail=True)

    def wait_stream_leader(
        self,
        stream: str,
        account: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        not_on: int | None = None,
    ) -> int:
        """Poll :meth:`stream_leader` until there is one (and, with ``not_on``, elsewhere)."""
        return self._wait_leader(lambda: self.stream_leader(stream, account), timeout, not_on, stream)

    def wait_consumer_leader(
        self,
        stream: str,
        consumer: str,
        account: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        not_on: int | None = None,
    ) -> int:
        return self._wait_leader(
            lambda: self.consumer_leader(stream, consumer, account), timeout, not_on, f"{stream} > {consumer}"
        )

    def _wait_leader(
        self, find: Callable[[], int | None], timeout: float, not_on: int | None, what: str
    ) -> int:
        deadline = time.monotonic() + timeout
        while True:
            index = find()
            if index is not None and index != not_on:
                return index
            if time.monotonic() >= deadline:
                raise NatsClusterError(f"no leader for {what} after {timeout:.1f} s\n{self.log_tails()}")
            time.sleep(POLL_INTERVAL)

    def _self_claimed(self, leader_of: Callable[[dict[str, Any]], str | None], *, detail: bool) -> int | None:
        """The one running node whose own ``/jsz`` names itself leader (None: none or ambiguous)."""
        claims = []
        for i in self.running():
            jsz = self._monitor(i, _JSZ_DETAIL if detail else "jsz")
            if jsz is not None and leader_of(jsz) == self.node_name(i):
                claims.append(i)
        return claims[0] if len(claims) == 1 else None

    # ----------------------------------------------------------------- inspection

    def log_tails(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` of every node's log, for error messages and failed tests."""
        parts = []
        for i, node in enumerate(self._nodes):
            state = "running" if node.is_running else f"exited {node.returncode}"
            tail = "\n".join(node.log_text().splitlines()[-lines:]) or "(no log)"
            parts.append(f"--- nats-server {self.node_name(i)} {node.url} ({state}) ---\n{tail}")
        return "\n".join(parts)

    def _monitor(self, index: int, endpoint: str) -> dict[str, Any] | None:
        try:
            return self._nodes[index].monitor_json(endpoint)
        except _MONITOR_ERRORS:
            return None

    # ----------------------------------------------------------------- config

    def _pick_cluster_ports(self) -> None:
        """Route ports, distinct from every client/monitor/websocket port, then each node's config."""
        if len(self._nodes) == 1:
            self._cluster_ports = []
            self._nodes[0].config.extra_conf = self._base_conf
            return
        taken = {p for node in self._nodes for p in _node_ports(node)}
        ports: list[int] = []
        while len(ports) < len(self._nodes):
            port = free_port()
            if port not in taken:
                taken.add(port)
                ports.append(port)
        self._cluster_ports = ports
        for i, node in enumerate(self._nodes):
            routes = ", ".join(f'"nats-route://{LOOPBACK}:{port}"' for j, port in enumerate(ports) if j != i)
            block = (
                f'cluster {{ name: "{self.name}", host: "{LOOPBACK}", port: {ports[i]}, routes: [{routes}] }}'
            )
            node.config.extra_conf = f"{self._base_conf}\n{block}\n" if self._base_conf else f"{block}\n"


def _node_ports(node: NatsServer) -> list[int]:
    ports = [node.port]
    for url in (node.monitor_url, node.websocket_url):
        if url is not None:
            ports.append(int(url.rsplit(":", 1)[1]))
    return ports


def _meta_leader_name(jsz: dict[str, Any]) -> str | None:
    meta = jsz.get("meta_cluster")
    leader = meta.get("leader") if isinstance(meta, dict) else None
    return leader if isinstance(leader, str) and leader else None


def _cluster_leader(detail: dict[str, Any]) -> str | None:
    cluster = detail.get("cluster")
    leader = cluster.get("leader") if isinstance(cluster, dict) else None
    return leader if isinstance(leader, str) and leader else None


def _stream_detail(jsz: dict[str, Any], stream: str, account: str | None) -> dict[str, Any] | None:
    """``account_details[].stream_detail[]`` entry of ``stream`` in ``/jsz?accounts=true&streams=true``."""
    for acc in jsz.get("account_details") or []:
        if not isinstance(acc, dict):
            continue
        if account is not None and account not in (acc.get("id"), acc.get("name")):
            continue
        for detail in acc.get("stream_detail") or []:
            if isinstance(detail, dict) and detail.get("name") == stream:
                return detail
    return None
