"""The inputs of the runners whose shape both ends know, checked the same way on both.

The gateway checks a run's input at ``POST /api/runs`` (a bad one is ``422 invalid_field``
at once, instead of a ``202`` whose run then fails ``desktop_rejected``), and the daemon's
runner checks it again before it runs (the daemon trusts nobody's check but its own).
Runners whose input depends on the desktop's own configuration (``command``: which
commands exist; ``http``: the upstream) are checked on the desktop only.

``mock`` input (all optional)::

    {"count": 3,          # chunks to emit, 0..1000000
     "delayMs": 0,        # pause before each chunk, 0..60000
     "chunkBytes": null,  # pad each chunk to this many characters (1..1048576)
     "prefix": "chunk",   # chunk i is "<prefix> <i>\\n" (i from 0)
     "fail": null}        # a string: after the chunks, fail with this reason

``echo`` takes any JSON value.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["MAX_CHUNK_BYTES", "MAX_COUNT", "MAX_DELAY_MS", "InvalidRunInput", "MockInput", "check_input"]

MAX_COUNT: Final = 1_000_000
MAX_DELAY_MS: Final = 60_000
MAX_CHUNK_BYTES: Final = 1024 * 1024
MAX_PREFIX_LENGTH: Final = 256
_MOCK_KEYS: Final = frozenset({"count", "delayMs", "chunkBytes", "prefix", "fail"})


class InvalidRunInput(ValueError):
    """The input does not suit the runner (answered 422 before anything runs)."""


@dataclass(frozen=True, slots=True)
class MockInput:
    """A checked ``mock`` input."""

    count: int = 3
    delay_ms: int = 0
    chunk_bytes: int | None = None
    prefix: str = "chunk"
    fail: str | None = None

    @classmethod
    def parse(cls, input: Any) -> MockInput:
        data: Mapping[str, Any] = {} if input is None else input
        if not isinstance(data, Mapping):
            raise InvalidRunInput("mock input must be a JSON object (or null)")
        unknown = sorted(set(data) - _MOCK_KEYS)
        if unknown:
            raise InvalidRunInput(
                f"mock input has unknown field {unknown[0][:64]!r} (known: {', '.join(sorted(_MOCK_KEYS))})"
            )
        chunk_bytes = data.get("chunkBytes")
        if chunk_bytes is not None:
            chunk_bytes = _whole(data, "chunkBytes", 1, 1, MAX_CHUNK_BYTES)
        prefix = data.get("prefix", "chunk")
        if not isinstance(prefix, str) or len(prefix) > MAX_PREFIX_LENGTH:
            raise InvalidRunInput(
                f"mock input 'prefix' must be a string of at most {MAX_PREFIX_LENGTH} characters"
            )
        fail = data.get("fail")
        if fail is not None and (not isinstance(fail, str) or not fail):
            raise InvalidRunInput("mock input 'fail' must be a non-empty string (the failure reason)")
        return cls(
            count=_whole(data, "count", 3, 0, MAX_COUNT),
            delay_ms=_whole(data, "delayMs", 0, 0, MAX_DELAY_MS),
            chunk_bytes=chunk_bytes,
            prefix=prefix,
            fail=fail,
        )


def _whole(data: Mapping[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = data.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidRunInput(f"mock input {key!r} must be a whole number in [{low}, {high}]")
    return value


_CHECKS: Final[dict[str, Callable[[Any], object]]] = {"mock": MockInput.parse}


def check_input(runner: str, input: Any) -> None:
    """Raise :class:`InvalidRunInput` if ``runner`` declares an input shape ``input`` does not fit."""
    check = _CHECKS.get(runner)
    if check is not None:
        check(input)
