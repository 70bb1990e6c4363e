"""linkd.access_log: the line's text and fields, escaping, sizes, and nothing from headers or bodies."""

from __future__ import annotations

import json
import logging
import time

import pytest

from contract.logs import JsonFormatter
from linkd.access_log import ACCESS_LOGGER, AccessLog, format_size, subscribe_access_log
from linkd.traffic import Exchange, Traffic


def exchange(**fields: object) -> Exchange:
    base: dict[str, object] = {
        "id": "7",
        "started_at": time.time(),
        "method": "POST",
        "target": "/api/x?q=1",
        "route": "upstream",
        "request_headers": [("authorization", "Bearer hdr-secret")],
        "request_body": b"body-secret",
        "request_bytes": 2048,
        "status": 201,
        "response_body": b"body-secret-too",
        "response_bytes": 5,
        "duration_ms": 12.345,
    }
    base.update(fields)
    return Exchange(**base)  # type: ignore[arg-type]


def records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == ACCESS_LOGGER]


def test_sizes_for_people() -> None:
    assert [format_size(n) for n in (0, 1023, 1024, 3500, 10 * 1024, 5 * 1024 * 1024)] == [
        "0B",
        "1023B",
        "1.0KiB",
        "3.4KiB",
        "10KiB",
        "5.0MiB",
    ]


def test_one_line_on_finished_only_with_its_fields(caplog: pytest.LogCaptureFixture) -> None:
    log = AccessLog()
    with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER):
        log("started", exchange(duration_ms=None))
        log("response", exchange(duration_ms=None))
        log("finished", exchange())
    (record,) = records(caplog)
    assert record.levelno == logging.INFO
    assert record.getMessage() == "POST /api/x?q=1 201 2.0KiB in 5B out 12.3ms"
    entry = json.loads(JsonFormatter().format(record))
    assert {k: entry[k] for k in ("event", "method", "path", "status", "bytesIn", "bytesOut", "ms")} == {
        "event": "access",
        "method": "POST",
        "path": "/api/x?q=1",
        "status": 201,
        "bytesIn": 2048,
        "bytesOut": 5,
        "ms": 12.3,
    }
    assert (entry["route"], entry["error"], entry["logger"]) == ("upstream", None, ACCESS_LOGGER)
    text = json.dumps(entry)
    assert "secret" not in text and "authorization" not in text.lower()


def test_failures_and_upgrades_are_named(caplog: pytest.LogCaptureFixture) -> None:
    log = AccessLog()
    with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER):
        log("finished", exchange(status=None, error="cancelled", response_bytes=0))
        log("finished", exchange(method="GET", status=101, upgraded=True, error=None))
    first, second = (r.getMessage() for r in records(caplog))
    assert first == "POST /api/x?q=1 - 2.0KiB in 0B out 12.3ms error=cancelled"
    assert second.endswith(" upgraded") and " 101 " in second


def test_a_line_break_in_the_target_cannot_forge_a_line(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER):
        AccessLog()("finished", exchange(target="/a\n12:00:00 GET /forged 200"))
    message = records(caplog)[0].getMessage()
    assert "\n" not in message and "/a\\x0a12:00:00\\x20GET" in message


def test_no_subscription_when_the_access_logger_is_off() -> None:
    logger = logging.getLogger(ACCESS_LOGGER)
    before = logger.level
    try:
        logger.setLevel(logging.WARNING)
        traffic = Traffic(capture_bodies=False)
        assert subscribe_access_log(traffic) is False and not traffic.active
        logger.setLevel(logging.INFO)
        assert subscribe_access_log(traffic) is True and traffic.active
    finally:
        logger.setLevel(before)
