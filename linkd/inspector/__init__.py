"""linkd's request inspector: recent tunnelled requests in a bounded ring, a loopback web page
and JSON API over them, and Replay (docs/inspector.md).

The daemon subscribes :meth:`Recorder.observe` to its traffic record and runs an
:class:`InspectorServer` on 127.0.0.1 (``linkd up --inspect-port``)."""

from __future__ import annotations

from .recorder import DEFAULT_SIZE, Recorder
from .redact import REDACTED, redact_headers, redact_target
from .replay import Replayer, ReplayExchange
from .server import DEFAULT_HOST, DEFAULT_PORT, InspectorServer, MetricsSource, host_allowed

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "DEFAULT_SIZE",
    "REDACTED",
    "InspectorServer",
    "MetricsSource",
    "Recorder",
    "ReplayExchange",
    "Replayer",
    "host_allowed",
    "redact_headers",
    "redact_target",
]
