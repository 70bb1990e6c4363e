"""Desktop previews: a user's own ``linkd --upstream`` dev server in a browser, through the gateway.

See docs/preview.md. Modules, each with one job (the sans-IO ones first):

- :mod:`.config`: the ``GATEWAY_PREVIEW_*`` settings as one value object;
- :mod:`.labels`: the DNS label of a desktop and the preview host of a request;
- :mod:`.tokens`: signed tickets and cookies, and the one-time ticket ledger;
- :mod:`.headers`: what crosses the gateway in each direction (hop-by-hop, our cookie, ...);
- :mod:`.pages`: the short text pages the preview answers with itself;
- :mod:`.api`: ``POST /api/links/preview`` (a ticket URL for the caller's own desktop);
- :mod:`.http_relay` and :mod:`.ws_relay`: the two relays;
- :mod:`.routing`: the middleware sending preview hosts to the relays, never to the API.

Nothing is imported here, so :mod:`studio_gateway.config` can import :mod:`.config` alone.
"""
