"""Hostile and malformed frames, from both directions, against a real nats-server.

Promise 9 of DESIGN.md: every frame from the network is validated; malformed or hostile frames
are dropped or answered with a protocol error and never crash a server (or a caller), and never
make it publish outside its host. The frames are written by hand and published with a raw
nats-py connection, the way an attacker (or a broken peer) would.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import struct
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

import tunnel
from cli.nats_server import NatsServer
from tests.helpers import wait_until
from tunnel._natsio.common import flush_everything

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
HOST: Final = "hostile.test"
SUBJECTS: Final = tunnel.HostSubjects.for_host(HOST)
P: Final = SUBJECTS.base
OTHER: Final = tunnel.HostSubjects.for_host("victim.test")
# Generous bound for "takes milliseconds locally" on a busy 2-core machine.
EVENT_TIMEOUT: Final = 5.0
# A peer that breaks the protocol must be noticed on its first bad frame, well within this.
NOTICE_WITHIN: Final = 2.0
# Caller timeouts far above NOTICE_WITHIN: a caller that waits for them instead has hung.
PATIENT: Final = 10.0


# --------------------------------------------------------------------------- fixtures


@dataclass
class CrashLog:
    """Everything that went wrong asynchronously: nats-py callback errors and loop exceptions."""

    errors: list[str] = field(default_factory=list)

    async def on_nats_error(self, exc: Exception) -> None:
        self.errors.append(f"nats-py error: {exc!r}")

    def on_loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.errors.append(f"event loop: {context.get('message')}: {context.get('exception')!r}")


@pytest.fixture
async def crash_log() -> AsyncIterator[CrashLog]:
    log = CrashLog()
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(log.on_loop_exception)
    try:
        yield log
    finally:
        loop.set_exception_handler(previous)


@contextlib.asynccontextmanager
async def connected(url: str, crash_log: CrashLog) -> AsyncIterator[Client]:
    nc = await nats.connect(url, error_cb=crash_log.on_nats_error, connect_timeout=EVENT_TIMEOUT)
    try:
        yield nc
    finally:
        await nc.close()


@pytest.fixture
async def server_nc(nats_server: NatsServer, crash_log: CrashLog) -> AsyncIterator[Client]:
    async with connected(nats_server.url, crash_log) as nc:
        yield nc


@pytest.fixture
async def client_nc(nats_server: NatsServer, crash_log: CrashLog) -> AsyncIterator[Client]:
    async with connected(nats_server.url, crash_log) as nc:
        yield nc


@pytest.fixture
async def raw(nats_server: NatsServer, crash_log: CrashLog) -> AsyncIterator[Client]:
    """The attacker's connection: publishes whatever bytes it likes, anywhere."""
    async with connected(nats_server.url, crash_log) as nc:
        yield nc


class App:
    """The handler behind the attacked server, with hooks to hold requests in flight."""

    def __init__(self) -> None:
        self.requests: dict[str, tunnel.Request] = {}
        self.arrived: dict[str, asyncio.Event] = {}
        self.release: dict[str, asyncio.Event] = {}

    def _event(self, table: dict[str, asyncio.Event], name: str) -> asyncio.Event:
        return table.setdefault(name, asyncio.Event())

    async def arrival(self, name: str) -> tunnel.Request:
        await asyncio.wait_for(self._event(self.arrived, name).wait(), EVENT_TIMEOUT)
        return self.requests[name]

    async def __call__(self, req: tunnel.Request) -> tunnel.Response:
        if req.path == "/hang":
            name = dict(req.query)["name"]
            self.requests[name] = req
            self._event(self.arrived, name).set()
            await self._event(self.release, name).wait()
            return tunnel.Response(200, [], f"released {name}")
        if req.path == "/upload":
            return tunnel.Response(200, [], hashlib.sha256(await req.read()).hexdigest())
        return tunnel.Response(200, [("x-test", "1")], f"hello {req.url}")


@pytest.fixture
async def app() -> App:
    return App()


@pytest.fixture
async def server(server_nc: Client, app: App) -> AsyncIterator[tunnel.TunnelServer]:
    srv = await tunnel.serve(server_nc, HOST, app)
    try:
        yield srv
    finally:
        await srv.close(timeout=1.0)


@pytest.fixture
def client(client_nc: Client) -> tunnel.TunnelClient:
    return tunnel.TunnelClient(client_nc, timeouts=tunnel.Timeouts(first_frame=PATIENT, idle=PATIENT))


_probe_counter = 0


async def assert_still_serves(client: tunnel.TunnelClient, crash_log: CrashLog) -> None:
    """A normal request still gets the right answer, and nothing crashed on the way."""
    global _probe_counter
    _probe_counter += 1
    resp = await client.fetch(f"tunnel://{HOST}/hello?probe={_probe_counter}")
    assert (resp.status, resp.header("x-test")) == (200, "1")
    assert await resp.text() == f"hello /hello?probe={_probe_counter}"
    assert crash_log.errors == []


async def publish_all(nc: Client, subject: str, payloads: list[bytes], reply: str = "") -> None:
    for payload in payloads:
        await nc.publish(subject, payload, reply=reply)
    await nc.flush()


async def wait_malformed(server: tunnel.TunnelServer, before: int, expected: int) -> None:
    await wait_until(
        lambda: server.stats.malformed_frames >= before + expected,
        timeout=EVENT_TIMEOUT,
        message=f"malformed_frames did not grow by {expected} (from {before})",
    )
    assert server.stats.malformed_frames == before + expected


# --------------------------------------------------------------------------- frame builders


def start(rid: str = "hostile0", **fields: Any) -> dict[str, Any]:
    """A valid plain-v1 request.start for the attacked host; ``fields`` override (None deletes)."""
    frame: dict[str, Any] = {
        "type": "request.start",
        "protocol": "tunnel.v1",
        "requestId": rid,
        "method": "GET",
        "url": "/hello",
        "headers": [],
        "replySubject": SUBJECTS.reply(rid),
        "abortSubject": SUBJECTS.abort(rid),
    }
    for key, value in fields.items():
        if value is None:
            frame.pop(key, None)
        else:
            frame[key] = value
    return frame


def js(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def binary(kind: int, seq: int = 0, data: bytes = b"") -> bytes:
    return struct.pack(">BBQ", 0, kind, seq) + data


def compact_start(*fields: str, flags: int = 0, deadline: int = 0, tail: bytes | None = None) -> bytes:
    """A compact request.start (docs/protocol.md section 2): NUL-ended UTF-8 fields."""
    body = tail if tail is not None else "".join(x + "\x00" for x in fields).encode()
    return struct.pack(">BBBQ", 0, 4, flags, deadline) + body


def compact_whole(flags: int = 0, status: int = 200, head: bytes = b"", data: bytes = b"") -> bytes:
    """A response.whole with a compact head."""
    return struct.pack(">BBBHII", 0, 5, flags, status, 0, len(head)) + head + data


COMPACT_EXT: Final = '{"binaryData":true,"wholeResponse":true,"binaryHead":true}'
RNG: Final = random.Random(0x5EED)
VALID_START: Final = js(start())


def _wrong_types() -> list[bytes]:
    variants: list[dict[str, Any]] = [
        start(requestId=5),
        start(requestId=""),
        start(requestId="has space"),
        start(requestId="x" * 200),
        start(requestId=None),
        start(type=5),
        start(type="request.explode"),
        start(type=None),
        start(protocol="tunnel.v2"),
        start(protocol=None),
        start(method=5),
        start(method=""),
        start(method="GE T"),
        start(method="X" * 64),
        start(url=5),
        start(url="no-leading-slash"),
        start(url="/with space"),
        start(url=None),
        start(headers="x"),
        start(headers={"a": "b"}),
        start(headers=[["only-name"]]),
        start(headers=[[1, "v"]]),
        start(headers=[["a", 2]]),
        start(headers=[["bad name", "v"]]),
        start(headers=None),
        start(replySubject=5),
        start(replySubject=None),
        start(abortSubject=[]),
        start(bodySubject=7),
        start(deadlineUnixMs="soon"),
        start(deadlineUnixMs=1.5),
        start(deadlineUnixMs=-1),
        start(deadlineUnixMs=2**60),
        start(extensions=[]),
        start(extensions={"window": -1}),
        start(extensions={"window": "big"}),
        start(extensions={"window": 2**60}),
        start(extensions={"heartbeatMs": 0}),
        start(extensions={"maxFrame": True}),
    ]
    return [js(v) for v in variants]


def _oversized() -> list[bytes]:
    return [
        js(start(headers=[["x-h", "v"]] * 513)),
        js(start(headers=[["x-h", "v" * (64 * 1024 + 1)]])),
        js(start(headers=[["n" * 1025, "v"]])),
        js(start(headers=[["x-h", "a\r\nInjected: yes"]])),
        js(start(headers=[["x-h", "nul\x00byte"]])),
        js(start(url="/" + "u" * (64 * 1024 + 1))),
        js(start(headers=[["x-huge", "v" * 1800]] * 513)),  # ~1 MB, just under max_payload
    ]


BARRAGES: Final[dict[str, list[bytes]]] = {
    "empty-payload": [b""],
    "random-bytes": [b"\xff" + RNG.randbytes(n) for n in (0, 7, 64, 4096)] + [RNG.randbytes(300)],
    "truncated-json": [VALID_START[:n] for n in (1, 2, len(VALID_START) // 2, len(VALID_START) - 1)],
    "json-non-objects": [b"[]", b"[" + VALID_START + b"]", b"42", b'"request.start"', b"null", b"true"],
    "invalid-utf8": [
        b'{"type":"request.start","requestId":"\xff\xfe"}',
        VALID_START.replace(b"/hello", b"/\xc3("),
    ],
    "deep-nesting": [b"[" * 100_000, b'{"a":' * 50_000],
    "wrong-types": _wrong_types(),
    "oversized-headers-and-values": _oversized(),
    "binary-frames": [
        b"\x00",
        binary(1, 0, b"chunk"),
        binary(2, 0, b"chunk"),
        binary(3, 0, b"\x00\x00\x00\x02{}"),
        binary(9, 0, b"unknown kind"),
        binary(255, 2**64 - 1),
    ],
    "compact-starts": [
        b"\x00\x04",
        compact_start(tail=b"\xff\xfe\xfd"),
        compact_start("hostile0", "GET", "/hello"),  # too few fields
        compact_start("bad id", "GET", "/hello", COMPACT_EXT),
        compact_start("hostile0", "GET", "/hello", COMPACT_EXT, flags=0xF0),
        compact_start("hostile0", "GET", "/hello", "{broken"),
        compact_start("hostile0", "GET", "/hello", COMPACT_EXT, "x", "a\r\nSet-Cookie: evil"),
        compact_start("hostile0", "GET", "/hello", COMPACT_EXT, *(["x", "v"] * 600)),
        compact_start("hostile0", "GET", "/hello", COMPACT_EXT),  # valid, but no reply subject
    ],
    "other-frame-types": [
        js({"type": "response.ack", "requestId": "hostile1"}),
        js({"type": "abort", "requestId": "hostile1"}),
        js({"type": "request.chunk", "requestId": "hostile1", "seq": 0, "data": "aGk"}),
        js({"type": "response.heartbeat", "requestId": "hostile1"}),
    ],
}


# --------------------------------------------------------------------------- server: request subject


@pytest.mark.parametrize("barrage", list(BARRAGES), ids=list(BARRAGES))
async def test_malformed_request_starts_are_counted_dropped_and_harmless(
    server: tunnel.TunnelServer,
    client: tunnel.TunnelClient,
    raw: Client,
    crash_log: CrashLog,
    barrage: str,
) -> None:
    payloads = BARRAGES[barrage]
    before = server.stats.malformed_frames
    await publish_all(raw, SUBJECTS.request, payloads)
    await wait_malformed(server, before, len(payloads))
    assert server.stats.requests == 0
    await assert_still_serves(client, crash_log)


async def test_malformed_start_with_a_reply_inside_the_host_is_answered_with_protocol_error(
    server: tunnel.TunnelServer, client: tunnel.TunnelClient, raw: Client, crash_log: CrashLog
) -> None:
    reply = SUBJECTS.reply("badstart1")
    sub = await raw.subscribe(reply)
    await publish_all(raw, SUBJECTS.request, [js(start("badstart1", method="GE T"))], reply=reply)
    msg = await sub.next_msg(timeout=EVENT_TIMEOUT)
    frame = json.loads(msg.data)
    assert frame["type"] == "response.error"
    assert frame["requestId"] == "badstart1"
    assert frame["code"] == "tunnel_protocol_error"
    await assert_still_serves(client, crash_log)


def _outside_subjects() -> list[str]:
    return [
        "evil.reply",
        OTHER.reply("hostile2"),  # another host's prefix
        f"{P}x.req.hostile2.reply",  # shares the prefix's characters but not its last token
        P,  # the prefix itself is not under the prefix
    ]


OUTSIDE_WATCH: Final = ["evil.>", f"{OTHER.base}.>", f"{P}x.>", P]


async def _watch(nc: Client, subjects: list[str]) -> list[Subscription]:
    subs = [await nc.subscribe(s) for s in subjects]
    await flush_everything(nc)
    return subs


async def _assert_nothing_arrived(
    subs: list[Subscription], server_nc: Client, raw: Client, what: str
) -> None:
    # Barrier: whatever the server published before now has reached the watchers' connection.
    await flush_everything(server_nc)
    await raw.flush()
    arrived = [(s.subject, s.pending_msgs) for s in subs if s.pending_msgs]
    assert arrived == [], f"the server published {what}: {arrived}"


async def test_request_start_naming_subjects_outside_the_host_is_dropped_and_never_answered(
    server: tunnel.TunnelServer,
    server_nc: Client,
    client: tunnel.TunnelClient,
    raw: Client,
    crash_log: CrashLog,
) -> None:
    watchers = await _watch(raw, OUTSIDE_WATCH)
    starts: list[bytes] = []
    for i, outside in enumerate(_outside_subjects()):
        starts.append(js(start(f"out{i}r", replySubject=outside)))
        starts.append(js(start(f"out{i}a", abortSubject=outside)))
        starts.append(js(start(f"out{i}b", method="POST", url="/upload", bodySubject=outside)))
        ext = {"binaryData": True, "window": 65536, "heartbeatMs": 50, "wholeResponse": True}
        starts.append(js(start(f"out{i}x", replySubject=outside, extensions=ext)))
    before = server.stats.malformed_frames
    await publish_all(raw, SUBJECTS.request, starts)
    await wait_malformed(server, before, len(starts))
    # A malformed start whose NATS reply subject is outside the host gets no answer either.
    before = server.stats.malformed_frames
    for outside in _outside_subjects():
        await publish_all(raw, SUBJECTS.request, [js(start("outmsg", method="GE T"))], reply=outside)
    await wait_malformed(server, before, len(_outside_subjects()))
    await assert_still_serves(client, crash_log)
    await _assert_nothing_arrived(watchers, server_nc, raw, "outside its host")
    assert server.stats.requests == 1  # only the normal fetch was ever accepted


NON_LITERAL_REPLIES: Final = {
    "full-wildcard": f"{P}.req.>",
    "token-wildcard": f"{P}.req.*.reply",
    "space": f"{P}.req.nl1.reply extra",
    "tab": f"{P}.req.nl1.reply\textra",
    "empty-token": f"{P}.req..reply",
}


@pytest.mark.parametrize("reply", list(NON_LITERAL_REPLIES.values()), ids=list(NON_LITERAL_REPLIES))
async def test_request_start_with_a_non_literal_reply_subject_is_dropped_as_malformed(
    server: tunnel.TunnelServer,
    server_nc: Client,
    client: tunnel.TunnelClient,
    raw: Client,
    crash_log: CrashLog,
    reply: str,
) -> None:
    """A reply subject must be one literal NATS subject: no wildcards, whitespace or empty tokens."""
    watcher = await raw.subscribe(f"{P}.>")
    await flush_everything(raw)
    before = server.stats.malformed_frames
    await publish_all(raw, SUBJECTS.request, [js(start("nonliteral1", replySubject=reply))])
    await wait_malformed(server, before, 1)
    await assert_still_serves(client, crash_log)
    await flush_everything(server_nc)
    await raw.flush()
    published = []
    while watcher.pending_msgs:
        msg = await watcher.next_msg(timeout=EVENT_TIMEOUT)
        if msg.subject != SUBJECTS.request and ("nonliteral1" in msg.data.decode("utf-8", "replace")):
            published.append(msg.subject)
    assert published == [], f"the server answered on {published}"


# --------------------------------------------------------------------------- server: abort subjects


async def test_garbage_on_abort_subjects_is_counted_and_harmless(
    server: tunnel.TunnelServer, client: tunnel.TunnelClient, raw: Client, crash_log: CrashLog
) -> None:
    payloads = [p for barrage in BARRAGES.values() for p in barrage[:3]]
    before = server.stats.malformed_frames
    for i, payload in enumerate(payloads):
        await raw.publish(SUBJECTS.abort(f"unknown{i}"), payload)
    await raw.publish(f"{P}.req.not!an$id.abort", js({"type": "abort", "requestId": "x"}))
    await raw.flush()
    await wait_malformed(server, before, len(payloads) + 1)
    await assert_still_serves(client, crash_log)


# --------------------------------------------------------------------------- server: body subjects

UP_GARBAGE: Final[dict[str, Callable[[str], bytes]]] = {
    "empty-payload": lambda rid: b"",
    "random-bytes": lambda rid: b"\xff" + RNG.randbytes(100),
    "truncated-json": lambda rid: js({"type": "request.end", "requestId": rid, "seq": 0})[:-3],
    "json-array": lambda rid: js([{"type": "request.end", "requestId": rid, "seq": 0}]),
    "wrong-types": lambda rid: js({"type": "request.credit", "requestId": rid, "bytes": "lots"}),
    "other-request-id": lambda rid: js({"type": "request.end", "requestId": "someone-else", "seq": 0}),
    "unknown-binary-kind": lambda rid: binary(9, 0, b"??"),
    "truncated-binary": lambda rid: b"\x00\x01\x00",
    "response-frame-upstream": lambda rid: binary(2, 0, b"not from a caller"),
    "ack-upstream": lambda rid: js({"type": "response.ack", "requestId": rid}),
}


async def test_malformed_frame_on_an_up_subject_fails_only_that_request(
    server: tunnel.TunnelServer,
    client: tunnel.TunnelClient,
    raw: Client,
    app: App,
    crash_log: CrashLog,
) -> None:
    for name, make in UP_GARBAGE.items():
        victim = asyncio.create_task(client.fetch(f"tunnel://{HOST}/hang?name={name}-a"))
        bystander = asyncio.create_task(client.fetch(f"tunnel://{HOST}/hang?name={name}-b"))
        victim_req = await app.arrival(f"{name}-a")
        await app.arrival(f"{name}-b")
        before = server.stats.malformed_frames
        rid = victim_req.request_id
        await publish_all(raw, SUBJECTS.server_up(rid, server.server_id), [make(rid)])
        with pytest.raises(tunnel.RemoteProtocolError) as info:
            await asyncio.wait_for(victim, NOTICE_WITHIN)
        assert info.value.code == "tunnel_protocol_error", name
        await wait_until(victim_req.cancelled.is_set, message=f"{name}: handler not cancelled")
        assert server.stats.malformed_frames == before + 1, name
        assert not bystander.done(), name
        app.release[f"{name}-b"].set()
        resp = await asyncio.wait_for(bystander, EVENT_TIMEOUT)
        assert await resp.text() == f"released {name}-b", name
    await wait_until(lambda: server.in_flight == 0)
    await assert_still_serves(client, crash_log)


async def test_a_burst_of_bad_frames_read_at_once_gets_one_error_frame(
    server: tunnel.TunnelServer,
    client: tunnel.TunnelClient,
    raw: Client,
    app: App,
    crash_log: CrashLog,
) -> None:
    """Up frames are handled in nats-py's read loop, where failing (a publish) waits for a task:
    the frames read with the first bad one must not fail the request again."""
    victim = asyncio.create_task(client.fetch(f"tunnel://{HOST}/hang?name=burst"))
    victim_req = await app.arrival("burst")
    rid = victim_req.request_id
    replies = await raw.subscribe(SUBJECTS.client_reply(rid, client.client_id))
    await flush_everything(raw)
    before = server.stats.malformed_frames
    bad = [make(rid) for make in UP_GARBAGE.values()]
    await publish_all(raw, SUBJECTS.server_up(rid, server.server_id), bad)
    with pytest.raises(tunnel.RemoteProtocolError):
        await asyncio.wait_for(victim, NOTICE_WITHIN)
    await wait_until(lambda: server.in_flight == 0)
    await server.nc.flush()  # whatever the server published for the victim has reached NATS
    await raw.flush()
    kinds = []
    while True:
        try:
            msg = await replies.next_msg(timeout=0.01)
        except nats.errors.TimeoutError:
            break
        kinds.append(json.loads(msg.data)["type"] if msg.data[:1] == b"{" else "binary")
    assert kinds.count("response.error") == 1, kinds
    assert server.stats.malformed_frames == before + 1  # the rest were dropped with the request
    await replies.unsubscribe()
    await assert_still_serves(client, crash_log)


@pytest.mark.parametrize("garbage", list(UP_GARBAGE), ids=list(UP_GARBAGE))
async def test_malformed_frame_on_a_v1_body_subject_fails_that_request_with_protocol_error(
    server: tunnel.TunnelServer,
    client: tunnel.TunnelClient,
    raw: Client,
    crash_log: CrashLog,
    garbage: str,
) -> None:
    """A plain v1 caller (written by hand) with a body: garbage on its body subject ends it."""
    rid = f"v1body{garbage.replace('-', '')}"
    replies = await raw.subscribe(SUBJECTS.reply(rid))
    v1_start = start(rid, method="POST", url="/upload", bodySubject=SUBJECTS.body(rid))
    await publish_all(raw, SUBJECTS.request, [js(v1_start)])
    ack = json.loads((await replies.next_msg(timeout=EVENT_TIMEOUT)).data)
    assert ack == {"type": "response.ack", "requestId": rid}  # plain v1: no extensions offered back
    before = server.stats.malformed_frames
    await publish_all(raw, SUBJECTS.body(rid), [UP_GARBAGE[garbage](rid)])
    error = json.loads((await replies.next_msg(timeout=NOTICE_WITHIN)).data)
    assert (error["type"], error["code"]) == ("response.error", "tunnel_protocol_error")
    assert server.stats.malformed_frames == before + 1
    await wait_until(lambda: server.in_flight == 0)
    await assert_still_serves(client, crash_log)


def _hostile_body_subject_starts(server: tunnel.TunnelServer) -> dict[str, dict[str, Any]]:
    """Plain v1 starts whose bodySubject would make the server listen to other requests' frames."""
    return {
        "wildcard-over-client-replies": start(
            "snoop1",
            method="POST",
            url="/upload",  # the handler waits for a body that never comes: the request lingers
            replySubject=f"{P}.req.snoop1.r",
            bodySubject=f"{P}.req.*.reply.*",
        ),
        "wildcard-over-up-subjects": start(
            "snoop2",
            method="POST",
            url="/upload",
            replySubject=f"{P}.req.snoop2.r",
            bodySubject=f"{P}.req.*.up.{server.server_id}",
        ),
    }


@pytest.mark.parametrize("attack", ["wildcard-over-client-replies", "wildcard-over-up-subjects"])
async def test_request_start_with_a_wildcard_body_subject_cannot_disturb_other_requests(
    server: tunnel.TunnelServer,
    client: tunnel.TunnelClient,
    raw: Client,
    app: App,
    crash_log: CrashLog,
    attack: str,
) -> None:
    hostile = _hostile_body_subject_starts(server)[attack]
    hostile_replies = await raw.subscribe(hostile["replySubject"])
    await publish_all(raw, SUBJECTS.request, [js(hostile)])
    # Wait until the server dealt with the hostile start: dropped it, or acked it (which it does
    # only after subscribing the body subject, so the subscription is live from here on).
    await wait_until(lambda: server.stats.malformed_frames > 0 or hostile_replies.pending_msgs > 0)
    # A concurrent request in flight (its ack and heartbeats cross the wildcard) ...
    victim = asyncio.create_task(client.fetch(f"tunnel://{HOST}/hang?name=victim"))
    await app.arrival("victim")
    # ... and one with a request body (its body and credit frames cross the up wildcard).
    body = RNG.randbytes(200_000)
    upload = await client.fetch(f"tunnel://{HOST}/upload", method="POST", body=body)
    assert await upload.text() == hashlib.sha256(body).hexdigest()
    app.release["victim"].set()
    resp = await asyncio.wait_for(victim, EVENT_TIMEOUT)
    assert await resp.text() == "released victim"
    assert crash_log.errors == []
    await publish_all(raw, SUBJECTS.abort(hostile["requestId"]), [js({"type": "abort", "requestId": "x"})])


# --------------------------------------------------------------------------- server: bursts


def _random_frame(rng: random.Random) -> bytes:
    kind = rng.randrange(4)
    if kind == 0:
        return rng.randbytes(rng.randrange(0, 200))
    if kind == 1:
        return b"\x00" + rng.randbytes(rng.randrange(0, 40))
    if kind == 2:
        return js(start(f"burst{rng.randrange(10**6)}"))[: rng.randrange(1, 120)]
    return js({"type": rng.choice(["request.start", "abort", "x"]), "requestId": rng.randrange(10**6)})


def _burst(n: int, seed: int) -> Iterator[tuple[str, bytes]]:
    rng = random.Random(seed)
    for i in range(n):
        subject = SUBJECTS.request if i % 2 else SUBJECTS.abort(f"burst{i}")
        yield subject, _random_frame(rng)


async def test_a_burst_of_1000_random_frames_is_counted_and_harmless(
    server: tunnel.TunnelServer, client: tunnel.TunnelClient, raw: Client, crash_log: CrashLog
) -> None:
    before = server.stats.malformed_frames
    for subject, payload in _burst(1000, seed=1):
        await raw.publish(subject, payload)
    await raw.flush()
    await wait_malformed(server, before, 1000)
    assert server.stats.requests == 0
    await assert_still_serves(client, crash_log)


async def test_a_server_process_survives_a_burst_of_1000_random_frames(
    nats_server: NatsServer, client_nc: Client, raw: Client
) -> None:
    hostname = "burst-proc.test"
    subjects = tunnel.HostSubjects.for_host(hostname)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.integration.tunnel_server_proc",
        nats_server.url,
        hostname,
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        assert (await asyncio.wait_for(proc.stdout.readline(), 15.0)).strip() == b"ready"
        rng = random.Random(2)
        for i in range(1000):
            subject = subjects.request if i % 2 else subjects.abort(f"burst{i}")
            await raw.publish(subject, _random_frame(rng))
        await raw.flush()
        client = tunnel.TunnelClient(client_nc, timeouts=tunnel.Timeouts(first_frame=PATIENT, idle=PATIENT))
        resp = await client.fetch(f"tunnel://{hostname}/hello?after=burst")
        assert await resp.text() == "hello /hello?after=burst"
        assert proc.returncode is None
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


# --------------------------------------------------------------------------- caller: a malicious server

# An answer: frames for the request's reply subject, or (subject, payload) to publish elsewhere.
Answer = Callable[[str, dict[str, Any]], list[bytes | tuple[str, bytes]]]


SMALL_WINDOW: Final = 64 * 1024


def _ack(rid: str, **ext: Any) -> bytes:
    frame: dict[str, Any] = {"type": "response.ack", "requestId": rid}
    if ext:
        frame["extensions"] = {"binaryData": True, "upSubject": SUBJECTS.server_up(rid, "fake"), **ext}
    return js(frame)


def _response_start(rid: str, status: Any = 200, **fields: Any) -> bytes:
    return js({"type": "response.start", "requestId": rid, "status": status, "headers": [], **fields})


def _whole(rid: str, head: dict[str, Any], data: bytes = b"", head_length: int | None = None) -> bytes:
    head_json = js(head)
    length = len(head_json) if head_length is None else head_length
    return binary(3, 0, struct.pack(">I", length) + head_json + data)


MALICIOUS_ANSWERS: Final[dict[str, Answer]] = {
    "garbage": lambda rid, s: [b"\xff" + RNG.randbytes(50)],
    "empty-payload": lambda rid, s: [b""],
    "truncated-json": lambda rid, s: [_ack(rid)[:-4]],
    "json-array": lambda rid, s: [js([{"type": "response.ack", "requestId": rid}])],
    "wrong-request-id": lambda rid, s: [_ack("not" + rid)],
    "missing-request-id": lambda rid, s: [js({"type": "response.ack"})],
    "request-frame-from-server": lambda rid, s: [
        js({"type": "request.chunk", "requestId": rid, "seq": 0, "data": "aGk"})
    ],
    "unknown-type": lambda rid, s: [js({"type": "response.surprise", "requestId": rid})],
    "chunk-as-first-frame": lambda rid, s: [binary(2, 0, b"early")],
    "chunk-before-start-json": lambda rid, s: [
        _ack(rid),
        js({"type": "response.chunk", "requestId": rid, "seq": 0, "data": "aGk"}),
    ],
    "chunk-before-start-binary": lambda rid, s: [_ack(rid, window=65536), binary(2, 0, b"early")],
    "end-before-start": lambda rid, s: [_ack(rid), js({"type": "response.end", "requestId": rid, "seq": 0})],
    "status-999": lambda rid, s: [_response_start(rid, 999)],
    "status-0": lambda rid, s: [_ack(rid), _response_start(rid, 0)],
    "status-as-string": lambda rid, s: [_response_start(rid, "200")],
    "header-injection": lambda rid, s: [_response_start(rid, 200, headers=[["x", "a\r\nSet-Cookie: evil"]])],
    "status-text-injection": lambda rid, s: [_response_start(rid, 200, statusText="OK\r\nX: y")],
    "unknown-binary-kind": lambda rid, s: [binary(9, 0, b"?")],
    "truncated-binary": lambda rid, s: [b"\x00\x02\x00\x00"],
    "compact-whole-truncated": lambda rid, s: [b"\x00\x05\x00\x00"],
    "compact-whole-header-injection": lambda rid, s: [compact_whole(head=b"x\x00a\r\nSet-Cookie: evil\x00")],
    "compact-whole-unknown-flags": lambda rid, s: [compact_whole(flags=0x40)],
    "up-subject-outside-the-request": lambda rid, s: [
        js({"type": "response.ack", "requestId": rid, "extensions": {"upSubject": "evil.up"}})
    ],
    "negative-window": lambda rid, s: [_ack(rid, window=-5)],
    "gap-in-chunks": lambda rid, s: [
        _ack(rid, window=65536),
        _response_start(rid),
        binary(2, 0, b"zero"),
        binary(2, 2, b"two"),
    ],
    "duplicate-chunk": lambda rid, s: [
        _ack(rid, window=65536),
        _response_start(rid),
        binary(2, 0, b"zero"),
        binary(2, 0, b"zero"),
    ],
    "end-with-wrong-seq": lambda rid, s: [
        _ack(rid, window=65536),
        _response_start(rid),
        binary(2, 0, b"zero"),
        js({"type": "response.end", "requestId": rid, "seq": 5}),
    ],
    "chunk-over-the-window": lambda rid, s: [
        _ack(rid, window=65536),
        _response_start(rid),
        binary(2, 0, b"x" * (s["extensions"]["window"] + 1)),  # == SMALL_WINDOW + 1
    ],
    "whole-head-longer-than-frame": lambda rid, s: [
        _whole(rid, {"type": "response.start", "requestId": rid, "status": 200, "headers": []}, b"", 10**6)
    ],
    "whole-for-another-request": lambda rid, s: [
        _whole(rid, {"type": "response.start", "requestId": "x" + rid, "status": 200, "headers": []})
    ],
    "whole-status-999": lambda rid, s: [
        _whole(rid, {"type": "response.start", "requestId": rid, "status": 999, "headers": []})
    ],
    "whole-not-a-start": lambda rid, s: [_whole(rid, {"type": "response.end", "requestId": rid, "seq": 0})],
}


class FakeServer:
    """Raw nats-py 'server' for the host: answers each start with chosen frames, records aborts."""

    def __init__(self, nc: Client, answer: Answer) -> None:
        self.nc = nc
        self.answer = answer
        self.starts: list[dict[str, Any]] = []
        self.aborts: list[dict[str, Any]] = []
        self.subs: list[Subscription] = []

    async def start(self) -> None:
        self.subs = [
            await self.nc.subscribe(SUBJECTS.request, queue=SUBJECTS.queue_group, cb=self._on_start),
            await self.nc.subscribe(SUBJECTS.all_aborts, cb=self._on_abort),
        ]
        await flush_everything(self.nc)  # NATS has the SUBs

    async def _on_start(self, msg: Msg) -> None:
        frame = json.loads(msg.data)
        self.starts.append(frame)
        if len(self.starts) > 1:
            return  # a republished start: the first answer is the test
        for item in self.answer(frame["requestId"], frame):
            subject, payload = item if isinstance(item, tuple) else (frame["replySubject"], item)
            await self.nc.publish(subject, payload)

    async def _on_abort(self, msg: Msg) -> None:
        self.aborts.append(json.loads(msg.data))


@pytest.mark.parametrize("answer", list(MALICIOUS_ANSWERS), ids=list(MALICIOUS_ANSWERS))
async def test_caller_rejects_a_malicious_server_on_its_first_bad_frame(
    raw: Client, client_nc: Client, crash_log: CrashLog, answer: str
) -> None:
    # A small window, so one frame can overrun it.
    client = tunnel.TunnelClient(
        client_nc,
        timeouts=tunnel.Timeouts(first_frame=PATIENT, idle=PATIENT),
        limits=tunnel.Limits(window=SMALL_WINDOW),
    )
    fake = FakeServer(raw, MALICIOUS_ANSWERS[answer])
    await fake.start()
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(tunnel.RemoteProtocolError) as info:
        resp = await asyncio.wait_for(client.fetch(f"tunnel://{HOST}/anything"), NOTICE_WITHIN)
        await asyncio.wait_for(resp.read(), NOTICE_WITHIN)
    took = loop.time() - began
    assert info.value.code == "tunnel_protocol_error"
    assert took < NOTICE_WITHIN
    assert client.in_flight == 0
    # The caller tells the server it gave up.
    await wait_until(lambda: len(fake.aborts) == 1, message="no abort published")
    assert fake.aborts[0]["requestId"] == fake.starts[0]["requestId"]
    assert crash_log.errors == []


async def test_caller_ignores_frames_forged_under_another_hosts_prefix(
    raw: Client, client: tunnel.TunnelClient, crash_log: CrashLog
) -> None:
    """Only host H publishes under H's prefix: frames for our request from elsewhere are dropped."""

    def answer(rid: str, s: dict[str, Any]) -> list[bytes | tuple[str, bytes]]:
        client_id = s["replySubject"].rsplit(".", 1)[1]
        forged = OTHER.client_reply(rid, client_id)
        return [
            (forged, b"\xff garbage from another host"),
            (forged, _response_start(rid, 500)),
            _response_start(rid, 200),
            js({"type": "response.end", "requestId": rid, "seq": 0}),
        ]

    fake = FakeServer(raw, answer)
    await fake.start()
    resp = await asyncio.wait_for(client.fetch(f"tunnel://{HOST}/forged"), NOTICE_WITHIN)
    assert resp.status == 200
    assert await resp.read() == b""
    assert client.protocol_errors == 2
    assert fake.aborts == []
    assert crash_log.errors == []
