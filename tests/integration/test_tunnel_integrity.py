"""End-to-end integrity through a real nats-server: a wire tap flips one byte of a body on its
way, and the request fails with ``tunnel_integrity_error`` instead of completing with wrong bytes."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable

import pytest

import tunnel
from cli.nats_server import NatsServer
from tests.integration.tunnel_harness import MiB, connect_peers, serving
from tunnel._events import Publish
from tunnel._frames import BINARY_MAGIC

HOST = "desk.example"
BODY = bytes(range(256)) * 4096  # 1 MiB: several chunks


class FlipOnce:
    """A wire tap that flips one bit in the body of the n-th binary data frame it sees."""

    def __init__(self, nth: int = 2) -> None:
        self.nth = nth
        self.seen = 0
        self.flipped = False

    def __call__(self, pub: Publish) -> Iterable[Publish]:
        if pub.payload[:1] == bytes([BINARY_MAGIC]) and len(pub.payload) > 64 and not self.flipped:
            self.seen += 1
            if self.seen == self.nth:
                self.flipped = True
                payload = bytearray(pub.payload)
                payload[len(payload) // 2] ^= 0x10
                return [dataclasses.replace(pub, payload=bytes(payload))]
        return [pub]


async def download(request: tunnel.Request) -> tunnel.Response:
    return tunnel.Response(200, [("content-type", "application/octet-stream")], BODY)


async def test_a_flipped_response_byte_is_a_typed_error_never_a_200_with_wrong_bytes(
    nats_server: NatsServer,
) -> None:
    tap = FlipOnce()
    async with connect_peers(nats_server) as peers, serving(peers.server_nc, HOST, download, wire_tap=tap):
        resp = await tunnel.fetch(peers.caller_nc, f"tunnel://{HOST}/file")
        assert resp.status == 200  # the head is fine: the damage shows when the body ends
        with pytest.raises(tunnel.IntegrityError) as caught:
            await resp.read()
        assert tap.flipped and caught.value.code == "tunnel_integrity_error"
        # Untouched, the same download is byte-exact: the check costs no false alarms.
        clean = await tunnel.fetch(peers.caller_nc, f"tunnel://{HOST}/file")
        assert hashlib.sha256(await clean.read()).digest() == hashlib.sha256(BODY).digest()


async def test_a_flipped_request_byte_fails_the_upload_and_the_handler_sees_no_complete_body(
    nats_server: NatsServer,
) -> None:
    completed: list[int] = []

    async def upload(request: tunnel.Request) -> tunnel.Response:
        body = await request.read()
        completed.append(len(body))
        return tunnel.Response(200, [], b"stored")

    async with connect_peers(nats_server) as peers, serving(peers.server_nc, HOST, upload):
        tap = FlipOnce()
        client = tunnel.TunnelClient(peers.caller_nc, wire_tap=tap)
        with pytest.raises(tunnel.IntegrityError):
            resp = await client.fetch(f"tunnel://{HOST}/upload", method="PUT", body=BODY * 2)
            await resp.read()
        assert tap.flipped and completed == []
        clean = await tunnel.TunnelClient(peers.caller_nc).fetch(
            f"tunnel://{HOST}/upload", method="PUT", body=BODY * 2
        )
        assert await clean.read() == b"stored" and completed == [2 * MiB]
        await client.aclose()
