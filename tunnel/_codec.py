"""Frame codec (sans-IO): bytes on the wire <-> the frame types of :mod:`tunnel._frames`.

Control frames are UTF-8 JSON objects with a ``type`` field, as the reference
``tunnel.v1`` protocol shapes them; binary data frames are ``0x00 kind seq:u64be data``
(kind 1 ``request.chunk``, 2 ``response.chunk``, 3 ``response.whole``). JSON always starts
with ``{``, so the first byte tells the encodings apart. Every decoded frame is validated:
anything malformed raises ``FrameError`` (never a KeyError, TypeError or a crash).
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import re
import struct
from collections.abc import Callable
from typing import Any, Final

from ._frames import (
    BINARY_HEADER_SIZE,
    BINARY_MAGIC,
    CHUNK_FRAMES,
    CODE_RE,
    KIND_REQUEST_CHUNK,
    KIND_REQUEST_START,
    KIND_RESPONSE_CHUNK,
    KIND_RESPONSE_WHOLE,
    KIND_RESPONSE_WHOLE_COMPACT,
    MAX_ERROR_CODE_LENGTH,
    MAX_ERROR_MESSAGE_LENGTH,
    MAX_HEADER_COUNT,
    MAX_HEADER_NAME_LENGTH,
    MAX_HEADER_VALUE_LENGTH,
    MAX_SAFE_INT,
    METHOD_RE,
    PROTOCOL,
    TOKEN_CHARS,
    Abort,
    AckExtensions,
    Checksum,
    ChunkFrame,
    Frame,
    FrameError,
    Headers,
    RequestChunk,
    RequestCredit,
    RequestEnd,
    RequestError,
    RequestStart,
    ResponseAck,
    ResponseChunk,
    ResponseCredit,
    ResponseEnd,
    ResponseError,
    ResponseHeartbeat,
    ResponseStart,
    ResponseWhole,
    StartExtensions,
    status_text_ok,
    target_ok,
    validate_headers,
)
from ._subjects import is_valid_request_id

_WHOLE_HEAD_LENGTH: Final = struct.Struct(">I")
_BINARY_HEADER: Final = struct.Struct(">BBQ")


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    if "=" in text:
        text = text.rstrip("=")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError) as exc:
        raise FrameError("data is not valid base64url") from exc


def _require(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], rid: str | None) -> Any:
    value = obj.get(key)
    if value is None or not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise FrameError(f"field {key!r} missing or of the wrong type", rid)
    return value


def _optional(obj: dict[str, Any], key: str, kind: type, rid: str | None) -> Any:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise FrameError(f"field {key!r} of the wrong type", rid)
    return value


def _seq(obj: dict[str, Any], rid: str) -> int:
    seq = _require(obj, "seq", int, rid)
    if not 0 <= seq <= MAX_SAFE_INT:
        raise FrameError("seq out of range", rid)
    return int(seq)


def _optional_seq(obj: dict[str, Any], rid: str) -> int | None:
    seq = _optional(obj, "seq", int, rid)
    if seq is not None and not 0 <= seq <= MAX_SAFE_INT:
        raise FrameError("seq out of range", rid)
    return None if seq is None else int(seq)


def _optional_count(obj: dict[str, Any], key: str, rid: str, limit: int = MAX_SAFE_INT) -> int | None:
    value = _optional(obj, key, int, rid)
    if value is not None and not 0 <= value <= limit:
        raise FrameError(f"field {key!r} out of range", rid)
    return None if value is None else int(value)


_MAX_CHECKSUM: Final = 0xFFFFFFFF
_MAX_INTEGRITY_NAME: Final = 32
# The checksum fields an end frame or a response.whole head may carry (integrity extension).
_CHECKSUM_FIELDS: Final = ("crc32c", "crc32")


def _checksum(obj: dict[str, Any], rid: str) -> Checksum | None:
    if "crc32c" not in obj and "crc32" not in obj:  # hot path: most frames carry none
        return None
    found: Checksum | None = None
    for name in _CHECKSUM_FIELDS:
        value = _optional_count(obj, name, rid, _MAX_CHECKSUM)
        if value is not None:
            if found is not None:
                raise FrameError("more than one checksum", rid)
            found = Checksum(name, value)
    return found


def _integrity(raw: dict[str, Any]) -> str | None:
    value = raw.get("integrity")
    return value if type(value) is str and len(value) <= _MAX_INTEGRITY_NAME else None


def _positive_int(obj: dict[str, Any], key: str, rid: str | None) -> int | None:
    value = _optional(obj, key, int, rid)
    if value is not None and not 0 < value <= MAX_SAFE_INT:
        raise FrameError(f"field {key!r} out of range", rid)
    return None if value is None else int(value)


def _code_and_message(obj: dict[str, Any], rid: str) -> tuple[str, str]:
    code = _require(obj, "code", str, rid)
    if len(code) > MAX_ERROR_CODE_LENGTH or not CODE_RE.fullmatch(code):
        code = "tunnel_unknown_error"
    message = _optional(obj, "message", str, rid) or ""
    return code, message[:MAX_ERROR_MESSAGE_LENGTH]


def _start_extensions(raw: Any, rid: str) -> StartExtensions | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise FrameError("extensions must be an object", rid)
    return StartExtensions(
        binary=raw.get("binaryData") is True,
        window=_positive_int(raw, "window", rid),
        heartbeat_ms=_positive_int(raw, "heartbeatMs", rid),
        max_frame=_positive_int(raw, "maxFrame", rid),
        whole=raw.get("wholeResponse") is True,
        upgrade=raw.get("upgrade") is True,
        integrity=_integrity(raw),
        ack_now=raw.get("ackNow") is True,
        binary_head=raw.get("binaryHead") is True,
        reply_batches=raw.get("replyBatches") is True,
    )


def _ack_extensions(raw: Any, rid: str) -> AckExtensions | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise FrameError("extensions must be an object", rid)
    return AckExtensions(
        binary=raw.get("binaryData") is True,
        window=_positive_int(raw, "window", rid),
        heartbeat_ms=_positive_int(raw, "heartbeatMs", rid),
        max_frame=_positive_int(raw, "maxFrame", rid),
        up_subject=_optional(raw, "upSubject", str, rid),
        upgrade=raw.get("upgrade") is True,
        integrity=_integrity(raw),
        binary_start=raw.get("binaryStart") is True,
        start_batches=raw.get("startBatches") is True,
    )


# --------------------------------------------------------------------------- decode


def decode_frame(payload: bytes, subject_request_id: str | None = None) -> Frame:
    """Decode one NATS payload into a frame, validating every field.

    ``subject_request_id`` is the id read from the subject (required for binary
    frames, and must match ``requestId`` in JSON frames when given).
    """
    if not payload:
        raise FrameError("empty frame", subject_request_id)
    if payload[0] == BINARY_MAGIC:
        return _decode_binary(payload, subject_request_id)
    try:
        obj = _JSON_DECODER.decode(payload.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise FrameError("frame is not valid UTF-8 JSON", subject_request_id) from exc
    if not isinstance(obj, dict):
        raise FrameError("frame is not a JSON object", subject_request_id)
    rid = obj.get("requestId")
    if not is_valid_request_id(rid):
        raise FrameError("missing or invalid requestId", subject_request_id)
    assert isinstance(rid, str)
    if subject_request_id is not None and rid != subject_request_id:
        raise FrameError("requestId does not match the subject", subject_request_id)
    kind = obj.get("type")
    decoder = _JSON_DECODERS.get(kind) if isinstance(kind, str) else None
    if decoder is None:
        raise FrameError(f"unknown frame type {str(kind)[:64]!r}", rid)
    frame: Frame = decoder(obj, rid)
    return frame


def _decode_binary(payload: bytes, rid: str | None) -> Frame:
    if rid is None:
        raise FrameError("binary frame on a subject without a request id")
    if len(payload) > 1 and payload[1] >= KIND_REQUEST_START:  # compact frames: no seq field
        if payload[1] == KIND_RESPONSE_WHOLE_COMPACT:
            return _decode_compact_whole(payload, rid)
        if payload[1] == KIND_REQUEST_START:
            raise FrameError("a compact request.start belongs on the request subject", rid)
    if len(payload) < BINARY_HEADER_SIZE:
        raise FrameError("truncated binary frame", rid)
    _, kind, seq = _BINARY_HEADER.unpack_from(payload)
    if seq > MAX_SAFE_INT:
        raise FrameError("seq out of range", rid)
    data = payload[BINARY_HEADER_SIZE:]
    if kind == KIND_RESPONSE_CHUNK:
        return ResponseChunk(rid, seq, data)
    if kind == KIND_REQUEST_CHUNK:
        return RequestChunk(rid, seq, data)
    if kind == KIND_RESPONSE_WHOLE:
        return _decode_whole(data, rid)
    raise FrameError(f"unknown binary frame kind {kind}", rid)


def _decode_whole(rest: bytes, rid: str) -> Frame:
    if len(rest) < _WHOLE_HEAD_LENGTH.size:
        raise FrameError("truncated response.whole frame", rid)
    (head_length,) = _WHOLE_HEAD_LENGTH.unpack_from(rest)
    head_end = _WHOLE_HEAD_LENGTH.size + head_length
    if head_end > len(rest):
        raise FrameError("response.whole head longer than the frame", rid)
    try:
        # Decode to str ourselves: json.loads on bytes sniffs the encoding first (every response).
        head = _JSON_DECODER.decode(rest[_WHOLE_HEAD_LENGTH.size : head_end].decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise FrameError("response.whole head is not valid JSON", rid) from exc
    if not isinstance(head, dict) or head.get("type") != "response.start" or head.get("requestId") != rid:
        raise FrameError("response.whole head is not this request's response.start", rid)
    start = _d_response_start(head, rid)
    assert isinstance(start, ResponseStart)
    return ResponseWhole(rid, start, rest[head_end:], _checksum(head, rid))


# --------------------------------------------------------------------------- compact frames
#
# Negotiated per host (``binaryStart``) and per request (``binaryHead``), see docs/protocol.md
# section 2. Text fields are UTF-8, each ended by NUL (no field can hold one: ids, methods and
# header names are tokens; URLs, header values, status texts and JSON text forbid it), so one
# split reads them all, and one regex checks a whole header block.

_COMPACT_START: Final = struct.Struct(">BBBQ")  # magic, kind, flags, deadlineUnixMs
START_HAS_BODY: Final = 0x01
START_HAS_DEADLINE: Final = 0x02
_START_FLAGS: Final = START_HAS_BODY | START_HAS_DEADLINE

_COMPACT_WHOLE: Final = struct.Struct(">BBBHII")  # magic, kind, flags, status, checksum, headLength
WHOLE_CRC32C: Final = 0x01
WHOLE_CRC32: Final = 0x02
WHOLE_STATUS_TEXT: Final = 0x04
WHOLE_BINARY_START: Final = 0x08  # the server also takes compact starts
_WHOLE_FLAGS: Final = WHOLE_CRC32C | WHOLE_CRC32 | WHOLE_STATUS_TEXT | WHOLE_BINARY_START
_CHECKSUM_FLAGS: Final = {"crc32c": WHOLE_CRC32C, "crc32": WHOLE_CRC32}

# A whole header block: name NUL value NUL, repeated; bounded like validate_headers.
_HEADER_BLOCK_RE: Final = re.compile(
    f"(?:[{TOKEN_CHARS}]{{1,{MAX_HEADER_NAME_LENGTH}}}\x00[^\r\n\x00]{{0,{MAX_HEADER_VALUE_LENGTH}}}\x00)*"
)


def _header_block(headers: Headers) -> str:
    return "".join([f"{name}\x00{value}\x00" for name, value in headers])


# Header blocks already checked, as pairs: a server sends the same few head blocks again and
# again (checking one took ~1.7 us for a single header). Bounded in count and block size, so
# a peer sending a new block each time only costs a lookup and, now and then, a clear. A block
# that may carry a credential is never kept (its values would outlive the request in memory).
_CHECKED_BLOCKS: Final[dict[str, tuple[tuple[str, str], ...]]] = {}
_CHECKED_BLOCKS_LIMIT: Final = 256
_CHECKED_BLOCK_MAX_LENGTH: Final = 1024
_MAY_HOLD_A_SECRET: Final = re.compile("auth|cookie|token|secret|key|session|passw", re.IGNORECASE)


def _parse_header_block(block: str, rid: str) -> Headers:
    if not block:
        return []
    checked = _CHECKED_BLOCKS.get(block)
    if checked is not None:
        return list(checked)  # a fresh list: whoever gets it may change it
    if block.count("\x00") > 2 * MAX_HEADER_COUNT:
        raise FrameError(f"more than {MAX_HEADER_COUNT} headers", rid)
    if _HEADER_BLOCK_RE.fullmatch(block) is None:
        raise FrameError("invalid header block", rid)
    items = iter(block.split("\x00"))  # the trailing "" after the last NUL pairs with nothing
    pairs = list(zip(items, items, strict=False))
    if len(block) <= _CHECKED_BLOCK_MAX_LENGTH and _MAY_HOLD_A_SECRET.search(block) is None:
        if len(_CHECKED_BLOCKS) >= _CHECKED_BLOCKS_LIMIT:
            _CHECKED_BLOCKS.clear()
        _CHECKED_BLOCKS[block] = tuple(pairs)
    return pairs


def encode_compact_start(
    request_id: str,
    method: str,
    url: str,
    headers: Headers,
    has_body: bool,
    deadline_unix_ms: int | None,
    extensions_text: str,
) -> bytes:
    """A compact ``request.start``: what ``encode_request_start`` says, minus the subjects
    (the reply subject is the message's NATS reply; abort and body follow from the id)."""
    flags = (START_HAS_BODY if has_body else 0) | (0 if deadline_unix_ms is None else START_HAS_DEADLINE)
    text = f"{request_id}\x00{method}\x00{url}\x00{extensions_text}\x00{_header_block(headers)}"
    return _COMPACT_START.pack(BINARY_MAGIC, KIND_REQUEST_START, flags, deadline_unix_ms or 0) + text.encode()


def is_compact_start(payload: bytes) -> bool:
    return len(payload) > 1 and payload[0] == BINARY_MAGIC and payload[1] == KIND_REQUEST_START


def decode_compact_start(payload: bytes, reply_subject: str, host_base: str) -> RequestStart:
    """A compact ``request.start`` from the request subject, checked like a JSON one.

    ``reply_subject`` is the message's NATS reply; ``host_base`` is ``P`` (the abort and body
    subjects are ``P.req.<id>.abort`` and ``P.req.<id>.body``).
    """
    if len(payload) < _COMPACT_START.size:
        raise FrameError("truncated compact request.start")
    _, kind, flags, deadline = _COMPACT_START.unpack_from(payload)
    if kind != KIND_REQUEST_START:
        raise FrameError(f"binary frame kind {kind} on the request subject")
    try:
        text = payload[_COMPACT_START.size :].decode()
    except UnicodeDecodeError as exc:
        raise FrameError("compact request.start is not valid UTF-8") from exc
    fields = text.split("\x00", 4)
    if len(fields) != 5:
        raise FrameError("compact request.start has too few fields")
    rid, method, url, ext_text, block = fields
    if not is_valid_request_id(rid):
        raise FrameError("missing or invalid requestId")
    if flags & ~_START_FLAGS:
        raise FrameError(f"unknown compact request.start flags {flags:#x}", rid)
    if deadline > MAX_SAFE_INT or (deadline and not flags & START_HAS_DEADLINE):
        raise FrameError("deadlineUnixMs invalid", rid)
    if not METHOD_RE.fullmatch(method):
        raise FrameError(f"invalid HTTP method {method[:64]!r}", rid)
    if not target_ok(url):
        raise FrameError("invalid request target", rid)
    head = f"{host_base}.req.{rid}."
    return RequestStart(
        rid,
        method,
        url,
        _parse_header_block(block, rid),
        reply_subject,
        head + "abort",
        head + "body" if flags & START_HAS_BODY else None,
        deadline if flags & START_HAS_DEADLINE else None,
        _compact_start_ext(ext_text, rid),
    )


def _compact_start_ext(text: str, rid: str) -> StartExtensions:
    """A caller sends the same offer every time: each distinct (small) text is parsed once."""
    try:
        if len(text) <= MAX_CACHED_OFFER:
            return _compact_start_ext_cached(text)
        return _parse_compact_offer(text)
    except FrameError as exc:
        raise FrameError(exc.message, rid) from None


def _parse_compact_offer(text: str) -> StartExtensions:
    try:
        raw = _JSON_DECODER.decode(text)
    except (ValueError, RecursionError) as exc:
        raise FrameError("compact request.start extensions are not valid JSON") from exc
    ext = _start_extensions(raw, "cache")
    if ext is None:
        raise FrameError("a compact request.start needs its extensions")
    return ext


_compact_start_ext_cached: Final = functools.lru_cache(maxsize=256)(_parse_compact_offer)


def encode_compact_whole(
    status: int,
    headers: Headers,
    status_text: str | None,
    data: bytes | bytearray | memoryview,
    checksum: Checksum | None,
    binary_start: bool,
) -> bytes:
    """A ``response.whole`` with a compact head (the caller offered ``binaryHead``)."""
    flags = WHOLE_BINARY_START if binary_start else 0
    block = _header_block(headers)
    if status_text is not None:
        flags |= WHOLE_STATUS_TEXT
        block = f"{status_text}\x00{block}"
    value = 0
    if checksum is not None:
        flags |= _CHECKSUM_FLAGS[checksum.algorithm]
        value = checksum.value
    head = block.encode()
    prefix = _COMPACT_WHOLE.pack(BINARY_MAGIC, KIND_RESPONSE_WHOLE_COMPACT, flags, status, value, len(head))
    return b"".join((prefix, head, data))


def _decode_compact_whole(payload: bytes, rid: str) -> Frame:
    if len(payload) < _COMPACT_WHOLE.size:
        raise FrameError("truncated response.whole frame", rid)
    _, _, flags, status, value, head_length = _COMPACT_WHOLE.unpack_from(payload)
    if flags & ~_WHOLE_FLAGS or (flags & WHOLE_CRC32C and flags & WHOLE_CRC32):
        raise FrameError(f"invalid response.whole flags {flags:#x}", rid)
    if not 100 <= status <= 599:
        raise FrameError("status missing or out of range", rid)
    head_end = _COMPACT_WHOLE.size + head_length
    if head_end > len(payload):
        raise FrameError("response.whole head longer than the frame", rid)
    try:
        block = payload[_COMPACT_WHOLE.size : head_end].decode()
    except UnicodeDecodeError as exc:
        raise FrameError("response.whole head is not valid UTF-8", rid) from exc
    status_text = None
    if flags & WHOLE_STATUS_TEXT:
        status_text, found, block = block.partition("\x00")
        if not found or not status_text_ok(status_text):
            raise FrameError("invalid statusText", rid)
    checksum = None
    if flags & WHOLE_CRC32C:
        checksum = Checksum("crc32c", value)
    elif flags & WHOLE_CRC32:
        checksum = Checksum("crc32", value)
    elif value:
        raise FrameError("response.whole checksum without its algorithm", rid)
    start = ResponseStart(rid, status, _parse_header_block(block, rid), status_text)
    return ResponseWhole(
        rid,
        start,
        payload[head_end:],
        checksum,
        compact_head=True,
        binary_start=bool(flags & WHOLE_BINARY_START),
    )


def _d_request_start(o: dict[str, Any], rid: str) -> Frame:
    # Hot path (every request on every server): plain checks instead of the generic helpers.
    if o.get("protocol") != PROTOCOL:
        raise FrameError("unsupported protocol", rid)
    method = o.get("method")
    url = o.get("url")
    headers = o.get("headers")
    reply = o.get("replySubject")
    abort = o.get("abortSubject")
    if type(method) is not str or type(url) is not str or type(headers) is not list:
        raise FrameError("method, url or headers missing or of the wrong type", rid)
    if type(reply) is not str or type(abort) is not str:
        raise FrameError("replySubject or abortSubject missing or of the wrong type", rid)
    if not METHOD_RE.fullmatch(method):
        raise FrameError(f"invalid HTTP method {method[:64]!r}", rid)
    if not target_ok(url):
        raise FrameError("invalid request target", rid)
    if headers:
        headers = validate_headers(headers, FrameError)
    body = o.get("bodySubject")
    if body is not None and type(body) is not str:
        raise FrameError("field 'bodySubject' of the wrong type", rid)
    deadline = o.get("deadlineUnixMs")
    if deadline is not None and (type(deadline) is not int or not 0 <= deadline <= MAX_SAFE_INT):
        raise FrameError("deadlineUnixMs invalid", rid)
    raw_ext = o.get("extensions")
    return RequestStart(
        rid,
        method,
        url,
        headers,
        reply,
        abort,
        body,
        deadline,
        None if raw_ext is None else _start_ext(raw_ext, rid),
    )


#: Offers are cached only when small (ours is ~150 characters): a hostile caller must not make
#: the cache keep 256 megabyte-sized texts alive.
MAX_CACHED_OFFER: Final = 512
# What an offer may hold and still be cached as a JSON object: known names; booleans and
# integers (JSON integers have at most 4300 digits), and a short integrity name.
_CACHEABLE_OFFER_KEYS: Final = frozenset(
    (
        "binaryData",
        "window",
        "heartbeatMs",
        "maxFrame",
        "wholeResponse",
        "upgrade",
        "integrity",
        "ackNow",
        "binaryHead",
        "replyBatches",
    )
)


def _start_ext(raw: Any, rid: str) -> StartExtensions | None:
    """A caller sends the same offer every time: parse each distinct offer once."""
    if (
        isinstance(raw, dict)
        and raw.keys() <= _CACHEABLE_OFFER_KEYS
        and all(type(v) is bool or type(v) is int or k == "integrity" for k, v in raw.items())
        and len(str(raw.get("integrity", ""))) <= _MAX_INTEGRITY_NAME
    ):
        try:
            return _start_ext_cached(tuple(raw.items()))
        except (TypeError, FrameError):
            pass  # unhashable or invalid: parse again below for a precise error
    return _start_extensions(raw, rid)


@functools.lru_cache(maxsize=256)
def _start_ext_cached(items: tuple[tuple[str, Any], ...]) -> StartExtensions | None:
    return _start_extensions(dict(items), "cache")


def _d_chunk(o: dict[str, Any], rid: str) -> Frame:
    data = b64url_decode(_require(o, "data", str, rid))
    cls = RequestChunk if o["type"] == "request.chunk" else ResponseChunk
    return cls(rid, _seq(o, rid), data)


def _d_request_end(o: dict[str, Any], rid: str) -> Frame:
    return RequestEnd(rid, _seq(o, rid), _optional_count(o, "bytes", rid), _checksum(o, rid))


def _d_response_end(o: dict[str, Any], rid: str) -> Frame:
    return ResponseEnd(rid, _seq(o, rid), _optional_count(o, "bytes", rid), _checksum(o, rid))


def _d_request_error(o: dict[str, Any], rid: str) -> Frame:
    return RequestError(rid, *_code_and_message(o, rid))


def _d_response_error(o: dict[str, Any], rid: str) -> Frame:
    return ResponseError(rid, *_code_and_message(o, rid))


def _d_credit(o: dict[str, Any], rid: str) -> Frame:
    amount = _require(o, "limit", int, rid)
    if not 0 < amount <= MAX_SAFE_INT:
        raise FrameError("credit out of range", rid)
    if o["type"] == "request.credit":
        seq = _optional_seq(o, rid)
        ended = _optional(o, "ended", bool, rid) is True
        if ended and seq is None:
            raise FrameError("'ended' without 'seq'", rid)
        probe = _optional(o, "probe", bool, rid) is True
        return RequestCredit(rid, amount, seq, ended, probe)
    return ResponseCredit(rid, amount)


def _d_response_ack(o: dict[str, Any], rid: str) -> Frame:
    return ResponseAck(rid, _ack_extensions(o.get("extensions"), rid))


def _d_response_start(o: dict[str, Any], rid: str) -> Frame:
    status = o.get("status")
    if type(status) is not int or not 100 <= status <= 599:
        raise FrameError("status missing or out of range", rid)
    status_text = o.get("statusText")
    if status_text is not None and (type(status_text) is not str or not status_text_ok(status_text)):
        raise FrameError("invalid statusText", rid)
    headers = o.get("headers")
    if type(headers) is not list:
        raise FrameError("field 'headers' missing or of the wrong type", rid)
    if headers:
        headers = validate_headers(headers, FrameError)
    raw_ext = o.get("extensions")
    ext = None if raw_ext is None else _ack_extensions(raw_ext, rid)
    return ResponseStart(rid, status, headers, status_text, ext)


def _d_heartbeat(o: dict[str, Any], rid: str) -> Frame:
    return ResponseHeartbeat(rid, _optional_seq(o, rid))


def _d_abort(o: dict[str, Any], rid: str) -> Frame:
    reason = _optional(o, "reason", str, rid)
    return Abort(rid, reason[:MAX_ERROR_MESSAGE_LENGTH] if reason else reason)


_JSON_DECODERS: Final[dict[str, Callable[[dict[str, Any], str], Frame]]] = {
    "request.start": _d_request_start,
    "request.chunk": _d_chunk,
    "request.end": _d_request_end,
    "request.error": _d_request_error,
    "request.credit": _d_credit,
    "response.ack": _d_response_ack,
    "response.start": _d_response_start,
    "response.chunk": _d_chunk,
    "response.end": _d_response_end,
    "response.error": _d_response_error,
    "response.credit": _d_credit,
    "response.heartbeat": _d_heartbeat,
    "abort": _d_abort,
}

# --------------------------------------------------------------------------- encode


# One encoder for every frame: json.dumps with options builds a new encoder per call.
# ASCII-only output: non-ASCII text travels as \\u escapes, so no string can fail to encode.
_JSON_ENCODER: Final = json.JSONEncoder(separators=(",", ":"))
_JSON_DECODER: Final = json.JSONDecoder()


_json_str: Final[Callable[[str], str]] = json.encoder.encode_basestring_ascii


def _dumps(obj: dict[str, Any]) -> bytes:
    return _JSON_ENCODER.encode(obj).encode("ascii")


def _headers_json(headers: Headers) -> str:
    if not headers:
        return "[]"
    return "[" + ",".join(f"[{_json_str(n)},{_json_str(v)}]" for n, v in headers) + "]"


@functools.lru_cache(maxsize=64)
def _ext_text(ext: StartExtensions | AckExtensions) -> str:
    return _JSON_ENCODER.encode(_ext_to_json(ext))


def extensions_json(ext: StartExtensions | AckExtensions) -> str:
    """The JSON text of an extensions object, as it appears inside a frame."""
    return _ext_text(ext)


def _encode_request_start(fr: RequestStart) -> bytes:
    return encode_request_start(
        fr.request_id,
        fr.method,
        fr.url,
        fr.headers,
        fr.reply_subject,
        fr.abort_subject,
        fr.body_subject,
        fr.deadline_unix_ms,
        None if fr.extensions is None else _ext_text(fr.extensions),
    )


def encode_request_start(
    request_id: str,
    method: str,
    url: str,
    headers: Headers,
    reply_subject: str,
    abort_subject: str,
    body_subject: str | None,
    deadline_unix_ms: int | None,
    extensions_text: str | None,
) -> bytes:
    """A request.start frame from its parts (``extensions_text``: see ``extensions_json``).

    Hot path (every request): string building is ~3x faster than a dict through json, and
    callers skip building a RequestStart object.
    """
    parts = [
        '{"type":"request.start","requestId":',
        _json_str(request_id),
        ',"protocol":"tunnel.v1","method":',
        _json_str(method),
        ',"url":',
        _json_str(url),
        ',"headers":',
        _headers_json(headers),
        ',"replySubject":',
        _json_str(reply_subject),
        ',"abortSubject":',
        _json_str(abort_subject),
    ]
    if body_subject is not None:
        parts += (',"bodySubject":', _json_str(body_subject))
    if deadline_unix_ms is not None:
        parts += (',"deadlineUnixMs":', str(int(deadline_unix_ms)))
    if extensions_text is not None:
        parts += (',"extensions":', extensions_text)
    parts.append("}")
    return "".join(parts).encode("ascii")


def _encode_response_start(fr: ResponseStart) -> bytes:
    return _response_start_json(fr.request_id, fr.status, fr.headers, fr.status_text, fr.extensions)


def _response_start_json(
    request_id: str,
    status: int,
    headers: Headers,
    status_text: str | None,
    extensions: AckExtensions | None,
    checksum: Checksum | None = None,
) -> bytes:
    parts = [
        '{"type":"response.start","requestId":',
        _json_str(request_id),
        ',"status":',
        str(int(status)),
    ]
    if status_text is not None:
        parts += (',"statusText":', _json_str(status_text))
    parts += (',"headers":', _headers_json(headers))
    if extensions is not None:
        parts += (',"extensions":', _JSON_ENCODER.encode(_ext_to_json(extensions)))
    if checksum is not None:  # only in a response.whole head (integrity extension)
        parts += (',"', checksum.algorithm, '":', str(int(checksum.value)))
    parts.append("}")
    return "".join(parts).encode("ascii")


_WHOLE_PREFIX: Final = _BINARY_HEADER.pack(BINARY_MAGIC, KIND_RESPONSE_WHOLE, 0)


def encode_whole(
    request_id: str,
    status: int,
    headers: Headers,
    status_text: str | None,
    data: bytes | bytearray | memoryview,
    checksum: Checksum | None = None,
) -> bytes:
    """``encode_frame(ResponseWhole(...))`` byte for byte, without building the frame objects.

    Hot path: every small response of an extended server goes through here.
    """
    head = _response_start_json(request_id, status, headers, status_text, None, checksum)
    return b"".join((_WHOLE_PREFIX, _WHOLE_HEAD_LENGTH.pack(len(head)), head, data))


def encode_binary_chunk(response: bool, seq: int, data: bytes | bytearray | memoryview) -> bytes:
    """``encode_chunk`` of a binary data frame straight from a slice of the sender's buffer.

    Bulk hot path: one copy of the data (into the frame), where building a frame object would
    copy it twice (a slice to ``bytes``, then the concatenation); ~0.2 ms per 256 KiB chunk.
    """
    kind = KIND_RESPONSE_CHUNK if response else KIND_REQUEST_CHUNK
    return _BINARY_HEADER.pack(BINARY_MAGIC, kind, seq) + data


def encode_chunk(frame: ChunkFrame, binary: bool) -> bytes:
    """Encode a data frame: raw bytes behind a 10-byte header, or v1 JSON+base64url."""
    if binary:
        kind = KIND_REQUEST_CHUNK if isinstance(frame, RequestChunk) else KIND_RESPONSE_CHUNK
        return _BINARY_HEADER.pack(BINARY_MAGIC, kind, frame.seq) + frame.data
    return _dumps(
        {
            "type": frame.type,
            "requestId": frame.request_id,
            "seq": frame.seq,
            "data": b64url_encode(frame.data),
        }
    )


def encode_frame(frame: Frame, binary: bool = False) -> bytes:
    """Encode any frame; ``binary`` only changes how chunks are written."""
    if isinstance(frame, CHUNK_FRAMES):
        return encode_chunk(frame, binary)
    if isinstance(frame, ResponseWhole):
        st = frame.start
        if frame.compact_head:
            return encode_compact_whole(
                st.status, st.headers, st.status_text, frame.data, frame.checksum, frame.binary_start
            )
        head = _response_start_json(
            st.request_id, st.status, st.headers, st.status_text, st.extensions, frame.checksum
        )
        return b"".join((_WHOLE_PREFIX, _WHOLE_HEAD_LENGTH.pack(len(head)), head, frame.data))
    if isinstance(frame, RequestStart):
        return _encode_request_start(frame)
    if isinstance(frame, ResponseStart):
        return _encode_response_start(frame)
    obj: dict[str, Any] = {"type": frame.type, "requestId": frame.request_id}
    if isinstance(frame, ResponseAck):
        if frame.extensions is not None:
            obj["extensions"] = _ext_to_json(frame.extensions)
    elif isinstance(frame, RequestEnd | ResponseEnd):
        obj["seq"] = frame.seq
        if frame.size is not None:
            obj["bytes"] = frame.size
        if frame.checksum is not None:
            obj[frame.checksum.algorithm] = frame.checksum.value
    elif isinstance(frame, RequestError | ResponseError):
        obj["code"] = frame.code
        obj["message"] = frame.message
    elif isinstance(frame, RequestCredit | ResponseCredit):
        obj["limit"] = frame.limit
        if isinstance(frame, RequestCredit):
            if frame.seq is not None:
                obj["seq"] = frame.seq
                if frame.ended:
                    obj["ended"] = True
            if frame.probe:
                obj["probe"] = True
    elif isinstance(frame, ResponseHeartbeat):
        if frame.seq is not None:
            obj["seq"] = frame.seq
    elif isinstance(frame, Abort) and frame.reason is not None:
        obj["reason"] = frame.reason
    return _dumps(obj)


def _ext_to_json(ext: StartExtensions | AckExtensions) -> dict[str, Any]:
    out: dict[str, Any] = {"binaryData": ext.binary}
    if ext.window is not None:
        out["window"] = ext.window
    if ext.heartbeat_ms is not None:
        out["heartbeatMs"] = ext.heartbeat_ms
    if ext.max_frame is not None:
        out["maxFrame"] = ext.max_frame
    if isinstance(ext, AckExtensions) and ext.up_subject is not None:
        out["upSubject"] = ext.up_subject
    if isinstance(ext, StartExtensions) and ext.whole:
        out["wholeResponse"] = True
    if ext.upgrade:
        out["upgrade"] = True
    if ext.integrity is not None:
        out["integrity"] = ext.integrity
    if isinstance(ext, StartExtensions):
        if ext.ack_now:
            out["ackNow"] = True
        if ext.binary_head:
            out["binaryHead"] = True
        if ext.reply_batches:
            out["replyBatches"] = True
    else:
        if ext.binary_start:
            out["binaryStart"] = True
        if ext.start_batches:
            out["startBatches"] = True
    return out


def whole_overhead(head: bytes) -> int:
    """Bytes a response.whole frame adds around its data."""
    return BINARY_HEADER_SIZE + _WHOLE_HEAD_LENGTH.size + len(head)


def max_chunk_data(max_payload: int, binary: bool, request_id_length: int = 32) -> int:
    """Largest data slice that fits one frame of ``max_payload`` bytes."""
    if binary:
        return max_payload - BINARY_HEADER_SIZE
    # JSON envelope: type, requestId, seq and quotes; base64 grows data by 4/3.
    envelope = 64 + request_id_length + 20
    return max(1, (max_payload - envelope) * 3 // 4)
