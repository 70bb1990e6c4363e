"""Frame codec: reference ``tunnel.v1`` JSON shapes, binary data frames, and strict validation.

Plain function calls only: no event loop, no NATS.
"""

from __future__ import annotations

import json
import random
import struct
import typing
from typing import Any

import pytest

from tunnel import _codec as codec
from tunnel import _frames as f
from tunnel._errors import ErrorCode, LocalProtocolError, RemoteProtocolError

RID = "0123456789abcdef0123456789abcdef"
OTHER_RID = "fedcba9876543210fedcba9876543210"
P = "_tunnel.v1.host.ZGVzay5leGFtcGxl"
REPLY = f"{P}.req.{RID}.reply"
ABORT = f"{P}.req.{RID}.abort"
BODY = f"{P}.req.{RID}.body"
UP = f"{P}.req.{RID}.up.server01"

HEADERS: f.Headers = [
    ("content-type", "text/plain; charset=utf-8"),
    ("set-cookie", "a=1"),
    ("x-name", "h\u00e9llo w\u00f6rld \u2713 \u4e2d\u6587"),
    ("set-cookie", "b=2"),
]

# One sample (or more) of every frame type, with and without optional fields.
SAMPLES: list[f.Frame] = [
    f.RequestStart(RID, "GET", "/", [], REPLY, ABORT),
    f.RequestStart(
        RID,
        "POST",
        "/api/items?q=1&q=2",
        HEADERS,
        REPLY,
        ABORT,
        body_subject=BODY,
        deadline_unix_ms=1_700_000_000_123,
        extensions=f.StartExtensions(binary=True, window=1 << 21, heartbeat_ms=500, max_frame=1 << 20),
    ),
    f.RequestStart(
        RID,
        "PUT",
        "/x",
        [],
        REPLY,
        ABORT,
        extensions=f.StartExtensions(
            binary=False, window=None, heartbeat_ms=None, max_frame=None, whole=True
        ),
    ),
    f.RequestChunk(RID, 0, b""),
    f.RequestChunk(RID, 7, bytes(range(256))),
    f.RequestEnd(RID, 0),
    f.RequestEnd(RID, 8),
    f.RequestError(RID, "tunnel_body_error", "the body iterator failed"),
    f.RequestCredit(RID, 65536),
    f.RequestCredit(RID, 65536, 9),
    f.ResponseAck(RID),
    f.ResponseAck(
        RID, f.AckExtensions(binary=True, window=4096, heartbeat_ms=250, max_frame=65536, up_subject=UP)
    ),
    f.ResponseStart(RID, 200, HEADERS),
    f.ResponseStart(RID, 404, [], "Not Found"),
    f.ResponseStart(RID, 200, [("a", "b")], "OK", f.AckExtensions(binary=True, window=10, up_subject=UP)),
    f.ResponseWhole(RID, f.ResponseStart(RID, 201, HEADERS, "Created"), b"\x00\x01binary\xff"),
    f.ResponseWhole(RID, f.ResponseStart(RID, 204, []), b""),
    f.ResponseChunk(RID, 0, b"hello"),
    f.ResponseChunk(RID, f.MAX_SAFE_INT, b"\x00" * 100),
    f.ResponseEnd(RID, 3),
    f.ResponseError(RID, "tunnel_handler_error", "handler raised ValueError"),
    f.ResponseCredit(RID, 1),
    f.ResponseHeartbeat(RID),
    f.ResponseHeartbeat(RID, 0),
    f.ResponseHeartbeat(RID, 12),
    f.Abort(RID),
    f.Abort(RID, "tunnel_timeout"),
]


def _ids(frame: f.Frame) -> str:
    return frame.type


# --------------------------------------------------------------------------- round trips


def test_samples_cover_every_frame_type() -> None:
    frame_classes = set(typing.get_args(f.Frame))
    assert {type(sample) for sample in SAMPLES} == frame_classes


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("frame", SAMPLES, ids=_ids)
def test_every_frame_round_trips_through_encode_and_decode(frame: f.Frame, binary: bool) -> None:
    payload = codec.encode_frame(frame, binary)
    assert codec.decode_frame(payload, RID) == frame


@pytest.mark.parametrize("frame", [s for s in SAMPLES if not isinstance(s, f.ResponseWhole)], ids=_ids)
def test_json_frames_decode_without_a_subject_request_id(frame: f.Frame) -> None:
    # request.start arrives on P.request, whose subject carries no request id.
    assert codec.decode_frame(codec.encode_frame(frame, False)) == frame


@pytest.mark.parametrize("cls", [f.RequestChunk, f.ResponseChunk])
def test_chunk_encodings_both_round_trip_arbitrary_bytes(cls: type[f.ChunkFrame]) -> None:
    rng = random.Random(7)
    for size in (0, 1, 2, 3, 4, 5, 255, 4096, 65537):
        frame = cls(RID, size, rng.randbytes(size))
        for binary in (False, True):
            assert codec.decode_frame(codec.encode_chunk(frame, binary), RID) == frame


def test_non_chunk_frames_are_json_even_when_binary_is_negotiated() -> None:
    for frame in SAMPLES:
        if isinstance(frame, f.RequestChunk | f.ResponseChunk | f.ResponseWhole):
            continue
        payload = codec.encode_frame(frame, binary=True)
        assert payload[:1] == b"{"
        assert payload == codec.encode_frame(frame, binary=False)


# --------------------------------------------------------------------------- v1 JSON shapes


def _json(frame: f.Frame) -> dict[str, Any]:
    obj = json.loads(codec.encode_frame(frame, binary=False))
    assert isinstance(obj, dict)
    return obj


def test_request_start_has_exactly_the_reference_v1_fields() -> None:
    frame = f.RequestStart(RID, "GET", "/a?b=c", [("accept", "*/*")], REPLY, ABORT)
    assert _json(frame) == {
        "type": "request.start",
        "protocol": "tunnel.v1",
        "requestId": RID,
        "method": "GET",
        "url": "/a?b=c",
        "headers": [["accept", "*/*"]],
        "replySubject": REPLY,
        "abortSubject": ABORT,
    }


def test_request_start_optional_fields_are_present_only_when_set() -> None:
    frame = f.RequestStart(RID, "POST", "/", [], REPLY, ABORT, body_subject=BODY, deadline_unix_ms=12345)
    obj = _json(frame)
    assert obj["bodySubject"] == BODY
    assert obj["deadlineUnixMs"] == 12345
    assert "extensions" not in obj
    bare = _json(f.RequestStart(RID, "GET", "/", [], REPLY, ABORT))
    assert "bodySubject" not in bare and "deadlineUnixMs" not in bare


def test_headers_are_name_value_lists_with_repeats_kept_in_order() -> None:
    obj = _json(f.ResponseStart(RID, 200, HEADERS))
    assert obj["headers"] == [list(pair) for pair in HEADERS]
    decoded = codec.decode_frame(codec.encode_frame(f.ResponseStart(RID, 200, HEADERS)), RID)
    assert isinstance(decoded, f.ResponseStart)
    assert decoded.headers == HEADERS
    assert [v for n, v in decoded.headers if n == "set-cookie"] == ["a=1", "b=2"]


def test_non_ascii_header_values_survive_as_utf8_json() -> None:
    value = "caf\u00e9 \u2603 \U0001f600 \u4e2d\u6587"
    payload = codec.encode_frame(f.ResponseStart(RID, 200, [("x-text", value)]))
    payload.decode("utf-8")  # valid UTF-8
    decoded = codec.decode_frame(payload, RID)
    assert isinstance(decoded, f.ResponseStart)
    assert decoded.headers == [("x-text", value)]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", ""),
        (b"a", "YQ"),
        (b"ab", "YWI"),
        (b"abc", "YWJj"),
        (b"\xfb\xff", "-_8"),
        (b"\xfb\xff\xbf", "-_-_"),
    ],
)
def test_chunk_data_is_base64url_without_padding(data: bytes, expected: str) -> None:
    for cls, kind in ((f.RequestChunk, "request.chunk"), (f.ResponseChunk, "response.chunk")):
        assert _json(cls(RID, 4, data)) == {"type": kind, "requestId": RID, "seq": 4, "data": expected}


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        (f.RequestEnd(RID, 3), {"type": "request.end", "requestId": RID, "seq": 3}),
        (f.ResponseEnd(RID, 0), {"type": "response.end", "requestId": RID, "seq": 0}),
        (
            f.RequestError(RID, "c", "m"),
            {"type": "request.error", "requestId": RID, "code": "c", "message": "m"},
        ),
        (
            f.ResponseError(RID, "tunnel_handler_error", "boom"),
            {"type": "response.error", "requestId": RID, "code": "tunnel_handler_error", "message": "boom"},
        ),
        (f.ResponseAck(RID), {"type": "response.ack", "requestId": RID}),
        (
            f.ResponseStart(RID, 404, [], "Not Found"),
            {
                "type": "response.start",
                "requestId": RID,
                "status": 404,
                "statusText": "Not Found",
                "headers": [],
            },
        ),
        (
            f.ResponseStart(RID, 200, []),
            {"type": "response.start", "requestId": RID, "status": 200, "headers": []},
        ),
        (f.Abort(RID), {"type": "abort", "requestId": RID}),
        (f.Abort(RID, "tunnel_timeout"), {"type": "abort", "requestId": RID, "reason": "tunnel_timeout"}),
    ],
    ids=lambda v: getattr(v, "type", "expected"),
)
def test_v1_frames_have_exactly_the_reference_shape(frame: f.Frame, expected: dict[str, Any]) -> None:
    assert _json(frame) == expected


def test_extension_frames_and_fields_use_camel_case_names() -> None:
    assert _json(f.RequestCredit(RID, 10)) == {"type": "request.credit", "requestId": RID, "limit": 10}
    assert _json(f.ResponseCredit(RID, 11)) == {"type": "response.credit", "requestId": RID, "limit": 11}
    assert _json(f.ResponseHeartbeat(RID)) == {"type": "response.heartbeat", "requestId": RID}
    assert _json(f.ResponseHeartbeat(RID, 5)) == {"type": "response.heartbeat", "requestId": RID, "seq": 5}
    assert _json(f.RequestCredit(RID, 10, 2)) == {
        "type": "request.credit",
        "requestId": RID,
        "limit": 10,
        "seq": 2,
    }
    assert _json(f.RequestCredit(RID, 10, probe=True)) == {
        "type": "request.credit",
        "requestId": RID,
        "limit": 10,
        "probe": True,
    }
    assert _json(f.RequestCredit(RID, 10, 2, ended=True)) == {
        "type": "request.credit",
        "requestId": RID,
        "limit": 10,
        "seq": 2,
        "ended": True,
    }
    start = f.RequestStart(
        RID, "GET", "/", [], REPLY, ABORT, extensions=f.StartExtensions(True, 100, 200, 300, whole=True)
    )
    assert _json(start)["extensions"] == {
        "binaryData": True,
        "window": 100,
        "heartbeatMs": 200,
        "maxFrame": 300,
        "wholeResponse": True,
    }
    ack = f.ResponseAck(RID, f.AckExtensions(True, 1, 2, 3, UP))
    assert _json(ack)["extensions"] == {
        "binaryData": True,
        "window": 1,
        "heartbeatMs": 2,
        "maxFrame": 3,
        "upSubject": UP,
    }


# --------------------------------------------------------------------------- decoding reference JSON


def test_decodes_frames_exactly_as_a_reference_peer_writes_them() -> None:
    start = (
        f'{{"type":"request.start","protocol":"tunnel.v1","requestId":"{RID}","method":"POST",'
        f'"url":"/p?x=1","headers":[["a","1"],["a","2"]],"replySubject":"{REPLY}",'
        f'"abortSubject":"{ABORT}","bodySubject":"{BODY}","deadlineUnixMs":1700000000000}}'
    )
    assert codec.decode_frame(start.encode()) == f.RequestStart(
        RID, "POST", "/p?x=1", [("a", "1"), ("a", "2")], REPLY, ABORT, BODY, 1_700_000_000_000, None
    )
    chunk = f'{{"type":"response.chunk","requestId":"{RID}","seq":2,"data":"aGVsbG8"}}'
    assert codec.decode_frame(chunk.encode(), RID) == f.ResponseChunk(RID, 2, b"hello")
    ack = f'{{"type":"response.ack","requestId":"{RID}"}}'
    assert codec.decode_frame(ack.encode(), RID) == f.ResponseAck(RID, None)
    start_resp = f'{{"type":"response.start","requestId":"{RID}","status":200,"headers":[]}}'
    assert codec.decode_frame(start_resp.encode(), RID) == f.ResponseStart(RID, 200, [], None)


def test_padded_base64_from_a_lenient_peer_is_accepted() -> None:
    chunk = f'{{"type":"request.chunk","requestId":"{RID}","seq":0,"data":"YQ=="}}'
    assert codec.decode_frame(chunk.encode(), RID) == f.RequestChunk(RID, 0, b"a")


def test_unknown_extra_fields_are_ignored() -> None:
    obj = _json(f.RequestStart(RID, "GET", "/", [("a", "b")], REPLY, ABORT, extensions=f.StartExtensions()))
    obj["futureField"] = {"nested": [1, 2, 3]}
    obj["extensions"]["compression"] = "zstd"
    obj["extensions"]["window"] = 4096
    decoded = codec.decode_frame(json.dumps(obj).encode(), RID)
    assert isinstance(decoded, f.RequestStart)
    assert decoded.headers == [("a", "b")]
    assert decoded.extensions == f.StartExtensions(binary=True, window=4096)
    for frame in SAMPLES:
        if isinstance(frame, f.ResponseWhole):
            continue
        extra = _json(frame)
        extra["x-unknown"] = "ignored"
        assert codec.decode_frame(json.dumps(extra).encode(), RID) == frame


def test_extensions_parse_and_absent_booleans_mean_off() -> None:
    obj = _json(f.RequestStart(RID, "GET", "/", [], REPLY, ABORT))
    obj["extensions"] = {"window": 10, "heartbeatMs": 20, "maxFrame": 30}
    decoded = codec.decode_frame(json.dumps(obj).encode())
    assert isinstance(decoded, f.RequestStart)
    assert decoded.extensions == f.StartExtensions(
        binary=False, window=10, heartbeat_ms=20, max_frame=30, whole=False
    )
    obj["extensions"] = {}
    decoded = codec.decode_frame(json.dumps(obj).encode())
    assert isinstance(decoded, f.RequestStart)
    assert decoded.extensions == f.StartExtensions(binary=False)
    ack = {"type": "response.ack", "requestId": RID, "extensions": {"binaryData": True, "upSubject": UP}}
    decoded_ack = codec.decode_frame(json.dumps(ack).encode(), RID)
    assert decoded_ack == f.ResponseAck(RID, f.AckExtensions(binary=True, up_subject=UP))


# --------------------------------------------------------------------------- binary frames


def test_binary_chunk_layout_is_magic_kind_seq_then_raw_bytes() -> None:
    assert (
        codec.encode_chunk(f.RequestChunk(RID, 1, b"abc"), True)
        == b"\x00\x01" + (1).to_bytes(8, "big") + b"abc"
    )
    assert codec.encode_chunk(f.ResponseChunk(RID, 2**40, b""), True) == b"\x00\x02" + (2**40).to_bytes(
        8, "big"
    )


def test_binary_frame_takes_its_request_id_from_the_subject() -> None:
    payload = codec.encode_chunk(f.ResponseChunk(RID, 0, b"x"), True)
    assert codec.decode_frame(payload, OTHER_RID) == f.ResponseChunk(OTHER_RID, 0, b"x")


@pytest.mark.parametrize("length", range(1, f.BINARY_HEADER_SIZE))
def test_truncated_binary_frame_is_rejected(length: int) -> None:
    payload = codec.encode_chunk(f.ResponseChunk(RID, 0, b"data"), True)[:length]
    with pytest.raises(f.FrameError):
        codec.decode_frame(payload, RID)


@pytest.mark.parametrize("kind", [0, 6, 9, 0x7B, 0xFF])
def test_unknown_binary_kind_is_rejected(kind: int) -> None:
    with pytest.raises(f.FrameError, match="kind"):
        codec.decode_frame(bytes([0, kind]) + bytes(8) + b"data", RID)


def test_binary_frame_on_a_subject_without_request_id_is_rejected() -> None:
    with pytest.raises(f.FrameError):
        codec.decode_frame(codec.encode_chunk(f.RequestChunk(RID, 0, b"data"), True), None)


def test_binary_seq_beyond_the_safe_integer_range_is_rejected() -> None:
    with pytest.raises(f.FrameError):
        codec.decode_frame(b"\x00\x02" + (2**53).to_bytes(8, "big"), RID)


def _whole(head: bytes, data: bytes = b"") -> bytes:
    return b"\x00\x03" + bytes(8) + struct.pack(">I", len(head)) + head + data


@pytest.mark.parametrize(
    "payload",
    [
        b"\x00\x03" + bytes(8),  # no head length
        b"\x00\x03" + bytes(8) + b"\x00\x00",  # truncated head length
        _whole(b'{"type":"response.start"}')[:-3],  # head longer than the frame
        _whole(b"not json"),
        _whole(b"[1]"),
        _whole(json.dumps({"type": "response.ack", "requestId": RID}).encode()),
        _whole(
            json.dumps(
                {"type": "response.start", "requestId": OTHER_RID, "status": 200, "headers": []}
            ).encode()
        ),
        _whole(
            json.dumps({"type": "response.start", "requestId": RID, "status": 99, "headers": []}).encode()
        ),
        _whole(json.dumps({"type": "response.start", "requestId": RID, "status": 200}).encode()),
    ],
)
def test_malformed_whole_response_frames_are_rejected(payload: bytes) -> None:
    with pytest.raises(f.FrameError):
        codec.decode_frame(payload, RID)


# --------------------------------------------------------------------------- rejection

_DELETE: Any = object()


def _mutated(frame: f.Frame, **changes: Any) -> bytes:
    obj = _json(frame)
    for key, value in changes.items():
        if value is _DELETE:
            obj.pop(key, None)
        else:
            obj[key] = value
    return json.dumps(obj).encode()


_START = f.RequestStart(RID, "GET", "/", [("a", "b")], REPLY, ABORT, extensions=f.StartExtensions())
_CHUNK = f.RequestChunk(RID, 0, b"abc")
_RSTART = f.ResponseStart(RID, 200, [("a", "b")])
_ERROR = f.ResponseError(RID, "tunnel_handler_error", "boom")
_CREDIT = f.RequestCredit(RID, 10)
_ACK = f.ResponseAck(RID, f.AckExtensions(up_subject=UP))

REJECTED: dict[str, bytes] = {
    "empty": b"",
    "invalid json": b"{not json",
    "truncated json": codec.encode_frame(_RSTART)[:-1],
    "invalid utf-8": b'{"type":"abort","requestId":"\xff\xfe"}',
    "json array": b"[]",
    "json number": b"1",
    "json string": b'"abort"',
    "json null": b"null",
    "deeply nested arrays": b"[" * 100_000,
    "deeply nested objects": b'{"a":' * 100_000,
    "deeply nested inside a frame": b'{"type":"abort","requestId":"%s","reason":' % RID.encode()
    + b"[" * 100_000,
    "requestId missing": _mutated(_CHUNK, requestId=_DELETE),
    "requestId empty": _mutated(_CHUNK, requestId=""),
    "requestId with a dot": _mutated(_CHUNK, requestId="a.b"),
    "requestId with a wildcard": _mutated(_CHUNK, requestId="*"),
    "requestId not a string": _mutated(_CHUNK, requestId=12345),
    "requestId too long": _mutated(_CHUNK, requestId="a" * 129),
    "requestId with trailing newline": _mutated(_START, requestId=RID + "\n"),
    "requestId does not match subject": _mutated(_CHUNK, requestId=OTHER_RID),
    "type missing": _mutated(_CHUNK, type=_DELETE),
    "type unknown": _mutated(_CHUNK, type="request.bogus"),
    "type not a string": _mutated(_CHUNK, type=["request.chunk"]),
    "credit ended not a bool": _mutated(f.RequestCredit(RID, 10, 2), ended=1),
    "credit ended without seq": _mutated(_CREDIT, ended=True),
    "credit probe not a bool": _mutated(_CREDIT, probe="yes"),
    "seq missing": _mutated(_CHUNK, seq=_DELETE),
    "seq as string": _mutated(_CHUNK, seq="0"),
    "seq as bool": _mutated(_CHUNK, seq=True),
    "seq negative": _mutated(_CHUNK, seq=-1),
    "seq float": _mutated(_CHUNK, seq=1.5),
    "seq integral float": _mutated(_CHUNK, seq=1.0),
    "seq too large": _mutated(_CHUNK, seq=2**53),
    "end seq as string": _mutated(f.ResponseEnd(RID, 1), seq="1"),
    "data missing": _mutated(_CHUNK, data=_DELETE),
    "data not base64": _mutated(_CHUNK, data="!!!!"),
    "data impossible length": _mutated(_CHUNK, data="abcde"),
    "data non-ascii": _mutated(_CHUNK, data="\u00e9\u00e9\u00e9\u00e9"),
    "data not a string": _mutated(_CHUNK, data=[1, 2]),
    "status below range": _mutated(_RSTART, status=99),
    "status above range": _mutated(_RSTART, status=600),
    "status as string": _mutated(_RSTART, status="200"),
    "status as bool": _mutated(_RSTART, status=True),
    "status float": _mutated(_RSTART, status=200.0),
    "statusText with CRLF": _mutated(_RSTART, statusText="OK\r\nX-Evil: 1"),
    "statusText not a string": _mutated(_RSTART, statusText=200),
    "headers missing": _mutated(_RSTART, headers=_DELETE),
    "headers not a list": _mutated(_RSTART, headers={"a": "b"}),
    "headers a string": _mutated(_RSTART, headers="a: b"),
    "header not a pair": _mutated(_RSTART, headers=[["a"]]),
    "header triple": _mutated(_RSTART, headers=[["a", "b", "c"]]),
    "header value not a string": _mutated(_RSTART, headers=[["a", 1]]),
    "header name with space": _mutated(_RSTART, headers=[["bad name", "v"]]),
    "header name empty": _mutated(_RSTART, headers=[["", "v"]]),
    "header name with colon": _mutated(_RSTART, headers=[["a:b", "v"]]),
    "header name with trailing newline": _mutated(_RSTART, headers=[["x-evil\n", "v"]]),
    "header value with CR": _mutated(_RSTART, headers=[["a", "x\ry"]]),
    "header value with LF": _mutated(_RSTART, headers=[["a", "x\ny"]]),
    "header value with CRLF": _mutated(_RSTART, headers=[["a", "x\r\nX-Evil: 1"]]),
    "header value with NUL": _mutated(_RSTART, headers=[["a", "x\x00y"]]),
    "too many headers": _mutated(_RSTART, headers=[["a", "b"]] * (f.MAX_HEADER_COUNT + 1)),
    "request header value with LF": _mutated(_START, headers=[["a", "x\ny"]]),
    "protocol missing": _mutated(_START, protocol=_DELETE),
    "protocol unknown": _mutated(_START, protocol="tunnel.v2"),
    "method missing": _mutated(_START, method=_DELETE),
    "method with space": _mutated(_START, method="GE T"),
    "method empty": _mutated(_START, method=""),
    "method with trailing newline": _mutated(_START, method="GET\n"),
    "url without slash": _mutated(_START, url="http://evil/"),
    "url with space": _mutated(_START, url="/a b"),
    "url with newline": _mutated(_START, url="/a\nb"),
    "url not a string": _mutated(_START, url=["/"]),
    "replySubject missing": _mutated(_START, replySubject=_DELETE),
    "replySubject not a string": _mutated(_START, replySubject=1),
    "abortSubject missing": _mutated(_START, abortSubject=_DELETE),
    "bodySubject not a string": _mutated(_START, bodySubject=True),
    "deadline as string": _mutated(_START, deadlineUnixMs="1700000000000"),
    "deadline negative": _mutated(_START, deadlineUnixMs=-1),
    "deadline as bool": _mutated(_START, deadlineUnixMs=True),
    "extensions not an object": _mutated(_START, extensions=["binaryData"]),
    "extensions window zero": _mutated(_START, extensions={"window": 0}),
    "extensions window negative": _mutated(_START, extensions={"window": -1}),
    "extensions window as string": _mutated(_START, extensions={"window": "1MiB"}),
    "extensions window huge": _mutated(_START, extensions={"window": 2**64}),
    "extensions heartbeat float": _mutated(_START, extensions={"heartbeatMs": 0.5}),
    "ack extensions not an object": _mutated(_ACK, extensions="yes"),
    "ack upSubject not a string": _mutated(_ACK, extensions={"upSubject": 5}),
    "ack maxFrame zero": _mutated(_ACK, extensions={"maxFrame": 0}),
    "credit zero": _mutated(_CREDIT, limit=0),
    "credit negative": _mutated(_CREDIT, limit=-5),
    "credit as string": _mutated(_CREDIT, limit="10"),
    "credit missing": _mutated(_CREDIT, limit=_DELETE),
    "error code missing": _mutated(_ERROR, code=_DELETE),
    "error code not a string": _mutated(_ERROR, code=500),
    "error message not a string": _mutated(_ERROR, message={"text": "x"}),
    "abort reason not a string": _mutated(f.Abort(RID, "r"), reason=1),
}


@pytest.mark.parametrize("payload", list(REJECTED.values()), ids=list(REJECTED))
def test_malformed_frames_raise_frame_error(payload: bytes) -> None:
    with pytest.raises(f.FrameError) as info:
        codec.decode_frame(payload, RID)
    assert isinstance(info.value, RemoteProtocolError)
    assert info.value.code == ErrorCode.PROTOCOL_ERROR


def test_request_id_with_a_trailing_newline_is_rejected_where_no_subject_id_checks_it() -> None:
    # request.start arrives on P.request: the payload's requestId is all there is.
    with pytest.raises(f.FrameError):
        codec.decode_frame(_mutated(_START, requestId=RID + "\n"), None)


def test_frame_error_names_the_request_when_it_was_readable() -> None:
    with pytest.raises(f.FrameError) as info:
        codec.decode_frame(_mutated(_CHUNK, seq=-1), RID)
    assert info.value.request_id == RID
    with pytest.raises(f.FrameError) as info:
        codec.decode_frame(_mutated(_CHUNK, seq=-1), None)
    assert info.value.request_id == RID


@pytest.mark.parametrize("code", ["bad code with spaces", "tunnel_handler_error\n", "x" * 129, ""])
def test_unknown_error_codes_from_the_network_are_replaced_not_trusted(code: str) -> None:
    decoded = codec.decode_frame(_mutated(_ERROR, code=code), RID)
    assert isinstance(decoded, f.ResponseError)
    assert decoded.code == "tunnel_unknown_error"


def test_long_error_messages_from_the_network_are_truncated() -> None:
    long_message = codec.decode_frame(_mutated(_ERROR, message="x" * 100_000), RID)
    assert isinstance(long_message, f.ResponseError)
    assert len(long_message.message) <= f.MAX_ERROR_MESSAGE_LENGTH


_HOSTILE_VALUES: list[Any] = [
    None,
    True,
    False,
    -1,
    0,
    1.5,
    1e308,
    2**64,
    "",
    "x",
    "\x00",
    "\ud800",
    [],
    [[]],
    [["a", "b", "c"]],
    {},
    {"a": {"b": []}},
]


def _paths(obj: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [path] if path else []
    if isinstance(obj, dict):
        for key, value in obj.items():
            out += _paths(value, (*path, key))
    return out


def _rejected(payload: bytes, subject_id: str | None) -> bool:
    """Decode; True when refused with FrameError. Any other exception fails the calling test."""
    try:
        codec.decode_frame(payload, subject_id)
    except f.FrameError:
        return True
    return False


def test_hostile_field_values_only_ever_raise_frame_error() -> None:
    """Every field of every JSON frame replaced by every kind of wrong value: FrameError or a frame."""
    attempts = rejections = 0
    for frame in SAMPLES:
        if isinstance(frame, f.ResponseWhole):
            continue
        base = _json(frame)
        for path in _paths(base):
            for value in _HOSTILE_VALUES:
                obj = json.loads(json.dumps(base))
                target = obj
                for key in path[:-1]:
                    target = target[key]
                target[path[-1]] = value
                payload = json.dumps(obj).encode()
                for subject_id in (None, RID):
                    attempts += 1
                    rejections += _rejected(payload, subject_id)
    assert attempts > 1000
    assert rejections > attempts // 2


def test_truncated_and_corrupted_payloads_only_ever_raise_frame_error() -> None:
    rng = random.Random(20240601)
    for frame in SAMPLES:
        for binary in (False, True):
            payload = codec.encode_frame(frame, binary)
            for end in range(len(payload)):
                _rejected(payload[:end], RID)
            assert _rejected(b"", RID)
            for _ in range(40):
                corrupted = bytearray(payload)
                for _ in range(rng.randint(1, 4)):
                    corrupted[rng.randrange(len(corrupted))] = rng.randrange(256)
                _rejected(bytes(corrupted), RID)


# --------------------------------------------------------------------------- local validation and sizing


def test_header_validation_for_local_use_raises_local_protocol_error() -> None:
    assert f.validate_headers([("a", "1"), ("a", "2")]) == [("a", "1"), ("a", "2")]
    for bad in ([("a b", "v")], [("a\n", "v")], [("a", "x\r\n")], [("a",)], "a: b", [("a", None)]):
        with pytest.raises(LocalProtocolError):
            f.validate_headers(bad)


def test_header_values_that_cannot_be_utf8_encoded_are_rejected_up_front() -> None:
    # A lone surrogate passes a str check but cannot go on the wire: it must be a
    # LocalProtocolError when validated, not a UnicodeEncodeError later in encode_frame.
    with pytest.raises(LocalProtocolError):
        f.validate_headers([("x-a", "\ud800")])


def test_method_and_url_validation() -> None:
    assert f.validate_method("get") == "GET"
    assert f.validate_url("/a/b?c=d") == "/a/b?c=d"
    for method in ("", "GE T", "GET\r\n", "GET\n", "X" * 33):
        with pytest.raises(LocalProtocolError):
            f.validate_method(method)
    for url in ("", "a", "/a b", "/\x7f", "/a\tb"):
        with pytest.raises(LocalProtocolError):
            f.validate_url(url)


@pytest.mark.parametrize("max_payload", [256, 1024, 65536, 1 << 20])
@pytest.mark.parametrize("request_id_length", [32, 128])
def test_largest_chunk_fits_max_payload_in_both_encodings(max_payload: int, request_id_length: int) -> None:
    rid = "a" * request_id_length
    for binary in (False, True):
        n = codec.max_chunk_data(max_payload, binary, request_id_length)
        assert n > 0
        for cls in (f.RequestChunk, f.ResponseChunk):
            payload = codec.encode_chunk(cls(rid, f.MAX_SAFE_INT, b"\xff" * n), binary)
            assert len(payload) <= max_payload
    # Binary frames waste nothing but their 10-byte header.
    assert codec.max_chunk_data(max_payload, True, request_id_length) == max_payload - f.BINARY_HEADER_SIZE


@pytest.mark.parametrize("seq", [-1, f.MAX_SAFE_INT + 1, "3", 1.5, True, [1]], ids=repr)
@pytest.mark.parametrize("kind", ["response.heartbeat", "request.credit"])
def test_an_invalid_optional_seq_is_a_frame_error(kind: str, seq: object) -> None:
    obj: dict[str, Any] = {"type": kind, "requestId": RID, "seq": seq}
    if kind == "request.credit":
        obj["limit"] = 10
    with pytest.raises(f.FrameError, match="seq"):
        codec.decode_frame(json.dumps(obj).encode())


def test_a_heartbeat_or_credit_without_seq_decodes_with_none() -> None:
    """Older extended peers send no seq: nothing is checked then."""
    heartbeat = codec.decode_frame(b'{"type":"response.heartbeat","requestId":"%s"}' % RID.encode())
    credit = codec.decode_frame(b'{"type":"request.credit","requestId":"%s","limit":5}' % RID.encode())
    assert heartbeat == f.ResponseHeartbeat(RID) and heartbeat.seq is None
    assert credit == f.RequestCredit(RID, 5) and credit.seq is None


@pytest.mark.parametrize(
    ("headers", "status_text", "data"),
    [
        ([], None, b""),
        ([("content-type", "text/plain"), ("x-é", "ünï")], "OK", b"hello"),
        ([("a", "b")], None, memoryview(b"\x00\xff" * 50)),
    ],
)
def test_encode_whole_is_byte_identical_to_encoding_the_frame(
    headers: f.Headers, status_text: str | None, data: bytes | memoryview
) -> None:
    """The hot-path encoder must never drift from the frame encoder (goldens pin the latter)."""
    rid = "r" * 32
    frame = f.ResponseWhole(rid, f.ResponseStart(rid, 200, headers, status_text), bytes(data))
    assert codec.encode_whole(rid, 200, headers, status_text, data) == codec.encode_frame(frame)
