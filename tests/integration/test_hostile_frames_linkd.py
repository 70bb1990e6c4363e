"""Random and malformed frames published at a live linkd daemon (not a bare tunnel server).

tests/integration/test_tunnel_hostile_frames.py covers ``tunnel.serve`` frame by frame; here
the target is the product: a ``LinkDaemon`` online through the real gateway session on an
operator-mode nats-server, with its routes and runs. The attacker publishes with an
unrestricted connection (a daemon's own credential could not reach another host at all, see
test_isolation.py). Afterwards the daemon still answers status and work, is still online,
logged no error or traceback, and counted the junk as malformed.
"""

from __future__ import annotations

import json
import logging
import random
import struct
from pathlib import Path
from typing import Any, Final

import pytest

import tunnel
from linkd.daemon import State
from tests.helpers import NatsServerFactory, wait_until
from tests.integration.gateway_harness import start_operator_server
from tests.integration.linkd_harness import live_gateway, probe, running_daemon

pytestmark = pytest.mark.timeout(60)

TIMEOUT: Final = 10.0


def start_frame(subjects: tunnel.HostSubjects, rid: str, **fields: Any) -> dict[str, Any]:
    frame: dict[str, Any] = {
        "type": "request.start",
        "protocol": "tunnel.v1",
        "requestId": rid,
        "method": "GET",
        "url": "/api/links/status",
        "headers": [],
        "replySubject": subjects.reply(rid),
        "abortSubject": subjects.abort(rid),
    }
    frame.update(fields)
    return {k: v for k, v in frame.items() if v is not None}


def barrage(subjects: tunnel.HostSubjects, max_payload: int) -> list[bytes]:
    rng = random.Random(9)
    js = [
        start_frame(subjects, "h1", type="request.explode"),
        start_frame(subjects, "h2", type=None),
        start_frame(subjects, "h3", requestId=12345),
        start_frame(subjects, "h4", method=["GET"]),
        start_frame(subjects, "h5", url={"path": "/"}),
        start_frame(subjects, "h6", headers="x: y"),
        start_frame(subjects, "h7", headers=[["x-h", "v"]] * 600),
        start_frame(subjects, "h8", headers=[["x-h", "a\r\nInjected: yes"]]),
        start_frame(subjects, "h9", headers=[["n" * 2000, "v"]]),
        start_frame(subjects, "h10", replySubject="_INBOX.elsewhere"),
        start_frame(subjects, "h11", replySubject=">"),
        start_frame(subjects, "h12", protocol="tunnel.v9"),
        start_frame(subjects, "h13", deadlineUnixMs="never"),
        start_frame(subjects, "h14", extensions={"window": -5}),
        {"type": "abort", "requestId": "nobody"},
        {"type": "response.start", "requestId": "h1", "status": 200},
        [start_frame(subjects, "h15")],
        None,
    ]
    frames = [json.dumps(f).encode() for f in js]
    # Huge JSON just under the connection's max_payload, and deep nesting.
    filler = max_payload - 2000
    frames.append(json.dumps(start_frame(subjects, "huge", headers=[["x-pad", "v" * filler]])).encode())
    frames.append(json.dumps({"type": "request.start", "pad": "p" * filler}).encode())
    frames.append(b"[" * 200_000)
    # Truncated and unknown binary frames, garbage bytes, invalid UTF-8.
    frames += [
        b"\x00",
        b"\x00\x01",
        struct.pack(">BBQ", 0, 1, 0)[:7],
        struct.pack(">BBQ", 0, 250, 2**63) + b"x",
    ]
    frames += [rng.randbytes(rng.randrange(1, 4096)) for _ in range(40)]
    frames += [b'{"type":"request.start","requestId":"\xff\xfe"}', b"", b"null", b"{}"]
    return frames


async def test_a_live_daemon_survives_random_and_malformed_frames_and_keeps_serving(
    nats_server_factory: NatsServerFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    op = start_operator_server(nats_server_factory, tmp_path)
    async with (
        live_gateway(op.env(NATS_TUNNEL_SESSION_TTL_SECONDS="600")) as gw,
        running_daemon(tmp_path, gw.url, gw.token("hostile")) as d,
    ):
        server = d.daemon.server
        assert server is not None
        subjects = tunnel.HostSubjects.for_host(d.hostname)
        attacker = gw.nc
        frames = barrage(subjects, attacker.max_payload)
        before = server.stats.malformed_frames
        for _ in range(3):
            for i, payload in enumerate(frames):
                await attacker.publish(subjects.request, payload)
                await attacker.publish(subjects.abort(f"h{i}"), payload[:512])
                await attacker.publish(f"{subjects.base}.req.h{i}.up.x", payload[:512])
            await attacker.flush()
            # Between rounds: the daemon answers normally.
            assert (await probe(gw.nc, d.hostname))["tunnelHostname"] == d.hostname
        await wait_until(
            lambda: server.stats.malformed_frames >= before + len(frames),
            TIMEOUT,
            message=f"malformed frames: {server.stats.malformed_frames - before} of {len(frames)}",
        )
        # Work still goes through, and the daemon is still the same online daemon.
        item = {
            "runId": "after-hostile",
            "threadId": "t",
            "userId": "hostile",
            "runFenceToken": 1,
            "runner": "echo",
            "input": "still here",
        }
        async with await tunnel.fetch(
            gw.nc,
            f"tunnel://{d.hostname}/api/links/work",
            method="POST",
            headers=[("content-type", "application/json")],
            body=json.dumps(item).encode(),
            first_frame_timeout=TIMEOUT,
        ) as resp:
            assert resp.status == 202, await resp.text()
        assert d.daemon.state is State.ONLINE
        assert server.stats.handler_errors == 0
        assert [c.state for c in d.changes].count(State.OFFLINE) == 0
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert bad == [], [(r.name, r.getMessage()[:200]) for r in bad]
