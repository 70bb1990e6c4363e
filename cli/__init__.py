"""cli: `linkctl`, presence probes, fetch, sessions, runs and the one-command local stack."""
