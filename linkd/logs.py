"""Output of ``linkd up``: one line per state change for people, or JSON lines with ``--json-logs``.

Human mode prints ``HH:MM:SS message`` on stdout for the daemon's own lines and
``HH:MM:SS warning: ...`` for problems from the libraries; the tunnel's own
connection chatter is left out (the daemon reports connection states itself).
JSON mode writes one object per record on stdout: ``ts`` (ISO 8601 UTC),
``level``, ``logger``, ``message`` and the record's structured fields (state
changes carry ``event: "state"`` and ``state``).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import UTC, datetime
from typing import Any, Final, TextIO

__all__ = ["STATE_LOGGER", "JsonFormatter", "configure_logging"]

STATE_LOGGER: Final = "linkd.state"
_STANDARD_ATTRS: Final = frozenset(vars(logging.makeLogRecord({})).keys()) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                payload[key] = (
                    value if isinstance(value, str | int | float | bool | None | list | dict) else str(value)
                )
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, ensure_ascii=False, default=str)


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
