"""linkd: the desktop link daemon (credentials, session lifecycle, tunnel routes, runners)."""
