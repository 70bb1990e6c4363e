"""linkd: the desktop link daemon (credentials, session lifecycle, tunnel routes, runners).

Modules, one job each: :mod:`.config` (settings), :mod:`.credentials_store`
(keyring), :mod:`.session` (the gateway's link sessions), :mod:`.connection`
(NATS with rotating credentials), :mod:`.daemon` (the lifecycle of ``linkd up``),
:mod:`.routes` (what it serves), :mod:`.runs` and :mod:`.runners` (work),
:mod:`.run_events` (run output), :mod:`.uplink` (run output to JetStream, durably:
a bounded outbox, idempotent message ids, retries across reconnects and credential
refreshes), :mod:`contract.run_protocol` (its wire contract), :mod:`.upstream` (the local reverse proxy),
:mod:`.status_file`, :mod:`.logs` and :mod:`.cli`.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__: str = version("natslink")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
