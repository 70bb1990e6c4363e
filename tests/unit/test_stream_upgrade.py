"""Upgraded streams (a 101 that opens both directions) in the sans-IO state machines, fake clock.

The rules under test (docs/protocol.md, "Upgraded streams"): only a caller that asked for an
upgrade, answered by a server that said it can carry one, gets a 101 with a body; both
directions then flow at once with their own credit; the caller keeps a quiet stream alive with
keepalives and the server gives up on a silent caller, while neither stall rule applies.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.unit.test_stream import (
    CLIENT_ID,
    RID,
    SERVER_ID,
    SUBJECTS,
    FakeClock,
    Link,
    caller_options,
    consume_all,
    data_of,
    server_options,
)
from tunnel import _codec as codec
from tunnel import _frames as f
from tunnel._caller import CallerPhase, CallerStream
from tunnel._config import PEER_SILENCE_HEARTBEATS
from tunnel._errors import (
    IdleTimeout,
    LocalProtocolError,
    RemoteProtocolError,
    TunnelError,
    UpgradeUnsupported,
)
from tunnel._events import Acked, BodyEnded, DataReceived, ResponseHead
from tunnel._server_stream import ServerPhase, ServerStream

WS_HEADERS: f.Headers = [
    ("upgrade", "websocket"),
    ("connection", "Upgrade"),
    ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ("sec-websocket-version", "13"),
]
HEARTBEAT = 5.0  # the caller options' heartbeat interval (caller_options default)


def upgrade_caller(clock: FakeClock, *, upgrade: bool = True, **options: Any) -> CallerStream:
    return CallerStream(
        request_id=RID,
        subjects=SUBJECTS,
        reply_subject=SUBJECTS.client_reply(RID, CLIENT_ID),
        method="GET",
        url="/hmr?client=1",
        headers=list(WS_HEADERS),
        has_body=True,
        options=caller_options(**options),
        clock=clock,
        upgrade=upgrade,
    )


def open_link(clock: FakeClock, *, server: dict[str, Any] | None = None, upgrade: bool = True) -> Link:
    caller = upgrade_caller(clock, upgrade=upgrade)
    start = codec.decode_frame(caller.start().payload)
    assert isinstance(start, f.RequestStart)
    link = Link(
        caller,
        ServerStream(
            start,
            subjects=SUBJECTS,
            server_id=SERVER_ID,
            options=server_options(**(server or {})),
            clock=clock,
        ),
    )
    assert link.server.ack_now, "an upgrade carries a caller->server direction: acked at once"
    assert link.to_caller([link.server.ack()]) == [Acked()]
    return link


def switch(link: Link) -> ResponseHead:
    events = link.to_caller([link.server.start_response(101, [("upgrade", "websocket")])])
    assert len(events) == 1 and isinstance(events[0], ResponseHead)
    return events[0]


def test_the_offer_and_the_ack_say_upgrade_and_a_101_opens_both_directions() -> None:
    clock = FakeClock()
    link = open_link(clock)
    assert link.server.upgrade and link.caller.upgrade
    start = link.to_server_frames  # nothing sent yet besides the start, which Link did not carry
    assert start == []
    head = switch(link)
    assert head.status == 101 and head.has_body
    assert link.caller.upgraded and link.caller.phase is CallerPhase.RESPONDING
    assert link.server.phase is ServerPhase.RESPONDING and link.server.response_has_body

    # Server -> caller and caller -> server at once, each with its own sequence numbers.
    down, _ = link.server.send_body(b"server hello")
    up, _ = link.caller.send_body(b"caller hello")
    assert data_of(link.to_caller(down)) == b"server hello"
    assert data_of(link.to_server(up)) == b"caller hello"

    # The caller half-closes: the server still sends, then ends the stream for both.
    assert link.to_server([link.caller.end_body()]) == [BodyEnded()]
    more, _ = link.server.send_body(b"still here")
    assert data_of(link.to_caller(more)) == b"still here"
    assert link.to_caller([link.server.end_response()]) == [BodyEnded()]
    assert link.caller.phase is CallerPhase.DONE and link.server.phase is ServerPhase.DONE


def test_a_refused_upgrade_is_an_ordinary_response() -> None:
    link = open_link(FakeClock())
    events = link.to_caller([link.server.start_response(404, [("content-type", "text/plain")])])
    assert isinstance(events[0], ResponseHead) and events[0].status == 404 and events[0].has_body
    assert not link.caller.upgraded
    body, _ = link.server.send_body(b"no such socket")
    assert data_of(link.to_caller(body)) == b"no such socket"


def test_a_101_to_a_request_that_did_not_ask_stays_bodyless() -> None:
    link = open_link(FakeClock(), upgrade=False)
    assert not link.server.upgrade
    events = link.to_caller([link.server.start_response(101, [])])
    assert isinstance(events[0], ResponseHead) and not events[0].has_body
    assert link.caller.phase is CallerPhase.DONE and not link.caller.upgraded


def test_a_plain_v1_server_is_refused_with_a_typed_error() -> None:
    caller = upgrade_caller(FakeClock())
    with pytest.raises(UpgradeUnsupported, match="plain v1"):
        caller.receive(f.ResponseAck(RID))  # no extensions: a reference v1 server
    assert caller.phase is CallerPhase.FAILED
    abort = caller.abort("tunnel_upgrade_unsupported")
    assert abort is not None and abort.subject == SUBJECTS.abort(RID)


def test_an_extended_server_without_the_upgrade_extension_is_refused() -> None:
    caller = upgrade_caller(FakeClock())
    older = f.AckExtensions(
        binary=True, window=65536, heartbeat_ms=5000, up_subject=SUBJECTS.server_up(RID, SERVER_ID)
    )
    with pytest.raises(UpgradeUnsupported, match="without the upgrade extension"):
        caller.receive(f.ResponseStart(RID, 101, [], None, older))


def test_a_server_in_v1_mode_does_not_claim_upgrades() -> None:
    clock = FakeClock()
    caller = upgrade_caller(clock)
    start = codec.decode_frame(caller.start().payload)
    assert isinstance(start, f.RequestStart) and start.extensions is not None and start.extensions.upgrade
    server = ServerStream(
        start, subjects=SUBJECTS, server_id=SERVER_ID, options=server_options(fast_path=False), clock=clock
    )
    assert not server.upgrade
    with pytest.raises(UpgradeUnsupported):
        caller.receive(codec.decode_frame(server.ack().payload, RID))


def test_an_upgrade_needs_the_extensions() -> None:
    with pytest.raises(LocalProtocolError, match="fast_path"):
        upgrade_caller(FakeClock(), fast_path=False)


def test_a_101_is_never_a_whole_response() -> None:
    link = open_link(FakeClock())
    assert link.server.whole_response(101, [], None, b"") is None
    caller = upgrade_caller(FakeClock())
    ext = f.AckExtensions(
        binary=True,
        window=65536,
        heartbeat_ms=5000,
        up_subject=SUBJECTS.server_up(RID, SERVER_ID),
        upgrade=True,
    )
    with pytest.raises(RemoteProtocolError, match="whole"):
        caller.receive(f.ResponseWhole(RID, f.ResponseStart(RID, 101, [], None, ext), b""))


def test_a_quiet_caller_sends_keepalives_that_grant_nothing_new() -> None:
    clock = FakeClock()
    link = open_link(clock)
    switch(link)
    granted = link.caller.receive_window.granted
    assert link.caller.poll() == []
    due = link.caller.next_deadline()
    assert due is not None and due <= clock.now + HEARTBEAT
    clock.now = due
    keepalive = link.caller.poll()
    assert len(keepalive) == 1 and keepalive[0].subject == link.caller.up_subject
    frame = codec.decode_frame(keepalive[0].payload, RID)
    assert isinstance(frame, f.RequestCredit) and frame.limit == granted and not frame.probe
    # Sending data counts as a sign of life too: no keepalive right after a chunk.
    clock.advance(HEARTBEAT * 0.9)
    link.caller.send_body(b"x")
    clock.advance(HEARTBEAT * 0.2)
    frames = [codec.decode_frame(pub.payload, RID) for pub in link.caller.poll()]
    assert not [fr for fr in frames if isinstance(fr, f.RequestCredit) and not fr.probe]


def test_the_server_outlives_any_quiet_stretch_while_keepalives_arrive_and_no_stall_rule_fires() -> None:
    clock = FakeClock()
    link = open_link(clock, server={"stall_timeout": 1.0})
    switch(link)
    # The server's response window is spent: a plain request would stall after 1 s.
    sent, taken = link.server.send_body(b"x" * 200_000)
    assert taken < 200_000
    link.to_caller(sent)  # delivered, never read: no credit comes back
    for _ in range(100):  # 100 heartbeat intervals: hours of HMR socket idling, compressed
        clock.advance(HEARTBEAT)
        link.to_caller(link.server.poll())  # heartbeats, nothing else
        link.to_server(link.caller.poll())  # keepalives
        assert not link.server.finished and not link.caller.finished
    # The caller reads at last: credit flows and the rest goes out.
    link.to_server(consume_all(link.caller, [DataReceived(b"x" * taken)]))
    rest, more = link.server.send_body(b"x" * (200_000 - taken))
    assert more > 0 and rest


def test_the_server_gives_up_on_a_caller_gone_silent() -> None:
    clock = FakeClock()
    link = open_link(clock)
    switch(link)
    deadline = link.server.next_deadline()
    assert deadline is not None
    gave_up: TunnelError | None = None
    while gave_up is None:  # heartbeats go out while we wait; the caller (gone) answers nothing
        clock.now = max(clock.now, deadline)
        try:
            link.server.poll()
        except TunnelError as exc:
            gave_up = exc
            break
        deadline = link.server.next_deadline()
        assert deadline is not None
        assert clock.now < 1000.0 + (PEER_SILENCE_HEARTBEATS + 1) * HEARTBEAT, "never gave up"
    assert isinstance(gave_up, IdleTimeout) and "gone" in gave_up.message
    assert clock.now >= 1000.0 + PEER_SILENCE_HEARTBEATS * HEARTBEAT
    assert link.server.phase is ServerPhase.FAILED
    pub = link.server.error_response(gave_up.code, gave_up.message)
    assert pub is not None  # the caller is told, should it still be listening
