"""One JSON log schema for the gateway and the daemon: one object per line.

Keys: ``ts`` (ISO 8601 UTC, milliseconds, ``Z``), ``level`` (lower case), ``logger``,
``message``, then every field the record got through
``extra={...}`` (values JSON cannot hold are written as text), and ``exception`` (the
formatted traceback) when there is one. Secrets are never passed in ``extra``.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Final

__all__ = ["JsonFormatter"]

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD_ATTRS: Final = frozenset(vars(logging.makeLogRecord({})).keys()) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)
