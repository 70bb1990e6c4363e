"""The integrity extension in the sans-IO state machines: each body direction's byte count and
checksum (CRC-32C, or CRC-32 where a peer offers only that) travel in its end frame (in the head
of a response.whole), and any difference from what arrived fails the request with
``IntegrityError`` instead of completing it."""

from __future__ import annotations

import dataclasses
import zlib

import google_crc32c
import pytest

from tests.unit.test_stream import RID, FakeClock, Link, body_bytes, connect, consume_all, data_of
from tunnel import _caller as caller_module
from tunnel import _codec as codec
from tunnel import _frames as f
from tunnel._caller import CallerPhase
from tunnel._errors import IntegrityError, RemoteProtocolError
from tunnel._events import BodyEnded, Publish, ResponseHead
from tunnel._integrity import BodyDigest
from tunnel._server_stream import ServerPhase


def flip_one_byte(pub: Publish, at: int = -1) -> Publish:
    """A data frame with one bit of its body flipped (binary frames: the last byte is body)."""
    payload = bytearray(pub.payload)
    payload[at] ^= 0x01
    return dataclasses.replace(pub, payload=bytes(payload))


def respond(link: Link, body: bytes) -> list[Publish]:
    """The server's response frames: start, the body's chunks, end (everything fits the window)."""
    start = link.server.start_response(200, [("content-type", "application/octet-stream")])
    chunks, taken = link.server.send_body(body)
    assert taken == len(body)
    return [start, *chunks, link.server.end_response()]


def test_both_directions_are_checked_and_an_intact_exchange_completes() -> None:
    link = connect(FakeClock(), method="POST", has_body=True)
    assert link.caller.sent_digest is not None and link.server.received_digest is not None
    upload = body_bytes(40_000, seed=3)
    frames, taken = link.caller.send_body(upload)
    assert taken == len(upload)
    events = link.to_server([*frames, link.caller.end_body()])
    assert data_of(events) == upload and isinstance(events[-1], BodyEnded)
    download = body_bytes(50_000, seed=4)
    events = link.to_caller(respond(link, download))
    assert data_of(events) == download and isinstance(events[-1], BodyEnded)
    assert link.caller.phase is CallerPhase.DONE
    end = link.to_caller_frames[-1]
    assert isinstance(end, f.ResponseEnd) and end.size == len(download) and end.checksum is not None


def test_one_flipped_response_byte_fails_the_request_at_its_end() -> None:
    link = connect(FakeClock())
    start, *chunks, end = respond(link, body_bytes(30_000))
    link.to_caller([start, *chunks[:-1], flip_one_byte(chunks[-1])])  # delivered, not yet trusted
    with pytest.raises(IntegrityError, match="arrived corrupted: crc32c") as caught:
        link.to_caller([end])
    assert caught.value.code == "tunnel_integrity_error"
    assert isinstance(caught.value, RemoteProtocolError)
    assert link.caller.phase is CallerPhase.FAILED and link.caller.error is caught.value


def test_one_flipped_request_byte_fails_the_request_at_its_end() -> None:
    link = connect(FakeClock(), method="PUT", has_body=True)
    frames, _ = link.caller.send_body(body_bytes(20_000))
    link.to_server([flip_one_byte(frames[0], at=20)])
    with pytest.raises(IntegrityError, match="request body arrived corrupted"):
        link.to_server([*frames[1:], link.caller.end_body()])
    assert link.server.phase is ServerPhase.FAILED
    error = link.server.error_response("tunnel_integrity_error", "corrupted")
    assert error is not None  # the caller hears why


def test_a_byte_count_that_differs_is_named() -> None:
    link = connect(FakeClock())
    start, chunk, end = respond(link, b"twelve bytes")
    short = dataclasses.replace(chunk, payload=chunk.payload[:-2])
    with pytest.raises(IntegrityError, match="12 bytes when sent, 10 bytes arrived"):
        link.to_caller([start, short, end])


def test_an_end_without_the_agreed_checksum_is_refused() -> None:
    link = connect(FakeClock())
    start, chunk, _ = respond(link, b"body")
    bare_end = Publish(
        link.caller.reply_subject, codec.encode_frame(f.ResponseEnd(link.caller.request_id, 1))
    )
    with pytest.raises(IntegrityError, match="without the byte count and checksum"):
        link.to_caller([start, chunk, bare_end])


def test_a_whole_response_carries_its_checksum_in_its_head() -> None:
    link = connect(FakeClock(), ack=False)
    whole = link.server.whole_response(200, [], None, b"small and whole")
    assert whole is not None
    frame = codec.decode_frame(whole.payload, link.caller.request_id)
    assert isinstance(frame, f.ResponseWhole) and frame.checksum is not None
    (head,) = link.to_caller([whole])
    assert isinstance(head, ResponseHead) and head.complete_body == b"small and whole"

    flipped = connect(FakeClock(), ack=False)
    whole = flipped.server.whole_response(200, [], None, b"small and whole")
    assert whole is not None
    with pytest.raises(IntegrityError):
        flipped.to_caller([flip_one_byte(whole)])


def test_plain_v1_peers_exchange_no_checksums() -> None:
    link = connect(FakeClock(), caller={"fast_path": False}, server={"fast_path": False})
    assert link.caller.received_digest is None and link.server.sent_digest is None
    link.to_caller(respond(link, b"v1 body"))
    end = link.to_caller_frames[-1]
    assert isinstance(end, f.ResponseEnd) and end.size is None and end.checksum is None
    assert link.caller.phase is CallerPhase.DONE


def test_a_request_end_repaired_from_a_credit_report_completes_without_a_checksum() -> None:
    """A lost request.end is presumed from the caller's report that it ended (all chunks here)."""
    link = connect(FakeClock(), method="POST", has_body=True)
    frames, _ = link.caller.send_body(b"abc")
    link.to_server(frames)
    link.caller.mark_published()
    link.caller.end_body()  # lost on the way
    link.caller.mark_published()
    report = f.RequestCredit(link.caller.request_id, link.caller.receive_window.granted or 1, 1, True)
    assert link.server.receive(report) == BodyEnded()
    consume_all(link.caller, [])


def test_the_caller_offers_crc32c_and_the_server_acks_it() -> None:
    link = connect(FakeClock(), method="POST", has_body=True)
    assert link.caller.sent_digest is not None and link.caller.sent_digest.algorithm == "crc32c"
    assert link.server.integrity == "crc32c"
    download = body_bytes(9_000, seed=5)
    link.to_caller(respond(link, download))
    end = link.to_caller_frames[-1]
    assert isinstance(end, f.ResponseEnd)
    assert end.checksum == f.Checksum("crc32c", google_crc32c.value(download))


def test_a_caller_that_offers_crc32_gets_crc32_both_ways(monkeypatch: pytest.MonkeyPatch) -> None:
    """A caller without a compiled CRC-32C offers zlib's CRC-32; the server follows its offer."""
    monkeypatch.setattr(caller_module, "PREFERRED", "crc32")
    link = connect(FakeClock(), method="PUT", has_body=True)
    assert link.server.integrity == "crc32"
    upload = body_bytes(7_000, seed=6)
    frames, _ = link.caller.send_body(upload)
    events = link.to_server([*frames, link.caller.end_body()])
    assert data_of(events) == upload
    download = body_bytes(5_000, seed=7)
    assert data_of(link.to_caller(respond(link, download))) == download
    end = link.to_caller_frames[-1]
    assert isinstance(end, f.ResponseEnd) and end.checksum == f.Checksum("crc32", zlib.crc32(download))
    assert link.caller.phase is CallerPhase.DONE


def test_an_unknown_checksum_offer_is_not_acked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(caller_module, "PREFERRED", "sha3-512")
    link = connect(FakeClock(), method="POST", has_body=True)
    assert link.server.integrity is None and link.server.received_digest is None
    assert link.caller.sent_digest is None and link.caller.received_digest is None
    link.to_caller(respond(link, b"unchecked"))
    assert link.caller.phase is CallerPhase.DONE


def test_an_end_frame_with_the_other_checksum_fails_the_request() -> None:
    link = connect(FakeClock())
    start, chunk, _ = respond(link, b"agreed on crc32c")
    other = f.ResponseEnd(link.caller.request_id, 1, 16, f.Checksum("crc32", zlib.crc32(b"agreed on crc32c")))
    end = Publish(link.caller.reply_subject, codec.encode_frame(other))
    with pytest.raises(IntegrityError, match="without the byte count and checksum both ends agreed on"):
        link.to_caller([start, chunk, end])


def test_an_end_frame_with_two_checksums_is_malformed() -> None:
    raw = b'{"type":"response.end","requestId":"%s","seq":1,"bytes":1,"crc32":1,"crc32c":2}' % RID.encode()
    with pytest.raises(f.FrameError, match="more than one checksum"):
        codec.decode_frame(raw, RID)


@pytest.mark.parametrize("algorithm", ["crc32c", "crc32"])
def test_a_running_checksum_is_the_same_over_bytes_views_and_bytearrays(algorithm: str) -> None:
    data = body_bytes(70_000, seed=8)
    whole = BodyDigest(algorithm)
    whole.update(data)
    pieces = BodyDigest(algorithm)
    view = memoryview(data)
    pieces.update(view[:10])  # a slice: copied for google-crc32c, which takes bytes only
    pieces.update(view[10:20_000])
    pieces.update(bytearray(data[20_000:50_000]))
    pieces.update(memoryview(bytearray(data))[50_000:])
    assert pieces.size == whole.size == len(data) and pieces.value == whole.value
    assert BodyDigest(algorithm).value == 0
    full_view = BodyDigest(algorithm)
    full_view.update(memoryview(data))  # a view of a whole bytes object: no copy, same value
    assert full_view.value == whole.value
