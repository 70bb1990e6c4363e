"""linkd settings: command-line flags, then ``LINKD_*`` environment variables, then the config file.

The config file is TOML, ``linkd.toml`` in the config dir (see :mod:`linkd.dirs`;
``--config`` / ``LINKD_CONFIG`` name another one). Every field::

    gateway = "https://studio.example.com"    # --gateway / LINKD_GATEWAY (else the last `linkd login`)
    upstream = "http://127.0.0.1:3000"        # --upstream / LINKD_UPSTREAM: other paths go there
    drain_timeout = 10                        # --drain-timeout / LINKD_DRAIN_TIMEOUT (seconds)
    status_file = "/run/user/1000/natslink/linkd-status.json"   # --status-file / LINKD_STATUS_FILE
    json_logs = false                         # --json-logs / LINKD_JSON_LOGS
    nats_transport = "auto"       # or standard, websocket (--nats-transport / LINKD_NATS_TRANSPORT)
    nats_ca = "~/natslink-ca.pem" # trust this CA (PEM) for tls:// and wss:// NATS URLs instead of
                                  # the system store (--nats-ca / LINKD_NATS_CA)
    nats_cert = "~/client.pem"    # client certificate where NATS requires one (mTLS)
    nats_key = "~/client.key"     # (--nats-cert / LINKD_NATS_CERT, --nats-key / LINKD_NATS_KEY)
    uplink = true                 # run events to the gateway's JetStream stream (--no-uplink / LINKD_UPLINK)
    journal = true                # keep unacknowledged run events on disk (LINKD_JOURNAL; see linkd.journal)
    state_dir = "~/.local/state/natslink"   # the journal's directory (LINKD_STATE_DIR; see linkd.dirs)
    inspect = true                # the request inspector page (--inspect/--no-inspect / LINKD_INSPECT)
    inspect_port = 4041           # its loopback port, 0: any (--inspect-port / LINKD_INSPECT_PORT)
    inspect_size = 200            # requests it keeps (--inspect-size / LINKD_INSPECT_SIZE)
    insecure_file_store = false   # where no OS keyring exists: secrets in 0600 files
                                  # (--insecure-file-store / LINKD_INSECURE_FILE_STORE; `linkd login`
                                  # with it also remembers it for `linkd up`)

    [runners]
    mock = true                 # the echo and mock runners (LINKD_MOCK_RUNNERS)
    heartbeat_interval = 10     # seconds between heartbeat events of a running run
                                # (--heartbeat-interval / LINKD_HEARTBEAT_INTERVAL)
    max_concurrent = 8          # runs at once; more are refused with 429 (LINKD_MAX_RUNS)
    kill_grace = 5              # seconds between SIGTERM and SIGKILL when a command is cancelled

    [runners.http]              # the `http` runner: POSTs the input, streams the answer
    endpoint = "http://127.0.0.1:11434/api/generate"   # LINKD_HTTP_RUNNER_URL
    timeout = 600               # seconds for the whole call (0: none)
    resumable = false           # true: the endpoint's answer is the same for the same input, so a
                                # restarted daemon asks again and continues after what it had sent

    [runners.command.build]     # the `command` runner, template "build"
    argv = ["make", "build"]    # or: command = "make build" (split like a shell, never run by one)
    cwd = "~/src/app"           # working directory (default: the home directory)
    input = "stdin"             # how the work item's input reaches it: "stdin" or "env" ($LINKD_INPUT)
    timeout = 3600              # seconds (0: none); the run fails when it is exceeded
    env = { RUST_LOG = "info" } # extra environment
    resumable = false           # true: same input, same output (idempotent); a restarted daemon runs
                                # it again and continues after the output it had already sent
                                # (docs/runs.md, "Daemon restarts"); false: such a run fails
                                # `daemon_restarted`

Command templates exist only here: a work item names a template and supplies
input *data*; it can never add arguments or choose the program.
"""

from __future__ import annotations

import os
import shlex
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, TypeVar
from urllib.parse import urlsplit

from .dirs import config_dir, runtime_dir, state_dir
from .errors import LinkdError

__all__ = [
    "CONFIG_FILE_NAME",
    "DEFAULT_DRAIN_TIMEOUT",
    "DEFAULT_HEARTBEAT_INTERVAL",
    "CommandTemplate",
    "HttpRunnerConfig",
    "RunnerSettings",
    "Settings",
    "check_http_url",
    "default_config_path",
    "default_status_file",
    "dev_stack_status_file",
    "load_settings",
]

CONFIG_FILE_NAME: Final = "linkd.toml"
STATUS_FILE_NAME: Final = "linkd-status.json"
# In-flight requests get this long to finish on SIGTERM/SIGINT; runs are cancelled at once.
DEFAULT_DRAIN_TIMEOUT: Final = 10.0
# Long work shows it is alive this often (the gateway's reaper waits several intervals).
DEFAULT_HEARTBEAT_INTERVAL: Final = 10.0
DEFAULT_MAX_CONCURRENT_RUNS: Final = 8
# A cancelled command gets this long to exit after SIGTERM before SIGKILL.
DEFAULT_KILL_GRACE: Final = 5.0
DEFAULT_HTTP_RUNNER_TIMEOUT: Final = 600.0
# The request inspector (linkd.inspector, docs/inspector.md): next to ngrok's 4040, on loopback.
DEFAULT_INSPECT_PORT: Final = 4041
DEFAULT_INSPECT_SIZE: Final = 200

_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})
_TRANSPORTS: Final = ("auto", "standard", "websocket")
Transport = Literal["auto", "standard", "websocket"]
InputMode = Literal["stdin", "env"]
T = TypeVar("T")


@dataclass(frozen=True)
class CommandTemplate:
    """A command the user allows work items to run; the work item supplies only input data."""

    name: str
    argv: tuple[str, ...]
    cwd: Path | None = None
    input_mode: InputMode = "stdin"
    timeout: float | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    # Same input, same output: a restarted daemon may run it again and skip what it already sent.
    resumable: bool = False


@dataclass(frozen=True)
class HttpRunnerConfig:
    endpoint: str
    timeout: float | None = DEFAULT_HTTP_RUNNER_TIMEOUT
    resumable: bool = False


@dataclass(frozen=True)
class RunnerSettings:
    mock: bool = True
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL
    max_concurrent: int = DEFAULT_MAX_CONCURRENT_RUNS
    kill_grace: float = DEFAULT_KILL_GRACE
    commands: Mapping[str, CommandTemplate] = field(default_factory=dict)
    http: HttpRunnerConfig | None = None


@dataclass(frozen=True)
class Settings:
    """Everything ``linkd up`` needs besides the secrets."""

    gateway_url: str | None = None
    upstream_url: str | None = None
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    status_file: Path = field(default_factory=lambda: default_status_file())
    json_logs: bool = False
    nats_transport: Transport = "auto"
    # TLS for the NATS connection (tunnel.tls.TLSConfig): a private CA, a client certificate (mTLS).
    nats_ca: Path | None = None
    nats_cert: Path | None = None
    nats_key: Path | None = None
    # Run events go to JetStream (the durable uplink); off: they stay in memory (a gateway without runs).
    uplink: bool = True
    # Unacknowledged run events are kept on disk (linkd.journal), in state_dir.
    journal: bool = True
    state_dir: Path = field(default_factory=lambda: state_dir())
    runners: RunnerSettings = field(default_factory=RunnerSettings)
    config_file: Path | None = None
    # None: not set by a flag, LINKD_INSECURE_FILE_STORE or the config file (then what the
    # last `linkd login` used decides).
    insecure_file_store: bool | None = None
    # The request inspector: off for a daemon built in code, on for `linkd up` (load_settings).
    inspect: bool = False
    inspect_port: int = DEFAULT_INSPECT_PORT
    inspect_size: int = DEFAULT_INSPECT_SIZE


def default_config_path(environ: Mapping[str, str] | None = None) -> Path:
    return config_dir(environ) / CONFIG_FILE_NAME


def default_status_file(environ: Mapping[str, str] | None = None) -> Path:
    return runtime_dir(environ) / STATUS_FILE_NAME


def dev_stack_status_file(environ: Mapping[str, str] | None = None) -> Path:
    """Where the linkd of ``linkctl dev`` keeps its status file: ``linkd/`` in the stack's state
    directory, ``$LINKCTL_STATE_DIR``, else ``$XDG_DATA_HOME/natslink/linkctl-dev`` (or under
    ``~/.local/share``). The same rule as ``cli.stack.default_state_dir`` (linkd does not import
    linkctl; tests/unit/test_linkd_cli.py keeps the two equal)."""
    env = os.environ if environ is None else environ
    explicit = env.get("LINKCTL_STATE_DIR", "").strip()
    if explicit:
        state = Path(explicit).expanduser()
    else:
        xdg = env.get("XDG_DATA_HOME", "").strip()
        base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".local" / "share"
        state = base / "natslink" / "linkctl-dev"
    return state / "linkd" / STATUS_FILE_NAME


# ------------------------------------------------------------------------------ value parsers


def check_http_url(value: str, where: str) -> str:
    """An absolute http(s) URL with a host, without trailing slash; LinkdError naming ``where``."""
    url = value.strip()
    try:
        parts = urlsplit(url)
        _ = parts.port
    except ValueError as exc:
        raise LinkdError(f"{where}: {url!r} is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LinkdError(f"{where}: {url!r} must be an http:// or https:// URL with a host")
    if parts.query or parts.fragment:
        raise LinkdError(f"{where}: {url!r} must not have a query or fragment")
    if parts.username or parts.password:
        raise LinkdError(f"{where}: {url!r} must not contain a user name or password")
    return url.rstrip("/")


def _bool(value: object, where: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise LinkdError(f"{where}: {value!r} is not a boolean (use true or false)")


def _number(low: float, high: float, *, zero_is_none: bool = False) -> Callable[[object, str], float]:
    def parse(value: object, where: str) -> float:
        if isinstance(value, bool):
            raise LinkdError(f"{where}: expected a number, got {value!r}")
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise LinkdError(f"{where}: {value!r} is not a number") from None
        if not low <= number <= high:
            raise LinkdError(f"{where}: {number:g} is out of range [{low:g}, {high:g}]")
        return number

    return parse


def _int(low: int, high: int) -> Callable[[object, str], int]:
    def parse(value: object, where: str) -> int:
        if isinstance(value, bool):
            raise LinkdError(f"{where}: expected a whole number, got {value!r}")
        try:
            number = int(str(value).strip()) if not isinstance(value, int) else value
        except ValueError:
            raise LinkdError(f"{where}: {value!r} is not a whole number") from None
        if not low <= number <= high:
            raise LinkdError(f"{where}: {number} is out of range [{low}, {high}]")
        return number

    return parse


def _path(value: object, where: str) -> Path:
    if not isinstance(value, str | Path) or not str(value).strip():
        raise LinkdError(f"{where}: expected a path")
    return Path(str(value).strip()).expanduser()


def _optional_path(value: object, where: str) -> Path | None:
    return _path(value, where)


def _transport(value: object, where: str) -> Transport:
    text = str(value).strip().lower()
    if text not in _TRANSPORTS:
        raise LinkdError(f"{where}: {value!r} must be one of {', '.join(_TRANSPORTS)}")
    return text  # type: ignore[return-value]


def _url(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise LinkdError(f"{where}: expected a URL string")
    return check_http_url(value, where)


# ------------------------------------------------------------------------------ resolution


@dataclass(frozen=True)
class _Field:
    key: str  # file key (and flags dict key)
    flag: str
    env: str


_FIELDS: Final = {
    "gateway": _Field("gateway", "--gateway", "LINKD_GATEWAY"),
    "upstream": _Field("upstream", "--upstream", "LINKD_UPSTREAM"),
    "drain_timeout": _Field("drain_timeout", "--drain-timeout", "LINKD_DRAIN_TIMEOUT"),
    "status_file": _Field("status_file", "--status-file", "LINKD_STATUS_FILE"),
    "json_logs": _Field("json_logs", "--json-logs", "LINKD_JSON_LOGS"),
    "nats_transport": _Field("nats_transport", "--nats-transport", "LINKD_NATS_TRANSPORT"),
    "nats_ca": _Field("nats_ca", "--nats-ca", "LINKD_NATS_CA"),
    "nats_cert": _Field("nats_cert", "--nats-cert", "LINKD_NATS_CERT"),
    "nats_key": _Field("nats_key", "--nats-key", "LINKD_NATS_KEY"),
    "uplink": _Field("uplink", "--uplink", "LINKD_UPLINK"),
    "journal": _Field("journal", "--journal", "LINKD_JOURNAL"),
    "state_dir": _Field("state_dir", "--state-dir", "LINKD_STATE_DIR"),
    "insecure_file_store": _Field(
        "insecure_file_store", "--insecure-file-store", "LINKD_INSECURE_FILE_STORE"
    ),
    "inspect": _Field("inspect", "--inspect", "LINKD_INSPECT"),
    "inspect_port": _Field("inspect_port", "--inspect-port", "LINKD_INSPECT_PORT"),
    "inspect_size": _Field("inspect_size", "--inspect-size", "LINKD_INSPECT_SIZE"),
}
_TOP_KEYS: Final = frozenset(_FIELDS) | {"runners"}
_RUNNER_KEYS: Final = frozenset(
    {"mock", "heartbeat_interval", "max_concurrent", "kill_grace", "http", "command"}
)
_RUNNER_ENV: Final = {
    "mock": "LINKD_MOCK_RUNNERS",
    "heartbeat_interval": "LINKD_HEARTBEAT_INTERVAL",
    "max_concurrent": "LINKD_MAX_RUNS",
}
_RUNNER_FLAGS: Final = {"heartbeat_interval": "--heartbeat-interval"}
_HTTP_KEYS: Final = frozenset({"endpoint", "timeout", "resumable"})
_COMMAND_KEYS: Final = frozenset({"argv", "command", "cwd", "input", "timeout", "env", "resumable"})


class _Sources:
    def __init__(
        self, flags: Mapping[str, object], environ: Mapping[str, str], file: Mapping[str, Any], path: str
    ):
        self.flags = flags
        self.environ = environ
        self.file = file
        self.path = path

    def pick(self, name: str, parse: Callable[[object, str], T], default: T) -> T:
        spec = _FIELDS[name]
        flag_value = self.flags.get(name)
        if flag_value is not None:
            return parse(flag_value, spec.flag)
        env_value = self.environ.get(spec.env, "").strip()
        if env_value:
            return parse(env_value, spec.env)
        if name in self.file:
            return parse(self.file[name], f"{self.path}: {name}")
        return default


def _read_file(path: Path, *, required: bool) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if required:
            raise LinkdError(f"config file {path} does not exist") from None
        return {}
    except OSError as exc:
        raise LinkdError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise LinkdError(f"config file {path} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise LinkdError(f"{path}: unknown setting {unknown[0]!r} (known: {', '.join(sorted(_TOP_KEYS))})")
    return data


def _table(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise LinkdError(f"{where} must be a table")
    return value


def _check_keys(table: Mapping[str, Any], allowed: frozenset[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise LinkdError(f"{where}: unknown setting {unknown[0]!r} (known: {', '.join(sorted(allowed))})")


def _optional_timeout(value: object, where: str) -> float | None:
    seconds = _number(0, 7 * 24 * 3600)(value, where)
    return None if seconds == 0 else seconds


def _command_template(name: str, table: Mapping[str, Any], where: str) -> CommandTemplate:
    _check_keys(table, _COMMAND_KEYS, where)
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise LinkdError(f"{where}: template names use letters, digits, '-', '_' and '.' only")
    if ("argv" in table) == ("command" in table):
        raise LinkdError(f"{where}: give exactly one of argv (a list) or command (a string)")
    if "argv" in table:
        argv_value = table["argv"]
        if (
            not isinstance(argv_value, list)
            or not argv_value
            or not all(isinstance(a, str) for a in argv_value)
        ):
            raise LinkdError(f"{where}.argv must be a non-empty list of strings")
        argv = tuple(argv_value)
    else:
        if not isinstance(table["command"], str):
            raise LinkdError(f"{where}.command must be a string")
        try:
            argv = tuple(shlex.split(table["command"]))
        except ValueError as exc:
            raise LinkdError(f"{where}.command: {exc}") from None
        if not argv:
            raise LinkdError(f"{where}.command is empty")
    if not argv[0].strip():
        raise LinkdError(f"{where}: the program name is empty")
    cwd = _path(table["cwd"], f"{where}.cwd") if "cwd" in table else None
    input_mode = table.get("input", "stdin")
    if input_mode not in ("stdin", "env"):
        raise LinkdError(f'{where}.input must be "stdin" or "env"')
    timeout = _optional_timeout(table["timeout"], f"{where}.timeout") if "timeout" in table else None
    env_table = table.get("env", {})
    if not isinstance(env_table, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env_table.items()
    ):
        raise LinkdError(f"{where}.env must be a table of strings")
    resumable = _bool(table["resumable"], f"{where}.resumable") if "resumable" in table else False
    return CommandTemplate(name, argv, cwd, input_mode, timeout, dict(env_table), resumable)


def _runner_settings(sources: _Sources) -> RunnerSettings:
    where = f"{sources.path}: runners"
    table = _table(sources.file.get("runners", {}), where)
    _check_keys(table, _RUNNER_KEYS, where)
    env = sources.environ

    def pick(key: str, parse: Callable[[object, str], T], default: T) -> T:
        flag_name = _RUNNER_FLAGS.get(key)
        if flag_name and sources.flags.get(key) is not None:
            return parse(sources.flags[key], flag_name)
        env_name = _RUNNER_ENV.get(key)
        if env_name and env.get(env_name, "").strip():
            return parse(env[env_name].strip(), env_name)
        if key in table:
            return parse(table[key], f"{where}.{key}")
        return default

    mock = pick("mock", _bool, True)
    heartbeat = pick("heartbeat_interval", _number(0.05, 3600), DEFAULT_HEARTBEAT_INTERVAL)
    max_concurrent = pick("max_concurrent", _int(1, 10_000), DEFAULT_MAX_CONCURRENT_RUNS)
    kill_grace = pick("kill_grace", _number(0, 600), DEFAULT_KILL_GRACE)

    commands: dict[str, CommandTemplate] = {}
    command_tables = _table(table.get("command", {}), f"{where}.command")
    for name, spec in command_tables.items():
        commands[name] = _command_template(
            name, _table(spec, f"{where}.command.{name}"), f"{where}.command.{name}"
        )

    http: HttpRunnerConfig | None = None
    http_table = _table(table.get("http", {}), f"{where}.http")
    _check_keys(http_table, _HTTP_KEYS, f"{where}.http")
    endpoint_env = env.get("LINKD_HTTP_RUNNER_URL", "").strip()
    endpoint: str | None = None
    if endpoint_env:
        endpoint = _url(endpoint_env, "LINKD_HTTP_RUNNER_URL")
    elif "endpoint" in http_table:
        endpoint = _url(http_table["endpoint"], f"{where}.http.endpoint")
    if endpoint is not None:
        timeout = DEFAULT_HTTP_RUNNER_TIMEOUT if "timeout" not in http_table else None
        if "timeout" in http_table:
            timeout = _optional_timeout(http_table["timeout"], f"{where}.http.timeout")
        resumable = (
            _bool(http_table["resumable"], f"{where}.http.resumable") if "resumable" in http_table else False
        )
        http = HttpRunnerConfig(endpoint, timeout, resumable)
    elif http_table:
        raise LinkdError(f"{where}.http needs an endpoint")
    return RunnerSettings(mock, heartbeat, max_concurrent, kill_grace, commands, http)


def load_settings(
    flags: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    config_path: Path | None = None,
) -> Settings:
    """Resolve the settings: ``flags`` (None values = not given) > ``environ`` > the config file.

    ``config_path`` (else ``LINKD_CONFIG``, else the default) must exist when given explicitly.
    """
    env = os.environ if environ is None else environ
    given = dict(flags or {})
    explicit = config_path
    if explicit is None and env.get("LINKD_CONFIG", "").strip():
        explicit = Path(env["LINKD_CONFIG"].strip()).expanduser()
    path = explicit if explicit is not None else default_config_path(env)
    file_data = _read_file(path, required=explicit is not None)
    sources = _Sources(given, env, file_data, str(path))
    return Settings(
        gateway_url=sources.pick("gateway", _url, None),
        upstream_url=sources.pick("upstream", _url, None),
        drain_timeout=sources.pick("drain_timeout", _number(0, 3600), DEFAULT_DRAIN_TIMEOUT),
        status_file=sources.pick("status_file", _path, default_status_file(env)),
        json_logs=sources.pick("json_logs", _bool, False),
        nats_transport=sources.pick("nats_transport", _transport, "auto"),
        nats_ca=sources.pick("nats_ca", _optional_path, None),
        nats_cert=sources.pick("nats_cert", _optional_path, None),
        nats_key=sources.pick("nats_key", _optional_path, None),
        uplink=sources.pick("uplink", _bool, True),
        journal=sources.pick("journal", _bool, True),
        state_dir=sources.pick("state_dir", _path, state_dir(env)),
        runners=_runner_settings(sources),
        config_file=path if file_data or explicit is not None else None,
        insecure_file_store=sources.pick("insecure_file_store", _bool, None),
        inspect=sources.pick("inspect", _bool, True),
        inspect_port=sources.pick("inspect_port", _int(0, 65535), DEFAULT_INSPECT_PORT),
        inspect_size=sources.pick("inspect_size", _int(1, 100_000), DEFAULT_INSPECT_SIZE),
    )
