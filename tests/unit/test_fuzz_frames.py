"""Hostile input to the frame decoder, property-based (hypothesis).

The promise (DESIGN.md property 9, docs/protocol.md section 2): every frame from the network
is validated; ``decode_frame`` returns a frame or raises ``FrameError`` -- never a KeyError,
TypeError, RecursionError, UnicodeError or any other exception -- and its time and memory
stay proportional to the payload, which NATS caps (``max_payload``).

Hypothesis generates the inputs and shrinks any failure to a minimal payload, which beats
hand-written fuzz loops: raw bytes, binary frames with every kind and length field, JSON
text, and structured JSON objects that mix plausible fields (right names, near-valid values)
with implausible ones (wrong types, huge numbers, control characters, deep nesting).

A decoded frame must also be *sound*: the request id is the one the subject gave, header
names are tokens and values carry no CR/LF/NUL, numbers are in range, and encoding it again
gives bytes that decode to the same frame.
"""

from __future__ import annotations

import dataclasses
import json
import re
import struct
import time
import tracemalloc
from collections.abc import Callable
from typing import Any, Final

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from tunnel import _codec as codec
from tunnel import _frames as f
from tunnel._errors import TunnelError

RID: Final = "0123456789abcdef0123456789abcdef"
# Payloads generated per example stay small so hundreds of examples run in a second or two;
# the size-proportionality checks below use large hand-made payloads instead.
MAX_FUZZ_BYTES: Final = 2048
FRAME_TYPES: Final = (
    "request.start",
    "request.chunk",
    "request.end",
    "request.error",
    "request.credit",
    "response.ack",
    "response.start",
    "response.chunk",
    "response.end",
    "response.error",
    "response.credit",
    "response.heartbeat",
    "abort",
)
_TOKEN_RE: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# The credit frames' one number (its wire name and attribute are the same word).
CREDIT_FIELD: Final = next(
    fl.name for fl in dataclasses.fields(f.RequestCredit) if fl.name not in ("request_id", "type")
)
_SUBJECT_IDS: Final = st.one_of(st.none(), st.just(RID), st.from_regex(r"[A-Za-z0-9_-]{1,8}", fullmatch=True))


def decode_or_frame_error(payload: bytes, subject_request_id: str | None) -> f.Frame | None:
    """The property itself: a frame, or FrameError (None); anything else propagates and fails."""
    try:
        frame = codec.decode_frame(payload, subject_request_id)
    except f.FrameError as exc:
        assert isinstance(exc, TunnelError) and exc.code == "tunnel_protocol_error"
        assert exc.request_id is None or isinstance(exc.request_id, str)
        return None
    assert_sound(frame, subject_request_id)
    return frame


def assert_sound(frame: f.Frame, subject_request_id: str | None) -> None:
    """What a successfully decoded frame guarantees to the code that uses it."""
    if subject_request_id is not None:
        assert frame.request_id == subject_request_id
    assert isinstance(frame.request_id, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,128}", frame.request_id)
    if isinstance(frame, f.RequestStart):
        assert re.fullmatch(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,32}", frame.method)
        assert frame.url.startswith("/") and not re.search("[\x00-\x20\x7f]", frame.url)
        _assert_headers(frame.headers)
        for subject in (frame.reply_subject, frame.abort_subject, frame.body_subject):
            assert subject is None or isinstance(subject, str)
        assert frame.deadline_unix_ms is None or 0 <= frame.deadline_unix_ms <= f.MAX_SAFE_INT
    if isinstance(frame, f.ResponseStart | f.ResponseWhole):
        start = frame.start if isinstance(frame, f.ResponseWhole) else frame
        assert 100 <= start.status <= 599
        _assert_headers(start.headers)
        assert start.status_text is None or not re.search("[\r\n\x00]", start.status_text)
        assert start.request_id == frame.request_id
    if isinstance(frame, f.RequestChunk | f.ResponseChunk | f.RequestEnd | f.ResponseEnd):
        assert 0 <= frame.seq <= f.MAX_SAFE_INT
    if isinstance(frame, f.RequestChunk | f.ResponseChunk | f.ResponseWhole):
        assert isinstance(frame.data, bytes)
    if isinstance(frame, f.RequestCredit | f.ResponseCredit):
        assert 0 < credit_amount(frame) <= f.MAX_SAFE_INT
    if isinstance(frame, f.RequestError | f.ResponseError):
        assert re.fullmatch(r"[A-Za-z0-9_.:-]+", frame.code) and len(frame.code) <= f.MAX_ERROR_CODE_LENGTH
        assert len(frame.message) <= f.MAX_ERROR_MESSAGE_LENGTH
    for ext in (getattr(frame, "extensions", None),):
        if ext is not None:
            for value in (ext.window, ext.heartbeat_ms, ext.max_frame):
                assert value is None or 0 < value <= f.MAX_SAFE_INT


def credit_amount(frame: f.RequestCredit | f.ResponseCredit) -> int:
    """The number a credit frame carries, whatever its field is called."""
    value = getattr(frame, CREDIT_FIELD)
    assert isinstance(value, int)
    return value


def _assert_headers(headers: f.Headers) -> None:
    assert len(headers) <= f.MAX_HEADER_COUNT
    for name, value in headers:
        assert _TOKEN_RE.fullmatch(name) and len(name) <= f.MAX_HEADER_NAME_LENGTH
        assert not re.search("[\r\n\x00]", value) and len(value) <= f.MAX_HEADER_VALUE_LENGTH


def assert_round_trips(frame: f.Frame) -> None:
    """Encoding a decoded frame and decoding it again gives the same frame (both encodings)."""
    for binary in (False, True):
        payload = codec.encode_frame(frame, binary=binary)
        rid = frame.request_id if payload[:1] == b"\x00" else None
        assert codec.decode_frame(payload, rid) == frame


# --------------------------------------------------------------------------- raw bytes


@given(payload=st.binary(max_size=MAX_FUZZ_BYTES), subject_request_id=_SUBJECT_IDS)
@example(payload=b"", subject_request_id=None)
@example(payload=b"\x00", subject_request_id=RID)
@example(payload=b"\xff\xfe{", subject_request_id=None)
@example(payload=b"{" + b'"a":' * 200, subject_request_id=None)
def test_any_bytes_decode_to_a_frame_or_frame_error(payload: bytes, subject_request_id: str | None) -> None:
    decode_or_frame_error(payload, subject_request_id)


@given(text=st.text(max_size=MAX_FUZZ_BYTES // 4), subject_request_id=_SUBJECT_IDS)
def test_any_text_decodes_to_a_frame_or_frame_error(text: str, subject_request_id: str | None) -> None:
    decode_or_frame_error(text.encode("utf-8", "surrogatepass"), subject_request_id)


# --------------------------------------------------------------------------- binary frames


def _u64(value: int) -> bytes:
    return struct.pack(">Q", value)


SEQS: Final = st.one_of(
    st.sampled_from([0, 1, f.MAX_SAFE_INT, f.MAX_SAFE_INT + 1, 2**63, 2**64 - 1]),
    st.integers(0, 2**64 - 1),
)


@st.composite
def binary_frames(draw: st.DrawFn) -> bytes:
    """``0x00 kind seq:u64be rest``, every kind byte, truncated headers, and whole-frame heads."""
    kind = draw(st.one_of(st.sampled_from([1, 2, 3, 3]), st.integers(0, 255)))
    header = bytes([0, kind]) + _u64(draw(SEQS))
    header = header[: draw(st.integers(0, len(header)))] if draw(st.booleans()) and kind != 3 else header
    if kind != 3:
        return header + draw(st.binary(max_size=256))
    head = draw(st.one_of(json_bytes(json_frames(force_type="response.start")), st.binary(max_size=64)))
    true_length = len(head)
    if draw(st.integers(0, 3)):
        head_length = true_length  # mostly honest, so the head's own validation is reached
    else:
        head_length = draw(
            st.one_of(st.sampled_from([0, true_length + 1, 2**32 - 1]), st.integers(0, 2**32 - 1))
        )
    length_field = struct.pack(">I", head_length)
    if draw(st.integers(0, 7)) == 0:
        length_field = length_field[: draw(st.integers(0, 3))]  # truncated
    return header + length_field + head + draw(st.binary(max_size=128))


@given(payload=binary_frames(), subject_request_id=_SUBJECT_IDS)
def test_binary_frames_of_any_kind_and_length_decode_or_raise_frame_error(
    payload: bytes, subject_request_id: str | None
) -> None:
    frame = decode_or_frame_error(payload, subject_request_id)
    if frame is None:
        return
    assert subject_request_id is not None, "a binary frame needs the request id from its subject"
    if isinstance(frame, f.RequestChunk | f.ResponseChunk):
        assert frame.data == payload[f.BINARY_HEADER_SIZE :]  # raw bytes, untouched
    assert_round_trips(frame)


def test_whole_frame_claiming_a_4_gib_head_is_rejected_without_allocating_it() -> None:
    payload = bytes([0, 3]) + _u64(0) + struct.pack(">I", 2**32 - 1) + b"{}"
    tracemalloc.start()
    try:
        with pytest.raises(f.FrameError):
            codec.decode_frame(payload, RID)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024


# --------------------------------------------------------------------------- structured JSON


JSON_SCALARS: Final = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
)
JSON_VALUES: Final = st.recursive(
    JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
# Text with the characters that matter to the validators: controls, CR/LF/NUL, spaces, surrogates.
NASTY_TEXT: Final = st.text(
    alphabet=st.one_of(
        st.sampled_from("\r\n\x00\t \x7f/.:%\\\"'{}[]"),
        st.characters(codec="utf-8"),
        st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
    ),
    max_size=40,
)
TOKENS: Final = st.from_regex(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,20}", fullmatch=True)
REQUEST_IDS: Final = st.one_of(
    st.just(RID),
    st.from_regex(r"[A-Za-z0-9_-]{1,128}", fullmatch=True),
    st.text(max_size=140),
    st.integers(),
    st.none(),
)


def _header_pairs() -> st.SearchStrategy[Any]:
    plausible = st.tuples(TOKENS, st.text(max_size=30)).map(list)
    implausible = st.tuples(st.one_of(NASTY_TEXT, TOKENS), st.one_of(NASTY_TEXT, JSON_SCALARS)).map(list)
    pair = st.one_of(plausible, plausible, implausible, JSON_VALUES)
    return st.one_of(st.lists(pair, max_size=6), JSON_VALUES)


def _extensions() -> st.SearchStrategy[Any]:
    number = st.one_of(st.integers(-5, 2**54), JSON_SCALARS)
    plausible = st.fixed_dictionaries(
        {},
        optional={
            "binaryData": st.one_of(st.booleans(), JSON_SCALARS),
            "window": number,
            "heartbeatMs": number,
            "maxFrame": number,
            "wholeResponse": st.one_of(st.booleans(), JSON_SCALARS),
            "upSubject": st.one_of(st.text(max_size=60), JSON_SCALARS),
        },
    )
    return st.one_of(plausible, plausible, JSON_VALUES)


SUBJECTS: Final = st.one_of(
    st.just(f"_tunnel.v1.host.ZGVzaw.req.{RID}.reply"),
    st.text(max_size=60),
    JSON_SCALARS,
)
# Each field: mostly plausible values, sometimes anything at all.
FIELDS: Final[dict[str, st.SearchStrategy[Any]]] = {
    "protocol": st.one_of(st.just("tunnel.v1"), st.just("tunnel.v1"), JSON_SCALARS),
    "method": st.one_of(st.sampled_from(["GET", "POST", "HEAD", "get", "PATCH"]), NASTY_TEXT, JSON_SCALARS),
    "url": st.one_of(st.just("/"), st.text(max_size=40).map(lambda t: "/" + t), NASTY_TEXT, JSON_SCALARS),
    "headers": _header_pairs(),
    "replySubject": SUBJECTS,
    "abortSubject": SUBJECTS,
    "bodySubject": SUBJECTS,
    "deadlineUnixMs": st.one_of(st.integers(-1, 2**60), JSON_SCALARS),
    "extensions": _extensions(),
    "seq": st.one_of(st.integers(-2, 2**54), st.sampled_from([0, 1, f.MAX_SAFE_INT]), JSON_SCALARS),
    "data": st.one_of(
        st.binary(max_size=64).map(codec.b64url_encode),
        st.binary(max_size=64).map(lambda b: codec.b64url_encode(b) + "=="),
        st.text(alphabet="ABCDxyz-_+/=\n ", max_size=20),
        JSON_SCALARS,
    ),
    "status": st.one_of(st.integers(0, 1000), st.sampled_from([100, 200, 599, 600]), JSON_SCALARS),
    "statusText": st.one_of(st.text(max_size=30), NASTY_TEXT, JSON_SCALARS),
    "code": st.one_of(
        st.sampled_from(["tunnel_handler_error", "x" * 200, "bad code"]), NASTY_TEXT, JSON_SCALARS
    ),
    "message": st.one_of(st.text(max_size=60), JSON_SCALARS),
    "reason": st.one_of(st.text(max_size=60), JSON_SCALARS),
    CREDIT_FIELD: st.one_of(st.integers(-2, 2**54), JSON_SCALARS),
}


# Values a correct peer would send, per field, so that most generated frames get past the
# first check and the deeper validators are exercised too.
VALID_FIELDS: Final[dict[str, st.SearchStrategy[Any]]] = {
    "protocol": st.just("tunnel.v1"),
    "method": st.from_regex(r"[A-Za-z]{1,10}", fullmatch=True),
    "url": st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30).map(lambda t: "/" + t),
    "headers": st.lists(
        st.tuples(TOKENS, st.text(st.characters(codec="ascii", min_codepoint=0x20), max_size=20)).map(list),
        max_size=4,
    ),
    "replySubject": st.just(f"_tunnel.v1.host.ZGVzaw.req.{RID}.reply"),
    "abortSubject": st.just(f"_tunnel.v1.host.ZGVzaw.req.{RID}.abort"),
    "bodySubject": st.just(f"_tunnel.v1.host.ZGVzaw.req.{RID}.body"),
    "deadlineUnixMs": st.integers(0, f.MAX_SAFE_INT),
    "extensions": st.fixed_dictionaries(
        {"binaryData": st.booleans()},
        optional={
            "window": st.integers(1, 2**30),
            "heartbeatMs": st.integers(1, 10**5),
            "maxFrame": st.integers(1, 2**24),
        },
    ),
    "seq": st.integers(0, f.MAX_SAFE_INT),
    "data": st.binary(max_size=64).map(codec.b64url_encode),
    "status": st.integers(100, 599),
    "statusText": st.text(st.characters(codec="ascii", min_codepoint=0x20), max_size=20),
    "code": st.from_regex(r"[A-Za-z0-9_.:-]{1,20}", fullmatch=True),
    "message": st.text(max_size=40),
    "reason": st.text(max_size=40),
    CREDIT_FIELD: st.integers(1, f.MAX_SAFE_INT),
}
_START: Final = ("protocol", "method", "url", "headers", "replySubject", "abortSubject")
# Fields each frame type needs, then fields it may carry.
FIELDS_OF: Final[dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "request.start": (_START, ("bodySubject", "deadlineUnixMs", "extensions")),
    "request.chunk": (("seq", "data"), ()),
    "response.chunk": (("seq", "data"), ()),
    "request.end": (("seq",), ()),
    "response.end": (("seq",), ()),
    "request.error": (("code",), ("message",)),
    "response.error": (("code",), ("message",)),
    "request.credit": ((CREDIT_FIELD,), ()),
    "response.credit": ((CREDIT_FIELD,), ()),
    "response.ack": ((), ("extensions",)),
    "response.start": (("status", "headers"), ("statusText", "extensions")),
    "response.heartbeat": ((), ()),
    "abort": ((), ("reason",)),
}


@st.composite
def json_frames(draw: st.DrawFn, force_type: str | None = None) -> Any:
    """A JSON frame object: its type's fields, each usually valid, sometimes wrong or missing; junk.

    Roughly one field in ten is omitted and one in ten replaced by anything at all, so both the
    happy path and every single-field failure of every frame type are reached.
    """
    if draw(st.integers(0, 19)) == 0:
        return draw(JSON_VALUES)  # not even an object
    kind = force_type or draw(st.sampled_from(FRAME_TYPES))
    obj: dict[str, Any] = {"type": kind if draw(st.integers(0, 19)) else draw(JSON_SCALARS)}
    choice = draw(st.integers(0, 19))
    if choice:
        obj["requestId"] = RID if choice > 2 else draw(REQUEST_IDS)
    required, optional = FIELDS_OF[kind]
    for name in required + tuple(draw(st.lists(st.sampled_from(optional), unique=True)) if optional else ()):
        roll = draw(st.integers(0, 9))
        if roll == 0:
            continue
        obj[name] = draw(FIELDS[name] if roll == 1 else VALID_FIELDS[name])
    if draw(st.integers(0, 4)) == 0:
        for name in draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=3, unique=True)):
            obj[name] = draw(FIELDS[name])  # fields of other frame types
    obj.update(draw(st.dictionaries(st.text(max_size=10), JSON_VALUES, max_size=2)))  # open world
    return obj


@st.composite
def json_bytes(draw: st.DrawFn, objects: st.SearchStrategy[Any]) -> bytes:
    obj = draw(objects)
    text = json.dumps(obj, ensure_ascii=draw(st.booleans()))
    # surrogatepass: a lone surrogate becomes bytes that are not valid UTF-8, as a hostile peer may send.
    return text.encode("utf-8", "surrogatepass")


@given(payload=json_bytes(json_frames()), subject_request_id=st.one_of(st.none(), st.just(RID)))
def test_structured_json_frames_decode_soundly_or_raise_frame_error(
    payload: bytes, subject_request_id: str | None
) -> None:
    frame = decode_or_frame_error(payload, subject_request_id)
    if frame is not None:
        assert_round_trips(frame)


@st.composite
def valid_starts(draw: st.DrawFn) -> bytes:
    """Plausible request.start frames, so the field validators themselves get exercised."""
    obj = {
        "type": "request.start",
        "protocol": "tunnel.v1",
        "requestId": RID,
        "method": draw(st.one_of(TOKENS, NASTY_TEXT)),
        "url": "/" + draw(st.one_of(st.text(max_size=30), NASTY_TEXT)),
        "headers": draw(_header_pairs()),
        "replySubject": f"_tunnel.v1.host.ZGVzaw.req.{RID}.reply",
        "abortSubject": f"_tunnel.v1.host.ZGVzaw.req.{RID}.abort",
    }
    for name in draw(st.lists(st.sampled_from(["bodySubject", "deadlineUnixMs", "extensions"]), unique=True)):
        obj[name] = draw(FIELDS[name])
    return json.dumps(obj, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")


@given(payload=valid_starts())
def test_near_valid_request_starts_decode_soundly_or_raise_frame_error(payload: bytes) -> None:
    frame = decode_or_frame_error(payload, None)
    if frame is not None:
        assert isinstance(frame, f.RequestStart)
        assert_round_trips(frame)


@given(payload=json_bytes(json_frames()), other=st.from_regex(r"[A-Za-z0-9_-]{1,16}", fullmatch=True))
def test_a_frame_claiming_another_request_than_its_subject_is_refused(payload: bytes, other: str) -> None:
    assume(other != RID)
    frame = decode_or_frame_error(payload, other)
    assert frame is None or frame.request_id == other


# --------------------------------------------------------------------------- encoder round trip

HEADER_LISTS: Final = st.lists(
    st.tuples(TOKENS, st.text(max_size=20).filter(lambda v: not re.search("[\r\n\x00\ud800-\udfff]", v))),
    max_size=4,
)


@st.composite
def valid_frames(draw: st.DrawFn) -> f.Frame:
    rid = draw(st.from_regex(r"[A-Za-z0-9_-]{1,40}", fullmatch=True))
    seq = draw(st.integers(0, f.MAX_SAFE_INT))
    data = draw(st.binary(max_size=100))
    text = draw(st.text(max_size=30))
    start = f.ResponseStart(rid, draw(st.integers(100, 599)), draw(HEADER_LISTS), None)
    candidates: list[f.Frame] = [
        f.RequestChunk(rid, seq, data),
        f.ResponseChunk(rid, seq, data),
        f.RequestEnd(rid, seq),
        f.ResponseEnd(rid, seq),
        f.RequestCredit(rid, max(1, seq)),
        f.ResponseCredit(rid, max(1, seq)),
        f.ResponseHeartbeat(rid),
        f.Abort(rid, text[:100] or None),
        f.ResponseError(rid, "tunnel_handler_error", text),
        f.ResponseAck(rid, f.AckExtensions(True, 1024, 100, 2048, f"x.req.{rid}.up.s")),
        start,
        f.ResponseWhole(rid, start, data),
        f.ResponseWhole(
            rid,
            dataclasses.replace(start, status_text=draw(st.sampled_from([None, "", "OK", "caf\u00e9"]))),
            data,
            draw(st.sampled_from([None, f.Checksum("crc32c", 0), f.Checksum("crc32", 2**32 - 1)])),
            compact_head=True,
            binary_start=draw(st.booleans()),
        ),
    ]
    return draw(st.sampled_from(candidates))


@given(frame=valid_frames())
def test_every_valid_frame_survives_encode_then_decode(frame: f.Frame) -> None:
    assert_round_trips(frame)


# --------------------------------------------------------------------------- compact frames

HOST_BASE: Final = "tunnel.v1.host.ZGVzaw"
COMPACT_REPLY: Final = f"{HOST_BASE}.req.{RID}.reply.c1"
_COMPACT_FIELD: Final = st.one_of(TOKENS, NASTY_TEXT, st.text(max_size=20))


@st.composite
def compact_starts(draw: st.DrawFn) -> bytes:
    """Near-valid compact starts: plausible fields mixed with NULs, controls, bad JSON, odd
    header counts, every flag and deadline, truncation."""
    fields = [
        draw(st.one_of(st.just(RID), REQUEST_IDS.map(str))),
        draw(st.one_of(st.sampled_from(["GET", "POST"]), _COMPACT_FIELD)),
        draw(st.one_of(st.just("/"), st.text(max_size=30).map(lambda t: "/" + t), _COMPACT_FIELD)),
        draw(st.one_of(_extensions().map(json.dumps), st.text(max_size=30))),
        *draw(st.lists(st.one_of(TOKENS, _COMPACT_FIELD), max_size=7)),
    ]
    tail = "".join(x + "\x00" for x in fields).encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 5)) == 0:
        tail = tail[: draw(st.integers(0, len(tail)))]
    flags = draw(st.one_of(st.sampled_from([0, 1, 2, 3]), st.integers(0, 255)))
    deadline = draw(st.one_of(st.just(0), SEQS))
    head = bytes([0, 4, flags]) + _u64(deadline)
    return head[: draw(st.integers(0, len(head)))] + tail if draw(st.integers(0, 9)) == 0 else head + tail


@given(payload=st.one_of(compact_starts(), st.binary(max_size=256).map(lambda b: b"\x00\x04" + b)))
def test_compact_starts_decode_soundly_or_raise_frame_error(payload: bytes) -> None:
    try:
        frame = codec.decode_compact_start(payload, COMPACT_REPLY, HOST_BASE)
    except f.FrameError as exc:
        assert exc.code == "tunnel_protocol_error"
        return
    assert_sound(frame, None)
    assert frame.extensions is not None
    assert frame.reply_subject == COMPACT_REPLY
    assert frame.abort_subject == f"{HOST_BASE}.req.{frame.request_id}.abort"
    assert frame.body_subject in (None, f"{HOST_BASE}.req.{frame.request_id}.body")
    # What it says survives a JSON start and back (the fallback carries the same request).
    assert codec.decode_frame(codec.encode_frame(frame)) == frame


@given(
    method=TOKENS,
    url=st.text(max_size=30).filter(lambda t: not re.search("[\x00-\x20\x7f\ud800-\udfff]", t)),
    headers=HEADER_LISTS,
    has_body=st.booleans(),
    deadline=st.one_of(st.none(), st.integers(0, f.MAX_SAFE_INT)),
)
def test_every_valid_compact_start_survives_encode_then_decode(
    method: str, url: str, headers: f.Headers, has_body: bool, deadline: int | None
) -> None:
    ext = f.StartExtensions(window=1024, whole=True, binary_head=True)
    payload = codec.encode_compact_start(
        RID, method, "/" + url, headers, has_body, deadline, codec.extensions_json(ext)
    )
    frame = codec.decode_compact_start(payload, COMPACT_REPLY, HOST_BASE)
    assert (frame.method, frame.url, frame.headers) == (method, "/" + url, headers)
    assert frame.body_subject is not None if has_body else frame.body_subject is None
    assert (frame.deadline_unix_ms, frame.extensions) == (deadline, ext)


@st.composite
def compact_wholes(draw: st.DrawFn) -> bytes:
    """Compact response.whole frames: every flag, status, checksum and head length."""
    fields = draw(st.lists(st.one_of(TOKENS, _COMPACT_FIELD), max_size=7))
    head = "".join(x + "\x00" for x in fields).encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 5)) == 0:
        head = head[: draw(st.integers(0, len(head)))]
    length = len(head) if draw(st.integers(0, 3)) else draw(st.integers(0, 2**32 - 1))
    prefix = struct.pack(
        ">BBBHII",
        0,
        5,
        draw(st.one_of(st.sampled_from([0, 1, 4, 8, 13]), st.integers(0, 255))),
        draw(st.one_of(st.integers(100, 599), st.integers(0, 2**16 - 1))),
        draw(st.one_of(st.just(0), st.integers(0, 2**32 - 1))),
        length,
    )
    if draw(st.integers(0, 9)) == 0:
        prefix = prefix[: draw(st.integers(0, len(prefix)))]
    return prefix + head + draw(st.binary(max_size=64))


@given(payload=compact_wholes())
def test_compact_wholes_decode_soundly_or_raise_frame_error(payload: bytes) -> None:
    frame = decode_or_frame_error(payload, RID)
    if frame is not None:
        assert isinstance(frame, f.ResponseWhole) and frame.compact_head
        assert_round_trips(frame)


# --------------------------------------------------------------------------- size and time bounds

ONE_MIB: Final = 1024 * 1024
# What one hostile 1 MiB payload (the NATS default max_payload) may cost to reject. The worst
# (many tiny JSON objects) takes ~0.4 s here under tracemalloc, which multiplies allocation costs:
# 2 s left a slower, loaded machine ~5x. A superlinear decoder would take minutes on 1 MiB.
MAX_DECODE_SECONDS: Final = 5.0
# JSON parsing builds Python objects before validation can refuse them: the cost is linear in
# the payload, and this bounds the constant (measured worst case here: tiny objects, ~25x).
MAX_PEAK_MEMORY_FACTOR: Final = 64


def _pathological_payloads() -> dict[str, bytes]:
    deep = b'{"type":"abort","requestId":"' + RID.encode() + b'","reason":' + b"[" * ONE_MIB
    many_headers = [["x", "y"]] * (ONE_MIB // 12)
    return {
        "deep-nesting": deep,
        "deep-nesting-bare": b"[" * ONE_MIB,
        "many-tiny-objects": b"[" + b"{}," * (ONE_MIB // 3 - 1) + b"{}]",
        "many-headers": json.dumps(
            {"type": "response.start", "requestId": RID, "status": 200, "headers": many_headers}
        ).encode(),
        "huge-header-value": json.dumps(
            {"type": "response.start", "requestId": RID, "status": 200, "headers": [["x", "v" * ONE_MIB]]}
        ).encode(),
        "huge-integer": b'{"type":"request.end","requestId":"'
        + RID.encode()
        + b'","seq":'
        + b"9" * ONE_MIB
        + b"}",
        "huge-base64": json.dumps(
            {"type": "response.chunk", "requestId": RID, "seq": 0, "data": "A" * ONE_MIB + "="}
        ).encode(),
        "whole-with-huge-head": bytes([0, 3]) + _u64(0) + struct.pack(">I", ONE_MIB) + b"[" * ONE_MIB,
        "invalid-utf8": b'{"type":"abort","requestId":"' + b"\xff" * ONE_MIB + b'"}',
        "compact-whole-many-headers": struct.pack(">BBBHII", 0, 5, 0, 200, 0, ONE_MIB)
        + b"x\x00" * (ONE_MIB // 2),
        "compact-whole-huge-value": struct.pack(">BBBHII", 0, 5, 0, 200, 0, ONE_MIB + 3)
        + b"x\x00"
        + b"v" * ONE_MIB
        + b"\x00",
        "compact-whole-all-nul": struct.pack(">BBBHII", 0, 5, 4, 200, 0, ONE_MIB) + b"\x00" * ONE_MIB,
    }


@pytest.mark.parametrize("name", sorted(_pathological_payloads()))
def test_pathological_megabyte_payloads_are_refused_quickly_and_within_bounded_memory(name: str) -> None:
    payload = _pathological_payloads()[name]
    assert_cheap(
        name, payload, lambda: decode_or_frame_error(payload, RID if payload[:1] == b"\x00" else None)
    )


def assert_cheap(name: str, payload: bytes, decode: Callable[[], object]) -> None:
    """``decode`` of ``payload`` takes little time and memory proportional to the payload."""
    tracemalloc.start()
    began = time.perf_counter()
    try:
        decode()
        took = time.perf_counter() - began
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert took < MAX_DECODE_SECONDS, f"{name}: {took:.2f} s"
    assert peak < MAX_PEAK_MEMORY_FACTOR * len(payload), f"{name}: peak {peak / ONE_MIB:.1f} MiB"


def _pathological_compact_starts() -> dict[str, bytes]:
    head = struct.pack(">BBBQ", 0, 4, 0, 0) + f"{RID}\x00GET\x00/\x00{{}}\x00".encode()
    return {
        "all-nul": head + b"\x00" * ONE_MIB,
        "many-headers": head + b"x\x00y\x00" * (ONE_MIB // 4),
        "huge-value": head + b"x\x00" + b"v" * ONE_MIB + b"\x00",
        "huge-url": struct.pack(">BBBQ", 0, 4, 0, 0) + f"{RID}\x00GET\x00/".encode() + b"u" * ONE_MIB,
    }


@pytest.mark.parametrize("name", sorted(_pathological_compact_starts()))
def test_pathological_megabyte_compact_starts_are_refused_quickly_and_within_bounded_memory(
    name: str,
) -> None:
    payload = _pathological_compact_starts()[name]

    def decode() -> None:
        with pytest.raises(f.FrameError):
            codec.decode_compact_start(payload, COMPACT_REPLY, HOST_BASE)

    assert_cheap(name, payload, decode)


# The character checks' fast paths (string methods for ASCII text) must agree with the regexes.
_CHECK_TEXT = st.text(
    alphabet=st.one_of(
        st.characters(max_codepoint=0x7F),
        st.sampled_from(["\u00a0", "\u2028", "\u200b", "\ud800", "\udfff", "é", "\x85"]),
    ),
    max_size=40,
)


@given(_CHECK_TEXT)
@example("")
@example("/a b")
@example("/a\x7f")
@example("/café")
def test_the_character_checks_agree_with_their_regexes(text: str) -> None:
    assert f.url_chars_ok(text) == (f.URL_FORBIDDEN.search(text) is None)
    assert f.value_chars_ok(text) == (f.HEADER_VALUE_FORBIDDEN.search(text) is None)


def test_the_character_checks_agree_with_their_regexes_for_every_single_character() -> None:
    for code in [*range(0x300), 0x2028, 0xD800, 0xDFFF, 0xFEFF]:
        char = chr(code)
        for text in (char, f"/x{char}y"):
            assert f.url_chars_ok(text) == (f.URL_FORBIDDEN.search(text) is None), hex(code)
            assert f.value_chars_ok(text) == (f.HEADER_VALUE_FORBIDDEN.search(text) is None), hex(code)
