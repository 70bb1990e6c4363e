"""Chaos machinery for the tunnel: a rig, a steady mixed load, faults, and the invariants.

Shared by ``tests/faults/test_tunnel_chaos.py`` (each fault once, a few seconds each) and
``scripts/soak_tunnel.py`` (faults over and over for minutes).

The rig: a real nats-server; the serving daemon's NATS connection goes through a
``FaultProxy`` (the desktop's network is the faulty one), the caller's connects directly
(the gateway sits in the data centre next to NATS). Both use nats-py reconnects tuned for
tests (``reconnect_time_wait`` 0.1 s, unlimited attempts); the daemon also pings every
0.5 s, so a half-open link is noticed in about a second, as a real daemon should.

The load: a few workers doing small GETs and small echoed POSTs, one downloading and one
uploading multi-MiB bodies, each body sha256-checked at the far end, all through one
``TunnelClient`` with short timeouts.

The invariants (checked by ``run_fault``), for every request under every fault:

1. it ends, with success or a ``tunnel.TunnelError``, never another exception, never a hang
   past its timeouts (each request runs under a hard limit a little above the caller's
   overall deadline);
2. success means the bytes are right: response bodies and uploaded bodies (checked by the
   handler, which sees the sender's sha256 in a header) match exactly, length and hash;
3. requests in flight when a partition begins end within the timeouts the design promises
   (idle timeout + 1 s for a pause or a blackhole; plus the server's stall timeout when the
   NATS server itself restarts, since then the link comes back quickly but frames were lost);
4. once the fault is healed and the daemon is reachable again, new requests succeed
   (for faults that promise it, every request succeeds throughout);
5. afterwards nothing is left behind: ``in_flight`` is 0 on both ends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hashlib
import json
import random
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Final

import nats
from nats.aio.client import Client

import tunnel
from cli.nats_server import NatsServer
from tests.faultproxy import FaultProxy
from tests.helpers import wait_until

KiB: Final = 1024
MiB: Final = 1024 * 1024
HOSTNAME: Final = "chaos.test"
# Pieces the big bodies travel in, at both ends.
PIECE: Final = 64 * KiB


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class ChaosSettings:
    """Timeouts and load shape. Short timeouts keep each scenario to a few seconds."""

    # Caller: heartbeats arrive every idle/3 s, so 1.2 s of silence means the daemon is cut off.
    idle_timeout: float = 1.2
    first_frame_timeout: float = 1.2
    # Overall deadline per request: far above a healthy 7 MiB transfer, even throttled (~2 s).
    total_timeout: float = 8.0
    # Daemon: a request whose caller stopped granting credit or sending body is freed after this.
    stall_timeout: float = 2.0
    # Flow-control window, both directions: small enough that a 4 MB/s throttled link drains
    # a full window well within the idle timeout (a heartbeat never waits behind >0.2 s of data).
    window: int = 512 * KiB
    # Big bodies, each way (sizes cycle); 5-7 MiB keeps a throttled transfer to ~2 s.
    big_sizes: tuple[int, ...] = (5 * MiB, 7 * MiB)
    small_workers: int = 3
    downloaders: int = 1
    uploaders: int = 1
    # Pause between one worker's small requests, so the big transfers get CPU too.
    small_gap: float = 0.01
    # nats-py settings for tests: reconnect fast and forever; the daemon pings often.
    reconnect_time_wait: float = 0.1
    daemon_ping_interval: float = 0.5
    daemon_max_outstanding_pings: int = 2
    connect_timeout: float = 1.0
    # A request that outlives its deadline by this much is hung (a bug), not slow.
    hang_slack: float = 3.0
    # A request in flight at a partition ends within (timeouts + this) of its start (promise).
    partition_slack: float = 1.0
    # After healing: how long the daemon may take to be reachable again.
    recover_timeout: float = 10.0

    @property
    def hang_limit(self) -> float:
        return self.total_timeout + self.hang_slack

    @property
    def cutoff_bound(self) -> float:
        """How soon a request in flight must fail once its daemon is cut off (design promise)."""
        return max(self.idle_timeout, self.first_frame_timeout) + self.partition_slack


# --------------------------------------------------------------------------- deterministic bodies


def small_body(seed: int, n: int) -> bytes:
    return hashlib.shake_128(seed.to_bytes(8, "big")).digest(n)


class BigBodies:
    """Random bytes made once; body ``i`` is a prefix, with its sha256 known in advance."""

    def __init__(self, sizes: tuple[int, ...]) -> None:
        self.data = random.Random(20261122).randbytes(max(sizes))
        self.sizes = sizes
        self.sha256 = {size: hashlib.sha256(self.data[:size]).hexdigest() for size in sizes}

    def pieces(self, size: int) -> list[memoryview]:
        view = memoryview(self.data)[:size]
        return [view[i : i + PIECE] for i in range(0, size, PIECE)]


# --------------------------------------------------------------------------- the daemon's app


class ChaosApp:
    """The handler the daemon serves; records any body it was handed wrong as a success."""

    def __init__(self, bodies: BigBodies) -> None:
        self.bodies = bodies
        self.violations: list[str] = []
        self.uploads_verified = 0

    async def handler(self, req: tunnel.Request) -> tunnel.Response:
        if req.path == "/small":
            query = dict(req.query)
            data = small_body(int(query["seed"]), int(query["n"]))
            return tunnel.Response(200, [("content-type", "application/octet-stream")], data)
        if req.path == "/echo":
            return tunnel.Response(200, [], await req.read())
        if req.path == "/download":
            size = int(dict(req.query)["size"])
            return tunnel.Response(200, [("x-sha256", self.bodies.sha256[size])], self._stream(size))
        if req.path == "/upload":
            return await self._upload(req)
        return tunnel.Response(404, [], b"no such chaos endpoint")

    async def _stream(self, size: int) -> AsyncIterator[bytes]:
        for piece in self.bodies.pieces(size):
            yield bytes(piece)

    async def _upload(self, req: tunnel.Request) -> tunnel.Response:
        expected = req.header("x-sha256")
        expected_length = int(req.header("x-length") or -1)
        digest = hashlib.sha256()
        length = 0
        async for chunk in req.stream():  # raises a TunnelError if the body did not end cleanly
            digest.update(chunk)
            length += len(chunk)
        got = digest.hexdigest()
        if got != expected or length != expected_length:
            self.violations.append(
                f"daemon: upload {req.request_id} delivered as complete but wrong: "
                f"{length} bytes sha256 {got[:16]}, sender sent {expected_length} bytes {str(expected)[:16]}"
            )
        else:
            self.uploads_verified += 1
        body = json.dumps({"sha256": got, "length": length}).encode()
        return tunnel.Response(200, [("content-type", "application/json")], body)


# --------------------------------------------------------------------------- the ledger


@dataclass
class Op:
    """One request the load made, and how it ended."""

    kind: str
    started: float
    ended: float | None = None
    outcome: str | None = None  # "ok" or a stable error code
    violation: str | None = None
    verified_bytes: int = 0

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


@dataclass
class Ledger:
    ops: list[Op] = field(default_factory=list)

    def outcomes(self) -> Counter[str]:
        return Counter(f"{op.kind}:{op.outcome}" for op in self.ops if op.outcome is not None)

    def violations(self) -> list[str]:
        return [op.violation for op in self.ops if op.violation is not None]

    def verified_bytes(self) -> int:
        return sum(op.verified_bytes for op in self.ops)


# --------------------------------------------------------------------------- the rig


async def _quiet(_: Exception) -> None:
    """Connection errors are the point of these tests; nats-py would log each one."""


class ChaosRig:
    """nats-server + fault proxy + daemon (tunnel server) + caller (tunnel client), in one loop."""

    def __init__(self, nats_server: NatsServer, settings: ChaosSettings | None = None) -> None:
        self.nats = nats_server
        self.settings = settings or ChaosSettings()
        self.bodies = BigBodies(self.settings.big_sizes)
        self.app = ChaosApp(self.bodies)
        self.proxy = FaultProxy(nats_server.port)
        self.daemon_nc: Client | None = None
        self.caller_nc: Client | None = None
        self.server: tunnel.TunnelServer | None = None
        self.client: tunnel.TunnelClient | None = None
        self.reconnects = Counter[str]()
        self._seeds = iter(range(1, 2**62))

    async def __aenter__(self) -> ChaosRig:
        s = self.settings
        await self.proxy.start()
        try:
            self.daemon_nc = await self._connect(
                self.proxy.url,
                "chaos-daemon",
                ping_interval=s.daemon_ping_interval,
                max_outstanding_pings=s.daemon_max_outstanding_pings,
            )
            self.caller_nc = await self._connect(self.nats.url, "chaos-caller")
            self.server = await tunnel.serve(
                self.daemon_nc,
                HOSTNAME,
                self.app.handler,
                config=tunnel.ServerConfig(window=s.window, stall_timeout=s.stall_timeout),
            )
            self.client = tunnel.TunnelClient(
                self.caller_nc,
                timeouts=tunnel.Timeouts(
                    idle=s.idle_timeout, first_frame=s.first_frame_timeout, total=s.total_timeout
                ),
                limits=tunnel.Limits(window=s.window),
            )
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self.client is not None:
            await self.client.aclose()
        if self.server is not None:
            await self.server.close(timeout=0.5)
        for nc in (self.caller_nc, self.daemon_nc):
            if nc is not None:
                with contextlib.suppress(Exception):
                    await nc.close()
        await self.proxy.close()

    async def _connect(self, url: str, name: str, **extra: Any) -> Client:
        s = self.settings

        async def reconnected() -> None:
            self.reconnects[name] += 1

        return await nats.connect(
            url,
            name=name,
            error_cb=_quiet,
            reconnected_cb=reconnected,
            reconnect_time_wait=s.reconnect_time_wait,
            max_reconnect_attempts=-1,
            connect_timeout=s.connect_timeout,
            **extra,
        )

    @property
    def tunnel_client(self) -> tunnel.TunnelClient:
        assert self.client is not None, "rig not entered"
        return self.client

    @property
    def tunnel_server(self) -> tunnel.TunnelServer:
        assert self.server is not None, "rig not entered"
        return self.server

    def next_seed(self) -> int:
        return next(self._seeds)

    # -- one request of each kind; each returns the bytes it verified --------------------------

    async def small_get(self) -> int:
        seed = self.next_seed()
        n = seed * 7919 % 3000
        expected = small_body(seed, n)
        async with await self.tunnel_client.fetch(f"tunnel://{HOSTNAME}/small?seed={seed}&n={n}") as resp:
            body = await resp.read()
        _check(resp.status == 200, f"small GET answered {resp.status}")
        _check(body == expected, f"small GET body wrong: {len(body)} bytes, expected {n}")
        return n

    async def small_post(self) -> int:
        seed = self.next_seed()
        payload = small_body(seed, 1 + seed * 104729 % 4000)
        async with await self.tunnel_client.fetch(
            f"tunnel://{HOSTNAME}/echo", method="POST", body=payload
        ) as resp:
            body = await resp.read()
        _check(resp.status == 200, f"echo answered {resp.status}")
        _check(body == payload, f"echo body wrong: {len(body)} bytes, sent {len(payload)}")
        return len(payload)

    async def download(self, size: int) -> int:
        digest = hashlib.sha256()
        length = 0
        async with await self.tunnel_client.fetch(f"tunnel://{HOSTNAME}/download?size={size}") as resp:
            async for chunk in resp.aiter_bytes():
                digest.update(chunk)
                length += len(chunk)
        _check(resp.status == 200, f"download answered {resp.status}")
        _check(
            length == size and digest.hexdigest() == self.bodies.sha256[size],
            f"download delivered as complete but wrong: {length} of {size} bytes, "
            f"sha256 {digest.hexdigest()[:16]} expected {self.bodies.sha256[size][:16]}",
        )
        return size

    async def upload(self, size: int) -> int:
        pieces = self.bodies.pieces(size)

        async def body() -> AsyncIterator[bytes]:
            for piece in pieces:
                yield bytes(piece)

        headers = [("x-sha256", self.bodies.sha256[size]), ("x-length", str(size))]
        async with await self.tunnel_client.fetch(
            f"tunnel://{HOSTNAME}/upload", method="POST", headers=headers, body=body()
        ) as resp:
            answer = await resp.read()
        _check(resp.status == 200, f"upload answered {resp.status}")
        got = json.loads(answer)
        _check(
            got == {"sha256": self.bodies.sha256[size], "length": size},
            f"upload acknowledged but the daemon got {got}",
        )
        return size

    async def probe(self) -> bool:
        """One small request: does the daemon answer right now?"""
        try:
            await asyncio.wait_for(self.small_get(), self.settings.hang_limit)
        except (tunnel.TunnelError, TimeoutError):
            return False
        return True

    async def wait_reachable(self, timeout: float) -> float:
        """Probe until the daemon answers; returns how long it took. AssertionError on timeout."""
        loop = asyncio.get_running_loop()
        began = loop.time()
        await wait_until(
            self.probe,
            timeout,
            interval=0.05,
            message=f"daemon not reachable {timeout:g} s after the fault was healed",
        )
        return loop.time() - began

    async def quiesced(self, timeout: float) -> list[str]:
        """Wait for both ends to hold no request; the problems found if they still do."""
        try:
            await wait_until(
                lambda: not (self.tunnel_server.in_flight or self.tunnel_client.in_flight),
                timeout,
                interval=0.02,
            )
        except AssertionError:
            return [
                f"left behind after {timeout:g} s: server in_flight={self.tunnel_server.in_flight}, "
                f"client in_flight={self.tunnel_client.in_flight}"
            ]
        return []


class _BadBody(Exception):
    """A request succeeded but its bytes were wrong: the one thing that must never happen."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise _BadBody(message)


# --------------------------------------------------------------------------- the load


class Load:
    """Workers issuing requests until stopped; every request becomes an ``Op`` in the ledger."""

    def __init__(self, rig: ChaosRig, ledger: Ledger) -> None:
        self.rig = rig
        self.ledger = ledger
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        s = self.rig.settings
        rig = self.rig
        for i in range(s.small_workers):
            call = rig.small_get if i % 2 == 0 else rig.small_post
            self._tasks.append(asyncio.create_task(self._loop(call.__name__, call, s.small_gap)))
        sizes = s.big_sizes
        for i in range(s.downloaders):
            self._tasks.append(asyncio.create_task(self._big_loop("download", rig.download, sizes, i)))
        for i in range(s.uploaders):
            self._tasks.append(asyncio.create_task(self._big_loop("upload", rig.upload, sizes, i + 1)))

    async def stop(self) -> list[str]:
        """Let every worker finish its current request (bounded), then stop them."""
        self._stop.set()
        _, pending = await asyncio.wait(self._tasks, timeout=self.rig.settings.hang_limit + 2.0)
        problems = []
        for task in pending:
            problems.append(f"load worker {task.get_name()} did not finish its request: hung")
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        return problems

    async def _loop(self, kind: str, call: Callable[[], Awaitable[int]], gap: float) -> None:
        while not self._stop.is_set():
            await self.run_op(kind, call)
            await asyncio.sleep(gap)

    async def _big_loop(
        self, kind: str, call: Callable[[int], Awaitable[int]], sizes: tuple[int, ...], offset: int
    ) -> None:
        n = offset
        while not self._stop.is_set():
            size = sizes[n % len(sizes)]
            n += 1
            await self.run_op(kind, functools.partial(call, size))
            await asyncio.sleep(0.01)

    async def run_op(self, kind: str, call: Callable[[], Awaitable[int]]) -> Op:
        loop = asyncio.get_running_loop()
        op = Op(kind, loop.time())
        self.ledger.ops.append(op)
        limit = self.rig.settings.hang_limit
        try:
            async with asyncio.timeout(limit) as scope:
                op.verified_bytes = await call()
            op.outcome = "ok"
        except tunnel.TunnelError as exc:
            op.outcome = exc.code
        except _BadBody as exc:
            op.outcome = "corrupt"
            op.violation = f"{kind}: {exc}"
        except TimeoutError:
            if scope.expired():
                op.outcome = "hung"
                deadline = self.rig.settings.total_timeout
                op.violation = f"{kind}: no outcome after {limit:g} s (deadline {deadline:g} s)"
            else:
                op.outcome = "TimeoutError"
                op.violation = f"{kind}: untyped TimeoutError escaped the tunnel"
        except Exception as exc:
            op.outcome = type(exc).__name__
            op.violation = f"{kind}: untyped {type(exc).__name__} escaped the tunnel: {exc}"
        op.ended = loop.time()
        return op


# --------------------------------------------------------------------------- faults


@dataclass(frozen=True)
class Fault:
    """One kind of trouble: how to cause it, how long, how to heal it, and what it promises."""

    name: str
    inject: Callable[[ChaosRig], Awaitable[None]]
    heal: Callable[[ChaosRig], Awaitable[None]]
    hold: float  # seconds between inject and heal
    # Every request succeeds throughout (the fault only slows things down).
    all_succeed: bool = False
    # Requests in flight at inject time end within this many seconds of it (None: no promise
    # beyond the deadline, e.g. a reset after which the daemon may still answer).
    in_flight_bound: Callable[[ChaosSettings], float] | None = None


async def _pause(rig: ChaosRig) -> None:
    rig.proxy.pause()


async def _resume(rig: ChaosRig) -> None:
    rig.proxy.resume()


async def _blackhole(rig: ChaosRig) -> None:
    rig.proxy.blackhole()


async def _heal(rig: ChaosRig) -> None:
    rig.proxy.pass_through()


async def _throttle(rig: ChaosRig) -> None:
    rig.proxy.throttle(THROTTLE_RATE)


async def _reset(rig: ChaosRig) -> None:
    rig.proxy.reset_all()


async def _nothing(rig: ChaosRig) -> None:
    return None


async def _kill_nats(rig: ChaosRig) -> None:
    await asyncio.to_thread(rig.nats.kill)


async def _restart_nats(rig: ChaosRig) -> None:
    await asyncio.to_thread(rig.nats.start)


# A throttled daemon link: 4 MB/s drains a full 512 KiB window in ~0.13 s, far inside the
# idle timeout, while a 7 MiB body takes ~2 s instead of ~0.1 s.
THROTTLE_RATE: Final = 4_000_000


def _cutoff(s: ChaosSettings) -> float:
    return s.cutoff_bound


def _cutoff_then_stall(s: ChaosSettings) -> float:
    # The link returns within the idle timeout, so heartbeats may resume while frames were
    # lost; the daemon's stall timeout then ends what the idle timeout could not.
    return s.cutoff_bound + s.stall_timeout


PAUSE_LONG: Final = Fault("pause-longer-than-idle", _pause, _resume, hold=2.5, in_flight_bound=_cutoff)
PAUSE_SHORT: Final = Fault("pause-shorter-than-idle", _pause, _resume, hold=0.4, all_succeed=True)
THROTTLE: Final = Fault("throttle", _throttle, _heal, hold=3.0, all_succeed=True)
BLACKHOLE: Final = Fault("blackhole", _blackhole, _heal, hold=2.5, in_flight_bound=_cutoff)
RESET: Final = Fault("reset", _reset, _nothing, hold=0.0, in_flight_bound=_cutoff_then_stall)
KILL_NATS: Final = Fault(
    "kill-9-nats-server", _kill_nats, _restart_nats, hold=0.5, in_flight_bound=_cutoff_then_stall
)
ALL_FAULTS: Final = (PAUSE_LONG, PAUSE_SHORT, THROTTLE, BLACKHOLE, RESET, KILL_NATS)
# No fault at all: the baseline between faults in a soak (everything must succeed).
CALM: Final = Fault("calm", _nothing, _nothing, hold=1.0, all_succeed=True)


# --------------------------------------------------------------------------- one scenario


@dataclass
class FaultReport:
    fault: str
    ledger: Ledger
    violations: list[str]
    recovered_after: float | None = None
    duration: float = 0.0
    injected_at: float = 0.0
    healed_at: float = 0.0
    # Requests in flight at the fault that ended later than promised (also in ``violations``).
    late: list[str] = field(default_factory=list)

    def in_flight_at_inject(self) -> list[Op]:
        return [
            op
            for op in self.ledger.ops
            if op.started <= self.injected_at and (op.ended is None or op.ended > self.injected_at)
        ]

    def cutoff_latency(self) -> float | None:
        """Longest time from the fault to the failure of a request it cut off (None: none failed)."""
        times = [
            op.ended - self.injected_at
            for op in self.in_flight_at_inject()
            if op.ended is not None and not op.ok
        ]
        return max(times, default=None)

    def summary(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in sorted(self.ledger.outcomes().items()))
        rec = "-" if self.recovered_after is None else f"{self.recovered_after:.2f}s"
        cut = self.cutoff_latency()
        cutoff = "" if cut is None else f", cut-off requests failed within {cut:.2f}s"
        return (
            f"{self.fault}: {len(self.ledger.ops)} requests in {self.duration:.1f}s, "
            f"recovered {rec}{cutoff}, "
            f"{self.ledger.verified_bytes() / MiB:.1f} MiB verified; {counts}; "
            f"{len(self.violations)} violations"
        )


async def _until_big_bodies_in_flight(ledger: Ledger, s: ChaosSettings) -> None:
    """Wait (bounded) until big bodies are mid-transfer: the fault then hits requests on the wire.

    Small requests take a millisecond and their workers mostly sit in their gaps, so without
    this a fault could land between requests, cut off nothing, and prove nothing. Bounded by
    the overall deadline: if the load never gets there, the fault goes in anyway and the
    scenario's own checks report it.
    """
    want = min(2, s.downloaders + s.uploaders)

    def big_in_flight() -> bool:
        return sum(op.ended is None and op.kind in ("download", "upload") for op in ledger.ops) >= want

    with contextlib.suppress(AssertionError):  # not there in time: the fault goes in anyway
        await wait_until(big_in_flight, s.total_timeout, interval=0.002)


async def run_fault(rig: ChaosRig, fault: Fault, *, warmup: float = 0.6, after: float = 1.2) -> FaultReport:
    """Mixed load; inject; hold; heal; wait until reachable; more load; check every invariant."""
    s = rig.settings
    loop = asyncio.get_running_loop()
    began = loop.time()
    ledger = Ledger()
    violations: list[str] = []
    app_violations_before = len(rig.app.violations)
    load = Load(rig, ledger)
    load.start()
    recovered_after: float | None = None
    try:
        await asyncio.sleep(warmup)  # steady load before the fault (the schedule under test)
        await _until_big_bodies_in_flight(ledger, s)
        injected_at = loop.time()
        await fault.inject(rig)
        await asyncio.sleep(fault.hold)
        await fault.heal(rig)
        healed_at = loop.time()
        try:
            recovered_after = await rig.wait_reachable(s.recover_timeout)
        except AssertionError as exc:
            violations.append(str(exc))
        recovered_at = loop.time()
        await asyncio.sleep(after)  # steady load after recovery
    finally:
        violations += await load.stop()
    violations += ledger.violations()
    violations += rig.app.violations[app_violations_before:]
    if fault.all_succeed:
        violations += [
            f"{op.kind} failed with {op.outcome} although {fault.name} only slows things down"
            for op in ledger.ops
            if not op.ok and op.violation is None
        ]
    else:
        violations += [
            f"{op.kind} started {op.started - healed_at:.2f}s after healing, once the daemon was "
            f"reachable again, and failed with {op.outcome}"
            for op in ledger.ops
            if op.started >= recovered_at and not op.ok and op.violation is None
        ]
    late: list[str] = []
    if fault.in_flight_bound is not None:
        bound = fault.in_flight_bound(s)
        for op in ledger.ops:
            if op.started <= injected_at and op.ended is not None and op.ended > injected_at + bound:
                late.append(
                    f"{op.kind} in flight at {fault.name} ended {op.ended - injected_at:.2f}s after it "
                    f"({op.outcome}); promised within {bound:.2f}s"
                )
        violations += late
    violations += await rig.quiesced(s.stall_timeout + s.idle_timeout + 2.0)
    return FaultReport(
        fault.name, ledger, violations, recovered_after, loop.time() - began, injected_at, healed_at, late
    )


def parse_fault_names(parser: argparse.ArgumentParser, text: str, known: Collection[str]) -> list[str]:
    """``--faults a,b``: the names, each one of ``known``, else a usage error (the soak scripts)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        parser.error(f"unknown fault(s) {', '.join(unknown) or '(none given)'}; pick from {', '.join(known)}")
    return names
