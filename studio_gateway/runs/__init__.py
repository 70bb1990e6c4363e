"""Runs on the gateway (``/api/runs``, docs/runs.md): accepted over HTTP, delivered to the
desktop through the tunnel (:mod:`studio_gateway.dispatch`), their events back over JetStream.

Modules, one job each:

- ``api``: the HTTP routes; ``service``: :class:`~.service.RunsService` and its lifetime;
- ``state``: one run's state and its transitions (pure);
- ``store``: the JetStream event stream and the key-value buckets;
- ``projector``: the only writer of run state from uplink events, fed by ``host_feeds``
  (one standing pull per host, in turns) on ``pull_feed`` (a standing JetStream pull);
- ``active``: the in-memory index of active runs per host;
- ``tenant_limits`` (per-host budgets and quotas, pure) and ``stray_watch`` (events of hosts
  without active runs): one desktop's flood costs the others nothing;
- ``reaper``: fails runs that can no longer finish; ``health``: ``/healthz``'s runs verdict;
- ``sse``: SSE/NDJSON formatting; ``metrics``: the run series of ``GET /metrics``;
- ``messages`` (the outbound message records in ``LINK_RUN_MESSAGES``), ``outbound`` (sending,
  acknowledging and resending them), ``message_api`` (``/context``, ``/signals``,
  ``/messages``, ``/validate``) and ``rebuild`` (a run's state recomputed from its events);
- ``processors``: the processor framework over the run stream (checkpoints, anchors); the
  projector is registered on it, and the webhooks (:mod:`studio_gateway.webhooks`) are one.
"""
