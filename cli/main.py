"""``linkctl``: the typer app. Each command lives in its own module and registers itself here.

A command module exposes ``register(app)`` and is listed in :data:`COMMAND_MODULES`.
Commands raise :class:`cli.common.CliError` for anything the user can fix;
:class:`LinkctlGroup` turns those, and typer's own usage errors, into one line on stderr
and the documented exit status (see :mod:`cli.exitcodes`).
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Annotated, Any, Final

import typer
from typer.core import TyperGroup

from . import demo, dev, exitcodes, fetch, forward, inspect, runs, services, session, status, webhooks
from .common import LOG_LEVELS, CliError, configure_logging, parse_log_level, version

__all__ = ["COMMAND_MODULES", "app", "main"]

COMMAND_MODULES: Final[tuple[ModuleType, ...]] = (
    fetch,
    status,
    forward,
    session,
    runs,
    webhooks,
    dev,
    demo,
    inspect,
    services,
)

HELP: Final = """\
Inspect and reach linked desktops over the NATS tunnel, send them work through the
gateway, or run the whole stack on this machine.

\b
Examples:
  linkctl demo                                      # the whole stack, one probe, one run, torn down
  linkctl dev                                       # the whole stack until Ctrl-C
  linkctl status desk.example                       # is the desktop online? (over NATS)
  linkctl status --gateway http://127.0.0.1:8080    # is my desktop online? (through the gateway)
  linkctl runs send mock '{"count": 3}' --attach    # a run, streamed live
  linkctl fetch tunnel://desk.example/api/links/status
  linkctl forward --listen 127.0.0.1:8080 desk.example   # then: curl http://127.0.0.1:8080/

NATS commands take --nats URL (env LINKCTL_NATS_URL), --creds FILE (LINKCTL_NATS_CREDS)
or --token TOKEN (LINKCTL_NATS_TOKEN), and --prefix; gateway commands (session, runs,
status --gateway) take --gateway URL (LINKCTL_GATEWAY) and --gateway-token TOKEN
(LINKCTL_TOKEN). One rule: --token is always the NATS token, --gateway-token the gateway's;
a flag overrides its variable. Run 'linkctl COMMAND --help' for a command's options,
examples and exit statuses.

Logs (library warnings; more with --log-level) go to stderr, as JSON lines with --json-logs.
"""


def _usage_error(exc: Exception) -> tuple[str, int] | None:
    """(one line, exit status) for a click/typer usage error, else None.

    Typer's exceptions come from the click it bundles (or from click itself in older
    versions); they all carry ``exit_code`` and ``format_message()``.
    """
    exit_code = getattr(exc, "exit_code", None)
    format_message = getattr(exc, "format_message", None)
    if not isinstance(exit_code, int) or not callable(format_message):
        return None
    if type(exc).__name__ == "NoArgsIsHelpError":  # a bare `linkctl`: its message is the help
        return str(format_message()), exit_code
    message = " ".join(str(format_message()).split())
    ctx = getattr(exc, "ctx", None)
    command_path = getattr(ctx, "command_path", None) or "linkctl"
    return f"linkctl: error: {message} (see '{command_path} --help')", exit_code


class LinkctlGroup(TyperGroup):
    """Runs a command, printing user errors as one line (never a traceback, never a box)."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        prog_name = prog_name or "linkctl"
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        try:
            result = super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        except CliError as exc:
            _die(exc.line(), exc.exit_code)
        except KeyboardInterrupt:
            _die("", exitcodes.INTERRUPTED)
        except BrokenPipeError:
            _quiet_broken_pipe()
            sys.exit(exitcodes.WRITE_ERROR)
        except OSError as exc:
            if exc.errno != errno.EPIPE:
                raise
            _quiet_broken_pipe()
            sys.exit(exitcodes.WRITE_ERROR)
        except Exception as exc:
            usage = _usage_error(exc)
            if usage is None:
                if type(exc).__name__ == "Abort":  # Ctrl-C at a prompt
                    _die("", exitcodes.INTERRUPTED)
                raise
            _die(*usage)
        sys.exit(result if isinstance(result, int) else exitcodes.OK)


def _die(line: str, status: int) -> None:
    if line:
        print(line, file=sys.stderr, flush=True)
    sys.exit(status)


def _quiet_broken_pipe() -> None:
    # The reader went away (`linkctl fetch ... | head`): say nothing, and keep Python
    # from complaining when it flushes stdout at exit.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


app = typer.Typer(
    name="linkctl",
    cls=LinkctlGroup,
    help=HELP,
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"linkctl {version()}")
        raise typer.Exit(0)


@app.callback()
def _root(
    show_version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    log_level: Annotated[
        str,
        typer.Option(
            "--log-level",
            metavar="LEVEL",
            envvar="LINKCTL_LOG_LEVEL",
            parser=parse_log_level,
            help=f"How much the libraries log on stderr: {', '.join(LOG_LEVELS)}.",
        ),
    ] = "warning",
    debug: Annotated[bool, typer.Option("--debug", help="Same as --log-level debug.")] = False,
    json_logs: Annotated[
        bool, typer.Option("--json-logs", help="Log lines as JSON objects (ts, level, logger, message).")
    ] = False,
) -> None:
    configure_logging("debug" if debug else log_level, json_logs=json_logs)


for _module in COMMAND_MODULES:
    _module.register(app)


def main() -> None:
    """Console-script entry point (``linkctl``)."""
    app()


if __name__ == "__main__":
    main()
