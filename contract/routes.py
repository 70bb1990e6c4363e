"""The HTTP paths gateway, daemon and linkctl call each other on.

Served by the daemon through the tunnel (``tunnel://<host><path>``, see :mod:`linkd.routes`
for the request and answer shapes):

- :data:`STATUS_PATH` ``GET``: who is serving and what it can run (the presence probe,
  :mod:`contract.presence`);
- :data:`WORK_PATH` ``POST``: a run's work item (the gateway's dispatcher);
- :data:`CONTROL_PATH` ``POST``: a cancel request for a run;
- everything under :data:`RESERVED_PREFIX` belongs to the daemon, never to its
  ``--upstream`` proxy.

Served by the gateway over plain HTTP:

- :data:`SESSION_PATH` ``POST``: a link session (the daemon's NATS credentials);
- :data:`ME_PATH` ``GET``: the caller's own presence document.
"""

from __future__ import annotations

from typing import Final

__all__ = ["CONTROL_PATH", "ME_PATH", "RESERVED_PREFIX", "SESSION_PATH", "STATUS_PATH", "WORK_PATH"]

RESERVED_PREFIX: Final = "/api/links/"
STATUS_PATH: Final = "/api/links/status"
WORK_PATH: Final = "/api/links/work"
CONTROL_PATH: Final = "/api/links/control"
SESSION_PATH: Final = "/api/links/session"
ME_PATH: Final = "/api/links/me"
