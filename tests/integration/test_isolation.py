"""Isolation: one user's desktop credential, token or account reaches nothing of another user's.

Every credential here is minted by the real gateway code path (``POST /api/links/session``
on the real aiohttp app) and every refusal is decided by a real operator-mode nats-server,
so each test checks what the server enforces, not what the JWT claims say. Cases (one test
each, issue 9): another host's tunnel subjects (subscribe and publish), another host's run
subjects and inbox, JetStream's API, expired credentials (creds file and own key),
WEBSOCKET-only credentials on the plain port, bad bearer tokens on every authenticated
route, presence and sessions confined to the caller's own host, and other users' runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
from aiohttp import web
from nats.aio.msg import Msg
from nats.errors import Error as NatsError

import tunnel
from contract.run_protocol import run_event_subject, uplink_inbox_prefix
from studio_gateway.hostnames import tunnel_hostname
from studio_gateway.nats_jwt import KeyKind, new_key
from studio_gateway.runs.service import RUNS
from studio_gateway.sessions import DAEMON_MAX_SUBSCRIPTIONS
from tests.helpers import NatsServerFactory, wait_until
from tests.integration.gateway_harness import (
    EVENT_TIMEOUT,
    SECRET,
    Daemon,
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
from tunnel._natsio.common import flush_everything

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def op(nats_server_factory: NatsServerFactory, tmp_path: Path) -> OperatorServer:
    return start_operator_server(nats_server_factory, tmp_path)


def subjects_of(user: str) -> tunnel.HostSubjects:
    return tunnel.HostSubjects.for_host(tunnel_hostname(user))


async def alice_daemon(op: OperatorServer, gw: Gateway) -> tuple[Daemon, tunnel.HostSubjects]:
    session = await gw.ok_session("alice")
    daemon = await connect_daemon(op.server.url, **creds_auth(session["credentials"]["creds"]))
    return daemon, tunnel.HostSubjects.for_host(session["tunnelHostname"])


async def fence(daemon: Daemon, gw: Gateway, own: tunnel.HostSubjects) -> None:
    """Publish allowed markers until the gateway sees one.

    One connection is ordered: once a marker arrived, the server has handled (and refused)
    everything the daemon sent before it. Markers repeat because nats-server 2.15 was seen
    (rarely) not to deliver the first message to a subscription created moments before.
    """
    seen = asyncio.Event()
    marker = own.reply("fence")

    async def on_marker(_: Msg) -> None:
        seen.set()

    sub = await gw.nc.subscribe(marker, cb=on_marker)
    await flush_everything(gw.nc)
    try:

        async def marker_seen() -> bool:
            await daemon.nc.publish(marker, b"fence")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(seen.wait(), 0.2)
            return seen.is_set()

        await wait_until(
            marker_seen, EVENT_TIMEOUT, message=f"no fence marker arrived; errors {daemon.errors}"
        )
    finally:
        await sub.unsubscribe()


async def watch(gw: Gateway, subject: str) -> list[str]:
    """Subjects the unrestricted gateway connection sees under ``subject``."""
    seen: list[str] = []

    async def on_msg(msg: Msg) -> None:
        seen.append(msg.subject)

    await gw.nc.subscribe(subject, cb=on_msg)
    await flush_everything(gw.nc)
    return seen


# ------------------------------------------------------------------ NATS: another host's subjects


@pytest.mark.parametrize(
    "pick",
    [
        lambda s: s.request,
        lambda s: s.all_aborts,
        lambda s: f"{s.base}.req.*.body",
        lambda s: f"{s.base}.req.*.up.*",
        lambda s: f"{s.base}.>",
        lambda s: f"{uplink_inbox_prefix(s)}.>",
        lambda s: f"{s.base}.runs.*",
        lambda s: s.ready,
    ],
    ids=["request", "aborts", "v1-bodies", "up-frames", "whole-host", "uplink-inbox", "runs", "readiness"],
)
async def test_daemon_cannot_subscribe_to_another_hosts_tunnel_subjects(
    op: OperatorServer, pick: Callable[[tunnel.HostSubjects], str]
) -> None:
    async with running_gateway(op.env()) as gw:
        daemon, _ = await alice_daemon(op, gw)
        try:
            subject = pick(subjects_of("bob"))
            got: list[str] = []

            async def on_msg(msg: Msg) -> None:
                got.append(msg.subject)

            await daemon.nc.subscribe(subject, cb=on_msg)
            error = await daemon.wait_error(f'permissions violation for subscription to "{subject}"')
            assert "permissions violation" in error.lower()
            # Traffic to Bob's subjects never reaches the refused subscription.
            await gw.nc.publish(subject.replace("*", "x").replace(">", "x"), b"for bob only")
            await gw.nc.flush()
            await daemon.nc.flush()
            assert got == []
        finally:
            await daemon.nc.close()


@pytest.mark.parametrize(
    "pick",
    [
        lambda s: s.request,
        lambda s: s.reply("r1"),
        lambda s: s.client_reply("r1", "c1"),
        lambda s: s.abort("r1"),
        lambda s: f"{s.base}.req.r1.up.srv1",
    ],
    ids=["request-start", "reply", "client-reply", "abort", "up-frame"],
)
async def test_daemon_cannot_publish_on_another_hosts_tunnel_subjects(
    op: OperatorServer, pick: Callable[[tunnel.HostSubjects], str]
) -> None:
    async with running_gateway(op.env()) as gw:
        daemon, own = await alice_daemon(op, gw)
        bob = subjects_of("bob")
        seen_by_bob = await watch(gw, f"{bob.base}.>")
        try:
            subject = pick(bob)
            await daemon.nc.publish(subject, b'{"type":"request.start","requestId":"forged"}')
            await daemon.wait_error(f'permissions violation for publish to "{subject}"')
            await fence(daemon, gw, own)
            assert seen_by_bob == []
        finally:
            await daemon.nc.close()


# ------------------------------------------------------------------ NATS: runs


def has_runs_grant(session: dict[str, Any]) -> bool:
    base = tunnel.HostSubjects.for_host(session["tunnelHostname"]).base
    return f"{base}.runs.*" in jwt_claims(session["credentials"]["jwt"])["nats"]["pub"]["allow"]


async def test_daemon_cannot_publish_into_another_hosts_runs(op: OperatorServer) -> None:
    async with running_gateway(op.env()) as gw:
        daemon, own = await alice_daemon(op, gw)
        bob = subjects_of("bob")
        seen_by_bob = await watch(gw, f"{bob.base}.runs.>")
        try:
            subject = run_event_subject(bob, "run-of-bob")
            forged = (
                b'{"runId":"run-of-bob","fence":1,"seq":1,"type":"done","finalSeq":1,"status":"completed"}'
            )
            await daemon.nc.publish(subject, forged, headers={"Nats-Msg-Id": "run-of-bob:1:1"})
            await daemon.wait_error(f'permissions violation for publish to "{subject}"')
            await fence(daemon, gw, own)
            assert seen_by_bob == []
        finally:
            await daemon.nc.close()


async def test_daemon_can_publish_its_own_runs_events(op: OperatorServer) -> None:
    async with running_gateway(op.env()) as gw:
        session = await gw.ok_session("alice")
        if not has_runs_grant(session):
            pytest.skip("the gateway does not grant run uplink subjects yet (runs feature not landed)")
        own = tunnel.HostSubjects.for_host(session["tunnelHostname"])
        seen = await watch(gw, f"{own.base}.runs.>")
        daemon = await connect_daemon(op.server.url, **creds_auth(session["credentials"]["creds"]))
        try:
            subject = run_event_subject(own, "run-of-alice")
            event = b'{"runId":"run-of-alice","fence":1,"seq":1,"type":"heartbeat"}'

            async def arrived() -> bool:
                await daemon.nc.publish(subject, event)
                await daemon.nc.flush()
                return subject in seen

            await wait_until(arrived, EVENT_TIMEOUT, interval=0.1, message="own run event never arrived")
            assert daemon.errors == []
        finally:
            await daemon.nc.close()


@pytest.mark.parametrize(
    "subject",
    [
        "$JS.API.STREAM.PURGE.LINK_RUNS",
        "$JS.API.STREAM.DELETE.LINK_RUNS",
        "$JS.API.STREAM.LIST",
        "$JS.API.CONSUMER.CREATE.LINK_RUNS",
        "$JS.API.STREAM.MSG.GET.LINK_RUNS",
        "$JS.API.DIRECT.GET.LINK_RUNS",
        "$KV.>",
    ],
)
async def test_daemon_cannot_touch_jetstream_or_kv_directly(op: OperatorServer, subject: str) -> None:
    """Run state lives in JetStream: a desktop must not be able to purge or read it."""
    async with running_gateway(op.env()) as gw:
        daemon, _ = await alice_daemon(op, gw)
        try:
            await daemon.nc.publish(subject, b"{}")
            await daemon.wait_error(f'permissions violation for publish to "{subject}"')
        finally:
            await daemon.nc.close()


# ------------------------------------------------------------------ NATS: expiry and connection types


@pytest.mark.parametrize("own_key", [False, True], ids=["gateway-made-creds", "daemon-own-key"])
async def test_expired_credentials_are_refused(op: OperatorServer, own_key: bool) -> None:
    async with running_gateway(op.env(NATS_TUNNEL_SESSION_TTL_SECONDS="1")) as gw:
        if own_key:
            key = new_key(KeyKind.USER)
            session = await gw.ok_session("ivan", {"publicKey": key.public_key})
            auth = own_key_auth(session["credentials"]["jwt"], key.seed)
        else:
            session = await gw.ok_session("ivan")
            auth = creds_auth(session["credentials"]["creds"])
        expires = jwt_claims(session["credentials"]["jwt"])["exp"]
        # Poll the clock past the expiry (plus the server's one-second granularity).
        await wait_until(lambda: time.time() > expires + 1.1, timeout=expires - time.time() + EVENT_TIMEOUT)
        with pytest.raises(NatsError, match=r"(?i)authorization violation|expired"):
            daemon = await connect_daemon(op.server.url, **auth)
            await daemon.nc.close()


async def test_websocket_only_credentials_are_refused_on_the_plain_port(op: OperatorServer) -> None:
    ws_url = op.server.websocket_url
    assert ws_url is not None
    async with running_gateway(op.env(NATS_PUBLIC_URL=ws_url.replace("ws://", "wss://"))) as gw:
        key = new_key(KeyKind.USER)
        for body in (None, {"publicKey": key.public_key}):
            session = await gw.ok_session("judy", body)
            assert session["connection"]["allowedConnectionTypes"] == ["WEBSOCKET"]
            creds = session["credentials"]
            auth = creds_auth(creds["creds"]) if body is None else own_key_auth(creds["jwt"], key.seed)
            with pytest.raises(NatsError, match=r"(?i)authorization violation"):
                daemon = await connect_daemon(op.server.url, **auth)
                await daemon.nc.close()


# ------------------------------------------------------------------ gateway: bearer tokens


def authenticated_routes(app: web.Application) -> list[tuple[str, str]]:
    """(method, concrete path) for every route but the unauthenticated ones."""
    routes: list[tuple[str, str]] = []
    for route in app.router.routes():
        if route.method in ("HEAD", "OPTIONS", "*"):
            continue
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        if not isinstance(path, str) or path in ("/healthz", "/metrics"):
            continue
        routes.append((route.method, path.replace("{", "").replace("}", "")))
    return routes


def bad_tokens(audience: str) -> dict[str, str | None]:
    now = int(time.time())

    def signed(**claims: Any) -> str:
        base = {"sub": "mallory", "aud": audience, "iat": now, "exp": now + 300}
        base.update(claims)
        return pyjwt.encode({k: v for k, v in base.items() if v is not None}, SECRET, algorithm="HS256")

    return {
        "missing": None,
        "malformed": "this-is.not-a.jwt",
        "empty-bearer": "",
        "expired": signed(exp=now - 60),
        "wrong-audience": signed(aud="some-other-service"),
        "wrong-secret": pyjwt.encode(
            {"sub": "mallory", "aud": audience, "exp": now + 300}, "x" * 48, algorithm="HS256"
        ),
    }


async def test_every_authenticated_route_refuses_bad_bearer_tokens_with_json_401(op: OperatorServer) -> None:
    async with running_gateway(op.env()) as gw:
        routes = authenticated_routes(gw.client.app)
        assert ("POST", "/api/links/session") in routes and ("GET", "/api/links/me") in routes
        expected = {
            "missing": "missing_token",
            "malformed": "invalid_token",
            "empty-bearer": "missing_token",
            "expired": "token_expired",
            "wrong-audience": "invalid_audience",
            "wrong-secret": "invalid_token",
        }
        for case, token in bad_tokens(gw.config.auth.audience).items():
            headers = {} if token is None else {"Authorization": f"Bearer {token}"}
            for method, path in routes:
                resp = await gw.client.request(method, path, headers=headers, json={"runner": "echo"})
                text = await resp.text()
                assert resp.status == 401, (case, method, path, text)
                assert resp.content_type == "application/json", (case, path)
                assert (await resp.json())["error"]["code"] == expected[case], (case, path, text)
                assert "Traceback" not in text and 'File "' not in text
                if token:
                    assert token not in text, "the refused token is echoed back"


# ------------------------------------------------------------------ gateway: one user, one host


async def test_me_probes_only_the_callers_own_host(op: OperatorServer) -> None:
    async with running_gateway(op.env()) as gw:
        bob_session = await gw.ok_session("bob")
        bob_host = bob_session["tunnelHostname"]
        daemon = await connect_daemon(op.server.url, **creds_auth(bob_session["credentials"]["creds"]))
        server = await serve_status(daemon.nc, bob_host)
        try:
            assert (await gw.me("bob"))["online"] is True
            # Whatever Mallory adds to the request, she learns about her own (absent) desktop only.
            headers = {**gw.headers("mallory"), "X-Tunnel-Hostname": bob_host, "Host": bob_host}
            for query in ("", f"?hostname={bob_host}", f"?tunnelHostname={bob_host}&user=bob"):
                resp = await gw.client.get(f"/api/links/me{query}", headers=headers)
                assert resp.status == 200
                me = await resp.json()
                assert me["online"] is False, me
                assert me["tunnelHostname"] == tunnel_hostname("mallory")
                assert bob_host not in await resp.text()
        finally:
            await server.close()
            await daemon.nc.close()


async def test_session_hostname_cannot_be_chosen_by_body_query_or_headers(op: OperatorServer) -> None:
    victim = tunnel_hostname("victim")
    async with running_gateway(op.env()) as gw:
        resp = await gw.client.post(
            f"/api/links/session?tunnelHostname={victim}&hostname={victim}",
            headers={**gw.headers("mallory"), "X-Tunnel-Hostname": victim, "X-User": "victim"},
            json={"tunnelHostname": victim, "userId": "victim", "sub": "victim"},
        )
        assert resp.status == 200
        session = await resp.json()
        assert session["tunnelHostname"] == tunnel_hostname("mallory")
        claims = jwt_claims(session["credentials"]["jwt"])
        victim_base = tunnel.HostSubjects.for_host(victim).base
        granted = claims["nats"]["pub"]["allow"] + claims["nats"]["sub"]["allow"]
        assert not any(victim_base in subject for subject in granted)
        assert claims["nats"]["tags"] == [f"host:{tunnel_hostname('mallory')}"]


# ------------------------------------------------------------------ gateway: runs of another user


def has_runs_api(gw: Gateway) -> bool:
    return ("POST", "/api/runs") in authenticated_routes(gw.client.app)


async def test_a_user_cannot_dispatch_to_read_or_cancel_another_users_runs(
    nats_server_factory: NatsServerFactory, tmp_path: Path
) -> None:
    op = start_operator_server(nats_server_factory, tmp_path, jetstream=True)
    async with running_gateway(op.env()) as gw:
        if not has_runs_api(gw):
            pytest.skip("the gateway runs API (POST /api/runs) has not landed yet")
        runs = gw.client.app[RUNS]
        assert await runs.wait_ready(EVENT_TIMEOUT), runs.unavailable_reason()
        bob_host = tunnel_hostname("bob")
        resp = await gw.client.post(
            "/api/runs", headers=gw.headers("bob"), json={"runner": "echo", "input": 1}
        )
        assert resp.status == 202, await resp.text()
        created = await resp.json()
        run_id, thread_id = created["runId"], created["threadId"]
        own = await gw.client.get(f"/api/runs/{run_id}", headers=gw.headers("bob"))
        assert own.status == 200 and (await own.json())["hostname"] == bob_host
        mallory = gw.headers("mallory")
        for method, path in (
            ("GET", f"/api/runs/{run_id}"),
            ("GET", f"/api/runs/{run_id}/events"),
            ("GET", f"/api/runs/{run_id}/export"),
            ("POST", f"/api/runs/{run_id}/cancel"),
        ):
            resp = await gw.client.request(method, path, headers=mallory)
            text = await resp.text()
            assert resp.status == 404, (method, path, text)
            assert resp.content_type == "application/json"
            assert bob_host not in text
        # Bob's run was not cancelled by Mallory's attempt (no desktop: it fails, unreachable).
        after = await (await gw.client.get(f"/api/runs/{run_id}", headers=gw.headers("bob"))).json()
        assert after["status"] != "cancelled", after
        # The unauthenticated metrics page says nothing about whose runs exist.
        metrics = await gw.client.get("/metrics")
        assert metrics.status == 200
        text = await metrics.text()
        for private in (run_id, thread_id, bob_host):
            assert private not in text, f"/metrics discloses {private!r}"
        # Mallory cannot aim a run at Bob's desktop: the body cannot name the host or the user.
        resp = await gw.client.post(
            "/api/runs",
            headers={**mallory, "X-Tunnel-Hostname": bob_host},
            json={
                "runner": "echo",
                "input": 1,
                "hostname": bob_host,
                "tunnelHostname": bob_host,
                "userId": "bob",
            },
        )
        if resp.status == 202:
            mine = (await resp.json())["runId"]
            state = await (await gw.client.get(f"/api/runs/{mine}", headers=mallory)).json()
            assert state["hostname"] == tunnel_hostname("mallory") and state["userId"] == "mallory", state
        else:  # refusing unknown fields is fine too, as long as it is a clear 4xx
            assert resp.status in (400, 422), await resp.text()


async def test_daemon_credentials_cap_subscriptions(op: OperatorServer) -> None:
    """A desktop cannot make the servers track unbounded interest: the server refuses past the cap."""
    async with running_gateway(op.env()) as gw:
        session = await gw.ok_session("alice")
        own = tunnel.HostSubjects.for_host(session["tunnelHostname"])
        daemon = await connect_daemon(op.server.url, **creds_auth(session["credentials"]["creds"]))
        try:
            for i in range(DAEMON_MAX_SUBSCRIPTIONS):
                await daemon.nc.subscribe(f"{own.base}.req.{i}.body")
            await flush_everything(daemon.nc)
            # Up to the cap, the server holds them all: its own view.
            connz = op.server.monitor_json("connz?subs=1")
            held = [
                c["subscriptions"] for c in connz["connections"] if c.get("name") == daemon.nc.options["name"]
            ]
            assert held == [DAEMON_MAX_SUBSCRIPTIONS], held
            # Past it, the server refuses with an -ERR (on which nats-py closes the connection, so
            # no flush can be the barrier here). The server logs the refusal on its own schedule
            # (its log is a file written apart from the -ERR), so wait for the line.
            for i in range(DAEMON_MAX_SUBSCRIPTIONS, DAEMON_MAX_SUBSCRIPTIONS + 8):
                await daemon.nc.subscribe(f"{own.base}.req.{i}.body")
            await wait_until(
                lambda: "maximum subscriptions exceeded" in str(daemon.nc.last_error),
                message="the daemon was never refused",
            )
            await wait_until(
                lambda: "maximum subscriptions exceeded" in op.server.log_text(),
                message="nats-server never logged the refused subscription",
            )
        finally:
            await daemon.nc.close()
