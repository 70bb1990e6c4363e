"""``linkctl inspect`` and ``linkd up``'s inspector as the user runs them: separate processes.

``linkd login`` + ``linkd up --upstream ... --inspect-port PORT`` (a real gateway on an
operator-mode nats-server, a real upstream); ``linkd up`` prints the inspector's URL and
``linkd status`` shows it; requests sent through the tunnel are then listed by ``linkctl
inspect`` (lines and NDJSON, filters, --follow until Ctrl-C), and an unreachable inspector is
one line and exit status 30.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import RawCredentials

import tunnel
from cli import exitcodes
from cli.nats_server import free_port
from tests.helpers import NatsServerFactory, wait_until
from tests.integration.gateway_harness import start_operator_server
from tests.integration.inspector_harness import EchoUpstream
from tests.integration.linkd_harness import live_gateway
from tests.linkd_support import subprocess_env

pytestmark = [pytest.mark.timeout(90), pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")]

LINKD = [sys.executable, "-m", "linkd.cli"]
LINKCTL = [sys.executable, "-m", "cli.main"]
TIMEOUT = 20.0  # cold Python starts of the CLIs are part of it
LINE = re.compile(r"^\d\d:\d\d:\d\d (\S+) (\S+) (\S+) ([\d.]+)ms in (\S+) out (\S+)$")


async def run(env: dict[str, str], argv: list[str], stdin: str = "") -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), TIMEOUT)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@asynccontextmanager
async def process(
    env: dict[str, str], argv: list[str]
) -> AsyncIterator[tuple[asyncio.subprocess.Process, list[str], list[str]]]:
    """A long-running process; its stdout and stderr lines collected as they come."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out: list[str] = []
    err: list[str] = []

    async def pump(stream: asyncio.StreamReader | None, into: list[str]) -> None:
        assert stream is not None
        async for raw in stream:
            into.append(raw.decode(errors="replace").rstrip("\n"))

    readers = [asyncio.ensure_future(pump(proc.stdout, out)), asyncio.ensure_future(pump(proc.stderr, err))]
    try:
        yield proc, out, err
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await asyncio.gather(*readers, return_exceptions=True)


async def test_linkd_up_prints_the_inspector_and_linkctl_inspect_tails_it(
    nats_server_factory: NatsServerFactory, tmp_path: Path
) -> None:
    op = start_operator_server(nats_server_factory, tmp_path)
    upstream = EchoUpstream()
    await upstream.start()
    env = subprocess_env(tmp_path)
    port = free_port()
    inspector = f"http://127.0.0.1:{port}"
    try:
        async with live_gateway(op.env()) as gw:
            code, _, err = await run(
                env, [*LINKD, "login", "--gateway", gw.url], stdin=gw.token("ann") + "\n"
            )
            assert code == 0, err
            up = [*LINKD, "up", "--json-logs", "--upstream", upstream.url, "--inspect-port", str(port)]
            async with process(env, up) as (daemon, _, daemon_err):
                logs: list[dict[str, Any]] = []

                def logged(text: str) -> dict[str, Any] | None:
                    logs[:] = [json.loads(line) for line in daemon_err if line.startswith("{")]
                    return next((line for line in logs if text in line.get("message", "")), None)

                await wait_until(
                    lambda: logged("online as") is not None, TIMEOUT, message=lambda: f"{daemon_err}"
                )
                started = logged("inspector at")
                assert started is not None and f"{inspector}/" in started["message"]
                hostname = str(logged("online as")["message"]).split("online as ", 1)[1].split()[0]  # type: ignore[index]
                code, status_out, _ = await run(env, [*LINKD, "status"])
                assert code == 0 and f"inspector:   {inspector}/" in status_out

                nc = await nats.connect(
                    op.server.url, user_credentials=RawCredentials(op.gateway_creds.read_text())
                )
                try:
                    for path, method, body in (
                        ("/items?page=2", "POST", b'{"a": 1}'),
                        ("/fail", "GET", None),
                    ):
                        async with await tunnel.fetch(
                            nc, f"tunnel://{hostname}{path}", method=method, body=body, timeout=TIMEOUT
                        ) as resp:
                            await resp.read()

                    async def listed() -> bool:
                        code, out, _ = await run(
                            env, [*LINKCTL, "inspect", "--url", inspector, "--no-follow"]
                        )
                        return code == 0 and len(out.splitlines()) == 2

                    await wait_until(listed, TIMEOUT, message="linkctl inspect never listed both requests")
                    code, out, err = await run(env, [*LINKCTL, "inspect", "--url", inspector, "--no-follow"])
                    assert code == 0 and err == ""
                    parsed = [LINE.match(line) for line in out.splitlines()]
                    assert all(parsed), out
                    assert [m.groups()[:3] for m in parsed if m] == [
                        ("POST", "/items?page=2", "200"),
                        ("GET", "/fail", "503"),
                    ]
                    assert parsed[0] is not None and parsed[0].group(5) == "8B"

                    # NDJSON, filtered; the URL from the environment.
                    code, out, _ = await run(
                        {**env, "LINKCTL_INSPECT_URL": inspector},
                        [*LINKCTL, "inspect", "--no-follow", "--json", "--status", "5xx"],
                    )
                    rows = [json.loads(line) for line in out.splitlines()]
                    assert code == 0 and [(r["target"], r["status"]) for r in rows] == [("/fail", 503)]
                    code, _, err = await run(
                        env, [*LINKCTL, "inspect", "--url", inspector, "--status", "7xx"]
                    )
                    assert code == exitcodes.USAGE and err.count("\n") == 1 and "status filter" in err

                    # --follow: the recent ones, then a new request as it finishes; Ctrl-C ends it.
                    follow = [*LINKCTL, "inspect", "--url", inspector, "--last", "1"]
                    async with process(env, follow) as (tail, tail_out, tail_err):
                        await wait_until(
                            lambda: len(tail_out) == 1, TIMEOUT, message=lambda: f"{tail_out} {tail_err}"
                        )
                        async with await tunnel.fetch(
                            nc, f"tunnel://{hostname}/later", timeout=TIMEOUT
                        ) as resp:
                            await resp.read()
                        await wait_until(
                            lambda: len(tail_out) == 2, TIMEOUT, message=lambda: f"{tail_out} {tail_err}"
                        )
                        tail.send_signal(signal.SIGINT)
                        assert await asyncio.wait_for(tail.wait(), TIMEOUT) == exitcodes.INTERRUPTED
                    assert "/fail 503" in tail_out[0] and "GET /later 200" in tail_out[1]
                    assert not [line for line in tail_err if "Traceback" in line]
                finally:
                    await nc.close()
                daemon.send_signal(signal.SIGTERM)
                await asyncio.wait_for(daemon.wait(), TIMEOUT)

        # Nothing listening: one line, its own exit status.
        dead = f"http://127.0.0.1:{free_port()}"
        code, out, err = await run(env, [*LINKCTL, "inspect", "--url", dead])
        assert code == exitcodes.INSPECTOR_UNREACHABLE and out == ""
        assert err.count("\n") == 1 and err.startswith(f"linkctl: error: cannot read the inspector at {dead}")
    finally:
        await upstream.stop()
