"""The one error type a user can act on: the CLI prints it as one line and exits with status 2."""

from __future__ import annotations

__all__ = ["LinkdError"]


class LinkdError(Exception):
    """A problem the user can fix (a bad setting, a missing login, no keyring); ``str()`` says how."""
