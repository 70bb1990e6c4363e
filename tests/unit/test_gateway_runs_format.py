"""SSE/NDJSON formatting, resume points, event ordering, metrics text, runs config, dispatch errors."""

from __future__ import annotations

import json

import pytest

import tunnel
from contract.permissions import DEFAULT_GRANTS, daemon_permissions
from studio_gateway.config import ConfigError, RunsConfig
from studio_gateway.dispatch import classify_error, error_fields, rejection
from studio_gateway.metrics import Counter, Gauge, Histogram, Registry
from studio_gateway.runs.metrics import RunMetrics
from studio_gateway.runs.sse import NDJSON, SSE, EventFormat, choose_format, ordered_events, parse_after
from tests.prom import parse_samples, sample_value


def test_sse_messages_have_id_event_and_one_data_line() -> None:
    fmt = EventFormat(SSE)
    event = {"runId": "r", "seq": 7, "type": "output", "data": "two\nlines\n"}
    text = fmt.event(event).decode()
    assert text.startswith("id: 7\nevent: output\ndata: ") and text.endswith("\n\n")
    assert text.count("\n") == 4  # the newline inside the data is escaped in the JSON
    assert json.loads(text.split("data: ", 1)[1]) == event
    end = fmt.end({"status": "completed"}).decode()
    assert end == 'event: end\ndata: {"status":"completed"}\n\n'
    assert fmt.keepalive() == b": keepalive\n\n"


def test_ndjson_lines_and_end_line() -> None:
    fmt = EventFormat(NDJSON)
    assert fmt.event({"seq": 1, "type": "heartbeat"}) == b'{"seq":1,"type":"heartbeat"}\n'
    assert json.loads(fmt.end({"status": "failed"})) == {"type": "end", "run": {"status": "failed"}}
    assert fmt.keepalive() is None
    assert fmt.content_type == "application/x-ndjson; charset=utf-8"


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (None, SSE),
        ("text/event-stream", SSE),
        ("application/x-ndjson", NDJSON),
        ("application/x-ndjson, */*", NDJSON),
        ("*/*", SSE),
    ],
)
def test_choose_format(accept: str | None, expected: str) -> None:
    assert choose_format(accept).media_type == expected


def test_parse_after() -> None:
    assert parse_after(None, None) == 0
    assert parse_after("5", None) == 5
    assert parse_after(None, "9") == 9
    assert parse_after("3", "9") == 3  # the query wins
    assert parse_after("", " ") == 0
    for bad in ("-1", "1.5", "x", "9" * 20):
        with pytest.raises(ValueError):
            parse_after(bad, None)
    with pytest.raises(ValueError, match="Last-Event-ID"):
        parse_after(None, "abc")


def test_ordered_events_collapse_duplicates_drop_other_fences_and_stop_at_gaps() -> None:
    events = [
        {"seq": 2, "fence": 1, "v": "b"},
        {"seq": 1, "fence": 1, "v": "a"},
        {"seq": 1, "fence": 1, "v": "dup"},
        {"seq": 3, "fence": 2, "v": "other fence"},
        {"seq": 5, "fence": 1, "v": "after a gap"},
    ]
    assert [e["v"] for e in ordered_events(events, 1)] == ["a", "b"]
    assert [e["v"] for e in ordered_events(events, 1, upto=1)] == ["a"]
    assert [e["v"] for e in ordered_events(events, 1, start=5)] == ["after a gap"]
    assert ordered_events(events, 3) == []


def test_metrics_text_format() -> None:
    registry = Registry()
    counter = registry.register(Counter("x_total", "Things.", ("kind",)))
    gauge = registry.register(Gauge("x_level", "Level.", source=lambda: 2.5))
    histogram = registry.register(Histogram("x_seconds", "Time.", buckets=(0.1, 1.0)))
    counter.inc(kind='a"b\\c\n')
    counter.inc(2, kind="plain")
    histogram.observe(0.05)
    histogram.observe(0.5)
    histogram.observe(5)
    for accept, openmetrics in ((None, False), ("application/openmetrics-text; version=1.0.0", True)):
        body, content_type = registry.exposition(accept)
        assert content_type.startswith(
            "application/openmetrics-text; version=1.0.0" if openmetrics else "text/plain; version=0.0.4"
        )
        text = body.decode()
        parsed = parse_samples(text, openmetrics=openmetrics)
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in parsed}
        assert samples[("x_total", (("kind", 'a"b\\c\n'),))] == 1
        assert samples[("x_total", (("kind", "plain"),))] == 2
        assert samples[("x_level", ())] == 2.5
        assert samples[("x_seconds_bucket", (("le", "0.1"),))] == 1
        assert samples[("x_seconds_bucket", (("le", "1.0"),))] == 2
        assert samples[("x_seconds_bucket", (("le", "+Inf"),))] == 3
        assert samples[("x_seconds_count", ())] == 3
        assert samples[("x_seconds_sum", ())] == pytest.approx(5.55)
    assert gauge.value() == 2.5 and histogram.count() == 3 and counter.value(kind="plain") == 2
    with pytest.raises(ValueError):
        counter.inc(-1, kind="a")
    with pytest.raises(ValueError):
        counter.inc(other="a")
    with pytest.raises(ValueError):
        registry.register(Counter("x_total", "again"))


def test_run_metrics_series() -> None:
    metrics = RunMetrics()
    metrics.run_finished("failed", "desktop_lost")
    metrics.run_finished("completed", None)
    metrics.uplink_events.inc(result="stale_fence")
    text = metrics.render()
    assert sample_value(text, 'studio_runs_finished_total{status="failed",failure_kind="desktop_lost"}') == 1
    assert sample_value(text, 'studio_runs_finished_total{status="completed",failure_kind=""}') == 1
    assert sample_value(text, 'studio_runs_uplink_events_total{result="stale_fence"}') == 1
    assert "studio_runs_projector_lag_seconds" in text  # HELP/TYPE even before any event


def test_runs_config_from_env() -> None:
    config = RunsConfig.from_env({})
    assert config == RunsConfig()
    assert config.runners == ("echo", "mock", "command", "http")
    assert config.reaper_scan_interval == 5.0
    short = RunsConfig.from_env({"RUNS_LIVENESS_TIMEOUT_SECONDS": "2.5", "RUNS_RUNNERS": "echo, mock,echo"})
    assert short.liveness_timeout == 2.5 and short.reaper_scan_interval == 0.25
    assert short.runners == ("echo", "mock")
    # A short retention pulls the default de-duplication window down with it...
    assert RunsConfig.from_env({"RUNS_STREAM_MAX_AGE_SECONDS": "60"}).duplicate_window == 60
    # ... but an explicit window longer than the retention is a mistake.
    with pytest.raises(ConfigError) as info:
        RunsConfig.from_env({"RUNS_STREAM_MAX_AGE_SECONDS": "60", "RUNS_DUPLICATE_WINDOW_SECONDS": "90"})
    assert info.value.variable == "RUNS_DUPLICATE_WINDOW_SECONDS"
    for name, value in (
        ("RUNS_LIVENESS_TIMEOUT_SECONDS", "0"),
        ("RUNS_LIVENESS_TIMEOUT_SECONDS", "nan"),
        ("RUNS_DISPATCH_TIMEOUT_SECONDS", "soon"),
        ("RUNS_RUNNERS", "Bad Name"),
        ("RUNS_RUNNERS", ","),
        ("RUNS_ENABLED", "maybe"),
        ("RUNS_OUTPUT_MAX_BYTES", "-1"),
    ):
        with pytest.raises(ConfigError) as info:
            RunsConfig.from_env({name: value})
        assert info.value.variable == name


def test_dispatch_failure_kinds() -> None:
    assert classify_error(tunnel.TunnelUnreachable("x")).kind == "desktop_unreachable"
    assert classify_error(tunnel.NoFirstFrameTimeout("x")).kind == "dispatch_timeout"
    assert classify_error(tunnel.DeadlineExceeded("x")).kind == "dispatch_timeout"
    assert classify_error(tunnel.RemoteProtocolError("x")).kind == "dispatch_error"
    assert classify_error(RuntimeError("x")).kind == "dispatch_error"
    refused = rejection(422, b'{"error":{"code":"unknown_runner","message":"no runner x"}}')
    assert refused.kind == "desktop_rejected"
    assert "unknown_runner" in refused.reason and "no runner x" in refused.reason and "422" in refused.reason
    assert "http_500" in rejection(500, b"<html>").reason
    assert error_fields(b'{"error":"flat"}') == (None, "")


def test_daemon_grant_includes_the_run_uplink_under_its_own_host_only() -> None:
    grant = daemon_permissions("alice-abc", extra=())
    base = tunnel.HostSubjects.for_host("alice-abc").base
    assert f"{base}.runs.*" not in grant.publish  # not without the provider...
    grant = daemon_permissions("alice-abc", extra=DEFAULT_GRANTS)
    assert f"{base}.runs.*" in grant.publish and f"{base}.inbox.>" in grant.subscribe
    subjects = tunnel.HostSubjects.for_host("alice-abc")
    # Everything under the host's prefix, but its readiness subject (outside it on purpose).
    assert all(s.startswith(base + ".") or s == subjects.ready for s in (*grant.publish, *grant.subscribe))


async def test_stop_tasks_stops_a_task_that_swallows_a_cancel() -> None:
    import asyncio

    from studio_gateway.tasks import stop_tasks

    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                swallowed += 1
                if swallowed == 1:
                    continue  # what a library racing its own timeout can do
                raise

    task = asyncio.get_running_loop().create_task(stubborn())
    await asyncio.sleep(0)
    await stop_tasks([task], timeout=5.0)
    assert task.cancelled() and swallowed == 2


def test_an_event_is_sent_as_its_stored_json_when_that_fits_one_line() -> None:
    event = {"runId": "r", "fence": 1, "seq": 3, "type": "output", "data": "a\nb"}
    stored = json.dumps(event, separators=(",", ":")).encode()  # a line break only as \\n
    sse = EventFormat(SSE).event(event, stored)
    assert sse == b"id: 3\nevent: output\ndata: " + stored + b"\n\n"
    assert EventFormat(NDJSON).event(event, stored) == stored + b"\n"
    # Stored JSON with a real line break (a hostile daemon's) would end the SSE message: re-encoded.
    spread = json.dumps(event, indent=1).encode()
    again = EventFormat(SSE).event(event, spread)
    assert again.count(b"\n") == 4 and json.loads(again.split(b"data: ")[1]) == event
