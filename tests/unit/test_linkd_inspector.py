"""linkd's inspector without I/O: the ring's bounds, every redaction rule, the filters, how
bodies are shown, and what a replay sends (secrets restored, edits kept)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from linkd.config import DEFAULT_INSPECT_PORT, Settings, load_settings
from linkd.daemon import LinkDaemon
from linkd.inspector import DEFAULT_PORT, REDACTED, Recorder, ReplayExchange, host_allowed
from linkd.inspector.redact import (
    is_secret_header,
    is_secret_name,
    redact_headers,
    redact_json_body,
    redact_target,
)
from linkd.inspector.replay import ReplayEdits, Replayer, ReplayRefused
from linkd.inspector.views import Filter, body_view, detail, hex_dump, looks_text, summary
from linkd.session import GatewayClient


def exchange(
    n: int | str,
    *,
    status: int | None = 200,
    target: str = "/x",
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    response_body: bytes = b"",
    response_headers: list[tuple[str, str]] | None = None,
    route: str = "upstream",
    error: str | None = None,
) -> ReplayExchange:
    return ReplayExchange(
        id=str(n),
        started_at=1000.0 + (n if isinstance(n, int) else 0),
        method="GET",
        target=target,
        route=route,
        request_headers=headers or [],
        request_body=body,
        request_bytes=len(body),
        status=status,
        response_headers=response_headers or [],
        response_body=response_body,
        response_bytes=len(response_body),
        ttfb_ms=1.0,
        duration_ms=2.0,
        error=error,
    )


# ------------------------------------------------------------------------------ the ring


def test_the_ring_keeps_the_newest_size_entries() -> None:
    recorder = Recorder(3)
    for n in range(10):
        recorder.observe("started", exchange(n))
        recorder.observe("finished", exchange(n))  # a second event for a kept id adds nothing
    assert len(recorder) == 3
    assert [e.exchange.id for e in recorder.newest()] == ["9", "8", "7"]
    assert recorder.get("6") is None
    assert [e.exchange.id for e in recorder.newest(limit=2)] == ["9", "8"]


def test_replays_count_against_the_ring_and_are_marked() -> None:
    recorder = Recorder(2)
    recorder.observe("started", exchange(1))
    recorder.observe("started", exchange(2))
    replay_id = recorder.next_replay_id()
    recorder.add_replay(exchange(replay_id), "1")
    assert [e.exchange.id for e in recorder.newest()] == [replay_id, "2"]
    entry = recorder.get(replay_id)
    assert entry is not None and entry.replay_of == "1"
    assert summary(entry.exchange, entry.replay_of)["replayOf"] == "1"


def test_watchers_get_ids_and_an_overrun_marker_instead_of_unbounded_growth() -> None:
    recorder = Recorder(5)
    watcher = recorder.watch()
    recorder.observe("started", exchange(1))
    assert watcher.queue.get_nowait() == "1"
    for n in range(5000):
        recorder.observe("started", exchange(n))
    assert watcher.overrun
    items = [watcher.queue.get_nowait() for _ in range(watcher.queue.qsize())]
    assert items[-1] is None and len(items) <= 1000
    recorder.unwatch(watcher)
    recorder.observe("started", exchange(99999))
    assert watcher.queue.qsize() == 0  # drained, and no longer fed


def test_a_ring_of_zero_is_refused() -> None:
    with pytest.raises(ValueError):
        Recorder(0)


# ------------------------------------------------------------------------------ redaction


@pytest.mark.parametrize(
    "name",
    [
        "Authorization",
        "proxy-authorization",
        "Cookie",
        "Set-Cookie",
        "X-Auth-Token",
        "x-csrf-token",
        "X-Client-Secret",
        "X-Api-Key",
        "x-apikey",
        "API_KEY",
        "X-Session-Id",
    ],
)
def test_secret_headers(name: str) -> None:
    assert is_secret_header(name)
    assert redact_headers([(name, "s3cr3t"), ("Accept", "*/*")]) == [(name, REDACTED), ("Accept", "*/*")]


@pytest.mark.parametrize("name", ["Accept", "Content-Type", "User-Agent", "X-Request-Id", "Keyboard"])
def test_ordinary_headers_stay(name: str) -> None:
    assert not is_secret_header(name)


@pytest.mark.parametrize(
    "name",
    ["token", "access_token", "id-token", "api_key", "apikey", "password", "secret", "auth", "key", "sig"],
)
def test_secret_query_and_json_names(name: str) -> None:
    assert is_secret_name(name)


@pytest.mark.parametrize("name", ["q", "page", "limit", "monkey", "sort"])
def test_ordinary_names_stay(name: str) -> None:
    assert not is_secret_name(name)


def test_query_parameters_named_like_tokens_are_redacted_order_and_others_kept() -> None:
    target = "/cb?page=2&access_token=s3cr3t&code=abc&q=a%20b&token="
    shown = redact_target(target)
    assert "s3cr3t" not in shown and "abc" not in shown
    assert shown.startswith("/cb?page=2&access_token=") and "&q=a%20b&" in shown
    assert redact_target("/plain?q=1") == "/plain?q=1"
    assert redact_target("/no-query") == "/no-query"


def test_json_bodies_lose_their_secret_top_level_keys_only() -> None:
    body = json.dumps({"user": "ann", "password": "s3cr3t", "nested": {"token": "kept-as-is"}}).encode()
    redacted = redact_json_body(body, "application/json")
    assert redacted is not None
    data = json.loads(redacted)
    assert data == {"user": "ann", "password": REDACTED, "nested": {"token": "kept-as-is"}}
    assert redact_json_body(b'{"user": "ann"}', "application/json") is None  # nothing to hide
    assert redact_json_body(b"password=s3cr3t", "application/x-www-form-urlencoded") is None


def test_a_cut_off_json_body_naming_a_secret_is_hidden() -> None:
    cut = b'{"user": "ann", "api_key": "s3cr3t-and-more'
    view = body_view(cut, 10_000, [("content-type", "application/json")])
    assert view["kind"] == "hidden" and "s3cr3t" not in json.dumps(view)


def test_detail_redacts_headers_target_and_bodies_everywhere() -> None:
    ex = exchange(
        1,
        target="/login?token=s3cr3t-q",
        headers=[("Authorization", "Bearer s3cr3t-h"), ("Cookie", "sid=s3cr3t-c")],
        body=json.dumps({"password": "s3cr3t-b"}).encode(),
        response_headers=[("Set-Cookie", "sid=s3cr3t-s"), ("content-type", "application/json")],
        response_body=json.dumps({"access_token": "s3cr3t-r", "ok": True}).encode(),
    )
    text = json.dumps(detail(ex)) + json.dumps(summary(ex))
    assert "s3cr3t" not in text
    assert text.count(REDACTED) >= 6


# ------------------------------------------------------------------------------ bodies


def test_text_or_hex() -> None:
    assert looks_text(b'{"a": 1}\n', "application/json")
    assert looks_text("héllo".encode(), None)
    assert looks_text(b"abc" + "é".encode()[:1], "text/plain")  # cut by the capture cap: still text
    assert not looks_text(b"\x00\x01\x02binary", None)
    assert not looks_text(b"GIF89a", "image/gif")
    assert not looks_text(b"plain", "application/octet-stream")
    assert not looks_text(b"\xff\xfe\xfd and more bytes", None)


def test_hex_dump_is_capped_and_xxd_like() -> None:
    dump = hex_dump(bytes(range(256)) * 100, limit=64)
    lines = dump.splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("00000000  00 01 02 03")
    assert lines[2].startswith("00000020  20 21")
    assert lines[2].endswith(" !\"#$%&'()*+,-./")


def test_body_views_say_size_and_truncation() -> None:
    assert body_view(b"", 0, [])["kind"] == "empty"
    text = body_view(b"hello", 100, [("Content-Type", "text/plain")])
    assert text == {"size": 100, "captured": 5, "truncated": True, "kind": "text", "text": "hello"}
    binary = body_view(b"\x89PNG\r\n\x1a\n", 8, [("content-type", "image/png")])
    assert binary["kind"] == "hex" and binary["hex"].startswith("00000000  89 50 4e 47")
    assert body_view(b"", 300, [], upgraded=True)["kind"] == "upgraded"


# ------------------------------------------------------------------------------ filters


def test_filters_by_status_class_exact_status_errors_and_path() -> None:
    rows = [
        exchange(1, status=200, target="/api/a"),
        exchange(2, status=404, target="/api/b"),
        exchange(3, status=503, target="/static/c"),
        exchange(4, status=None, target="/api/d", error="upstream_unreachable"),
    ]

    def ids(status: str | None = None, path: str | None = None) -> list[str]:
        where = Filter.parse(status, path)
        return [r.id for r in rows if where.matches(r)]

    assert ids() == ["1", "2", "3", "4"]
    assert ids("2xx") == ["1"]
    assert ids("4xx") == ["2"]
    assert ids("5xx") == ["3"]
    assert ids("404") == ["2"]
    assert ids("error") == ["3", "4"]
    assert ids(path="/api/") == ["1", "2", "4"]
    assert ids("4xx", "/api/") == ["2"]
    for bad in ("6xx", "abc", "20"):
        with pytest.raises(ValueError):
            Filter.parse(bad, None)


def test_the_path_filter_cannot_probe_a_redacted_value() -> None:
    row = exchange(1, target="/cb?token=s3cr3t")
    assert not Filter.parse(None, "s3cr3t").matches(row)


# ------------------------------------------------------------------------------ replay preparation


def original() -> ReplayExchange:
    return exchange(
        1,
        target="/api/items?token=real-q&page=2",
        headers=[("Authorization", "Bearer real-h"), ("Accept", "application/json")],
        body=json.dumps({"name": "x", "password": "real-b"}).encode(),
    )


def test_an_unedited_replay_sends_the_real_values() -> None:
    replayer = Replayer("http://127.0.0.1:9")
    method, target, headers, body = replayer.prepare(original(), ReplayEdits())
    assert (method, target) == ("GET", "/api/items?token=real-q&page=2")
    assert ("Authorization", "Bearer real-h") in headers
    assert json.loads(body)["password"] == "real-b"


def test_redacted_placeholders_left_in_an_edit_keep_the_real_values() -> None:
    ex = original()
    shown = detail(ex)
    edits = ReplayEdits.parse(
        {
            "method": "post",
            "target": shown["target"].replace("page=2", "page=3"),
            "headers": [*shown["request"]["headers"], ["X-Extra", "1"]],
            "body": json.dumps({"name": "y", "password": REDACTED}),
        }
    )
    method, target, headers, body = Replayer("http://127.0.0.1:9").prepare(ex, edits)
    assert method == "POST"
    assert target == "/api/items?token=real-q&page=3"
    assert ("Authorization", "Bearer real-h") in headers and ("X-Extra", "1") in headers
    assert json.loads(body) == {"name": "y", "password": "real-b"}


def test_the_shown_body_sent_back_unchanged_is_the_original() -> None:
    ex = original()
    text = detail(ex)["request"]["body"]["text"]
    _, _, _, body = Replayer("http://127.0.0.1:9").prepare(ex, ReplayEdits(body=text))
    assert body == ex.request_body


def test_replay_refusals() -> None:
    replayer = Replayer("http://127.0.0.1:9")
    with pytest.raises(ReplayRefused) as refused:
        replayer.prepare(exchange(1, route="status"), ReplayEdits())
    assert refused.value.status == 409
    cut = exchange(2, body=b"abc")
    cut.request_bytes = 10_000
    with pytest.raises(ReplayRefused) as refused:
        replayer.prepare(cut, ReplayEdits())
    assert refused.value.code == "body_not_captured"
    replayer.prepare(cut, ReplayEdits(body="a new body"))  # an edited body is fine
    for bad in ({"method": "GE T"}, {"target": "http://evil/"}, {"headers": "x"}, {"body": 1}, [1]):
        with pytest.raises(ReplayRefused) as refused:
            ReplayEdits.parse(bad)
        assert refused.value.status == 400


# ------------------------------------------------------------------------------ host check and settings


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1:4041", True),
        ("localhost:4041", True),
        ("localhost", True),
        ("app.localhost:4041", True),
        ("[::1]:4041", True),
        ("evil.example:4041", False),
        ("127.0.0.1.evil.example", False),
        ("", False),
        (None, False),
    ],
)
def test_loopback_host_names_only(host: str | None, allowed: bool) -> None:
    assert host_allowed(host) is allowed


def test_settings_defaults_and_sources(tmp_path: object) -> None:
    assert DEFAULT_PORT == DEFAULT_INSPECT_PORT
    assert Settings().inspect is False  # a daemon built in code: off unless asked
    empty = {"HOME": "/nonexistent", "XDG_CONFIG_HOME": "/nonexistent"}
    resolved = load_settings({}, empty)
    assert (resolved.inspect, resolved.inspect_port, resolved.inspect_size) == (
        True,
        DEFAULT_INSPECT_PORT,
        200,
    )
    from_env = load_settings(
        {}, {**empty, "LINKD_INSPECT": "0", "LINKD_INSPECT_PORT": "0", "LINKD_INSPECT_SIZE": "5"}
    )
    assert (from_env.inspect, from_env.inspect_port, from_env.inspect_size) == (False, 0, 5)
    flags = load_settings({"inspect_port": 5000}, {**empty, "LINKD_INSPECT_PORT": "6000"})
    assert flags.inspect_port == 5000


def test_a_daemon_without_the_inspector_captures_nothing_and_reports_none(tmp_path: Path) -> None:
    settings = Settings(status_file=tmp_path / "status.json", inspect=False)
    daemon = LinkDaemon(settings, GatewayClient("http://127.0.0.1:9", lambda: "t"), own_seed=None)
    assert daemon.inspector is None and daemon.traffic.capture_bodies is False
    assert daemon.status_document()["inspector"] is None
    on = LinkDaemon(
        Settings(status_file=tmp_path / "status.json", inspect=True, inspect_port=0),
        GatewayClient("http://127.0.0.1:9", lambda: "t"),
        own_seed=None,
    )
    assert on.inspector is not None and on.traffic.capture_bodies is True
    assert on.status_document()["inspector"] is None  # not listening until run() starts it
    assert load_settings({"inspect": False}, {"HOME": "/nonexistent"}).inspect is False
