"""Output of ``linkd up``: one line per state change for people, or JSON lines with ``--json-logs``.

Both go to stderr, as the logs of ``linkctl`` and ``studio-gateway`` do: stdout is for what
a command prints as its result (``linkd status``), and ``linkd up`` has none.

Human mode prints ``HH:MM:SS message`` for the daemon's own lines and
``HH:MM:SS warning: ...`` for problems from the libraries; the tunnel's own
connection chatter is left out (the daemon reports connection states itself).
JSON mode writes one object per record in the schema of :mod:`contract.logs`
(``ts``, ``level``, ``logger``, ``message`` and the record's structured fields;
state changes carry ``event: "state"`` and ``state``).

The level (``--log-level``): ``debug`` adds the libraries' details (``-v`` is the same),
``info`` is the default (state changes, library warnings), ``warning`` and ``error`` leave
out the state lines.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Final, TextIO

from contract.logs import JsonFormatter

__all__ = ["LOG_LEVELS", "STATE_LOGGER", "HumanFormatter", "configure_logging"]

STATE_LOGGER: Final = "linkd.state"
LOG_LEVELS: Final = ("debug", "info", "warning", "error")


class HumanFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        message = record.getMessage()
        if record.name == STATE_LOGGER or (
            record.name.startswith("linkd") and record.levelno < logging.WARNING
        ):
            line = f"{stamp} {message}"
        else:
            line = f"{stamp} {record.levelname.lower()}: {message}"
        if record.exc_info and record.levelno >= logging.ERROR:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_logging(
    *, json_logs: bool, level: str = "info", verbose: bool = False, stream: TextIO | None = None
) -> None:
    """Log to ``stream`` (stderr) at ``level`` (one of :data:`LOG_LEVELS`; ``verbose``: debug)."""
    name = "debug" if verbose else level.lower()
    if name not in LOG_LEVELS:
        raise ValueError(f"log level {level!r} is not one of {', '.join(LOG_LEVELS)}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if json_logs else HumanFormatter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(name.upper())
    # Library details (debug only): else warnings and worse. The daemon reports connection
    # states itself, so the tunnel's own connection lines only when they are errors.
    quiet = name != "debug"
    for library in ("tunnel", "nats", "httpx", "httpcore", "asyncio"):
        logging.getLogger(library).setLevel(max(logging.WARNING, root.level) if quiet else logging.NOTSET)
    logging.getLogger("tunnel.connect").setLevel(logging.ERROR if quiet else logging.NOTSET)
