"""What ``linkd service install`` writes and runs: a systemd user unit or a launchd agent plist.

Functions that write nothing and run nothing, so the generated text is tested on any platform:
:func:`plan_install` turns the ``linkd up`` command line and the environment into a
:class:`ServicePlan` (the file, its content, the commands that load it); :mod:`linkd.service_cli`
writes it and runs the commands.

- Linux: ``$XDG_CONFIG_HOME/systemd/user/linkd.service`` (else ``~/.config/systemd/user``);
  ``Restart=on-failure``, stdout and stderr to the journal (``journalctl --user -u linkd``),
  ``WantedBy=default.target`` (started at login).
- macOS: ``~/Library/LaunchAgents/com.natslink.linkd.plist`` (``RunAtLoad``, ``KeepAlive``
  {``SuccessfulExit``: false}: restarted when it fails), logs in ``~/Library/Logs/linkd/``;
  loaded with ``launchctl bootstrap gui/<uid>``.

The ``LINKD_*`` settings set in the installing shell go into the file too (paths made
absolute: :data:`SETTING_ENV_VARS`). Secrets never do: the daemon reads its token and key from
the keyring (or the opted-in file store), as ``linkd up`` does in a terminal.
"""

from __future__ import annotations

import os
import plistlib
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

__all__ = [
    "LAUNCHD_LABEL",
    "SETTING_ENV_VARS",
    "SYSTEMD_UNIT_NAME",
    "Platform",
    "ServicePlan",
    "current_platform",
    "launchd_plist",
    "linkd_program",
    "plan_install",
    "plan_uninstall",
    "systemd_quote",
    "systemd_unit",
]

Platform = Literal["linux", "macos", "windows"]

SYSTEMD_UNIT_NAME: Final = "linkd.service"
LAUNCHD_LABEL: Final = "com.natslink.linkd"
# A crash restarts after this long (systemd RestartSec, launchd ThrottleInterval): long enough
# not to flood the log when something stays broken (no login yet), short enough to come back.
RESTART_SECONDS: Final = 10
# SIGTERM drains for up to --drain-timeout (default 10 s); the service manager waits this long.
STOP_TIMEOUT_SECONDS: Final = 30
# The environment settings of `linkd up` (never LINKD_TOKEN, a secret): a service started by
# systemd/launchd does not see the shell's environment, so the ones set at install time are
# written into the unit. XDG_CONFIG_HOME/XDG_STATE_HOME move linkd's default dirs (systemd does
# not set them).
SETTING_ENV_VARS: Final = (
    "LINKD_CONFIG_DIR",
    "LINKD_RUNTIME_DIR",
    "LINKD_STATE_DIR",
    "LINKD_STATUS_FILE",
    "LINKD_GATEWAY",
    "LINKD_UPSTREAM",
    "LINKD_NATS_TRANSPORT",
    "LINKD_NATS_CA",
    "LINKD_NATS_CERT",
    "LINKD_NATS_KEY",
    "LINKD_DRAIN_TIMEOUT",
    "LINKD_JSON_LOGS",
    "LINKD_LOG_LEVEL",
    "LINKD_UPLINK",
    "LINKD_JOURNAL",
    "LINKD_INSECURE_FILE_STORE",
    "LINKD_MOCK_RUNNERS",
    "LINKD_HEARTBEAT_INTERVAL",
    "LINKD_MAX_RUNS",
    "LINKD_HTTP_RUNNER_URL",
    "LINKD_INSPECT",
    "LINKD_INSPECT_PORT",
    "LINKD_INSPECT_SIZE",
    "XDG_CONFIG_HOME",
    "XDG_STATE_HOME",
)
# Those holding a path: made absolute (the service's working directory is not the shell's).
PATH_ENV_VARS: Final = frozenset(
    {
        "LINKD_CONFIG_DIR",
        "LINKD_RUNTIME_DIR",
        "LINKD_STATE_DIR",
        "LINKD_STATUS_FILE",
        "LINKD_NATS_CA",
        "LINKD_NATS_CERT",
        "LINKD_NATS_KEY",
        "XDG_CONFIG_HOME",
        "XDG_STATE_HOME",
    }
)


def current_platform() -> Platform:
    if sys.platform == "darwin":
        return "macos"
    if sys.platform == "win32":
        return "windows"
    return "linux"


@dataclass(frozen=True)
class ServicePlan:
    """A file to write (or remove) and the commands that (un)load it, in order."""

    platform: Platform
    path: Path
    content: bytes
    commands: tuple[tuple[str, ...], ...]
    logs: str  # where the daemon's log lines go, for the user
    # Commands whose failure is fine (unloading something that was not loaded).
    tolerant: frozenset[int] = field(default_factory=frozenset)
    # Uninstall: commands run once the file is gone (systemd forgets the unit).
    after: tuple[tuple[str, ...], ...] = ()


def linkd_program(argv0: str | None = None, executable: str | None = None) -> list[str]:
    """The command that runs this linkd, as absolute paths.

    The ``linkd`` script we were started as (not symlink-resolved: a pipx or distro symlink
    keeps pointing at the current install after an upgrade), else the ``linkd`` script next
    to this interpreter (a venv), else ``<python> -m linkd.cli``.
    """
    argv0 = sys.argv[0] if argv0 is None else argv0
    python = sys.executable if executable is None else executable
    started_as = Path(argv0)
    if started_as.name in ("linkd", "linkd.exe") and started_as.is_file():
        return [os.path.abspath(started_as)]
    beside = Path(python).parent / "linkd"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [os.path.abspath(beside)]
    found = shutil.which("linkd")
    if found:
        return [os.path.abspath(found)]
    return [os.path.abspath(python), "-m", "linkd.cli"]


def _home(environ: Mapping[str, str]) -> Path:
    return Path(environ.get("HOME", "").strip() or Path.home())


def systemd_unit_path(environ: Mapping[str, str]) -> Path:
    xdg = environ.get("XDG_CONFIG_HOME", "").strip()
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else _home(environ) / ".config"
    return base / "systemd" / "user" / SYSTEMD_UNIT_NAME


def launchd_plist_path(environ: Mapping[str, str]) -> Path:
    return _home(environ) / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist"


def launchd_log_dir(environ: Mapping[str, str]) -> Path:
    return _home(environ) / "Library" / "Logs" / "linkd"


_SYSTEMD_SAFE: Final = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_./:=,@+")


def systemd_quote(arg: str) -> str:
    """One ExecStart/Environment word: specifiers (``%``) and variables (``$``) doubled, quoted
    with C escapes when it holds anything but plain characters."""
    if "\n" in arg or "\r" in arg or "\0" in arg:
        raise ValueError("a service argument cannot contain a line break or NUL")
    escaped = arg.replace("%", "%%").replace("$", "$$")
    if arg and all(c in _SYSTEMD_SAFE for c in arg):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def service_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment the service needs that the service manager would not give it."""
    env: dict[str, str] = {}
    for name in SETTING_ENV_VARS:
        value = environ.get(name, "").strip()
        if value:
            env[name] = os.path.abspath(os.path.expanduser(value)) if name in PATH_ENV_VARS else value
    env["PYTHONUNBUFFERED"] = "1"  # log lines reach the journal / log file as they happen
    return env


def systemd_unit(command: Sequence[str], env: Mapping[str, str]) -> str:
    """The unit text for ``command`` (the full ``linkd up ...`` argv)."""
    lines = [
        "# Written by `linkd service install`; `linkd service uninstall` removes it.",
        "[Unit]",
        "Description=linkd: link this desktop to a Studio gateway (natslink)",
        # Give up only after many quick failures in a row (RestartSec keeps them apart).
        "StartLimitIntervalSec=600",
        "StartLimitBurst=20",
        "",
        "[Service]",
        "Type=exec",
        "ExecStart=" + " ".join(systemd_quote(arg) for arg in command),
        *(f"Environment={systemd_quote(f'{k}={v}')}" for k, v in sorted(env.items())),
        "Restart=on-failure",
        f"RestartSec={RESTART_SECONDS}",
        f"TimeoutStopSec={STOP_TIMEOUT_SECONDS}",
        "StandardOutput=journal",
        "StandardError=journal",
        "SyslogIdentifier=linkd",
        "",
        "[Install]",
        "WantedBy=default.target",
        "",
    ]
    return "\n".join(lines)


def launchd_plist(command: Sequence[str], env: Mapping[str, str], log_dir: Path) -> bytes:
    """The agent plist (XML) for ``command``."""
    doc = {
        "Label": LAUNCHD_LABEL,
        "ProgramArguments": list(command),
        "EnvironmentVariables": dict(sorted(env.items())),
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": RESTART_SECONDS,
        "ExitTimeOut": STOP_TIMEOUT_SECONDS,
        "ProcessType": "Background",
        "StandardOutPath": str(log_dir / "linkd.out.log"),
        "StandardErrorPath": str(log_dir / "linkd.err.log"),
    }
    return plistlib.dumps(doc, fmt=plistlib.FMT_XML)


def _systemctl(*args: str) -> tuple[str, ...]:
    return ("systemctl", "--user", *args)


def _gui_domain(uid: int) -> str:
    return f"gui/{uid}"


def plan_install(
    platform: Platform, command: Sequence[str], environ: Mapping[str, str], uid: int
) -> ServicePlan:
    """What to write and run to start ``command`` at login (``platform`` linux or macos)."""
    env = service_environment(environ)
    if platform == "linux":
        return ServicePlan(
            platform,
            systemd_unit_path(environ),
            systemd_unit(command, env).encode("utf-8"),
            (_systemctl("daemon-reload"), _systemctl("enable", "--now", SYSTEMD_UNIT_NAME)),
            f"the journal: journalctl --user -u {SYSTEMD_UNIT_NAME}",
        )
    if platform == "macos":
        path = launchd_plist_path(environ)
        log_dir = launchd_log_dir(environ)
        return ServicePlan(
            platform,
            path,
            launchd_plist(command, env, log_dir),
            (
                ("launchctl", "bootout", f"{_gui_domain(uid)}/{LAUNCHD_LABEL}"),  # a previous version
                ("launchctl", "bootstrap", _gui_domain(uid), str(path)),
            ),
            f"{log_dir}/linkd.err.log (and linkd.out.log)",
            tolerant=frozenset({0}),
        )
    raise ValueError(f"no service support on {platform}")


def plan_uninstall(platform: Platform, environ: Mapping[str, str], uid: int) -> ServicePlan:
    """What to run and remove to stop starting linkd at login (the file is removed last)."""
    if platform == "linux":
        return ServicePlan(
            platform,
            systemd_unit_path(environ),
            b"",
            (_systemctl("disable", "--now", SYSTEMD_UNIT_NAME),),
            f"the journal: journalctl --user -u {SYSTEMD_UNIT_NAME}",
            tolerant=frozenset({0}),
            after=(_systemctl("daemon-reload"),),
        )
    if platform == "macos":
        return ServicePlan(
            platform,
            launchd_plist_path(environ),
            b"",
            (("launchctl", "bootout", f"{_gui_domain(uid)}/{LAUNCHD_LABEL}"),),
            f"{launchd_log_dir(environ)}/",
            tolerant=frozenset({0}),
        )
    raise ValueError(f"no service support on {platform}")
