"""``POST /api/links/session`` in operator mode, against a real operator-mode nats-server.

What a minted credential can and cannot do is decided by nats-server, so every
promise here is checked by connecting with the credential: it serves its own host
(and the gateway reaches it through the tunnel), it is refused everything of another
host, it dies at its expiry, it respects its allowed connection types, and a daemon
that keeps its own seed gets a JWT only.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.msg import Msg
from nats.errors import Error as NatsError

import tunnel
from contract.discovery import RESPONSE_PERMISSION, discovery_grant
from contract.permissions import PermissionGrant
from studio_gateway.hostnames import tunnel_hostname
from studio_gateway.nats_jwt import KeyKind, new_key
from tests.helpers import NatsServerFactory, wait_until
from tests.integration.gateway_harness import (
    EVENT_TIMEOUT,
    Gateway,
    OperatorServer,
    connect_daemon,
    creds_auth,
    jwt_claims,
    own_key_auth,
    running_gateway,
    serve_status,
    start_operator_server,
)

TTL = 600


@pytest.fixture
def op(nats_server_factory: NatsServerFactory, tmp_path: Path) -> OperatorServer:
    return start_operator_server(nats_server_factory, tmp_path)


async def fetch_text(gateway: Gateway, url: str) -> tuple[int, str]:
    async with await tunnel.fetch(gateway.nc, url, first_frame_timeout=EVENT_TIMEOUT) as resp:
        return resp.status, await resp.text()


async def test_minted_credential_serves_its_own_host_and_the_gateway_reaches_it(op: OperatorServer) -> None:
    async with running_gateway(op.env(NATS_TUNNEL_SESSION_TTL_SECONDS=str(TTL))) as gw:
        before = int(time.time())
        session = await gw.ok_session("alice@example.com")
        host = session["tunnelHostname"]
        assert host == tunnel_hostname("alice@example.com")
        assert session["connection"] == {
            "urls": [op.server.url],
            "allowedConnectionTypes": ["STANDARD", "WEBSOCKET"],
            "tunnelPrefix": tunnel.DEFAULT_PREFIX,
        }
        assert set(session) == {"connection", "credentials", "expiresAt", "tunnelHostname"}
        assert set(session["credentials"]) == {"jwt", "creds"}
        assert "-----BEGIN USER NKEY SEED-----" in session["credentials"]["creds"]

        claims = jwt_claims(session["credentials"]["jwt"])
        assert claims["iss"] == op.setup.account_signing.public_key
        assert claims["nats"]["issuer_account"] == op.setup.account.public_key
        assert before + TTL <= claims["exp"] <= int(time.time()) + TTL
        assert time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(claims["exp"])) == session["expiresAt"]
        subjects = tunnel.HostSubjects.for_host(host)
        base = subjects.base
        # Discovery of its own host (contract.discovery), the tunnel rules, then the run uplink
        # (its own runs' events, JetStream acks in its own inbox).
        discovery = discovery_grant(host)
        assert claims["nats"]["pub"] == {
            "allow": [*discovery.publish, f"{base}.req.*.reply", f"{base}.req.*.reply.*", f"{base}.runs.*"]
        }
        assert claims["nats"]["resp"] == RESPONSE_PERMISSION
        assert claims["nats"]["sub"] == {
            "allow": [
                *discovery.subscribe,
                f"{base}.request",
                f"{base}.req.*.abort",
                f"{base}.req.*.body",
                f"{base}.req.*.up.*",
                subjects.ready,
                f"{base}.inbox.>",
            ]
        }

        daemon = await connect_daemon(op.server.url, **creds_auth(session["credentials"]["creds"]))
        try:
            server = await serve_status(daemon.nc, host)
            assert await fetch_text(gw, f"tunnel://{host}/hello") == (200, f"hello from {host}")
            # Both caller reply shapes work: the shared-reply default and the reference P.req.<id>.reply.
            v1_client = tunnel.TunnelClient(
                gw.nc, shared_replies=False, timeouts=tunnel.Timeouts(first_frame=EVENT_TIMEOUT)
            )
            async with await v1_client.fetch(f"tunnel://{host}/hello") as resp:
                assert resp.status == 200
            await v1_client.aclose()
            await server.close()
            assert daemon.errors == []
        finally:
            await daemon.nc.close()


async def test_credential_is_refused_every_subject_of_another_host_and_that_host_sees_nothing(
    op: OperatorServer,
) -> None:
    async with running_gateway(op.env()) as gw:
        alice = await gw.ok_session("alice")
        bob_host = tunnel_hostname("bob")
        alice_p = tunnel.HostSubjects.for_host(alice["tunnelHostname"])
        bob_p = tunnel.HostSubjects.for_host(bob_host)

        # Bob's side, observed with the gateway's unrestricted connection: everything under his prefix.
        seen_by_bob: list[str] = []
        alice_marker = asyncio.Event()

        async def observe(msg: Msg) -> None:
            if msg.subject.startswith(bob_p.base + "."):
                seen_by_bob.append(msg.subject)
            elif msg.subject == alice_p.reply("marker"):
                alice_marker.set()

        observer = await gw.nc.subscribe(f"{tunnel.DEFAULT_PREFIX}.>", cb=observe)
        bob_daemon_requests: list[str] = []

        async def bob_handler(request: tunnel.Request) -> tunnel.Response:
            bob_daemon_requests.append(request.path)
            return tunnel.Response(200, [], b"bob")

        bob_server = await tunnel.serve(gw.nc, bob_host, bob_handler)
        await gw.nc.flush()

        daemon = await connect_daemon(op.server.url, **creds_auth(alice["credentials"]["creds"]))
        try:
            # Subscribing to Bob's subjects (or everything) is refused.
            received_by_alice: list[str] = []

            async def alice_cb(msg: Msg) -> None:
                received_by_alice.append(msg.subject)

            for subject in (bob_p.request, bob_p.all_aborts, f"{bob_p.base}.>", ">", "_INBOX.>"):
                await daemon.nc.subscribe(subject, cb=alice_cb)
                await daemon.wait_error(f'permissions violation for subscription to "{subject}"')
            # Publishing into Bob's host (a forged request, a forged reply) is refused.
            start = b'{"type":"request.start","protocol":"tunnel.v1","requestId":"x"}'
            for subject in (
                bob_p.request,
                bob_p.reply("abc"),
                bob_p.client_reply("abc", "c1"),
                "other.subject",
            ):
                await daemon.nc.publish(subject, start)
                await daemon.wait_error(f'permissions violation for publish to "{subject}"')
            # An allowed publish after the refused ones: once the observer sees it, the server
            # has processed everything Alice sent before it (one connection is ordered).
            await daemon.nc.publish(alice_p.reply("marker"), b"marker")
            await asyncio.wait_for(alice_marker.wait(), EVENT_TIMEOUT)
            assert seen_by_bob == []
            assert bob_daemon_requests == []
            # And the refused subscriptions deliver nothing: traffic to Bob still reaches only Bob.
            status, body = await fetch_text(gw, f"tunnel://{bob_host}/secret")
            assert (status, body) == (200, "bob")
            await daemon.nc.flush()
            assert received_by_alice == []
            # Serving Bob's host with Alice's credential fails too (the request subscription is
            # refused), loudly: serve() raises instead of returning a server that never answers.
            errors_before = len(daemon.errors)
            with pytest.raises(tunnel.PermissionDenied):
                await tunnel.serve(daemon.nc, bob_host, bob_handler)
            await wait_until(lambda: len(daemon.errors) > errors_before, EVENT_TIMEOUT)
            # (the first subscription serve() makes is refused: the request subscription comes last)
            assert f'subscription to "{bob_p.base}.'.lower() in daemon.errors[errors_before]
        finally:
            await daemon.nc.close()
            await bob_server.close()
            await observer.unsubscribe()


async def test_credential_stops_working_at_its_expiry(op: OperatorServer) -> None:
    async with running_gateway(op.env(NATS_TUNNEL_SESSION_TTL_SECONDS="2")) as gw:
        session = await gw.ok_session("carol")
        creds = session["credentials"]["creds"]
        exp = jwt_claims(session["credentials"]["jwt"])["exp"]
        # Valid now: it connects. At expiry the server closes the connection.
        daemon = await connect_daemon(op.server.url, **creds_auth(creds))
        await wait_until(lambda: daemon.nc.is_closed, timeout=exp - time.time() + EVENT_TIMEOUT)
        assert time.time() >= exp - 1
        # nats-py keeps the server's reason as last_error (it reaches no callback).
        assert "authentication expired" in str(daemon.nc.last_error).lower()
        # Expired: a new connection is refused outright.
        await wait_until(lambda: time.time() > exp + 1, timeout=EVENT_TIMEOUT)
        with pytest.raises(NatsError, match="Authorization Violation"):
            await connect_daemon(op.server.url, **creds_auth(creds))


async def test_websocket_only_credential_is_refused_on_the_standard_port_and_accepted_on_websocket(
    op: OperatorServer,
) -> None:
    ws_url = op.server.websocket_url
    assert ws_url is not None
    async with running_gateway(op.env(NATS_PUBLIC_URL=ws_url)) as gw:
        session = await gw.ok_session("dave")
        assert session["connection"]["allowedConnectionTypes"] == ["WEBSOCKET"]
        assert session["connection"]["urls"] == [ws_url]
        assert jwt_claims(session["credentials"]["jwt"])["nats"]["allowed_connection_types"] == ["WEBSOCKET"]
        creds = session["credentials"]["creds"]
        with pytest.raises(NatsError, match="Authorization Violation"):
            await connect_daemon(op.server.url, **creds_auth(creds))
        daemon = await connect_daemon(ws_url, **creds_auth(creds))
        try:
            host = session["tunnelHostname"]
            server = await serve_status(daemon.nc, host)
            assert await fetch_text(gw, f"tunnel://{host}/hello") == (200, f"hello from {host}")
            await server.close()
        finally:
            await daemon.nc.close()


async def test_daemon_keeps_its_seed_the_response_has_a_jwt_only_and_the_daemon_connects(
    op: OperatorServer,
) -> None:
    ws_url = op.server.websocket_url
    assert ws_url is not None
    own = new_key(KeyKind.USER)
    async with running_gateway(op.env(NATS_PUBLIC_URL=f"{op.server.url},{ws_url}")) as gw:
        resp = await gw.client.post(
            "/api/links/session", headers=gw.headers("erin"), json={"publicKey": own.public_key}
        )
        assert resp.status == 200
        raw = await resp.text()
        session = await resp.json()
        assert session["credentials"] == {"jwt": session["credentials"]["jwt"]}
        assert not re.search(r"S[OAU][A-Z2-7]{56}", raw), "a seed in the response"
        assert "SEED" not in raw and own.seed not in raw
        assert jwt_claims(session["credentials"]["jwt"])["sub"] == own.public_key
        assert session["connection"]["allowedConnectionTypes"] == ["STANDARD", "WEBSOCKET"]

        host = session["tunnelHostname"]
        for url in (op.server.url, ws_url):
            daemon = await connect_daemon(url, **own_key_auth(session["credentials"]["jwt"], own.seed))
            try:
                server = await serve_status(daemon.nc, host)
                assert await fetch_text(gw, f"tunnel://{host}/hello") == (200, f"hello from {host}")
                await server.close()
            finally:
                await daemon.nc.close()
        # A different seed cannot use that JWT (the nonce signature does not match its subject).
        stranger = new_key(KeyKind.USER)
        with pytest.raises(NatsError, match="Authorization Violation"):
            await connect_daemon(op.server.url, **own_key_auth(session["credentials"]["jwt"], stranger.seed))


@pytest.mark.parametrize(
    "body",
    [
        {"publicKey": "not-a-key"},
        {"publicKey": 42},
        {"publicKey": "account"},
        {"publicKey": "seed"},
        {"publicKey": "typo"},
        [1, 2],
        "just a string",
    ],
)
async def test_malformed_session_bodies_are_a_400_naming_the_problem(op: OperatorServer, body: Any) -> None:
    user_key = new_key(KeyKind.USER)
    if isinstance(body, dict) and body.get("publicKey") == "account":
        body = {"publicKey": new_key(KeyKind.ACCOUNT).public_key}
    elif isinstance(body, dict) and body.get("publicKey") == "seed":
        body = {"publicKey": user_key.seed}
    elif isinstance(body, dict) and body.get("publicKey") == "typo":
        key = user_key.public_key
        body = {"publicKey": key[:10] + ("A" if key[10] != "A" else "B") + key[11:]}
    async with running_gateway(op.env()) as gw:
        status, payload = await gw.session("frank", body)
        assert status == 400
        expected = "invalid_public_key" if isinstance(body, dict) else "invalid_body"
        assert payload["error"]["code"] == expected
        resp = await gw.client.post("/api/links/session", headers=gw.headers("frank"), data=b"{not json")
        assert resp.status == 400 and (await resp.json())["error"]["code"] == "invalid_body"


async def test_a_user_cannot_obtain_a_session_for_another_users_host(op: OperatorServer) -> None:
    mallory_host = tunnel_hostname("mallory")
    victim_host = tunnel_hostname("victim")
    async with running_gateway(op.env()) as gw:
        session = await gw.ok_session(
            "mallory",
            {"tunnelHostname": victim_host, "hostname": victim_host, "user": "victim", "sub": "victim"},
        )
        assert session["tunnelHostname"] == mallory_host
        claims = jwt_claims(session["credentials"]["jwt"])
        victim_base = tunnel.HostSubjects.for_host(victim_host).base
        granted = claims["nats"]["pub"]["allow"] + claims["nats"]["sub"]["allow"]
        assert granted and not any(victim_base in subject for subject in granted)
        # The server agrees: serving the victim's host with this credential is refused.
        daemon = await connect_daemon(op.server.url, **creds_auth(session["credentials"]["creds"]))
        try:
            with pytest.raises(tunnel.PermissionDenied, match=victim_host):
                await serve_status(daemon.nc, victim_host)  # loudly: not a server that never answers
            await daemon.wait_error("permissions violation for subscription")
        finally:
            await daemon.nc.close()


async def test_gateway_account_supports_jetstream_for_later_run_streams(
    nats_server_factory: NatsServerFactory, tmp_path: Path
) -> None:
    op = start_operator_server(nats_server_factory, tmp_path, jetstream=True)
    nc = await nats.connect(op.server.url, **creds_auth(op.gateway_creds.read_text()))
    try:
        js = nc.jetstream()
        await js.add_stream(name="RUNS_TEST", subjects=["runs.test.>"])
        ack = await js.publish("runs.test.1", b"event")
        assert ack.seq == 1
    finally:
        await nc.close()


async def test_the_account_key_itself_can_be_the_signer(op: OperatorServer) -> None:
    async with running_gateway(op.env(NATS_ACCOUNT_SIGNING_KEY=op.setup.account.seed)) as gw:
        session = await gw.ok_session("grace")
        claims = jwt_claims(session["credentials"]["jwt"])
        assert claims["iss"] == op.setup.account.public_key
        assert "issuer_account" not in claims["nats"]
        daemon = await connect_daemon(op.server.url, **creds_auth(session["credentials"]["creds"]))
        try:
            server = await serve_status(daemon.nc, session["tunnelHostname"])
            assert (await gw.me("grace"))["online"] is True
            await server.close()
        finally:
            await daemon.nc.close()


async def test_extra_grants_extend_daemon_credentials_within_their_own_host(op: OperatorServer) -> None:
    def run_uplink(subjects: tunnel.HostSubjects) -> PermissionGrant:
        return PermissionGrant(publish=(f"{subjects.base}.runs.*.events",))

    async with running_gateway(op.env(), extra_grants=(run_uplink,)) as gw:
        session = await gw.ok_session("heidi")
        base = tunnel.HostSubjects.for_host(session["tunnelHostname"]).base
        assert (
            jwt_claims(session["credentials"]["jwt"])["nats"]["pub"]["allow"][-1] == f"{base}.runs.*.events"
        )
        daemon = await connect_daemon(op.server.url, **creds_auth(session["credentials"]["creds"]))
        try:
            await daemon.nc.publish(f"{base}.runs.r1.events", b"{}")
            await daemon.nc.flush()
            assert daemon.errors == []
        finally:
            await daemon.nc.close()
