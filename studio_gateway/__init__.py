"""studio_gateway: the aiohttp service that mints link sessions, probes presence and dispatches runs."""
