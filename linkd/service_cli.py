"""``linkd service install|uninstall|status``: start ``linkd up`` at login, restart it after a crash.

The unit/plist comes from :mod:`linkd.service_unit`; this module writes it and runs
``systemctl --user`` (Linux) or ``launchctl`` (macOS). When the service manager cannot be
reached (no systemctl, no user bus in a container or over plain ssh) the file stays written and
the one-line error names the command to run by hand.

Exit statuses: 0 done; 1 ``status``: not installed or not running; 2 a usage error (bad flag,
a secret on the command line); 4 the service manager is missing or unreachable; 5 one of its
commands failed; 6 not supported on this platform (Windows).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Final, NoReturn

import typer

from .config import load_settings
from .errors import LinkdError
from .logs import LOG_LEVELS
from .service_unit import (
    LAUNCHD_LABEL,
    SYSTEMD_UNIT_NAME,
    Platform,
    ServicePlan,
    current_platform,
    linkd_program,
    plan_install,
    plan_uninstall,
)
from .status_file import pid_alive, read_status
from .tls import nats_tls

__all__ = [
    "EXIT_MANAGER_FAILED",
    "EXIT_MANAGER_UNAVAILABLE",
    "EXIT_NOT_ACTIVE",
    "EXIT_UNSUPPORTED",
    "service_app",
]

EXIT_NOT_ACTIVE: Final = 1
EXIT_MANAGER_UNAVAILABLE: Final = 4
EXIT_MANAGER_FAILED: Final = 5
EXIT_UNSUPPORTED: Final = 6
COMMAND_TIMEOUT: Final = 60.0
# `linkd up` flags that carry a secret: never written into a unit file.
SECRET_FLAGS: Final = ("--gateway-token", "--token")
_BUS_ERRORS: Final = ("failed to connect to bus", "no medium found", "dbus_session_bus_address")

service_app = typer.Typer(
    name="service",
    help=(
        "Run `linkd up` at login and restart it after a crash: a systemd user unit (Linux) or a\n"
        "launchd agent (macOS). Windows is not supported yet.\n\n"
        "\b\n"
        "Examples:\n"
        "  linkd service install --upstream http://127.0.0.1:3000\n"
        "  linkd service install --dry-run      # print the unit and the commands, change nothing\n"
        "  linkd service status\n"
        "  linkd service uninstall"
    ),
    no_args_is_help=True,
    rich_markup_mode=None,
)

PlatformOption = Annotated[
    str | None,
    typer.Option("--platform", hidden=True, help="linux, macos or windows (tests: generate for another OS)."),
]
DryRunOption = Annotated[
    bool, typer.Option("--dry-run", help="Print what would be written and run; change nothing.")
]


def _die(message: str, status: int) -> NoReturn:
    typer.echo(f"linkd: error: {message}", err=True)
    raise typer.Exit(status)


def _platform(forced: str | None) -> Platform:
    if forced is None:
        return current_platform()
    value = forced.strip().lower()
    if value not in ("linux", "macos", "windows"):
        _die(f"--platform: {forced!r} must be linux, macos or windows", 2)
    return value  # type: ignore[return-value]


def _refuse_windows(platform: Platform) -> None:
    if platform == "windows":
        _die(
            "linkd service is not supported on Windows yet; run `linkd up` in a terminal "
            "(or add it to Task Scheduler by hand)",
            EXIT_UNSUPPORTED,
        )


def _uid() -> int:
    getuid = getattr(os, "getuid", None)
    return int(getuid()) if getuid is not None else 0


def _shell(command: Sequence[str]) -> str:
    return shlex.join(command)


def _manual(plan: ServicePlan, *, removing: bool = False) -> str:
    """The commands to run by hand (uninstall: with the file's removal in its place)."""
    remove = [("rm", "-f", str(plan.path))] if removing else []
    return " && ".join(_shell(c) for c in (*plan.commands, *remove, *plan.after))


def _bus_unreachable(output: str) -> bool:
    text = output.lower()
    return any(marker in text for marker in _BUS_ERRORS)


def _run(command: Sequence[str]) -> subprocess.CompletedProcess[str] | None:
    """Run a service manager command; None when its program does not exist."""
    try:
        return subprocess.run(
            list(command),
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except FileNotFoundError:
        return None
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(list(command), 124, "", f"no answer in {COMMAND_TIMEOUT:g} s")


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def _run_all(
    plan: ServicePlan, commands: Sequence[Sequence[str]], tolerant: frozenset[int], *, removing: bool = False
) -> None:
    """Run ``commands`` in order; one clear line and a distinct status when the manager fails."""
    for index, command in enumerate(commands):
        result = _run(command)
        if result is None:
            _die(
                f"{command[0]} not found; the file is {plan.path}: run by hand: "
                f"{_manual(plan, removing=removing)}",
                EXIT_MANAGER_UNAVAILABLE,
            )
        output = (result.stderr or "") + (result.stdout or "")
        if result.returncode != 0 and _bus_unreachable(output):
            _die(
                f"cannot reach the user's service manager ({_first_line(output)}); the file is "
                f"{plan.path}: in a login session, run: {_manual(plan, removing=removing)}",
                EXIT_MANAGER_UNAVAILABLE,
            )
        if result.returncode != 0 and index not in tolerant:
            _die(
                f"`{_shell(command)}` failed (status {result.returncode}): "
                f"{_first_line(output) or 'no message'}",
                EXIT_MANAGER_FAILED,
            )
        if result.returncode == 0:
            typer.echo(f"Ran: {_shell(command)}")


def _write_file(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(content)
    tmp.chmod(0o644)
    tmp.replace(path)


# install flag -> `linkd up` flag, for the settings passed on as given.
_PASSED_ON: Final = {
    "gateway": "--gateway",
    "upstream": "--upstream",
    "nats_transport": "--nats-transport",
    "nats_ca": "--nats-ca",
    "nats_cert": "--nats-cert",
    "nats_key": "--nats-key",
}


def _up_command(
    flags: dict[str, Any], *, log_level: str | None, config: Path | None, up_args: Sequence[str]
) -> list[str]:
    """``linkd up`` with the install's settings: checked as ``linkd up`` would, no secrets, paths
    absolute (the service does not start in the shell's directory)."""
    for arg in up_args:
        if arg.split("=", 1)[0] in SECRET_FLAGS:
            raise LinkdError(
                f"{arg.split('=', 1)[0]} would put a secret into the service file; store the token "
                "with `linkd login` instead"
            )
    settings = load_settings(flags, config_path=config)  # a bad URL or config file fails here
    nats_tls(settings)  # and an unreadable CA or certificate file
    if log_level is not None and log_level.strip().lower() not in LOG_LEVELS:
        raise LinkdError(f"--log-level: {log_level!r} is not one of {', '.join(LOG_LEVELS)}")
    command = [*linkd_program()]
    if log_level is not None:
        command += ["--log-level", log_level.strip().lower()]
    command.append("up")
    if settings.config_file is not None:
        command += ["--config", os.path.abspath(settings.config_file)]
    for key, flag in _PASSED_ON.items():
        value = flags.get(key)
        if isinstance(value, Path):
            command += [flag, os.path.abspath(value.expanduser())]
        elif value is not None:
            command += [flag, str(value).strip()]
    insecure = flags.get("insecure_file_store")
    if insecure is not None:
        command.append("--insecure-file-store" if insecure else "--no-insecure-file-store")
    return [*command, *up_args]


@service_app.command(
    epilog=(
        "\b\n"
        "Examples:\n"
        "  linkd service install\n"
        "  linkd service install --upstream http://127.0.0.1:3000 --dry-run\n"
        "  linkd service install -- --drain-timeout 30      # more `linkd up` flags after --\n\n"
        "Exit status: 0 installed; 2 a bad flag; 4 systemctl/launchctl missing or unreachable (the\n"
        "file is written: the message names the command to run); 5 it failed; 6 Windows."
    )
)
def install(
    up_args: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="[-- UP_FLAGS...]", help="More `linkd up` flags (after --).", show_default=False
        ),
    ] = None,
    gateway: Annotated[
        str | None,
        typer.Option("--gateway", metavar="URL", help="As `linkd up --gateway`.", show_default=False),
    ] = None,
    upstream: Annotated[
        str | None,
        typer.Option("--upstream", metavar="URL", help="As `linkd up --upstream`.", show_default=False),
    ] = None,
    nats_transport: Annotated[
        str | None,
        typer.Option("--nats-transport", metavar="MODE", help="As `linkd up`.", show_default=False),
    ] = None,
    nats_ca: Annotated[
        Path | None,
        typer.Option("--nats-ca", metavar="FILE", help="As `linkd up --nats-ca`.", show_default=False),
    ] = None,
    nats_cert: Annotated[
        Path | None,
        typer.Option("--nats-cert", metavar="FILE", help="As `linkd up --nats-cert`.", show_default=False),
    ] = None,
    nats_key: Annotated[
        Path | None,
        typer.Option("--nats-key", metavar="FILE", help="As `linkd up --nats-key`.", show_default=False),
    ] = None,
    insecure_file_store: Annotated[
        bool | None,
        typer.Option(
            "--insecure-file-store/--no-insecure-file-store", help="As `linkd up`.", show_default=False
        ),
    ] = None,
    log_level: Annotated[
        str | None,
        typer.Option("--log-level", metavar="LEVEL", help="The daemon's log level.", show_default=False),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", metavar="FILE", help="The config file the daemon reads.", show_default=False
        ),
    ] = None,
    dry_run: DryRunOption = False,
    platform: PlatformOption = None,
) -> None:
    """Write the service file (same settings as `linkd up`, no secrets) and start it now and at login."""
    target = _platform(platform)
    _refuse_windows(target)
    try:
        flags = {
            "gateway": gateway,
            "upstream": upstream,
            "nats_transport": nats_transport,
            "nats_ca": nats_ca,
            "nats_cert": nats_cert,
            "nats_key": nats_key,
            "insecure_file_store": insecure_file_store,
        }
        command = _up_command(flags, log_level=log_level, config=config, up_args=up_args or [])
    except LinkdError as exc:
        _die(str(exc), 2)
    plan = plan_install(target, command, os.environ, _uid())
    if dry_run:
        typer.echo(f"Would write {plan.path}:")
        typer.echo(plan.content.decode("utf-8").rstrip("\n"))
        typer.echo("Would run:")
        for cmd in plan.commands:
            typer.echo(f"  {_shell(cmd)}")
        typer.echo(f"Logs: {plan.logs}")
        return
    try:
        _write_file(plan.path, plan.content)
        if target == "macos":  # launchd does not create the log directory
            (plan.path.parent.parent / "Logs" / "linkd").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _die(f"cannot write {exc.filename or plan.path}: {exc.strerror or exc}", 2)
    typer.echo(f"Wrote {plan.path}")
    _run_all(plan, plan.commands, plan.tolerant)
    typer.echo(
        f"linkd now starts at login and restarts after a failure. Logs: {plan.logs}. "
        "Check with: linkd service status"
    )


@service_app.command(epilog="Exit status: 0 removed (or not installed); 4, 5, 6 as for install.")
def uninstall(dry_run: DryRunOption = False, platform: PlatformOption = None) -> None:
    """Stop the service, stop starting it at login, and remove its file."""
    target = _platform(platform)
    _refuse_windows(target)
    plan = plan_uninstall(target, os.environ, _uid())
    if dry_run:
        typer.echo("Would run:")
        for cmd in plan.commands:
            typer.echo(f"  {_shell(cmd)}")
        typer.echo(f"Would remove {plan.path}")
        for cmd in plan.after:
            typer.echo(f"  {_shell(cmd)}")
        return
    if not plan.path.exists():
        typer.echo(f"linkd service is not installed (no {plan.path})")
        return
    _run_all(plan, plan.commands, plan.tolerant, removing=True)
    try:
        plan.path.unlink(missing_ok=True)
    except OSError as exc:
        _die(f"cannot remove {plan.path}: {exc.strerror or exc}", 2)
    typer.echo(f"Removed {plan.path}")
    _run_all(plan, plan.after, frozenset(range(len(plan.after))))


def _query(command: Sequence[str]) -> str:
    """One word of a status query (``enabled``, ``active``...), or why there is none."""
    result = _run(command)
    if result is None:
        return f"unknown ({command[0]} not found)"
    output = (result.stdout or "").strip() or (result.stderr or "").strip()
    if result.returncode != 0 and _bus_unreachable(output):
        return "unknown (the user's service manager is unreachable)"
    return _first_line(output) or ("yes" if result.returncode == 0 else "no")


def _manager_state(target: Platform) -> tuple[str, str]:
    """(enabled, active) as the service manager says."""
    if target == "linux":
        enabled = _query(("systemctl", "--user", "is-enabled", SYSTEMD_UNIT_NAME))
        active = _query(("systemctl", "--user", "is-active", SYSTEMD_UNIT_NAME))
        return enabled, active
    result = _run(("launchctl", "print", f"gui/{_uid()}/{LAUNCHD_LABEL}"))
    if result is None:
        return "unknown (launchctl not found)", "unknown (launchctl not found)"
    if result.returncode != 0:
        return "not loaded", "inactive"
    running = any(line.strip() == "state = running" for line in result.stdout.splitlines())
    return "loaded", "active" if running else "inactive"


@service_app.command(
    "status",
    epilog="Exit status: 0 installed and active; 1 not installed or not active; 6 Windows.",
)
def service_status(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document.")] = False,
    platform: PlatformOption = None,
) -> None:
    """Is the service installed, enabled and active, and what does the daemon's status file say?"""
    target = _platform(platform)
    _refuse_windows(target)
    plan = plan_uninstall(target, os.environ, _uid())
    installed = plan.path.exists()
    enabled, active = _manager_state(target) if installed else ("no", "inactive")
    try:
        status_path = load_settings({}).status_file
    except LinkdError as exc:
        _die(str(exc), 2)
    doc = read_status(status_path)
    running = doc is not None and pid_alive(doc.get("pid"))
    ok = installed and (active == "active" or (active.startswith("unknown") and running))
    if as_json:
        report: dict[str, Any] = {
            "platform": target,
            "installed": installed,
            "file": str(plan.path),
            "enabled": enabled,
            "active": active,
            "logs": plan.logs,
            "daemon": {"running": running, "statusFile": str(status_path), **(doc or {})},
        }
        typer.echo(json.dumps(report, indent=2, sort_keys=True))
    else:
        typer.echo(f"service:   {'installed' if installed else 'not installed'} ({plan.path})")
        if installed:
            typer.echo(f"enabled:   {enabled}")
            typer.echo(f"active:    {active}")
            typer.echo(f"logs:      {plan.logs}")
        if running and doc is not None:
            from .cli import _describe  # lazily: linkd.cli registers this module

            typer.echo("\n".join(_describe(doc)))
        elif doc is not None:
            typer.echo(f"daemon:    not running (stale status file from pid {doc.get('pid')})")
        else:
            typer.echo(f"daemon:    not running (no status file at {status_path})")
    if not ok:
        raise typer.Exit(EXIT_NOT_ACTIVE)
