"""The frames of the tunnel protocol (sans-IO): types, limits and validation.

The reference ``tunnel.v1`` frames plus our negotiated extensions: ``extensions`` objects
in ``request.start`` / ``response.ack``, binary data frames, ``request.credit`` /
``response.credit`` flow control, ``response.heartbeat`` (with the ``seq`` of response
chunks published, so a caller that got fewer knows frames were lost) and
``response.whole`` (start + one chunk + end in one message). Bytes <-> frames is
:mod:`tunnel._codec`; docs/protocol.md has the wire format with golden frames.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import field
from typing import Any, Final

from ._errors import LocalProtocolError, RemoteProtocolError
from ._record import record

PROTOCOL: Final = "tunnel.v1"

BINARY_MAGIC: Final = 0x00
KIND_REQUEST_CHUNK: Final = 0x01
KIND_RESPONSE_CHUNK: Final = 0x02
KIND_RESPONSE_WHOLE: Final = 0x03
# Compact frames (negotiated: ``binaryStart`` / ``binaryHead``); their own layouts, no seq.
KIND_REQUEST_START: Final = 0x04
KIND_RESPONSE_WHOLE_COMPACT: Final = 0x05
# Several frames in one message (negotiated): compact starts to one host (``startBatches``),
# complete responses to one caller (``replyBatches``).
KIND_START_BATCH: Final = 0x06
KIND_REPLY_BATCH: Final = 0x07
#: A sender batches at most a burst of frames (16); a receiver takes up to this many per batch.
MAX_BATCHED_FRAMES: Final = 64
MAX_BATCHED_STARTS: Final = MAX_BATCHED_FRAMES
BINARY_HEADER_SIZE: Final = 10  # magic, kind, seq:u64be

# Headers: bounded so a hostile frame cannot make us build huge lists.
MAX_HEADER_COUNT: Final = 512
MAX_HEADER_NAME_LENGTH: Final = 1024
MAX_HEADER_VALUE_LENGTH: Final = 64 * 1024
# Error messages from the network are for humans; cap what we keep of them.
MAX_ERROR_MESSAGE_LENGTH: Final = 4096
MAX_ERROR_CODE_LENGTH: Final = 128
# JSON integers above this lose precision in JavaScript peers.
MAX_SAFE_INT: Final = 2**53 - 1
# Only plausible methods: an HTTP token, bounded.
# The characters of an HTTP token (RFC 9110): methods and header names.
TOKEN_CHARS: Final = r"!#$%&'*+\-.^_`|~0-9A-Za-z"
METHOD_RE: Final = re.compile(f"^[{TOKEN_CHARS}]{{1,32}}$")
HEADER_NAME_RE: Final = re.compile(f"^[{TOKEN_CHARS}]+$")
# CR/LF/NUL would split or truncate HTTP headers; lone surrogates cannot be encoded as UTF-8.
HEADER_VALUE_FORBIDDEN: Final = re.compile("[\r\n\x00\ud800-\udfff]")
URL_FORBIDDEN: Final = re.compile("[\x00-\x20\x7f\ud800-\udfff]")
CODE_RE: Final = re.compile(r"^[A-Za-z0-9_.:-]+$")
MAX_TARGET_LENGTH: Final = 64 * 1024
MAX_STATUS_TEXT_LENGTH: Final = 1024

Headers = list[tuple[str, str]]


class FrameError(RemoteProtocolError):
    """A frame from the network is malformed; ``request_id`` is set when it was readable."""

    def __init__(self, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


# --------------------------------------------------------------------------- frames


@record
class StartExtensions:
    """What the caller offers in ``request.start``."""

    binary: bool = True
    window: int | None = None  # caller's initial credit for the response body, bytes
    heartbeat_ms: int | None = None  # how often the caller wants proof of life
    max_frame: int | None = None  # largest NATS payload the caller's connection accepts
    whole: bool = False  # caller accepts response.whole frames
    upgrade: bool = False  # this request asks for an upgraded stream (a 101 opens both directions)
    integrity: str | None = None  # checksum the caller puts in its end frames and wants in ours
    ack_now: bool = False  # first contact: ack at once (the caller is timing whether anyone serves)
    binary_head: bool = False  # caller accepts response.whole with a compact binary head
    reply_batches: bool = False  # caller takes several complete responses in one message


@record
class AckExtensions:
    """What the server accepts in ``response.ack`` (absent: plain v1)."""

    binary: bool = True
    window: int | None = None  # server's initial credit for the request body, bytes
    heartbeat_ms: int | None = None
    max_frame: int | None = None
    up_subject: str | None = None  # where body and credit frames go to reach this server
    upgrade: bool = False  # the server can carry the upgraded stream the caller asked for
    integrity: str | None = None  # checksum both ends then put in their end frames
    binary_start: bool = False  # the server takes compact binary request.start frames
    start_batches: bool = False  # ... and batches of them in one message (``startBatches``)


@record
class RequestStart:
    request_id: str
    method: str
    url: str
    headers: Headers
    reply_subject: str
    abort_subject: str
    body_subject: str | None = None
    deadline_unix_ms: int | None = None
    extensions: StartExtensions | None = None
    type: str = field(default="request.start", init=False)


@record
class Checksum:
    """A body's checksum in an end frame or a ``response.whole`` head (integrity extension):
    the JSON field is named after the algorithm (``"crc32c"`` or ``"crc32"``)."""

    algorithm: str
    value: int


@record
class RequestChunk:
    request_id: str
    seq: int
    data: bytes
    type: str = field(default="request.chunk", init=False)


@record
class RequestEnd:
    request_id: str
    seq: int
    # With the integrity extension: the body's byte count and checksum (JSON "bytes", "crc32c").
    size: int | None = None
    checksum: Checksum | None = None
    type: str = field(default="request.end", init=False)


@record
class RequestError:
    request_id: str
    code: str
    message: str
    type: str = field(default="request.error", init=False)


@record
class RequestCredit:
    """The caller allows the server ``limit`` response-body bytes in total (cumulative).

    ``seq`` (optional): how many ``request.chunk`` frames the caller has published so far,
    so a server that received fewer knows request-body frames were lost. ``ended``: the
    caller also published its ``request.end`` (after those chunks), so a server that has
    every chunk but no end knows the end alone was lost, and the body is complete.
    ``probe``: the caller heard nothing for two heartbeat intervals while the response body
    is open; a server that already ended the response re-sends its final frame.
    """

    request_id: str
    limit: int
    seq: int | None = None
    ended: bool = False
    probe: bool = False
    type: str = field(default="request.credit", init=False)


@record
class ResponseAck:
    request_id: str
    extensions: AckExtensions | None = None
    type: str = field(default="response.ack", init=False)


@record
class ResponseStart:
    request_id: str
    status: int
    headers: Headers
    status_text: str | None = None
    # Negotiation, when the server answers before (instead of) a separate ack.
    extensions: AckExtensions | None = None
    type: str = field(default="response.start", init=False)


@record
class ResponseWhole:
    """A complete small response in one message (extension, binary only)."""

    request_id: str
    start: ResponseStart
    data: bytes
    checksum: Checksum | None = None  # with the integrity extension: in the head, as "crc32c"
    # The head was compact (binary, ``binaryHead``), and its server then also says whether it
    # takes compact starts; a JSON head says nothing about that.
    compact_head: bool = False
    binary_start: bool = False
    type: str = field(default="response.whole", init=False)


@record
class ResponseChunk:
    request_id: str
    seq: int
    data: bytes
    type: str = field(default="response.chunk", init=False)


@record
class ResponseEnd:
    request_id: str
    seq: int
    size: int | None = None
    checksum: Checksum | None = None
    type: str = field(default="response.end", init=False)


@record
class ResponseError:
    request_id: str
    code: str
    message: str
    type: str = field(default="response.error", init=False)


@record
class ResponseCredit:
    """The server allows the caller ``limit`` request-body bytes in total (cumulative)."""

    request_id: str
    limit: int
    type: str = field(default="response.credit", init=False)


@record
class ResponseHeartbeat:
    """Proof of life; ``seq`` (optional, once the response body flows) is how many
    ``response.chunk`` frames the server has published, so a caller that received
    fewer knows response-body frames were lost."""

    request_id: str
    seq: int | None = None
    type: str = field(default="response.heartbeat", init=False)


@record
class Abort:
    request_id: str
    reason: str | None = None
    type: str = field(default="abort", init=False)


Frame = (
    RequestStart
    | RequestChunk
    | RequestEnd
    | RequestError
    | RequestCredit
    | ResponseAck
    | ResponseStart
    | ResponseChunk
    | ResponseWhole
    | ResponseEnd
    | ResponseError
    | ResponseCredit
    | ResponseHeartbeat
    | Abort
)
ChunkFrame = RequestChunk | ResponseChunk
CHUNK_FRAMES: Final = (RequestChunk, ResponseChunk)

# --------------------------------------------------------------------------- validation helpers


# Like the fetch standard: these are normalised to upper case, other methods keep their case
# (HTTP methods are case-sensitive).
_NORMALISED_METHODS: Final = frozenset({"DELETE", "GET", "HEAD", "OPTIONS", "POST", "PUT"})


# Methods already checked, and what each becomes: callers use a handful (every request).
_CHECKED_METHODS: Final[dict[str, str]] = {}
_CHECKED_METHODS_LIMIT: Final = 64


def validate_method(method: str) -> str:
    if type(method) is str:
        checked = _CHECKED_METHODS.get(method)
        if checked is not None:
            return checked
    if not isinstance(method, str) or not METHOD_RE.fullmatch(method):
        raise LocalProtocolError(f"invalid HTTP method {method!r}")
    upper = method.upper()
    result = upper if upper in _NORMALISED_METHODS else method
    if len(_CHECKED_METHODS) < _CHECKED_METHODS_LIMIT:
        _CHECKED_METHODS[method] = result
    return result


# The checks below run on every request. For ASCII text (``isascii`` is a flag lookup) string
# methods give the same answer as the regexes above in a fraction of the time: searching a
# 30-character URL with URL_FORBIDDEN took ~0.9 us. Other text still goes through the regexes.


def url_chars_ok(url: str) -> bool:
    """No whitespace, control character or lone surrogate (``URL_FORBIDDEN``)."""
    if url.isascii():
        return url.isprintable() and " " not in url  # ASCII printable: 0x20-0x7e, then no 0x20
    return URL_FORBIDDEN.search(url) is None


def value_chars_ok(value: str) -> bool:
    """No CR, LF, NUL or lone surrogate (``HEADER_VALUE_FORBIDDEN``): a header value or status text."""
    if value.isascii():
        return "\r" not in value and "\n" not in value and "\x00" not in value
    return HEADER_VALUE_FORBIDDEN.search(value) is None


def validate_url(url: str) -> str:
    """The path+query that travels: must start with '/' and hold no whitespace or controls."""
    if not isinstance(url, str) or not url.startswith("/") or len(url) > MAX_TARGET_LENGTH:
        raise LocalProtocolError(f"invalid request target {url!r}: must start with '/'")
    if not url_chars_ok(url):
        raise LocalProtocolError("request target contains whitespace or control characters")
    return url


def target_ok(url: str) -> bool:
    """A request target a peer may send: path+query from '/', bounded, no whitespace or controls."""
    return url.startswith("/") and len(url) <= MAX_TARGET_LENGTH and url_chars_ok(url)


def status_text_ok(text: str) -> bool:
    """A status text that fits a head: bounded, no CR, LF or NUL, nothing UTF-8 cannot carry."""
    return len(text) <= MAX_STATUS_TEXT_LENGTH and value_chars_ok(text)


# isinstance with an inline ``A | B`` builds the union object on every call (3x slower):
# the checks that run for every request use prebuilt tuples.
_LIST_OR_TUPLE: Final = (list, tuple)


def validate_headers(headers: Any, error: type[Exception] = LocalProtocolError) -> Headers:
    """Check a header list: names are HTTP tokens, values hold no CR, LF or NUL."""
    if not isinstance(headers, _LIST_OR_TUPLE):
        raise error("headers must be a list of [name, value] pairs")
    if len(headers) > MAX_HEADER_COUNT:
        raise error(f"more than {MAX_HEADER_COUNT} headers")
    out: Headers = []
    for pair in headers:
        if not isinstance(pair, _LIST_OR_TUPLE) or len(pair) != 2:
            raise error("each header must be a [name, value] pair")
        name, value = pair
        if not isinstance(name, str) or not isinstance(value, str):
            raise error("header names and values must be strings")
        if len(name) > MAX_HEADER_NAME_LENGTH or not HEADER_NAME_RE.fullmatch(name):
            raise error(f"invalid header name {name[:64]!r}")
        if len(value) > MAX_HEADER_VALUE_LENGTH or not value_chars_ok(value):
            raise error(f"invalid value for header {name!r}")
        out.append((name, value))
    return out


def check_headers(headers: Sequence[tuple[str, str]]) -> Headers:
    """``headers`` as a list if the tunnel can carry them, else :class:`LocalProtocolError`.

    For proxies relaying someone else's response head: at most 512 headers, names that
    are HTTP tokens up to 1024 characters, values up to 64 KiB without CR, LF or NUL.
    Checked before responding, a bad head becomes the proxy's own error (a 502), not
    a failure inside the tunnel server.
    """
    return validate_headers(headers)
