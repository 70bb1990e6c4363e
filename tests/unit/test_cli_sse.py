"""The sans-IO event-stream parser: any split of the bytes gives the same messages."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cli.sse import SseError, SseMessage, SseParser

STREAM = (
    b": keepalive\n\n"
    b'id: 1\nevent: stage\ndata: {"seq": 1}\n\n'
    b"id: 2\r\nevent: output\r\ndata: line one\r\ndata: line two\r\n\r\n"
    b"retry: 1500\n"
    b"id: 3\revent: done\rdata: caf\xc3\xa9\r\r"
    b'event: end\ndata: {"status": "completed"}\n\n'
)
EXPECTED = [
    SseMessage("stage", '{"seq": 1}', "1"),
    SseMessage("output", "line one\nline two", "2"),
    SseMessage("done", "café", "3"),
    SseMessage("end", '{"status": "completed"}', None),
]


def parse_all(chunks: list[bytes]) -> tuple[list[SseMessage], SseParser]:
    parser = SseParser()
    out: list[SseMessage] = []
    for chunk in chunks:
        out += parser.feed(chunk)
    return out, parser


def test_whole_stream_gives_every_message_with_ids_and_types() -> None:
    messages, parser = parse_all([STREAM])
    assert messages == EXPECTED
    assert parser.keepalives == 1
    assert parser.last_event_id == "3"
    assert parser.retry_ms == 1500


def test_byte_by_byte_splits_inside_crlf_and_utf8_change_nothing() -> None:
    messages, _ = parse_all([STREAM[i : i + 1] for i in range(len(STREAM))])
    assert messages == EXPECTED


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_any_split_gives_the_same_messages(cuts: list[int]) -> None:
    points = sorted({0, len(STREAM), *cuts})
    chunks = [STREAM[a:b] for a, b in itertools.pairwise(points)]
    assert parse_all(chunks)[0] == EXPECTED


def test_unterminated_message_is_not_dispatched() -> None:
    messages, _ = parse_all([b"id: 9\ndata: half"])
    assert messages == []


def test_data_without_event_is_a_message_and_a_leading_bom_is_ignored() -> None:
    assert parse_all([b"\xef\xbb\xbfdata:x\n\n"])[0] == [SseMessage("message", "x", None)]


def test_a_line_beyond_the_limit_is_a_typed_error() -> None:
    parser = SseParser(max_line=100)
    with pytest.raises(SseError):
        parser.feed(b"data: " + b"x" * 200)
