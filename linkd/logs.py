"""Output of ``linkd up``: one line per state change for people, or JSON lines with ``--json-logs``.

Human mode prints ``HH:MM:SS message`` on stdout for the daemon's own lines and
``HH:MM:SS warning: ...`` for problems from the libraries; the tunnel's own
connection chatter is left out (the daemon reports connection states itself).
JSON mode writes one object per record on stdout in the schema of :mod:`contract.logs`
(``ts``, ``level``, ``logger``, ``message`` and the record's structured fields;
state changes carry ``event: "state"`` and ``state``).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Final, TextIO

from contract.logs import JsonFormatter

__all__ = ["STATE_LOGGER", "HumanFormatter", "configure_logging"]

STATE_LOGGER: Final = "linkd.state"


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


def configure_logging(*, json_logs: bool, verbose: bool = False, stream: TextIO | None = None) -> None:
    handler = logging.StreamHandler(stream if stream is not None else sys.stdout)
    handler.setFormatter(JsonFormatter() if json_logs else HumanFormatter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        # Library details: warnings and worse. The daemon reports connection states itself.
        for name in ("tunnel", "nats", "httpx", "httpcore", "asyncio"):
            logging.getLogger(name).setLevel(logging.WARNING)
        logging.getLogger("tunnel.connect").setLevel(logging.ERROR)
