"""``tunnel._ws_protocol``: the sans-IO WebSocket end both sides of the tunnel use.

Two ends wired back to back (client and server roles), plus raw wsproto connections to
produce what our own sender never would (fragments, unmasked frames, bad UTF-8).
"""

from __future__ import annotations

import pytest
from wsproto.connection import CLIENT, SERVER, Connection
from wsproto.events import BytesMessage, Ping, TextMessage
from wsproto.frame_protocol import FrameProtocol, Opcode

from tunnel._ws_protocol import (
    WebSocketMessage,
    WebSocketProtocol,
    accept_token,
    new_key,
    split_tokens,
    valid_close_code,
    valid_key,
)


def pair(max_message_size: int = 1 << 20) -> tuple[WebSocketProtocol, WebSocketProtocol]:
    return (
        WebSocketProtocol(client=True, max_message_size=max_message_size),
        WebSocketProtocol(client=False, max_message_size=max_message_size),
    )


def test_accept_token_is_rfc_6455s_example() -> None:
    # RFC 6455 section 1.3
    assert accept_token("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_keys() -> None:
    key = new_key()
    assert valid_key(key)
    assert new_key() != key
    assert not valid_key(None)
    assert not valid_key("not base64!")
    assert not valid_key("c2hvcnQ=")  # "short": not 16 bytes


def test_split_tokens() -> None:
    assert split_tokens(["a, b", " c ", ""]) == ["a", "b", "c"]


def test_close_codes_an_endpoint_may_send() -> None:
    assert valid_close_code(1000) and valid_close_code(4999) and valid_close_code(1011)
    for code in (999, 1005, 1006, 1015, 5000):
        assert not valid_close_code(code)


def test_text_and_binary_both_ways_client_frames_masked() -> None:
    client, server = pair()
    frame = client.send_text("héllo")
    assert frame[1] & 0x80, "client frames are masked"
    assert server.receive_data(frame) == [WebSocketMessage("text", "héllo")]
    frame = server.send_bytes(b"\x00\xff")
    assert not frame[1] & 0x80, "server frames are not masked"
    assert client.receive_data(frame) == [WebSocketMessage("binary", b"\x00\xff")]


def test_messages_split_anywhere_and_fragmented_are_reassembled() -> None:
    client = WebSocketProtocol(client=True)
    raw = Connection(SERVER)
    wire = raw.send(TextMessage(data="frag", message_finished=False))
    wire += raw.send(TextMessage(data="mént", message_finished=False))
    wire += raw.send(Ping(payload=b"in between"))  # control frames may interleave fragments
    wire += raw.send(TextMessage(data="ed", message_finished=True))
    wire += raw.send(BytesMessage(data=b"\x01" * 300_000))
    received: list[WebSocketMessage] = []
    for i in range(0, len(wire), 7):  # seven bytes at a time: splits frames and UTF-8 sequences
        received += client.receive_data(wire[i : i + 7])
        assert client.buffered <= 300_000
    assert received == [WebSocketMessage("text", "fragménted"), WebSocketMessage("binary", b"\x01" * 300_000)]
    assert client.buffered == 0
    raw.receive_data(client.data_to_send())
    assert [type(e).__name__ for e in raw.events()] == ["Pong"]


def test_ping_is_answered_and_pong_counted() -> None:
    client, server = pair()
    assert server.receive_data(client.ping(b"data")) == []
    pong = server.data_to_send()
    assert pong
    assert client.receive_data(pong) == []
    assert (client.pongs_received, client.last_pong) == (1, b"data")
    with pytest.raises(ValueError, match="125"):
        client.ping(b"x" * 126)


def test_close_handshake_started_by_the_client() -> None:
    client, server = pair()
    server.receive_data(client.close(4000, "bye"))
    assert client.close_sent and not client.closed
    assert (server.close_code, server.close_reason) == (4000, "bye")
    assert server.closed and server.finished
    reply = server.data_to_send()
    assert client.receive_data(reply) == []
    assert (client.close_code, client.close_reason) == (4000, "bye")
    assert client.finished
    assert client.close(1000) == b"", "one close frame only"
    with pytest.raises(Exception, match="closing or closed"):
        client.send_text("late")


def test_messages_in_flight_before_the_close_reply_still_arrive() -> None:
    client, server = pair()
    text = server.send_text("in flight")
    server.receive_data(client.close())
    assert client.receive_data(text + server.data_to_send()) == [WebSocketMessage("text", "in flight")]
    assert client.close_code == 1000


def test_message_over_the_limit_fails_with_1009() -> None:
    client, server = pair(max_message_size=1000)
    assert server.receive_data(client.send_bytes(b"x" * 1000)) == [WebSocketMessage("binary", b"x" * 1000)]
    assert server.receive_data(client.send_bytes(b"x" * 1001)) == []
    assert server.failed and server.close_code == 1009
    assert server.buffered == 0
    client.receive_data(server.data_to_send())
    assert client.close_code == 1009
    # The client's reply completes the handshake; nothing more is delivered.
    assert server.receive_data(client.data_to_send()) == []
    assert server.finished and server.close_code == 1009


def test_unmasked_client_frame_is_a_protocol_error() -> None:
    server = WebSocketProtocol(client=False)
    unmasked = FrameProtocol(client=False, extensions=[]).send_data("hi", True)  # server-style frame
    assert server.receive_data(unmasked) == []
    assert server.close_code == 1002
    assert server.data_to_send()  # our close frame
    assert server.receive_data(b"more garbage") == []


def test_invalid_utf8_is_1007() -> None:
    client = WebSocketProtocol(client=True)
    proto = FrameProtocol(client=False, extensions=[])
    frame = proto._serialize_frame(Opcode.TEXT, b"\xff\xfe")
    assert client.receive_data(frame) == []
    assert client.close_code == 1007


def test_stream_end_without_close_is_1006() -> None:
    client, server = pair()
    client.receive_data(server.send_text("partial")[:-2])
    client.receive_data(None)
    assert client.closed and client.finished and client.close_code == 1006
    assert client.buffered == 0
    assert client.receive_data(b"after the end") == []


def test_invalid_close_arguments() -> None:
    client = WebSocketProtocol(client=True)
    with pytest.raises(ValueError):
        client.close(1006)
    with pytest.raises(ValueError):
        client.close(1000, "x" * 124)
    with pytest.raises(ValueError):
        WebSocketProtocol(client=True, max_message_size=0)


def test_pong_flood_is_bounded() -> None:
    client = WebSocketProtocol(client=True)
    raw = Connection(SERVER)
    pings = b"".join(raw.send(Ping(payload=b"p" * 125)) for _ in range(2000))
    client.receive_data(pings)
    assert len(client.data_to_send()) < 70 * 1024


def test_a_raw_client_connection_talks_to_our_server() -> None:
    raw = Connection(CLIENT)
    server = WebSocketProtocol(client=False)
    assert server.receive_data(raw.send(TextMessage(data="hi"))) == [WebSocketMessage("text", "hi")]


def test_the_size_limit_counts_text_in_utf8_bytes() -> None:
    client, server = pair(max_message_size=1000)
    assert server.receive_data(client.send_text("é" * 500)) == [WebSocketMessage("text", "é" * 500)]
    assert server.receive_data(client.send_text("é" * 501)) == []  # 501 characters, 1002 bytes
    assert server.close_code == 1009


def test_a_flood_of_empty_or_tiny_fragments_costs_only_its_bytes() -> None:
    """The message is reassembled in one buffer: millions of empty continuation frames hold no
    memory, and 1-byte fragments hold one byte each, until max_message_size closes with 1009."""
    limit = 64 * 1024
    empty = WebSocketProtocol(client=True, max_message_size=limit)
    empty.receive_data(b"\x01\x00")  # a text message begins: an empty first fragment, not final
    empty.receive_data(b"\x00\x00" * 200_000)  # empty continuations, none of them final
    assert empty.close_code is None and empty.buffered == 0
    assert empty.receive_data(b"\x80\x02hi") == [WebSocketMessage("text", "hi")]  # and it still ends
    tiny = WebSocketProtocol(client=True, max_message_size=limit)
    tiny.receive_data(b"\x02\x01x" + b"\x00\x01x" * (limit + 10))  # a binary message, 1-byte fragments
    assert tiny.close_code == 1009
    assert tiny.buffered <= limit
