"""Case-insensitive lookups in ordered header lists (repeats allowed), shared by both ends."""

from __future__ import annotations

from collections.abc import Sequence


def first_header(headers: Sequence[tuple[str, str]], name: str, default: str | None = None) -> str | None:
    """The first value of ``name`` (HTTP header names are case-insensitive)."""
    lname = name.lower()
    for key, value in headers:
        if key.lower() == lname:
            return value
    return default


def all_headers(headers: Sequence[tuple[str, str]], name: str) -> list[str]:
    """Every value of ``name``, in order."""
    lname = name.lower()
    return [value for key, value in headers if key.lower() == lname]
