"""The agreement between the gateway, the desktop daemon (linkd) and linkctl.

Modules here are what both sides must read the same way; they import only the stdlib,
:mod:`tunnel`, ``nkeys`` and ``jwt`` -- never :mod:`linkd` or :mod:`studio_gateway`.

- :mod:`.run_protocol` -- run events: subjects, stream name, message ids, batches.
"""
