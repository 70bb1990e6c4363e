"""studio_gateway: the aiohttp service that mints link sessions, probes presence and dispatches runs.

Modules, one job each:

- ``app``: ``create_app(config)``, routes, the NATS connection's lifetime;
- ``config``: ``GatewayConfig.from_env`` and its start-up validation (``ConfigError``);
- ``auth``: bearer-token (JWT) verification, ``@authenticated``, ``issue_token``;
- ``sessions``: ``POST /api/links/session`` (scoped, short-lived NATS credentials);
- ``presence``: ``GET /api/links/me`` (a live probe through the tunnel);
- runs (docs/runs.md): ``runs_api`` (the HTTP routes), ``runs`` (the service and its lifetime),
  ``run_state`` (pure state transitions), ``run_store`` (JetStream stream and buckets),
  ``projector`` (the only writer of run state from events), ``dispatch`` (work items and
  cancels over the tunnel), ``reaper`` (silent desktops), ``run_sse`` (SSE/NDJSON),
  ``run_metrics`` on ``metrics`` (a tiny Prometheus registry);
- ``nats_jwt``: NATS JWT encoding on ``nkeys`` and ``OperatorSetup`` (operator-mode stacks);
- ``permissions``: what one host's daemon may do on NATS (tunnel rules plus the run uplink);
- ``hostnames``: the tunnel hostname of a user id;
- ``natsconn``: the gateway's own NATS connection; ``errors``/``logs``: JSON errors and logs;
- ``cli``: the ``studio-gateway`` command.
"""
