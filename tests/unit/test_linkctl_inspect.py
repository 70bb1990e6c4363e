"""``linkctl inspect``'s pieces without I/O: its default URL is linkd's default inspector, and
the one-line format."""

from __future__ import annotations

import time

from cli.inspect import DEFAULT_INSPECT_URL, format_line
from linkd.config import DEFAULT_INSPECT_PORT
from linkd.inspector import DEFAULT_HOST


def test_the_default_url_is_where_linkd_up_serves_the_inspector() -> None:
    assert f"http://{DEFAULT_HOST}:{DEFAULT_INSPECT_PORT}" == DEFAULT_INSPECT_URL


def test_one_line_per_request() -> None:
    at = time.mktime((2026, 1, 2, 3, 4, 5, 0, 0, -1))
    row = {
        "startedAt": at,
        "method": "POST",
        "target": "/items?page=2",
        "status": 201,
        "durationMs": 12.345,
        "requestBytes": 18,
        "responseBytes": 3 * 1024,
    }
    assert format_line(row) == "03:04:05 POST /items?page=2 201 12.3ms in 18B out 3.0KiB"
    failed = {**row, "status": None, "durationMs": 5.0, "error": "upstream_unreachable", "replayOf": "7"}
    assert format_line(failed).endswith("- 5.0ms in 18B out 3.0KiB error=upstream_unreachable (replay of 7)")
    hostile = {**row, "target": "/a\nforged 200"}
    assert "\n" not in format_line(hostile)
