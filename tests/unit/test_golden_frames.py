"""Golden wire bytes: every frame our code emits, compared byte for byte with checked-in files.

``golden/v1/*.json`` are the plain ``tunnel.v1`` frames our caller and server emit
in v1 mode (``fast_path=False``, or facing a v1 peer); ``golden/ext/`` pins the
negotiated extensions (the offers, credit, heartbeat, binary chunks and
``response.whole``). Each frame is built by the sans-IO core with fixed ids and a
fake clock, so an accidental change to what goes on the wire fails here.

Each ``.json`` file holds the exact payload followed by one newline; each ``.hex``
file holds the payload as hex followed by one newline. The test never rewrites a
file. After a deliberate wire change (and a matching docs/protocol.md change),
regenerate with::

    python -m tests.unit.test_golden_frames --regenerate
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import google_crc32c
import pytest

from tunnel import _codec as codec
from tunnel import _frames as f
from tunnel import _start_batch as start_batch
from tunnel._caller import CallerOptions, CallerStream
from tunnel._events import Publish
from tunnel._server_stream import ServerOptions, ServerStream
from tunnel._subjects import HostSubjects

GOLDEN = Path(__file__).parent / "golden"

RID = "0123456789abcdef0123456789abcdef"
OTHER_RID = "fedcba9876543210fedcba9876543210"
CLIENT_ID = "c11e47c11e47c11e"
SERVER_ID = "5e7e75e7e75e7e75"
SUBJECTS = HostSubjects.for_host("desk.example")
# Repeated names keep their order; a non-ASCII value travels as \u escapes (ASCII-only JSON).
HEADERS: f.Headers = [
    ("content-type", "text/plain"),
    ("set-cookie", "a=1"),
    ("set-cookie", "b=2"),
    ("x-name", "caf\u00e9 \u2603"),
]
# base64url of these bytes uses both '-' and '_' and needs padding in plain base64.
DATA = b"hello \xfb\xff\xbf\x00"
DEADLINE_UNIX_MS = 1_700_000_000_123
MAX_PAYLOAD = 1024 * 1024
WINDOW = 64 * 1024

# The reference v1 fields of each frame type (shared/PROTOCOL-v1-reference.md).
V1_FIELDS: dict[str, set[str]] = {
    "request.start": {
        "type",
        "protocol",
        "requestId",
        "method",
        "url",
        "headers",
        "replySubject",
        "abortSubject",
        "bodySubject",
        "deadlineUnixMs",
    },
    "request.chunk": {"type", "requestId", "seq", "data"},
    "request.end": {"type", "requestId", "seq"},
    "request.error": {"type", "requestId", "code", "message"},
    "response.ack": {"type", "requestId"},
    "response.start": {"type", "requestId", "status", "statusText", "headers"},
    "response.chunk": {"type", "requestId", "seq", "data"},
    "response.end": {"type", "requestId", "seq"},
    "response.error": {"type", "requestId", "code", "message"},
    "abort": {"type", "requestId", "reason"},
}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _caller(
    *,
    fast_path: bool,
    has_body: bool,
    deadline: int | None = None,
    method: str = "POST",
    upgrade: bool = False,
    headers: f.Headers | None = None,
    compact_start: bool = False,
) -> CallerStream:
    options = CallerOptions(
        first_frame_timeout=30.0,
        idle_timeout=20.0,
        total_timeout=None,
        republish_interval=1.0,
        unreachable_grace=0.2,
        window=WINDOW,
        max_chunk=256 * 1024,
        max_payload=MAX_PAYLOAD,
        heartbeat_interval=20.0 / 3,
        fast_path=fast_path,
    )
    return CallerStream(
        request_id=RID,
        subjects=SUBJECTS,
        reply_subject=SUBJECTS.client_reply(RID, CLIENT_ID),
        method=method,
        url="/api/items?tag=a&tag=b",
        headers=HEADERS if headers is None else headers,
        has_body=has_body,
        options=options,
        clock=FakeClock(),
        deadline_unix_ms=deadline,
        upgrade=upgrade,
        compact_start=compact_start,
    )


def _v1_start(*, has_body: bool = True, extensions: f.StartExtensions | None = None) -> f.RequestStart:
    """A start as a reference v1 caller sends it (reply on ``P.req.<id>.reply``)."""
    return f.RequestStart(
        request_id=RID,
        method="GET",
        url="/status",
        headers=[],
        reply_subject=SUBJECTS.reply(RID),
        abort_subject=SUBJECTS.abort(RID),
        body_subject=SUBJECTS.body(RID) if has_body else None,
        extensions=extensions,
    )


def _server(start: f.RequestStart, *, fast_path: bool, clock: FakeClock | None = None) -> ServerStream:
    options = ServerOptions(
        window=WINDOW, max_chunk=256 * 1024, max_payload=MAX_PAYLOAD, stall_timeout=60.0, fast_path=fast_path
    )
    return ServerStream(
        start, subjects=SUBJECTS, server_id=SERVER_ID, options=options, clock=clock or FakeClock()
    )


def _acked_v1_caller(*, has_body: bool = True) -> CallerStream:
    caller = _caller(fast_path=False, has_body=has_body)
    caller.receive(f.ResponseAck(RID))
    return caller


def _only(frames: tuple[list[Publish], int]) -> Publish:
    pubs, _ = frames
    assert len(pubs) == 1
    return pubs[0]


def _one(pub: Publish | None) -> bytes:
    assert pub is not None
    return pub.payload


# ----------------------------------------------------------------------------- v1 frames


def v1_request_start_no_body() -> bytes:
    return _caller(fast_path=False, has_body=False, method="GET").start().payload


def v1_request_start_body_and_deadline() -> bytes:
    return _caller(fast_path=False, has_body=True, deadline=DEADLINE_UNIX_MS).start().payload


def v1_request_chunk() -> bytes:
    return _only(_acked_v1_caller().send_body(DATA)).payload


def v1_request_end() -> bytes:
    caller = _acked_v1_caller()
    caller.send_body(DATA)
    return caller.end_body().payload


def v1_request_error() -> bytes:
    return _one(_acked_v1_caller().fail_body("tunnel_body_error", "caller's request body failed: OSError"))


def v1_abort() -> bytes:
    return _one(_acked_v1_caller().abort("tunnel_timeout"))


def v1_abort_without_reason() -> bytes:
    return codec.encode_frame(f.Abort(RID))


def _v1_server(fast_path: bool = False, offer: f.StartExtensions | None = None) -> ServerStream:
    """Our server in v1 mode: ``fast_path=False``, or (the same bytes) facing a v1 caller."""
    return _server(_v1_start(extensions=offer), fast_path=fast_path)


def v1_response_ack(**variant: Any) -> bytes:
    return _v1_server(**variant).ack().payload


def v1_response_start(**variant: Any) -> bytes:
    server = _v1_server(**variant)
    server.ack()
    return server.start_response(200, HEADERS).payload


def v1_response_start_status_text(**variant: Any) -> bytes:
    server = _v1_server(**variant)
    server.ack()
    return server.start_response(404, [], "Not Found").payload


def _responding_v1_server(**variant: Any) -> ServerStream:
    server = _v1_server(**variant)
    server.ack()
    server.start_response(200, [])
    return server


def v1_response_chunk(**variant: Any) -> bytes:
    return _only(_responding_v1_server(**variant).send_body(DATA)).payload


def v1_response_end(**variant: Any) -> bytes:
    server = _responding_v1_server(**variant)
    server.send_body(DATA)
    return server.end_response().payload


def v1_response_error(**variant: Any) -> bytes:
    server = _v1_server(**variant)
    server.ack()
    return _one(server.error_response("tunnel_handler_error", "handler raised RuntimeError"))


V1_SERVER_BUILDERS: list[Callable[..., bytes]] = [
    v1_response_ack,
    v1_response_start,
    v1_response_start_status_text,
    v1_response_chunk,
    v1_response_end,
    v1_response_error,
]


# ----------------------------------------------------------------------------- extensions


OFFER = f.StartExtensions(
    binary=True, window=WINDOW, heartbeat_ms=6666, max_frame=MAX_PAYLOAD, whole=True, integrity="crc32c"
)


def ext_request_start_offer() -> bytes:
    return _caller(fast_path=True, has_body=True).start().payload


def _extended_server(clock: FakeClock | None = None) -> ServerStream:
    return _server(_v1_start(has_body=True, extensions=OFFER), fast_path=True, clock=clock)


UPGRADE_HEADERS: f.Headers = [
    ("upgrade", "websocket"),
    ("connection", "Upgrade"),
    ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ("sec-websocket-version", "13"),
]


def ext_request_start_upgrade() -> bytes:
    caller = _caller(fast_path=True, has_body=True, method="GET", upgrade=True, headers=UPGRADE_HEADERS)
    return caller.start().payload


def _upgrade_server() -> ServerStream:
    upgrade_offer = dataclasses.replace(OFFER, upgrade=True)
    return _server(_v1_start(has_body=True, extensions=upgrade_offer), fast_path=True)


def ext_response_ack_upgrade() -> bytes:
    return _upgrade_server().ack().payload


def ext_response_start_101() -> bytes:
    server = _upgrade_server()
    server.ack()
    headers = [
        ("upgrade", "websocket"),
        ("connection", "Upgrade"),
        ("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
    ]
    return server.start_response(101, headers).payload


def ext_response_end_integrity() -> bytes:
    server = _extended_server()
    server.ack()
    server.start_response(200, [("content-type", "text/plain")])
    server.send_body(DATA)
    return server.end_response().payload


def ext_request_end_integrity() -> bytes:
    caller = _caller(fast_path=True, has_body=True)
    caller.receive(codec.decode_frame(_extended_server().ack().payload, RID))
    caller.send_body(DATA)
    return caller.end_body().payload


def ext_response_ack() -> bytes:
    return _extended_server().ack().payload


def ext_response_start() -> bytes:
    server = _extended_server()
    server.ack()
    return server.start_response(200, [("content-type", "text/plain")]).payload


def ext_response_heartbeat() -> bytes:
    clock = FakeClock()
    server = _extended_server(clock)
    server.ack()
    clock.now += 7.0  # past the 6.666 s heartbeat interval
    pub = server.poll()[0]  # (a quiet open request body also gets its credit limit repeated)
    return pub.payload


def ext_response_heartbeat_seq() -> bytes:
    """Once the response body flows, a heartbeat says how many chunks the server published."""
    clock = FakeClock()
    server = _extended_server(clock)
    server.ack()
    server.start_response(200, [])
    server.send_body(DATA)
    server.mark_published()
    clock.now += 7.0
    return server.poll()[0].payload


def ext_request_credit_seq() -> bytes:
    return codec.encode_frame(f.RequestCredit(RID, 32768, 3))


def ext_request_credit_ended() -> bytes:
    return codec.encode_frame(f.RequestCredit(RID, 32768, 3, ended=True))


def ext_request_credit_probe() -> bytes:
    return codec.encode_frame(f.RequestCredit(RID, 32768, probe=True))


def ext_response_credit() -> bytes:
    return codec.encode_frame(f.ResponseCredit(RID, 32768))


def ext_request_credit() -> bytes:
    return codec.encode_frame(f.RequestCredit(RID, 32768))


def ext_response_chunk_binary() -> bytes:
    server = _extended_server()
    server.ack()
    server.start_response(200, [])
    return _only(server.send_body(DATA)).payload


def ext_request_chunk_binary() -> bytes:
    caller = _caller(fast_path=True, has_body=True)
    ack = f.ResponseAck(
        RID,
        f.AckExtensions(
            binary=True,
            window=WINDOW,
            heartbeat_ms=6666,
            max_frame=MAX_PAYLOAD,
            up_subject=SUBJECTS.server_up(RID, SERVER_ID),
        ),
    )
    caller.receive(ack)
    caller.send_body(DATA)  # seq 0
    return _only(caller.send_body(DATA)).payload  # seq 1: pins the seq field too


def ext_response_whole() -> bytes:
    start = _v1_start(has_body=False, extensions=OFFER)
    server = _server(start, fast_path=True)
    pub = server.whole_response(200, [("content-type", "text/plain")], None, DATA)
    assert pub is not None
    return pub.payload


def ext_request_start_compact() -> bytes:
    caller = _caller(fast_path=True, has_body=True, deadline=DEADLINE_UNIX_MS, compact_start=True)
    return caller.start().payload


# Two fixed compact starts (their own bytes are pinned by ext/request.start.compact): a batch
# carries them as they are, so only the batch's layout is pinned here, not the caller's offer.
BATCH_EXTENSIONS: Final = '{"binaryData":true,"wholeResponse":true}'
BATCHED_STARTS: Final[tuple[tuple[str, str, f.Headers], ...]] = (
    (RID, "/a", [("accept", "text/plain")]),
    (OTHER_RID, "/b", []),
)


def ext_request_start_batch() -> bytes:
    return start_batch.encode(
        [
            start_batch.entry(
                SUBJECTS.client_reply(rid, CLIENT_ID),
                codec.encode_compact_start(rid, "GET", url, headers, False, None, BATCH_EXTENSIONS),
            )
            for rid, url, headers in BATCHED_STARTS
        ]
    )


def ext_response_whole_compact() -> bytes:
    offer = dataclasses.replace(OFFER, binary_head=True)
    server = _server(_v1_start(has_body=False, extensions=offer), fast_path=True)
    pub = server.whole_response(200, [("content-type", "text/plain")], "OK", DATA)
    assert pub is not None
    return pub.payload


# name -> (builder, file suffix). JSON frames as text, binary ones as hex.
BUILDERS: dict[str, tuple[Callable[[], bytes], str]] = {
    "v1/request.start": (v1_request_start_no_body, ".json"),
    "v1/request.start.body_deadline": (v1_request_start_body_and_deadline, ".json"),
    "v1/request.chunk": (v1_request_chunk, ".json"),
    "v1/request.end": (v1_request_end, ".json"),
    "v1/request.error": (v1_request_error, ".json"),
    "v1/response.ack": (v1_response_ack, ".json"),
    "v1/response.start": (v1_response_start, ".json"),
    "v1/response.start.status_text": (v1_response_start_status_text, ".json"),
    "v1/response.chunk": (v1_response_chunk, ".json"),
    "v1/response.end": (v1_response_end, ".json"),
    "v1/response.error": (v1_response_error, ".json"),
    "v1/abort": (v1_abort, ".json"),
    "v1/abort.no_reason": (v1_abort_without_reason, ".json"),
    "ext/request.start.offer": (ext_request_start_offer, ".json"),
    "ext/response.ack": (ext_response_ack, ".json"),
    "ext/response.start": (ext_response_start, ".json"),
    "ext/response.heartbeat": (ext_response_heartbeat, ".json"),
    "ext/response.heartbeat.seq": (ext_response_heartbeat_seq, ".json"),
    "ext/request.credit": (ext_request_credit, ".json"),
    "ext/request.credit.seq": (ext_request_credit_seq, ".json"),
    "ext/request.credit.ended": (ext_request_credit_ended, ".json"),
    "ext/request.credit.probe": (ext_request_credit_probe, ".json"),
    "ext/response.credit": (ext_response_credit, ".json"),
    "ext/request.chunk.binary": (ext_request_chunk_binary, ".hex"),
    "ext/response.chunk.binary": (ext_response_chunk_binary, ".hex"),
    "ext/response.whole": (ext_response_whole, ".hex"),
    "ext/request.start.compact": (ext_request_start_compact, ".hex"),
    "ext/request.start.batch": (ext_request_start_batch, ".hex"),
    "ext/response.whole.compact": (ext_response_whole_compact, ".hex"),
    "ext/request.start.upgrade": (ext_request_start_upgrade, ".json"),
    "ext/response.ack.upgrade": (ext_response_ack_upgrade, ".json"),
    "ext/response.start.101": (ext_response_start_101, ".json"),
    "ext/response.end.integrity": (ext_response_end_integrity, ".json"),
    "ext/request.end.integrity": (ext_request_end_integrity, ".json"),
}


def golden_path(name: str) -> Path:
    return GOLDEN / (name + BUILDERS[name][1])


def file_bytes(name: str, payload: bytes) -> bytes:
    """What the golden file of a payload contains."""
    if BUILDERS[name][1] == ".hex":
        return payload.hex().encode("ascii") + b"\n"
    return payload + b"\n"


def regenerate() -> None:
    for path in GOLDEN.rglob("*"):
        if path.is_file():
            path.unlink()
    for name, (build, _) in BUILDERS.items():
        path = golden_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(file_bytes(name, build()))
        print(f"wrote {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", list(BUILDERS))
def test_emitted_frame_matches_its_golden_file_byte_for_byte(name: str) -> None:
    path = golden_path(name)
    assert path.is_file(), f"{path} missing: run python -m tests.unit.test_golden_frames --regenerate"
    build, _ = BUILDERS[name]
    assert file_bytes(name, build()) == path.read_bytes(), (
        f"the wire bytes of {name} changed; if deliberate, update docs/protocol.md and regenerate"
    )


def test_every_golden_file_belongs_to_a_frame() -> None:
    on_disk = {p.relative_to(GOLDEN).as_posix() for p in GOLDEN.rglob("*") if p.is_file()}
    assert on_disk == {golden_path(name).relative_to(GOLDEN).as_posix() for name in BUILDERS}


def test_every_v1_frame_type_has_a_golden_file() -> None:
    types = {json.loads(golden_path(n).read_bytes())["type"] for n in BUILDERS if n.startswith("v1/")}
    assert types == set(V1_FIELDS)


@pytest.mark.parametrize("name", [n for n in BUILDERS if n.startswith("v1/")])
def test_v1_goldens_are_reference_v1_frames_only(name: str) -> None:
    """The checked-in v1 bytes hold only reference fields: no extensions, no binary."""
    raw = golden_path(name).read_bytes()[:-1]
    assert raw[:1] == b"{" and raw.isascii()
    obj = json.loads(raw)
    assert set(obj) <= V1_FIELDS[obj["type"]]
    assert obj["requestId"] == RID
    if "data" in obj:
        assert "=" not in obj["data"] and codec.b64url_decode(obj["data"]) == DATA
    # And our own decoder reads back exactly what was meant.
    assert codec.encode_frame(codec.decode_frame(raw, RID)) == raw


@pytest.mark.parametrize("build", V1_SERVER_BUILDERS, ids=lambda b: b.__name__)
@pytest.mark.parametrize(
    "variant",
    [{"fast_path": True}, {"fast_path": False, "offer": "OFFER"}],
    ids=["fast_path_server_v1_caller", "v1_mode_server_extended_caller"],
)
def test_server_v1_bytes_are_the_same_in_every_way_of_being_in_v1_mode(
    build: Callable[..., bytes], variant: dict[str, Any]
) -> None:
    """A fast-path server facing a v1 caller, and a v1-mode server facing an extended caller,
    emit exactly the golden v1 bytes."""
    if variant.get("offer") == "OFFER":
        variant = {**variant, "offer": OFFER}
    assert build(**variant) == build()


# What the caller of ``_caller(has_body=True, deadline=DEADLINE_UNIX_MS)`` asks for, as a frame.
BODY_DEADLINE_START: Final = f.RequestStart(
    RID,
    "POST",
    "/api/items?tag=a&tag=b",
    HEADERS,
    SUBJECTS.client_reply(RID, CLIENT_ID),
    SUBJECTS.abort(RID),
    SUBJECTS.body(RID),
    DEADLINE_UNIX_MS,
)


def test_stream_output_equals_encode_frame_of_the_same_frame() -> None:
    """The hand-built hot-path encoders agree with the generic encoder, byte for byte."""
    expected: dict[str, f.Frame] = {
        "v1/request.start.body_deadline": BODY_DEADLINE_START,
        "v1/request.chunk": f.RequestChunk(RID, 0, DATA),
        "v1/request.end": f.RequestEnd(RID, 1),
        "v1/response.ack": f.ResponseAck(RID),
        "v1/response.start.status_text": f.ResponseStart(RID, 404, [], "Not Found"),
        "v1/response.chunk": f.ResponseChunk(RID, 0, DATA),
        "v1/response.end": f.ResponseEnd(RID, 1),
        "v1/abort": f.Abort(RID, "tunnel_timeout"),
        "ext/response.heartbeat": f.ResponseHeartbeat(RID),
        "ext/response.heartbeat.seq": f.ResponseHeartbeat(RID, 1),
        "ext/request.credit.seq": f.RequestCredit(RID, 32768, 3),
        "ext/request.credit.ended": f.RequestCredit(RID, 32768, 3, ended=True),
        "ext/request.credit.probe": f.RequestCredit(RID, 32768, probe=True),
    }
    for name, frame in expected.items():
        assert BUILDERS[name][0]() == codec.encode_frame(frame), name
    assert ext_response_chunk_binary() == codec.encode_frame(f.ResponseChunk(RID, 0, DATA), binary=True)
    assert ext_request_chunk_binary() == codec.encode_frame(f.RequestChunk(RID, 1, DATA), binary=True)


def test_binary_golden_layouts_are_as_documented() -> None:
    """docs/protocol.md: 0x00, kind, seq u64be, then data (whole: headLength u32be, head, data)."""
    chunk = bytes.fromhex(golden_path("ext/request.chunk.binary").read_text().strip())
    assert chunk[:10] == b"\x00\x01" + (1).to_bytes(8, "big") and chunk[10:] == DATA
    chunk = bytes.fromhex(golden_path("ext/response.chunk.binary").read_text().strip())
    assert chunk[:10] == b"\x00\x02" + (0).to_bytes(8, "big") and chunk[10:] == DATA
    whole = bytes.fromhex(golden_path("ext/response.whole").read_text().strip())
    assert whole[:10] == b"\x00\x03" + bytes(8)
    head_length = int.from_bytes(whole[10:14], "big")
    head = json.loads(whole[14 : 14 + head_length])
    assert head == {
        "type": "response.start",
        "requestId": RID,
        "status": 200,
        "headers": [["content-type", "text/plain"]],
        "crc32c": google_crc32c.value(DATA),  # the integrity extension: the body's CRC-32C in the head
    }
    assert whole[14 + head_length :] == DATA


def test_compact_golden_layouts_are_as_documented() -> None:
    """docs/protocol.md section 2: the compact start and the compact response.whole head."""
    start = bytes.fromhex(golden_path("ext/request.start.compact").read_text().strip())
    # 0x00, kind 4, flags (1 body | 2 deadline), deadlineUnixMs u64be, then NUL-ended UTF-8 fields.
    assert start[:11] == b"\x00\x04\x03" + DEADLINE_UNIX_MS.to_bytes(8, "big")
    fields = start[11:].decode().split("\x00")
    assert fields[-1] == ""
    rid, method, url, extensions, *header_fields, _ = fields
    assert (rid, method, url) == (RID, "POST", "/api/items?tag=a&tag=b")
    offer = json.loads(golden_path("ext/request.start.offer").read_bytes())["extensions"]
    assert json.loads(extensions) == offer
    assert list(zip(header_fields[::2], header_fields[1::2], strict=True)) == HEADERS
    # The subjects travel as the message's NATS reply (reply) or follow from the id (abort, body).
    decoded = codec.decode_compact_start(start, SUBJECTS.client_reply(RID, CLIENT_ID), SUBJECTS.base)
    assert decoded == dataclasses.replace(
        BODY_DEADLINE_START, extensions=dataclasses.replace(OFFER, binary_head=True, reply_batches=True)
    )

    whole = bytes.fromhex(golden_path("ext/response.whole.compact").read_text().strip())
    # 0x00, kind 5, flags (1 crc32c | 4 statusText | 8 takes compact starts), status u16be,
    # checksum u32be, headLength u32be, head (NUL-ended: statusText, then name, value, ...), data.
    assert whole[:3] == b"\x00\x05\x0d"
    assert int.from_bytes(whole[3:5], "big") == 200
    assert int.from_bytes(whole[5:9], "big") == google_crc32c.value(DATA)
    head_length = int.from_bytes(whole[9:13], "big")
    assert whole[13 : 13 + head_length] == b"OK\x00content-type\x00text/plain\x00"
    assert whole[13 + head_length :] == DATA


def test_start_batch_golden_layout_is_as_documented() -> None:
    """docs/protocol.md section 2 (``startBatches``): 0x00, kind 6, then per start
    replyLength u16be, startLength u32be, the reply subject (UTF-8), the compact start."""
    batch = bytes.fromhex(golden_path("ext/request.start.batch").read_text().strip())
    assert batch[:2] == b"\x00\x06"
    offset, entries = 2, []
    while offset < len(batch):
        reply_length = int.from_bytes(batch[offset : offset + 2], "big")
        start_length = int.from_bytes(batch[offset + 2 : offset + 6], "big")
        reply = batch[offset + 6 : offset + 6 + reply_length].decode()
        start = batch[offset + 6 + reply_length : offset + 6 + reply_length + start_length]
        assert len(start) == start_length
        entries.append((reply, start))
        offset += 6 + reply_length + start_length
    assert offset == len(batch) and start_batch.decode(batch) == entries
    for (reply, start), (rid, url, headers) in zip(entries, BATCHED_STARTS, strict=True):
        assert reply == SUBJECTS.client_reply(rid, CLIENT_ID)
        # 0x00, kind 4, flags 0 (no body, no deadline), deadline 0, then the NUL-ended fields.
        assert start[:11] == b"\x00\x04\x00" + bytes(8)
        decoded = codec.decode_compact_start(start, reply, SUBJECTS.base)
        assert (decoded.request_id, decoded.method, decoded.url, decoded.headers) == (
            rid,
            "GET",
            url,
            headers,
        )
        assert decoded.body_subject is None and decoded.deadline_unix_ms is None


def test_integrity_end_frames_carry_the_byte_count_and_crc32c_of_the_body() -> None:
    for name in ("ext/request.end.integrity", "ext/response.end.integrity"):
        end = json.loads(golden_path(name).read_bytes())
        assert end["bytes"] == len(DATA) and end["crc32c"] == google_crc32c.value(DATA), name


def test_extension_objects_are_as_documented() -> None:
    start = json.loads(golden_path("ext/request.start.offer").read_bytes())
    assert start["extensions"] == {
        "binaryData": True,
        "window": WINDOW,
        "heartbeatMs": 6666,
        "maxFrame": MAX_PAYLOAD,
        "wholeResponse": True,
        "integrity": "crc32c",
        "binaryHead": True,
        "replyBatches": True,
    }
    ack = json.loads(golden_path("ext/response.ack").read_bytes())
    assert ack["extensions"] == {
        "binaryData": True,
        "window": WINDOW,
        "heartbeatMs": 6666,
        "maxFrame": MAX_PAYLOAD,
        "upSubject": SUBJECTS.server_up(RID, SERVER_ID),
        "integrity": "crc32c",
        "binaryStart": True,
        "startBatches": True,
    }


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        sys.exit("usage: python -m tests.unit.test_golden_frames --regenerate")
    regenerate()
