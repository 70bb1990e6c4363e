"""The agreement between the gateway, the desktop daemon (linkd) and linkctl.

Whatever both sides must read the same way lives here, once; :mod:`linkd` and
:mod:`studio_gateway` stand side by side above it and never import each other. Modules
here import only the stdlib, :mod:`tunnel`, ``nkeys`` and ``nacl`` (all in the desktop install).

- :mod:`.run_protocol` -- run events on NATS: subjects, stream, message ids, batches.
- :mod:`.routes` -- the HTTP paths: the daemon's (status, work, control) and the gateway's.
- :mod:`.presence` -- the presence probe of a host and the document it answers.
- :mod:`.nats_jwt` -- reading NATS user JWTs and nkeys (minting is the gateway's).
- :mod:`.permissions` -- the NATS subjects a daemon credential is granted.
- :mod:`.runner_inputs` -- the runner inputs both ends check (``mock``), the same way.
- :mod:`.logs` -- the JSON log line schema of the gateway and the daemon.
- :mod:`.http_headers` -- the connection-level (hop-by-hop) HTTP headers every proxy drops.
"""
