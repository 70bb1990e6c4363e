"""studio_gateway: the aiohttp service that mints link sessions, probes presence and dispatches runs.

Modules, one job each:

- ``app``: ``create_app(config)``, routes, the NATS connection's lifetime;
- ``config``: ``GatewayConfig.from_env`` and its start-up validation (``ConfigError``);
- ``auth``: bearer-token (JWT) verification, ``@authenticated``, ``issue_token``;
- ``sessions``: ``POST /api/links/session`` (scoped, short-lived NATS credentials);
- ``presence``: ``GET /api/links/me`` (a live probe through the tunnel);
- ``nats_jwt``: NATS JWT encoding on ``nkeys`` and ``OperatorSetup`` (operator-mode stacks);
- ``permissions``: what one host's daemon may do on NATS;
- ``hostnames``: the tunnel hostname of a user id;
- ``natsconn``: the gateway's own NATS connection; ``errors``/``logs``: JSON errors and logs;
- ``cli``: the ``studio-gateway`` command.
"""
