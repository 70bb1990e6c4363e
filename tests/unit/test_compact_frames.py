"""Compact frames (docs/protocol.md section 2): a binary ``request.start`` for hosts whose server
said it takes one, and a binary head for ``response.whole`` when the caller offers it.

Sans-IO: real caller streams, a real dispatcher and real server streams, fake clocks. What is
pinned here: both ends agree on every field; a compact start is never sent on first contact
nor without extensions; an unanswered compact start goes again as JSON (an older server may
have dropped it) and the client then sends that host JSON for a cooldown; an older server
(``compact_frames=False``) drops a compact start silently, as the versions before did; every
malformed compact frame is a ``FrameError`` with the reason, never another exception.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from typing import Any

import pytest

from tests.unit.test_dispatch import Handle, Wall
from tests.unit.test_stream import (
    CLIENT_ID,
    HEADERS,
    RID,
    SERVER_ID,
    SUBJECTS,
    FakeClock,
    caller_options,
    make_caller,
    server_options,
)
from tunnel import _codec as codec
from tunnel import _frames as f
from tunnel._caller import CallerPhase, CallerStream
from tunnel._compact_starts import CompactStarts
from tunnel._config import UNREACHABLE_RETRY_INTERVAL
from tunnel._dispatch import ServerDispatcher
from tunnel._errors import (
    ErrorCode,
    IntegrityError,
    LocalProtocolError,
    RemoteProtocolError,
    TunnelUnreachable,
)
from tunnel._events import Publish, ResponseHead

DEADLINE_MS = 1_700_000_060_000
REPLY = SUBJECTS.client_reply(RID, CLIENT_ID)


def caller(
    clock: FakeClock,
    *,
    compact_start: bool = True,
    url: str = "/items?q=caf%C3%A9",
    deadline_unix_ms: int | None = DEADLINE_MS,
    **kwargs: Any,
) -> CallerStream:
    """``make_caller`` with a compact start by default, a non-ASCII target and a deadline."""
    return make_caller(
        clock, compact_start=compact_start, url=url, deadline_unix_ms=deadline_unix_ms, **kwargs
    )


def dispatcher(clock: FakeClock, **options: Any) -> ServerDispatcher[Handle]:
    return ServerDispatcher(
        hostname="desk.example",
        subjects=SUBJECTS,
        server_id=SERVER_ID,
        options=server_options(**options),
        max_concurrent=4,
        clock=clock,
        wall_clock=Wall(clock),
    )


def is_compact(pub: Publish) -> bool:
    return pub.payload[:2] == b"\x00\x04"


# -- both ends agree --------------------------------------------------------------------------


@pytest.mark.parametrize("has_body", [False, True])
@pytest.mark.parametrize("deadline", [None, 0, DEADLINE_MS])
def test_a_compact_start_is_the_same_request_as_its_json_start(has_body: bool, deadline: int | None) -> None:
    clock = FakeClock()
    method = "POST" if has_body else "GET"
    headers = [*HEADERS, ("x-empty", ""), ("x-text", "caf\u00e9 \u2603")]
    compact = caller(clock, has_body=has_body, method=method, headers=headers, deadline_unix_ms=deadline)
    plain = caller(
        clock,
        compact_start=False,
        has_body=has_body,
        method=method,
        headers=headers,
        deadline_unix_ms=deadline,
    )
    start = compact.start()
    assert is_compact(start) and start.reply == REPLY and start.subject == SUBJECTS.request
    assert len(start.payload) < len(plain.start().payload) // 2
    json_frame = codec.decode_frame(plain.start().payload)
    assert codec.decode_compact_start(start.payload, start.reply or "", SUBJECTS.base) == json_frame


def test_a_compact_start_runs_the_handler_and_gets_a_compact_whole_that_teaches_the_caller() -> None:
    clock = FakeClock()
    stream = caller(clock)
    answer = dispatcher(clock).on_start(stream.start().payload, stream.reply_subject)
    assert answer.malformed is None and answer.stream is not None
    server = answer.stream
    assert server.start_frame.reply_subject == REPLY and server.start_frame.url == "/items?q=caf%C3%A9"
    whole = server.whole_response(200, [("content-type", "text/plain")], "OK", b"tiny")
    assert whole is not None and whole.payload[:2] == b"\x00\x05" and whole.subject == REPLY
    event = stream.receive(codec.decode_frame(whole.payload, RID))
    assert event == ResponseHead(200, "OK", [("content-type", "text/plain")], True, b"tiny")
    assert stream.phase is CallerPhase.DONE
    assert stream.server_takes_compact_starts


def test_an_ack_says_whether_the_server_takes_compact_starts() -> None:
    for compact_frames in (True, False):
        clock = FakeClock()
        stream = caller(clock, compact_start=False, first_contact=True)
        answer = dispatcher(clock, compact_frames=compact_frames).on_start(stream.start().payload, REPLY)
        assert answer.stream is not None
        stream.receive(codec.decode_frame(answer.stream.ack().payload, RID))
        assert stream.server_takes_compact_starts is compact_frames


def test_an_older_server_answers_a_json_head_which_says_it_takes_no_compact_starts() -> None:
    clock = FakeClock()
    stream = caller(clock, compact_start=False)
    answer = dispatcher(clock, compact_frames=False).on_start(stream.start().payload, REPLY)
    assert answer.stream is not None
    whole = answer.stream.whole_response(204, [], None, b"")
    assert whole is not None and whole.payload[:2] == b"\x00\x03"
    stream.receive(codec.decode_frame(whole.payload, RID))
    assert stream.phase is CallerPhase.DONE and stream.server_takes_compact_starts is False


def test_an_error_as_the_first_frame_says_nothing_about_compact_starts() -> None:
    stream = caller(FakeClock())
    stream.receive(f.ResponseError(RID, ErrorCode.HANDLER_ERROR, "boom"))
    assert stream.server_takes_compact_starts is None


def test_a_plain_v1_server_takes_no_compact_starts() -> None:
    stream = caller(FakeClock(), compact_start=False)
    stream.receive(f.ResponseAck(RID))
    assert stream.server_takes_compact_starts is False


def test_the_compact_whole_head_carries_the_integrity_checksum_and_the_caller_checks_it() -> None:
    clock = FakeClock()
    stream = caller(clock)
    answer = dispatcher(clock).on_start(stream.start().payload, REPLY)
    assert answer.stream is not None
    whole = answer.stream.whole_response(200, [], None, b"exact bytes")
    assert whole is not None
    flipped = whole.payload[:-1] + bytes([whole.payload[-1] ^ 1])
    with pytest.raises(IntegrityError, match="arrived corrupted"):
        stream.receive(codec.decode_frame(flipped, RID))
    assert stream.phase is CallerPhase.FAILED


def test_a_caller_that_did_not_offer_a_binary_head_refuses_one() -> None:
    stream = caller(FakeClock(), compact_start=False, fast_path=False)
    whole = codec.encode_compact_whole(200, [], None, b"x", None, True)
    with pytest.raises(RemoteProtocolError, match="did not offer"):
        stream.receive(codec.decode_frame(whole, RID))


def test_a_server_refuses_a_status_text_that_cannot_travel() -> None:
    clock = FakeClock()
    stream = caller(clock)
    answer = dispatcher(clock).on_start(stream.start().payload, REPLY)
    assert answer.stream is not None
    for text in ("Not\x00Found", "bad\ud800", "x" * 1025, "two\r\nlines"):
        with pytest.raises(LocalProtocolError, match="status text"):
            answer.stream.whole_response(404, [], text, b"")


# -- when a caller sends one ------------------------------------------------------------------


def test_first_contact_and_callers_without_extensions_send_json_starts() -> None:
    assert not is_compact(caller(FakeClock(), first_contact=True).start())
    assert not is_compact(caller(FakeClock(), fast_path=False).start())
    assert not caller(FakeClock(), fast_path=False).compact_start


def test_an_unanswered_compact_start_goes_again_as_json() -> None:
    clock = FakeClock()
    stream = caller(clock, has_body=True, method="POST")
    first = stream.start()
    assert is_compact(first)
    clock.advance(1.0)
    (again,) = stream.poll()
    assert again.payload[:1] == b"{" and again.reply == REPLY
    assert stream.compact_start_unanswered and not stream.compact_start
    decoded = codec.decode_compact_start(first.payload, REPLY, SUBJECTS.base)
    assert codec.decode_frame(again.payload) == decoded
    clock.advance(1.0)
    (third,) = stream.poll()
    assert third.payload == again.payload


def test_no_responders_retries_of_a_compact_start_stay_compact() -> None:
    """Nobody subscribed (a daemon reconnecting) is not an older server dropping it."""
    clock = FakeClock()
    stream = caller(clock, unreachable_grace=1.0)
    assert stream.no_responders() is None
    clock.advance(UNREACHABLE_RETRY_INTERVAL)
    (retry,) = stream.poll()
    assert is_compact(retry) and not stream.compact_start_unanswered


def test_a_compact_start_that_would_not_fit_as_json_is_not_given_up() -> None:
    clock = FakeClock()
    headers = [("x-big", "v" * 900)]
    stream = caller(clock, headers=headers, max_payload=1200)
    assert is_compact(stream.start())
    clock.advance(1.0)
    (again,) = stream.poll()
    assert is_compact(again) and not stream.compact_start_unanswered


def test_text_that_cannot_be_utf8_falls_back_to_a_json_start() -> None:
    """The client validates URLs and headers first; a stream built with such text still works."""
    stream = caller(FakeClock(), headers=[("x-odd", "\ud800")])
    assert not stream.compact_start and stream.start().payload[:1] == b"{"


def test_no_responders_on_a_compact_start_still_fails_fast_after_the_grace() -> None:
    clock = FakeClock()
    stream = caller(clock, unreachable_grace=0.0)
    with pytest.raises(TunnelUnreachable):
        stream.no_responders()


# -- the client's memory of hosts -------------------------------------------------------------


def test_the_client_remembers_hosts_that_take_compact_starts() -> None:
    hosts = CompactStarts(limit=8, cooldown=60.0)
    assert not hosts.use("desk")
    hosts.learn("desk", True, 0.0)
    assert hosts.use("desk") and not hosts.use("other")
    hosts.learn("desk", False, 1.0)  # a server of it says no (an older one took this request)
    assert not hosts.use("desk")


def test_an_unanswered_compact_start_means_json_for_the_cooldown() -> None:
    hosts = CompactStarts(limit=8, cooldown=60.0)
    hosts.learn("desk", True, 0.0)
    hosts.unanswered("desk", 10.0)
    assert not hosts.use("desk")
    hosts.learn("desk", True, 69.9)  # a newer server answered meanwhile: still in the cooldown
    assert not hosts.use("desk")
    hosts.learn("desk", True, 70.0)
    assert hosts.use("desk")


def test_the_host_memory_is_bounded() -> None:
    hosts = CompactStarts(limit=3, cooldown=60.0)
    for i in range(10):
        hosts.learn(f"h{i}", True, 0.0)
        hosts.unanswered(f"u{i}", 0.0)
    assert sum(hosts.use(f"h{i}") for i in range(10)) <= 3
    assert len(hosts._refused_until) <= 3


# -- the server's side ------------------------------------------------------------------------


def test_an_older_server_drops_a_compact_start_without_a_word() -> None:
    clock = FakeClock()
    stream = caller(clock)
    answer = dispatcher(clock, compact_frames=False).on_start(stream.start().payload, REPLY)
    assert answer.stream is None and answer.publishes == ()
    assert answer.malformed is not None and "request id" in answer.malformed


def test_a_repeated_compact_start_gets_another_ack_not_a_second_handler() -> None:
    clock = FakeClock()
    stream = caller(clock)
    disp = dispatcher(clock)
    first = disp.on_start(stream.start().payload, REPLY)
    assert first.stream is not None
    disp.admit(Handle(first.stream))
    again = disp.on_start(stream.start().payload, REPLY)
    assert again.stream is None and len(again.publishes) == 1
    ack = codec.decode_frame(again.publishes[0].payload, RID)
    assert isinstance(ack, f.ResponseAck) and ack.extensions is not None and ack.extensions.binary_start


def test_a_compact_start_with_a_reply_subject_outside_its_request_is_dropped() -> None:
    clock = FakeClock()
    stream = caller(clock)
    for reply in ("", "_INBOX.x", SUBJECTS.client_reply("f" * 32, CLIENT_ID), "other.host.req.x.reply"):
        answer = dispatcher(clock).on_start(stream.start().payload, reply)
        assert answer.stream is None and answer.publishes == (), reply
        assert answer.malformed is not None


def test_a_malformed_compact_start_with_a_readable_id_is_answered_protocol_error() -> None:
    clock = FakeClock()
    payload = bytearray(caller(clock).start().payload)
    payload[2] |= 0x80  # an unknown flag
    answer = dispatcher(clock).on_start(bytes(payload), REPLY)
    assert answer.stream is None and "flags" in (answer.malformed or "")
    (pub,) = answer.publishes
    frame = codec.decode_frame(pub.payload, RID)
    assert isinstance(frame, f.ResponseError) and frame.code == ErrorCode.PROTOCOL_ERROR


# -- malformed compact frames -----------------------------------------------------------------

START_HEAD = struct.Struct(">BBBQ")
GOOD_EXT = '{"binaryData":true,"wholeResponse":true}'


def compact_start(*fields: str, flags: int = 0, deadline: int = 0, raw_tail: bytes | None = None) -> bytes:
    tail = raw_tail if raw_tail is not None else "".join(x + "\x00" for x in fields).encode()
    return START_HEAD.pack(0, 4, flags, deadline) + tail


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\x00\x04\x00", "truncated"),
        (compact_start(raw_tail=b"\xff\xfe"), "UTF-8"),
        (compact_start(RID, "GET", "/"), "too few fields"),
        (compact_start("bad id!", "GET", "/", GOOD_EXT), "requestId"),
        (compact_start(RID, "GET", "/", GOOD_EXT, flags=0x04), "flags"),
        (compact_start(RID, "GET", "/", GOOD_EXT, deadline=5), "deadline"),
        (compact_start(RID, "GET", "/", GOOD_EXT, flags=2, deadline=2**53), "deadline"),
        (compact_start(RID, "G E T", "/", GOOD_EXT), "method"),
        (compact_start(RID, "GET", "no-slash", GOOD_EXT), "target"),
        (compact_start(RID, "GET", "/a b", GOOD_EXT), "target"),
        (compact_start(RID, "GET", "/", "{not json"), "JSON"),
        (compact_start(RID, "GET", "/", "[1]"), "object"),
        (compact_start(RID, "GET", "/", "null"), "needs its extensions"),
        (compact_start(RID, "GET", "/", ""), "JSON"),
        (compact_start(RID, "GET", "/", GOOD_EXT, "host"), "header"),
        (compact_start(RID, "GET", "/", GOOD_EXT, "bad name", "v"), "header"),
        (compact_start(RID, "GET", "/", GOOD_EXT, "x", "line\r\nbreak"), "header"),
        (compact_start(RID, "GET", "/", GOOD_EXT, "x", "v" * (64 * 1024 + 1)), "header"),
        (compact_start(RID, "GET", "/", GOOD_EXT, *(["x", "v"] * 513)), "headers"),
        (compact_start(RID, "GET", "/", GOOD_EXT, raw_tail=b"x"), "too few fields"),
    ],
)
def test_a_malformed_compact_start_is_a_frame_error(payload: bytes, reason: str) -> None:
    with pytest.raises(f.FrameError, match=reason):
        codec.decode_compact_start(payload, REPLY, SUBJECTS.base)


def test_a_compact_start_anywhere_but_the_request_subject_is_a_frame_error() -> None:
    payload = caller(FakeClock()).start().payload
    with pytest.raises(f.FrameError, match="request subject"):
        codec.decode_frame(payload, RID)


WHOLE_HEAD = struct.Struct(">BBBHII")


def compact_whole(
    flags: int = 0, status: int = 200, value: int = 0, head: bytes = b"", length: int | None = None
) -> bytes:
    size = len(head) if length is None else length
    return WHOLE_HEAD.pack(0, 5, flags, status, value, size) + head + b"data"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\x00\x05\x00\x00\xc8", "truncated"),
        (compact_whole(flags=0x10), "flags"),
        (compact_whole(flags=0x03), "flags"),
        (compact_whole(status=99), "status"),
        (compact_whole(status=600), "status"),
        (compact_whole(length=100), "longer than the frame"),
        (compact_whole(head=b"\xff\x00"), "UTF-8"),
        (compact_whole(flags=0x04, head=b"no terminator"), "statusText"),
        (compact_whole(flags=0x04, head=b"bad\rtext\x00"), "statusText"),
        (compact_whole(value=7), "checksum"),
        (compact_whole(head=b"name-only\x00"), "header"),
        (compact_whole(head=b"bad name\x00v\x00"), "header"),
    ],
)
def test_a_malformed_compact_whole_is_a_frame_error(payload: bytes, reason: str) -> None:
    with pytest.raises(f.FrameError, match=reason):
        codec.decode_frame(payload, RID)


def test_encode_frame_of_a_decoded_compact_whole_gives_the_same_bytes() -> None:
    payload = codec.encode_compact_whole(
        404, [("a", ""), ("b", "c")], "", b"\x00body", f.Checksum("crc32", 0xFFFFFFFF), False
    )
    frame = codec.decode_frame(payload, RID)
    assert isinstance(frame, f.ResponseWhole) and frame.compact_head and not frame.binary_start
    assert frame.start.status_text == "" and frame.start.headers == [("a", ""), ("b", "c")]
    assert codec.encode_frame(frame) == payload
    assert dataclasses.replace(frame, compact_head=False) != frame


def test_hostile_offers_are_not_kept_in_the_offer_caches() -> None:
    """Found by review: distinct megabyte-sized offers could pin 256 of them in each cache."""
    compact_before = codec._compact_start_ext_cached.cache_info().currsize
    json_before = codec._start_ext_cached.cache_info().currsize
    for i in range(20):
        offer = json.dumps({"binaryData": True, f"x{i}": "v" * 10_000})
        start = codec.encode_compact_start(RID, "GET", "/", [], False, None, offer)
        assert codec.decode_compact_start(start, REPLY, SUBJECTS.base).extensions is not None
        frame = codec.decode_frame(
            codec.encode_request_start(RID, "GET", "/", [], REPLY, SUBJECTS.abort(RID), None, None, offer)
        )
        assert isinstance(frame, f.RequestStart) and frame.extensions is not None
    assert codec._compact_start_ext_cached.cache_info().currsize == compact_before
    assert codec._start_ext_cached.cache_info().currsize == json_before
    ours = caller_options().offer_json
    assert ours is not None and len(ours) <= codec.MAX_CACHED_OFFER  # our own offer stays cached


def test_a_header_block_checked_once_is_not_shared_between_frames() -> None:
    """Checked blocks are remembered (a server repeats its heads): each decode still gets its
    own list, and a block that fails the check fails every time."""
    whole = codec.encode_compact_whole(200, [("content-type", "text/plain")], None, b"x", None, False)
    first = codec.decode_frame(whole, RID)
    assert isinstance(first, f.ResponseWhole)
    first.start.headers.append(("x-mutated", "1"))
    second = codec.decode_frame(whole, RID)
    assert isinstance(second, f.ResponseWhole)
    assert second.start.headers == [("content-type", "text/plain")]
    bad = codec.encode_compact_whole(200, [("bad name", "v")], None, b"x", None, False)
    for _ in range(2):
        with pytest.raises(f.FrameError, match="invalid header block"):
            codec.decode_frame(bad, RID)


@pytest.mark.parametrize(
    "headers",
    [
        [("authorization", "Bearer abc")],
        [("Set-Cookie", "sid=1")],
        [("x-api-key", "k")],
        [("x-note", "my session id is 7")],
        [("content-type", "text/plain"), ("Proxy-Authorization", "Basic eA==")],
    ],
)
def test_a_header_block_that_may_hold_a_credential_is_never_kept(headers: list[tuple[str, str]]) -> None:
    whole = codec.encode_compact_whole(200, headers, None, b"", None, False)
    frame = codec.decode_frame(whole, RID)
    assert isinstance(frame, f.ResponseWhole) and frame.start.headers == headers
    start = codec.encode_compact_start(RID, "GET", "/", headers, False, None, "{}")
    assert codec.decode_compact_start(start, REPLY, SUBJECTS.base).headers == headers
    assert codec._header_block(headers) not in codec._CHECKED_BLOCKS
    plain = [("content-type", "text/plain")]
    codec.decode_frame(codec.encode_compact_whole(200, plain, None, b"", None, False), RID)
    assert codec._header_block(plain) in codec._CHECKED_BLOCKS  # what the check above could miss


def test_the_checked_header_blocks_stay_bounded() -> None:
    for i in range(codec._CHECKED_BLOCKS_LIMIT + 10):
        whole = codec.encode_compact_whole(200, [("x-n", str(i))], None, b"", None, False)
        frame = codec.decode_frame(whole, RID)
        assert isinstance(frame, f.ResponseWhole) and frame.start.headers == [("x-n", str(i))]
    assert len(codec._CHECKED_BLOCKS) <= codec._CHECKED_BLOCKS_LIMIT
    big = [("x-big", "v" * (codec._CHECKED_BLOCK_MAX_LENGTH + 1))]
    before = dict(codec._CHECKED_BLOCKS)
    codec.decode_frame(codec.encode_compact_whole(200, big, None, b"", None, False), RID)
    assert before == codec._CHECKED_BLOCKS  # too long to keep


def test_checked_methods_are_normalised_the_same_way_and_stay_bounded() -> None:
    assert f.validate_method("get") == "GET" and f.validate_method("get") == "GET"
    assert f.validate_method("PATCH") == "PATCH" and f.validate_method("patch") == "patch"
    for bad in ("GET ", "", "G\r\nET", 7):
        for _ in range(2):
            with pytest.raises(LocalProtocolError):
                f.validate_method(bad)  # type: ignore[arg-type]
    for i in range(100):
        assert f.validate_method(f"M{i}") == f"M{i}"
    assert len(f._CHECKED_METHODS) <= f._CHECKED_METHODS_LIMIT
