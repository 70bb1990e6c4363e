"""Real-process tests for cli/nats_cluster.py: a multi-node nats-server cluster.

Promises checked: the nodes route to each other and carry messages across; in operator mode
an R3 stream keeps taking and serving messages after its leader is SIGKILLed (a client given
every URL fails over, a new leader is elected) and the killed node restarts on its ports with
its store and rejoins; token mode refuses a wrong token on every node; one node is a plain
JetStream server. Raft elections after a SIGKILL take nats-server 4-9 s (its election timeout),
so the failover test polls with generous deadlines and never sleeps.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import nats
import pytest
from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, StorageType, StreamConfig
from nats.js.errors import ServiceUnavailableError

from cli.nats_cluster import NatsCluster, NatsClusterError
from studio_gateway.nats_jwt import OperatorSetup
from tests.helpers import NatsClusterFactory, wait_until
from tests.integration.runs_harness import JetStreamCluster
from tunnel._natsio.common import flush_everything

# nats-server's error code for a request of an account JetStream is not (yet) enabled for.
JS_NOT_ENABLED_FOR_ACCOUNT = 10039

pytestmark = pytest.mark.timeout(90)

# Local servers answer in milliseconds; this bounds one request, not a failover.
REQUEST_TIMEOUT = 1.0
# A follower waits 4-9 s for a lost leader before it campaigns; a second round may be needed.
FAILOVER_TIMEOUT = 30.0


async def _ignore_error(_: Exception) -> None:
    """nats-py logs every connection error by default; these tests provoke some on purpose."""


@asynccontextmanager
async def connected(servers: list[str], **kwargs: Any) -> AsyncIterator[Client]:
    nc = await nats.connect(
        servers,
        error_cb=_ignore_error,
        connect_timeout=REQUEST_TIMEOUT,
        reconnect_time_wait=0.05,
        max_reconnect_attempts=-1,
        **kwargs,
    )
    try:
        yield nc
    finally:
        await nc.close()


def _port(url: Any) -> int | None:
    return urlsplit(url if isinstance(url, str) else url.geturl()).port


async def _add_stream_when_ready(js: JetStreamContext, config: StreamConfig) -> None:
    """Add a replicated stream on a cluster that has just come up.

    Right after the meta leader is agreed, an account's first request can still find JetStream
    "not enabled for account" (10039) while the cluster enables it (the gateway retries its
    set-up the same way).
    """

    async def added() -> bool:
        try:
            await js.add_stream(config)
        except ServiceUnavailableError as exc:
            if exc.err_code != JS_NOT_ENABLED_FOR_ACCOUNT:
                raise
            return False
        return True

    await wait_until(added, FAILOVER_TIMEOUT, interval=0.1, message="JetStream never came up")


async def _publish_once(js: JetStreamContext, subject: str, payload: bytes, failures: list[str]) -> None:
    """Publish until stored, exactly once: while a replicated stream has no leader (just created,
    or its leader killed) a publish finds no responder or times out, and one that timed out may
    still have been stored; its message id makes a resend a duplicate the stream drops."""

    async def stored() -> bool:
        try:
            await js.publish(
                subject, payload, timeout=REQUEST_TIMEOUT, headers={"Nats-Msg-Id": payload.decode()}
            )
        except NatsError as exc:
            failures.append(type(exc).__name__)
            return False
        return True

    await wait_until(
        stored, FAILOVER_TIMEOUT, interval=0.05, message=lambda: f"{payload!r} was never stored: {failures}"
    )


def _route_names(cluster: NatsCluster, index: int) -> set[str]:
    routes = cluster.nodes[index].monitor_json("routez").get("routes") or []
    return {r["remote_name"] for r in routes}


async def _cross_node_roundtrip(cluster: NatsCluster, **auth: Any) -> None:
    """A subscriber on the last node gets what a client of the first node publishes (routes work)."""
    async with (
        connected([cluster.urls[-1]], **auth) as sub_nc,
        connected([cluster.urls[0]], **auth) as pub_nc,
    ):
        sub = await sub_nc.subscribe("cluster.echo")
        await flush_everything(sub_nc)

        async def delivered() -> bool:  # route subscription interest propagates asynchronously
            await pub_nc.publish("cluster.echo", b"ping")
            try:
                return (await sub.next_msg(timeout=0.05)).data == b"ping"
            except NatsError:
                return False

        await wait_until(delivered, 5.0, message="no message crossed from n1 to the last node")


async def test_three_nodes_route_to_each_other_and_carry_messages(nats_cluster: NatsCluster) -> None:
    cluster = nats_cluster
    assert cluster.running() == [0, 1, 2]
    assert cluster.url == ",".join(cluster.urls) and len(set(cluster.urls)) == 3
    for i in range(3):
        assert _route_names(cluster, i) == {"n1", "n2", "n3"} - {cluster.node_name(i)}
    assert cluster.meta_leader() in (0, 1, 2)
    await _cross_node_roundtrip(cluster)

    # Two of three gone: no quorum, so wait_ready gives up with a reason and every node's log.
    cluster.kill(1)
    cluster.kill(2)
    assert cluster.meta_leader() is None
    with pytest.raises(NatsClusterError) as failed:
        await asyncio.to_thread(cluster.wait_ready, 1.0)
    message = str(failed.value)
    assert "not ready after 1.0 s" in message and "only 1 of 3 nodes run" in message
    assert "--- nats-server n2" in message and "(exited -9)" in message


async def test_operator_mode_r3_stream_survives_sigkill_of_its_leader(
    nats_cluster_factory: NatsClusterFactory, tmp_path: Path
) -> None:
    setup = OperatorSetup.generate()
    cluster = nats_cluster_factory(size=3, operator_conf=setup.server_conf())
    account = setup.account.public_key
    creds = tmp_path / "admin.creds"
    creds.write_text(setup.user_creds("cluster-admin"), encoding="utf-8")

    async with connected(cluster.urls, user_credentials=str(creds)) as admin:
        js = admin.jetstream(timeout=5.0)
        orders = StreamConfig(name="ORDERS", subjects=["orders.>"], num_replicas=3, storage=StorageType.FILE)

        await _add_stream_when_ready(js, orders)
        await _publish_once(js, "orders.new", b"order-0", [])
        for n in range(1, 10):
            await js.publish("orders.new", b"order-%d" % n)
        await js.add_consumer("ORDERS", ConsumerConfig(durable_name="worker", num_replicas=3))
    leader = await asyncio.to_thread(cluster.wait_stream_leader, "ORDERS", account)
    assert cluster.stream_leader("ORDERS", "LINKS") == leader  # the JWT name works too
    assert await asyncio.to_thread(cluster.wait_consumer_leader, "ORDERS", "worker", account) in (0, 1, 2)

    # A client that knows every URL but is connected to the leader's node: it must fail over.
    servers = [cluster.urls[leader], *(u for i, u in enumerate(cluster.urls) if i != leader)]
    async with connected(servers, user_credentials=str(creds), dont_randomize=True) as nc:
        assert _port(nc.connected_url) == cluster.nodes[leader].port
        js = nc.jetstream(timeout=REQUEST_TIMEOUT)
        psub = await js.pull_subscribe_bind("worker", "ORDERS")
        killed_at = time.monotonic()
        cluster.kill(leader)

        failures: list[str] = []  # 503 no responders until a new leader, timeouts meanwhile
        await _publish_once(js, "orders.new", b"order-after-kill", failures)
        publish_ok = time.monotonic() - killed_at
        assert _port(nc.connected_url) != cluster.nodes[leader].port
        new_leader = await asyncio.to_thread(
            cluster.wait_stream_leader, "ORDERS", account, timeout=FAILOVER_TIMEOUT, not_on=leader
        )
        assert new_leader != leader

        got: list[bytes] = []

        async def read_all() -> bool:
            try:
                for msg in await psub.fetch(11 - len(got), timeout=REQUEST_TIMEOUT):
                    got.append(msg.data)
                    await msg.ack_sync(timeout=REQUEST_TIMEOUT)
            except NatsError as exc:
                failures.append(f"fetch:{type(exc).__name__}")
            return len(got) >= 11

        await wait_until(
            read_all, FAILOVER_TIMEOUT, interval=0.05, message="the durable consumer did not deliver"
        )
        read_ok = time.monotonic() - killed_at
        assert got == [b"order-%d" % n for n in range(10)] + [b"order-after-kill"]
        print(
            f"\nleader n{leader + 1} killed: publish ok after {publish_ok:.2f} s, all read after "
            f"{read_ok:.2f} s; new leader n{new_leader + 1}; failed calls: {sorted(set(failures))} "
            f"x{len(failures)}"
        )
        await asyncio.to_thread(cluster.wait_ready, FAILOVER_TIMEOUT)  # survivors agree on a meta leader

        # The killed node comes back on its ports with its store, rejoins and catches up.
        restarted_at = time.monotonic()
        await asyncio.to_thread(cluster.restart, leader, FAILOVER_TIMEOUT)
        print(f"n{leader + 1} restarted and rejoined in {time.monotonic() - restarted_at:.2f} s")
        assert cluster.running() == [0, 1, 2]
        assert _route_names(cluster, leader) == {"n1", "n2", "n3"} - {cluster.node_name(leader)}

        def caught_up() -> bool:
            jsz = cluster.nodes[leader].monitor_json("jsz?accounts=true&streams=true")
            streams = [s for acc in jsz.get("account_details") or [] for s in acc.get("stream_detail") or []]
            return any(s["name"] == "ORDERS" and s["state"]["messages"] == 11 for s in streams)

        await wait_until(
            caught_up, FAILOVER_TIMEOUT, interval=0.05, message="the restarted node never caught up"
        )
        ack = await js.publish("orders.new", b"order-after-restart", timeout=5.0)
        assert ack.seq == 12


async def test_token_mode_refuses_a_wrong_token_on_every_node(
    nats_cluster_factory: NatsClusterFactory,
) -> None:
    cluster = nats_cluster_factory(size=3, token="s3cret-cluster-token")
    for url in cluster.urls:
        for wrong in ({"token": "wrong"}, {}):
            with pytest.raises(NatsError, match="Authorization Violation"):
                await nats.connect(url, allow_reconnect=False, error_cb=_ignore_error, **wrong)
    await _cross_node_roundtrip(cluster, token="s3cret-cluster-token")


async def test_a_single_node_cluster_is_a_plain_jetstream_server(
    nats_cluster_factory: NatsClusterFactory,
) -> None:
    cluster = nats_cluster_factory(size=1)
    assert "," not in cluster.url and cluster.cluster_ports == []
    assert cluster.meta_leader() == 0
    async with connected(cluster.urls) as nc:
        js = nc.jetstream(timeout=5.0)
        await js.add_stream(StreamConfig(name="ONE", subjects=["one.>"], storage=StorageType.FILE))
        await js.publish("one.x", b"kept")
    assert cluster.stream_leader("ONE") == 0 and cluster.stream_leader("ONE", "$G") == 0
    assert cluster.stream_leader("NOPE") is None

    cluster.kill(0)
    assert cluster.meta_leader() is None
    await asyncio.to_thread(cluster.restart, 0)
    async with connected(cluster.urls) as nc:
        info = await nc.jetstream(timeout=5.0).stream_info("ONE")
        assert info.state.messages == 1  # the file store survived the SIGKILL


async def test_jetstream_cluster_harness_keeps_serving_when_a_follower_dies(tmp_path: Path) -> None:
    """runs_harness.JetStreamCluster: the gateway's creds work on every node; a follower's crash
    costs the R3 stream nothing (two of three still make a quorum: no election, no 503)."""
    nats_cluster = await asyncio.to_thread(JetStreamCluster.start, tmp_path, size=3)
    try:
        assert nats_cluster.url.split(",") == nats_cluster.urls and len(nats_cluster.nodes) == 3
        creds = tmp_path / "admin.creds"
        creds.write_text(nats_cluster.admin_creds(), encoding="utf-8")
        for url in nats_cluster.urls:
            async with connected([url], user_credentials=str(nats_cluster.gateway_creds)) as nc:
                assert nc.is_connected
        async with connected(nats_cluster.urls, user_credentials=str(creds)) as nc:
            js = nc.jetstream(timeout=5.0)
            await _add_stream_when_ready(js, StreamConfig(name="RUNS", subjects=["runs.>"], num_replicas=3))
            await _publish_once(js, "runs.x", b"0", [])  # the group has a leader
        leader = await asyncio.to_thread(
            nats_cluster.cluster.wait_stream_leader, "RUNS", nats_cluster.account
        )
        assert nats_cluster.stream_leader("RUNS") == leader  # the harness's default account
        # Neither the stream's nor the meta leader (no election), nor the node the client uses.
        follower = min({0, 1, 2} - {leader, nats_cluster.meta_leader()})
        servers = [nats_cluster.urls[leader], *(u for i, u in enumerate(nats_cluster.urls) if i != leader)]
        async with connected(servers, user_credentials=str(creds), dont_randomize=True) as nc:
            js = nc.jetstream(timeout=5.0)
            # Both followers hold the stream: the one left makes a quorum with the leader.
            await asyncio.to_thread(nats_cluster.wait_in_sync, ["RUNS"])
            nats_cluster.kill(follower)
            for n in range(1, 6):
                ack = await js.publish("runs.x", b"%d" % n, timeout=REQUEST_TIMEOUT)
                assert ack.seq == n + 1
            assert nats_cluster.stream_leader("RUNS") == leader
            await asyncio.to_thread(nats_cluster.restart, follower)
            assert nats_cluster.cluster.running() == [0, 1, 2]
    except BaseException:
        print(nats_cluster.log_tails())
        raise
    finally:
        nats_cluster.close()
