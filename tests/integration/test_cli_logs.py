"""The logs of ``linkd up``, ``studio-gateway serve`` and ``linkctl``, as processes: one JSON schema
(:mod:`contract.logs`), all on stderr (stdout stays for what a command prints as its result),
and ``--log-level LEVEL`` deciding what is written.

No gateway or NATS server is needed: each points at a closed port and logs its attempts.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cli.nats_server import free_port
from tests.helpers import wait_until
from tests.integration.gateway_harness import SECRET
from tests.linkd_support import subprocess_env

pytestmark = [pytest.mark.timeout(60), pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")]

TIMEOUT = 20.0
TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
LEVEL_ORDER = {"debug": 10, "info": 20, "warning": 30, "error": 40}


@dataclass
class Proc:
    proc: asyncio.subprocess.Process
    records: list[dict[str, Any]] = field(default_factory=list)
    other_stderr: list[str] = field(default_factory=list)
    stdout: list[str] = field(default_factory=list)

    async def first(self, match: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        found: list[dict[str, Any]] = []
        await wait_until(
            lambda: found or found.extend(r for r in self.records if match(r)),
            TIMEOUT,
            message=lambda: f"no such record: {self.records[-5:]} / {self.other_stderr[-5:]}",
        )
        return found[0]

    async def stop(self) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), TIMEOUT)


@asynccontextmanager
async def started(*argv: str, env: dict[str, str]) -> AsyncIterator[Proc]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *argv,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    running = Proc(proc)

    async def read_stdout() -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            running.stdout.append(raw.decode(errors="replace"))

    async def read_stderr() -> None:
        assert proc.stderr is not None
        async for raw in proc.stderr:
            try:
                running.records.append(json.loads(raw))
            except ValueError:
                running.other_stderr.append(raw.decode(errors="replace"))

    readers = [asyncio.ensure_future(read_stdout()), asyncio.ensure_future(read_stderr())]
    try:
        yield running
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await asyncio.gather(*readers)


def assert_schema(records: list[dict[str, Any]]) -> None:
    assert records
    for record in records:
        assert list(record)[:4] == ["ts", "level", "logger", "message"], record
        assert TS.fullmatch(record["ts"]), record["ts"]
        assert record["level"] in LEVEL_ORDER
        assert "msg" not in record and "exc" not in record


def linkd_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    # LINKD_TOKEN and no keyring: linkd runs with a temporary key and says so (a warning).
    return subprocess_env(
        tmp_path, LINKD_TOKEN="token", PYTHON_KEYRING_BACKEND="keyring.backends.null.Keyring", **extra
    )


def closed_url(scheme: str) -> str:
    return f"{scheme}://127.0.0.1:{free_port()}"


async def test_all_three_write_json_logs_in_one_schema_on_stderr_and_nothing_on_stdout(
    tmp_path: Path,
) -> None:
    gateway = closed_url("http")
    async with started(
        "-m", "linkd.cli", "up", "--json-logs", "--gateway", gateway, env=linkd_env(tmp_path)
    ) as linkd:
        offline = await linkd.first(lambda r: r.get("state") == "offline")
        assert gateway in offline["message"] and offline["logger"] == "linkd.state"
        await linkd.first(lambda r: r["message"] == "no keyring: using a temporary NATS key for this run")
        assert await linkd.stop() == 0
    assert_schema(linkd.records)
    assert linkd.stdout == [] and linkd.other_stderr == []

    env = subprocess_env(tmp_path, GATEWAY_JWT_SECRET=SECRET)
    port = str(free_port())
    async with started(
        "-m", "studio_gateway.cli", "serve", "--port", port, "--nats-url", closed_url("nats"), env=env
    ) as gw:
        await gw.first(lambda r: r["message"].startswith("starting studio-gateway"))
        assert await gw.stop() == 0
    assert_schema(gw.records)
    assert gw.stdout == []

    argv = ["-m", "cli", "--json-logs", "--log-level", "debug", "status", "desk.example"]
    async with started(*argv, "--nats", closed_url("nats"), env=env) as linkctl:
        assert await asyncio.wait_for(linkctl.proc.wait(), TIMEOUT) == 2
    assert_schema(linkctl.records)
    assert any(r["logger"] == "tunnel.connect" and r["level"] == "debug" for r in linkctl.records)
    assert linkctl.stdout == []
    assert linkctl.other_stderr[-1].startswith("linkctl: error: cannot connect to NATS")  # the error line


async def test_linkd_verbose_flag_wins_over_the_log_level_variable(tmp_path: Path) -> None:
    env = linkd_env(tmp_path, LINKD_LOG_LEVEL="error")
    async with started(
        "-m", "linkd.cli", "up", "--json-logs", "-v", "--gateway", closed_url("http"), env=env
    ) as linkd:
        # A library's debug line (httpx/httpcore connecting), once the daemon runs (and handles SIGTERM).
        await linkd.first(lambda r: r["level"] == "debug" and r["logger"].startswith(("httpx", "httpcore")))
        assert await linkd.stop() == 0


async def test_linkd_log_level_after_up_wins_and_warning_leaves_out_the_state_lines(tmp_path: Path) -> None:
    env = linkd_env(tmp_path)
    status_file = tmp_path / "run" / "linkd-status.json"

    def offline() -> bool:
        try:
            return bool(json.loads(status_file.read_text())["state"] == "offline")
        except (OSError, ValueError, KeyError):
            return False

    argv = ["-m", "linkd.cli", "--log-level", "debug", "up", "--log-level", "WARNING", "--json-logs"]
    async with started(*argv, "--gateway", closed_url("http"), env=env) as linkd:
        await wait_until(offline, TIMEOUT, message="linkd never went offline")
        assert await linkd.stop() == 0
    assert_schema(linkd.records)
    assert [r["message"] for r in linkd.records] == ["no keyring: using a temporary NATS key for this run"]
    assert all(LEVEL_ORDER[r["level"]] >= LEVEL_ORDER["warning"] for r in linkd.records)
