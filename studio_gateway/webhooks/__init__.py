"""Durable, signed webhooks for run events (docs/runs.md, "Webhooks")."""
