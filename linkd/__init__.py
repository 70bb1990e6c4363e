"""linkd: the desktop link daemon (credentials, session lifecycle, tunnel routes, runners).

What it shares with the gateway and linkctl (run protocol, route paths, presence, NATS
JWTs and permissions, the JSON log schema) is :mod:`contract`; its retry and reconnect
policy is :mod:`tunnel.backoff`. Its modules, one job each:

- :mod:`.cli` -- ``linkd login``/``logout``/``up``/``status``; :mod:`.config` -- settings (flags,
  ``LINKD_*``, ``linkd.toml``); :mod:`.dirs` -- where its files live;
- :mod:`.credentials_store` -- the API token and the daemon's nkey seed in the OS keyring;
  :mod:`.login_state` -- the gateway URL ``linkd login`` remembers;
- :mod:`.session` -- link sessions from the gateway; :mod:`.connection` -- the NATS
  connection of one session (URLs, credential callbacks, reconnect policy);
- :mod:`.daemon` -- the lifecycle of ``linkd up`` (connect, serve, refresh, reconnect);
- :mod:`.routes` -- what it serves through the tunnel (status, work, control);
- :mod:`.runs` -- accepted work items executing in the background; :mod:`.runners` --
  what executes them (``echo``/``mock``, ``command``, ``http``);
- :mod:`.run_events` -- run output and the sink it leaves through; :mod:`.uplink` -- that
  output to JetStream, durably (a bounded outbox, idempotent message ids, retries across
  reconnects and credential refreshes);
- :mod:`.upstream` -- the ``--upstream`` reverse proxy to a local service, with
  :mod:`.upstream_path`, :mod:`.upstream_body` and :mod:`.upstream_response` (its checks);
- :mod:`.status_file` -- the status document of a running ``linkd up``; :mod:`.logs` --
  its output (human lines or JSON); :mod:`.errors` -- the one error a user can act on.
"""

from __future__ import annotations

from tunnel import __version__  # one version for the natslink distribution, looked up in one place

__all__ = ["__version__"]
