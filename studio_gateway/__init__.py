"""studio_gateway: the aiohttp service that mints link sessions, probes presence and dispatches runs.

Modules, one job each:

- ``app``: ``create_app(config)``, the routes, ``/healthz``, the NATS connection's lifetime,
  ``run_app`` (serving with ``GatewayRunner``);
- ``auth``: bearer-token (JWT) verification, ``@authenticated``, ``issue_token``;
- ``bodies``: reading request bodies within limits (declared lengths refused at once, JSON depth);
- ``cli``: the ``studio-gateway`` command (``serve``, ``issue-token``);
- ``config``: ``GatewayConfig`` (and its auth and runs parts) built and checked from the settings;
- ``dispatch``: delivering a run's work item and cancels to the desktop through the tunnel;
- ``errors``: every error answer as JSON, never a stack trace (nor the request's bytes);
- ``hostnames``: the tunnel hostname of a user id;
- ``logs``: JSON log lines (the schema of :mod:`contract.logs`) and the access log;
- ``discovery``: the gateway's NATS micro service (``studio-gateway``, endpoint ``health``);
- ``metrics``: Prometheus metrics on ``prometheus_client``, one registry per application;
- ``nats_jwt``: minting NATS JWTs and creds on ``nkeys``, ``OperatorSetup`` (operator-mode stacks);
- ``natsconn``: the gateway's own NATS connection, opened in the background, reconnecting;
- ``presence``: ``GET /api/links/me`` (a live probe through the tunnel);
- ``runs/``: runs (``/api/runs``, docs/runs.md): routes, service, state, store, projector, reaper, ...;
- ``settings``: every setting declared once: env var, flag, type, default, help (``ConfigError``);
- ``sessions``: ``POST /api/links/session`` (scoped, short-lived NATS credentials);
- ``tasks``: stopping background tasks reliably;
- ``telemetry``: the gateway's own series and ``GET /metrics`` (token, or loopback only).
"""
