"""The one-command local stack: nats-server + studio-gateway + linkd, as real processes.

Why real processes (not one asyncio loop): it is what a user runs in production, each piece
logs to its own file, and a crash of one is visible as a dead pid, not a stuck task.

Layout of the state directory (private, 0700)::

    keys.json                 operator/account keys and the gateway's token secret (0600)
    linkctl.creds             an unrestricted NATS user for `linkctl status/fetch --nats` (0600)
    dev.env                   export lines for the running stack (gateway URL, token, NATS)
    nats/                     nats-server.conf, nats-server.log, jetstream-store/
    nats-cluster-N/n1..nN/    the same per node with ``--cluster N`` (N > 1): one store per size
    gateway/                  gateway.creds, gateway.log
    linkd/                    linkd's config dir (file secret store, login.json), status file, linkd.log
    tls/                      with ``--tls``: the dev CA and nats-server's certificate (cli.dev_tls)
    .lock                     held while a stack runs there (one stack per directory)

Keys are kept between runs so an exported token stays valid and JetStream data survives a
restart. :class:`LocalStack` is synchronous on purpose: start/stop are short blocking waits
with deadlines, and the owner (``linkctl dev``/``demo``) polls :meth:`LocalStack.dead_child`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

import httpx

from . import exitcodes
from .common import CliError
from .nats_cluster import NatsCluster
from .nats_server import (
    NatsServer,
    NatsServerConfig,
    NatsServerError,
    NatsServerTLS,
    detached_popen_kwargs,
    free_port,
)

__all__ = [
    "DEFAULT_USER",
    "GATEWAY_IMPORTS",
    "Child",
    "LocalStack",
    "StackError",
    "StackOptions",
    "default_state_dir",
    "require_gateway_extra",
]

DEFAULT_USER: Final = "dev@localhost"
STATE_DIR_ENV: Final = "LINKCTL_STATE_DIR"
# A cold Python start of the gateway or linkd on a busy 2-core machine takes seconds.
DEFAULT_READY_TIMEOUT: Final = 60.0
# Dev tokens outlive a working day; they only work against this local gateway.
DEFAULT_TOKEN_TTL: Final = 24 * 3600
# linkd's drain on SIGTERM: short, the dev stack has nothing precious in flight.
LINKD_DRAIN_TIMEOUT: Final = 3.0
# Bounded waits on stop: linkd drains (above) plus margin; the gateway closes in ~1 s.
LINKD_STOP_TIMEOUT: Final = LINKD_DRAIN_TIMEOUT + 5.0
GATEWAY_STOP_TIMEOUT: Final = 8.0
NATS_STOP_TIMEOUT: Final = 5.0
KILL_WAIT: Final = 5.0
# JetStream replicas of the gateway's run stream and buckets on a cluster: 3 survives one lost node.
MAX_RUNS_REPLICAS: Final = 3
POLL_INTERVAL: Final = 0.1
LOG_TAIL_LINES: Final = 20
# Settings from the user's environment that would redirect our children: never inherited.
_FOREIGN_PREFIXES: Final = ("NATS_", "GATEWAY_", "LINKD_", "TUNNEL_PREFIX")
_LOOPBACK_HOSTS: Final = ("127.0.0.1", "localhost", "::1")
# What the gateway imports beyond the base install: the ``gateway`` extra (import name ->
# distribution; tests/unit/test_dependencies.py keeps it equal to the extra). A desktop-only
# install (``pip install natslink``) lacks PyJWT at least, and ``dev``/``demo`` say so up front.
GATEWAY_IMPORTS: Final = {"jwt": "pyjwt", "cryptography": "cryptography"}
LOCAL_EXTRA_HINT: Final = "pip install 'natslink[local]'"


class StackError(CliError):
    """A piece of the stack did not start or died; the message carries its last log lines."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exitcodes.STACK_FAILED)


def require_gateway_extra() -> None:
    """StackError unless the gateway's libraries are importable here (the ``local`` extra).

    Checked before anything starts, so a desktop-only install gets one line naming the fix
    instead of a gateway that dies at start-up with an ImportError in its log.
    """
    missing = sorted(
        dist for module, dist in GATEWAY_IMPORTS.items() if importlib.util.find_spec(module) is None
    )
    if missing:
        raise StackError(
            f"the local stack runs the gateway, which needs {', '.join(missing)} "
            f"(not in a desktop-only install); install it with: {LOCAL_EXTRA_HINT}"
        )


def default_state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$LINKCTL_STATE_DIR``, else ``$XDG_DATA_HOME/natslink/linkctl-dev`` (``~/.local/share``)."""
    env = os.environ if environ is None else environ
    explicit = env.get(STATE_DIR_ENV, "").strip()
    if explicit:
        return Path(explicit).expanduser()
    xdg = env.get("XDG_DATA_HOME", "").strip()
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".local" / "share"
    return base / "natslink" / "linkctl-dev"


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


@dataclass(frozen=True)
class StackOptions:
    state_dir: Path
    user: str = DEFAULT_USER
    nats_port: int = 0
    websocket_port: int = 0
    gateway_port: int = 0
    ready_timeout: float = DEFAULT_READY_TIMEOUT
    token_ttl: int = DEFAULT_TOKEN_TTL
    python: str = sys.executable
    # nats-server nodes: 1 is the single server; N > 1 an N-node cluster (routes, clustered JetStream).
    cluster: int = 1
    # linkd's --upstream: the local web service the desktop serves through the tunnel.
    upstream: str | None = None
    # The production shape: nats-server with TLS on the client port and wss on its websocket
    # listener, a dev CA (tls/ in the state dir) trusted by every client through its setting.
    tls: bool = False

    @property
    def runs_replicas(self) -> int:
        return min(self.cluster, MAX_RUNS_REPLICAS)


@dataclass
class Child:
    """One process of the stack: how to see it, how to stop it."""

    name: str
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    nats: NatsServer | None = None
    # A node of a --cluster: its death alone does not stop the stack while a majority runs.
    cluster_node: bool = False

    @property
    def pid(self) -> int | None:
        if self.nats is not None:
            return self.nats.pid
        return self.proc.pid if self.proc is not None else None

    @property
    def returncode(self) -> int | None:
        """None while running."""
        if self.nats is not None:
            return self.nats.returncode
        return None if self.proc is None else self.proc.poll()

    def log_tail(self) -> str:
        return tail(self.log_path)

    def stop(self, timeout: float) -> None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL (and reap)."""
        if self.nats is not None:
            self.nats.stop(timeout)
            return
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=KILL_WAIT)


@dataclass
class Keys:
    """What must survive restarts of the stack: trust chain and the token secret."""

    setup: Any  # studio_gateway.nats_jwt.OperatorSetup
    jwt_secret: str

    @classmethod
    def load_or_create(cls, path: Path) -> Keys:
        from studio_gateway.nats_jwt import NKey, OperatorSetup

        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            data = json.loads(path.read_text(encoding="utf-8"))
            op = data["operator"]
            setup = OperatorSetup(
                operator=NKey(**op["operator"]),
                operator_jwt=op["operator_jwt"],
                account=NKey(**op["account"]),
                account_signing=NKey(**op["account_signing"]),
                account_jwt=op["account_jwt"],
                system_account=NKey(**op["system_account"]),
                system_account_jwt=op["system_account_jwt"],
            )
            return cls(setup, str(data["jwt_secret"]))
        setup = OperatorSetup.generate(operator_name="linkctl-dev")
        keys = cls(setup, secrets.token_hex(32))
        doc = {
            "operator": {
                "operator": _nkey(setup.operator),
                "operator_jwt": setup.operator_jwt,
                "account": _nkey(setup.account),
                "account_signing": _nkey(setup.account_signing),
                "account_jwt": setup.account_jwt,
                "system_account": _nkey(setup.system_account),
                "system_account_jwt": setup.system_account_jwt,
            },
            "jwt_secret": keys.jwt_secret,
        }
        write_private(path, json.dumps(doc, indent=2) + "\n")
        return keys


def _nkey(key: Any) -> dict[str, str]:
    return {"seed": key.seed, "public_key": key.public_key}


def write_private(path: Path, text: str) -> None:
    """Write a file only the user can read (0600), atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    tmp.replace(path)


def _lock_exclusive(lock: IO[str]) -> None:
    """Hold an exclusive, non-blocking lock on ``lock`` until it is closed (OSError if held)."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; one stack per directory is then on the user
        return
    fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def child_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The children's environment: ours without settings that would redirect them, plus ``extra``.

    Loopback is added to ``NO_PROXY`` so an HTTP proxy from the environment never sits between
    linkd and the local gateway.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(_FOREIGN_PREFIXES)}
    for name in ("NO_PROXY", "no_proxy"):
        existing = [part for part in env.get(name, "").split(",") if part.strip()]
        env[name] = ",".join([*existing, *(h for h in _LOOPBACK_HOSTS if h not in existing)])
    env.update(extra)
    return env


@dataclass
class LocalStack:
    """Start, watch and stop the three processes; ``say`` receives one progress line per step."""

    options: StackOptions
    say: Callable[[str], None] = print
    children: list[Child] = field(default_factory=list)
    nats_url: str = ""
    nats_urls: list[str] = field(default_factory=list)
    cluster: NatsCluster | None = None
    websocket_url: str | None = None
    monitor_url: str | None = None
    gateway_url: str = ""
    token: str = ""
    tunnel_hostname: str = ""
    desktop_hostname: str = ""
    # With --tls: the dev CA every client is told to trust.
    ca_file: Path | None = None
    started_in: float = 0.0
    _lock: IO[str] | None = None
    _keys: Keys | None = None

    @property
    def state_dir(self) -> Path:
        return self.options.state_dir

    # ------------------------------------------------------------------ start

    def start(self) -> None:
        """Bring everything up, in order; on any failure stop what started and raise StackError."""
        require_gateway_extra()
        began = time.monotonic()
        try:
            self._prepare()
            self._start_nats()
            self._start_gateway()
            self._start_linkd()
        except BaseException:
            self.stop(quiet=True)
            raise
        self.started_in = time.monotonic() - began
        self._write_env_file()

    def _prepare(self) -> None:
        state = self.state_dir
        try:
            state.mkdir(mode=0o700, parents=True, exist_ok=True)
            for sub in ("nats", "gateway", "linkd"):
                (state / sub).mkdir(mode=0o700, exist_ok=True)
            lock = (state / ".lock").open("w")
        except OSError as exc:
            raise CliError(f"--state-dir: cannot use {str(state)!r} ({exc.strerror or exc})") from None
        try:
            _lock_exclusive(lock)
        except OSError:
            lock.close()
            raise CliError(
                f"another linkctl dev/demo is using {state}; stop it or pass another --state-dir"
            ) from None
        self._lock = lock
        self._keys = Keys.load_or_create(state / "keys.json")

    def _step(self, name: str, detail: str, since: float) -> None:
        self.say(f"  ok  {name:<12} {detail} ({time.monotonic() - since:.2f} s)")

    def _start_nats(self) -> None:
        if self.options.cluster > 1:
            self._start_nats_cluster()
            return
        assert self._keys is not None
        since = time.monotonic()
        tls = self._dev_tls()
        shape = "TLS and wss" if tls is not None else "websocket"
        self.say(f"  ..  nats-server  starting (operator mode, JetStream, {shape})")
        try:
            server = NatsServer(
                NatsServerConfig(
                    port=self.options.nats_port,
                    websocket_port=self.options.websocket_port,
                    jetstream=True,
                    workdir=str(self.state_dir / "nats"),
                    extra_conf=self._keys.setup.server_conf(),
                    server_name="linkctl-dev",
                    detached=True,
                    tls=tls,
                )
            )
        except NatsServerError as exc:  # not installed
            raise StackError(f"nats-server: {exc}") from None
        child = Child("nats-server", self.state_dir / "nats" / "nats-server.log", nats=server)
        self.children.append(child)
        try:
            server.start(timeout=min(self.options.ready_timeout, 30.0))
        except NatsServerError as exc:
            raise StackError(f"nats-server did not start: {exc}") from None
        self.nats_url = server.url
        self.nats_urls = [server.url]
        self.websocket_url = server.websocket_url
        self.monitor_url = server.monitor_url
        write_private(self.state_dir / "linkctl.creds", self._keys.setup.user_creds("linkctl"))
        self._step("nats-server", f"{server.url} (pid {server.pid})", since)

    def _dev_tls(self) -> NatsServerTLS | None:
        """With --tls: the dev CA and server certificate (made once, kept in tls/)."""
        if not self.options.tls:
            return None
        from .dev_tls import ensure_dev_certs

        certs = ensure_dev_certs(self.state_dir / "tls")
        self.ca_file = certs.ca
        return NatsServerTLS(str(certs.server_cert), str(certs.server_key))

    @property
    def public_nats_url(self) -> str:
        """What the gateway hands to linkd: with --tls the wss:// listener, as in production
        (WEBSOCKET-only credentials); else every node's nats:// URL."""
        if self.options.tls and self.websocket_url is not None:
            return self.websocket_url
        return self.nats_url

    def _ca_env(self, variable: str) -> dict[str, str]:
        return {variable: str(self.ca_file)} if self.ca_file is not None else {}

    @property
    def cluster_dir(self) -> Path:
        """Where the nodes of ``--cluster N`` keep config, log and store: one directory per size, so a
        JetStream meta group never meets a store made for another number of peers."""
        return self.state_dir / f"nats-cluster-{self.options.cluster}"

    def _start_nats_cluster(self) -> None:
        assert self._keys is not None
        size = self.options.cluster
        since = time.monotonic()
        self.say(f"  ..  nats-server  starting a {size}-node cluster (operator mode, JetStream, websocket)")
        try:
            cluster = NatsCluster(
                size,
                name="linkctl-dev",
                operator_conf=self._keys.setup.server_conf(),
                ports=[self.options.nats_port],
                websocket=True,
                websocket_ports=[self.options.websocket_port],
                workdir=self.cluster_dir,
                detached=True,
            )
        except NatsServerError as exc:  # not installed
            raise StackError(f"nats-server: {exc}") from None
        self.cluster = cluster
        for i, node in enumerate(cluster.nodes):
            log = self.cluster_dir / cluster.node_name(i) / "nats-server.log"
            self.children.append(Child(f"nats-{cluster.node_name(i)}", log, nats=node, cluster_node=True))
        try:
            cluster.start(timeout=min(self.options.ready_timeout, 30.0))
        except NatsServerError as exc:
            raise StackError(f"the nats-server cluster did not form: {exc}") from None
        self.nats_url = cluster.url
        self.nats_urls = cluster.urls
        self.websocket_url = cluster.nodes[0].websocket_url
        self.monitor_url = cluster.nodes[0].monitor_url
        write_private(self.state_dir / "linkctl.creds", self._keys.setup.user_creds("linkctl"))
        pids = ", ".join(str(node.pid) for node in cluster.nodes)
        self._step("nats-server", f"{size} nodes, {cluster.url} (pids {pids})", since)

    def _spawn(self, name: str, argv: list[str], env: Mapping[str, str], log_path: Path) -> Child:
        with log_path.open("ab") as log:
            log.write(f"--- linkctl: starting {name} at {time.strftime('%H:%M:%S')} ---\n".encode())
            log.flush()
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env),
                close_fds=True,
                **detached_popen_kwargs(True),
            )
        child = Child(name, log_path, proc=proc)
        self.children.append(child)
        return child

    def _wait(self, child: Child, what: str, check: Callable[[], bool]) -> None:
        deadline = time.monotonic() + self.options.ready_timeout
        while True:
            if child.returncode is not None:
                raise StackError(
                    f"{child.name} exited with status {child.returncode} while {what}; "
                    f"last lines of {child.log_path}:\n{child.log_tail()}"
                )
            with contextlib.suppress(httpx.HTTPError, ValueError):
                if check():
                    return
            if time.monotonic() >= deadline:
                raise StackError(
                    f"{child.name} was not ready after {self.options.ready_timeout:g} s ({what}); "
                    f"last lines of {child.log_path}:\n{child.log_tail()}"
                )
            time.sleep(POLL_INTERVAL)

    def _start_gateway(self) -> None:
        assert self._keys is not None
        since = time.monotonic()
        self.say("  ..  gateway      starting studio-gateway")
        creds = self.state_dir / "gateway" / "gateway.creds"
        write_private(creds, self._keys.setup.user_creds("studio-gateway"))
        port = self.options.gateway_port or free_port()
        env = child_env(
            {
                **self._keys.setup.gateway_env(),
                "GATEWAY_JWT_SECRET": self._keys.jwt_secret,
                # On a cluster: every node's URL, so the gateway and (through its sessions) linkd
                # fail over to another node.
                "NATS_URL": self.nats_url,
                "NATS_PUBLIC_URL": self.public_nats_url,
                **self._ca_env("NATS_CA"),
                "PYTHONUNBUFFERED": "1",
            }
        )
        argv = [
            self.options.python,
            "-m",
            "studio_gateway.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--nats-creds",
            str(creds),
        ]
        clustered = self.options.cluster > 1
        if clustered:
            argv += ["--runs-replicas", str(self.options.runs_replicas)]
        child = self._spawn("gateway", argv, env, self.state_dir / "gateway" / "gateway.log")
        self.gateway_url = f"http://127.0.0.1:{port}"
        with httpx.Client(trust_env=False, timeout=2.0) as http:

            def healthy() -> bool:
                resp = http.get(f"{self.gateway_url}/healthz")
                doc = resp.json()
                if resp.status_code != 200 or doc.get("nats") != "connected":
                    return False
                # Replicated run streams are placed by the meta leader: wait until they exist.
                return not clustered or doc.get("runs") in ("ready", "disabled")

            what = "waiting for /healthz with NATS connected" + (" and runs ready" if clustered else "")
            self._wait(child, what, healthy)
        self.token = self._issue_token()
        self._step("gateway", f"{self.gateway_url} (pid {child.pid})", since)

    def _issue_token(self) -> str:
        from studio_gateway.auth import issue_token
        from studio_gateway.config import AuthConfig

        assert self._keys is not None
        config = AuthConfig.from_env({"GATEWAY_JWT_SECRET": self._keys.jwt_secret})
        return issue_token(config, self.options.user, self.options.token_ttl)

    def _linkd_env(self) -> dict[str, str]:
        linkd_dir = self.state_dir / "linkd"
        return child_env(
            {
                "LINKD_CONFIG_DIR": str(linkd_dir),
                "LINKD_RUNTIME_DIR": str(linkd_dir),
                "LINKD_INSECURE_FILE_STORE": "1",
                # Never the user's OS keyring: the dev login must not replace a real one.
                "PYTHON_KEYRING_BACKEND": "keyring.backends.null.Keyring",
                **self._ca_env("LINKD_NATS_CA"),
                "PYTHONUNBUFFERED": "1",
            }
        )

    def _start_linkd(self) -> None:
        since = time.monotonic()
        self.say(f"  ..  linkd        logging in as {self.options.user} and starting `linkd up`")
        linkd_dir = self.state_dir / "linkd"
        env = self._linkd_env()
        log_path = linkd_dir / "linkd.log"
        with log_path.open("ab") as log:
            log.write(b"--- linkctl: linkd login ---\n")
            log.flush()
            try:
                login = subprocess.run(
                    [self.options.python, "-m", "linkd.cli", "login", "--gateway", self.gateway_url],
                    input=(self.token + "\n").encode(),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    timeout=self.options.ready_timeout,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                raise StackError(
                    f"linkd login did not finish; last lines of {log_path}:\n{tail(log_path)}"
                ) from None
        if login.returncode != 0:
            raise StackError(
                f"linkd login failed with status {login.returncode}; "
                f"last lines of {log_path}:\n{tail(log_path)}"
            )
        argv = [
            self.options.python,
            "-m",
            "linkd.cli",
            "up",
            "--gateway",
            self.gateway_url,
            "--status-file",
            str(linkd_dir / "linkd-status.json"),
            "--drain-timeout",
            f"{LINKD_DRAIN_TIMEOUT:g}",
        ]
        if self.options.upstream is not None:
            argv += ["--upstream", self.options.upstream]
        child = self._spawn("linkd", argv, env, log_path)
        with httpx.Client(trust_env=False, timeout=5.0) as http:

            def online() -> bool:
                resp = http.get(f"{self.gateway_url}/api/links/me", headers=self.auth_headers())
                doc = resp.json()
                if resp.status_code == 200 and doc.get("online") is True:
                    self.tunnel_hostname = str(doc.get("tunnelHostname"))
                    self.desktop_hostname = str(doc.get("hostname"))
                    return True
                return False

            self._wait(child, "waiting for /api/links/me to report it online", online)
        self._step("linkd", f"online as {self.tunnel_hostname} (pid {child.pid})", since)

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def _write_env_file(self) -> None:
        lines = [
            f"export LINKCTL_GATEWAY={self.gateway_url}",
            f"export LINKCTL_TOKEN={self.token}",
            f"export LINKCTL_NATS_URL={self.nats_url}",
            f"export LINKCTL_NATS_CREDS={self.state_dir / 'linkctl.creds'}",
        ]
        if self.ca_file is not None:
            lines.append(f"export LINKCTL_NATS_CA={self.ca_file}")
        write_private(self.state_dir / "dev.env", "\n".join(lines) + "\n")

    # ------------------------------------------------------------------ watch and stop

    def dead_child(self) -> Child | None:
        """The first child that exited on its own, if any; nodes of a cluster only once fewer than
        a majority of them run (until then the cluster carries on without them, as it should)."""
        for child in self.children:
            if child.returncode is not None and not child.cluster_node:
                return child
        lost = self.lost_nodes()
        nodes = sum(1 for child in self.children if child.cluster_node)
        if lost and nodes - len(lost) < nodes // 2 + 1:
            return lost[0]
        return None

    def lost_nodes(self) -> list[Child]:
        """Cluster nodes that exited (killed or crashed) while the stack runs."""
        return [c for c in self.children if c.cluster_node and c.returncode is not None]

    def stop(self, quiet: bool = False) -> None:
        """Stop in reverse order (linkd, gateway, nats-server), each bounded; release the lock."""
        timeouts = {"linkd": LINKD_STOP_TIMEOUT, "gateway": GATEWAY_STOP_TIMEOUT}
        for child in reversed(self.children):
            if child.returncode is not None:
                continue
            since = time.monotonic()
            child.stop(timeouts.get(child.name, NATS_STOP_TIMEOUT))
            if not quiet:
                self.say(f"  ok  stopped {child.name} (pid {child.pid}, {time.monotonic() - since:.2f} s)")
        for child in self.children:
            if child.nats is not None:
                child.nats.close()
        if self.cluster is not None:
            self.cluster.close()  # its directory is ours (the state dir): kept
        if self._lock is not None:
            # dev.env is ours to remove only while we hold the directory: a second stack
            # refused at the lock must leave the running one's alone.
            with contextlib.suppress(OSError):
                (self.state_dir / "dev.env").unlink()
            self._lock.close()
            self._lock = None

    def pids(self) -> dict[str, int | None]:
        return {child.name: child.pid for child in self.children}
