"""The ``command`` runner: user-configured templates only, input stays data, cancel kills the whole tree.

Real processes (``sh``, ``sleep``, ``cat``), no mocks: the point is what the OS sees.
"""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from linkd.config import CommandTemplate
from linkd.run_events import MemoryEventSink, RunEvent
from linkd.runners import CommandRunner, InvalidInput, WorkItem
from linkd.runs import RunManager
from tests.helpers import wait_until
from tests.linkd_support import process_gone

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX process groups")

TIMEOUT = 5.0
INJECTIONS = [
    "; touch pwned1",
    "$(touch pwned2)",
    "`touch pwned3`",
    "&& touch pwned4 || touch pwned5",
    "| touch pwned6",
    "x'; touch pwned7; echo '",
    '"; touch pwned8; echo "',
    "$HOME ${PATH} %s %n \\ \\n",
    "line one\nline two; touch pwned9\n",
    "-rf --help --version",
]


def setup(
    tmp_path: Path, *templates: CommandTemplate, grace: float = 0.3
) -> tuple[RunManager, MemoryEventSink]:
    sink = MemoryEventSink()
    runner = CommandRunner({t.name: t for t in templates}, kill_grace=grace)
    return RunManager({"command": runner}, sink, heartbeat_interval=60, max_concurrent=100), sink


def submit(runs: RunManager, run_id: str, input: Any) -> None:
    runs.runners["command"].validate(input)
    runs.submit(WorkItem(run_id, "t", "u", 1, "command", input))


def output(events: list[RunEvent], stream: str | None = None) -> str:
    return "".join(
        e.data["data"] for e in events if e.type == "output" and stream in (None, e.data["stream"])
    )


async def test_input_stays_data_on_stdin_and_in_the_environment(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    stdin_t = CommandTemplate("cat", ("cat",), cwd=work)
    env_t = CommandTemplate("show", ("sh", "-c", 'printf "%s" "$LINKD_INPUT"'), cwd=work, input_mode="env")
    runs, sink = setup(tmp_path, stdin_t, env_t)
    for n, text in enumerate(INJECTIONS):
        submit(runs, f"s{n}", {"template": "cat", "data": text})
        submit(runs, f"e{n}", {"template": "show", "data": text})
    for n, text in enumerate(INJECTIONS):
        for prefix in ("s", "e"):
            info = await runs.wait_finished(f"{prefix}{n}", TIMEOUT)
            events = sink.events(f"{prefix}{n}")
            assert info.status == "completed", events[-1].data
            assert output(events, "stdout") == text, f"{prefix}{n}: the text did not arrive verbatim"
    assert list(work.iterdir()) == [], "an injection created a file"
    assert not list(Path.cwd().glob("pwned*"))
    # JSON input is passed as JSON text.
    submit(runs, "j", {"template": "cat", "data": {"cmd": "$(touch pwned)", "n": [1]}})
    await runs.wait_finished("j", TIMEOUT)
    assert output(sink.events("j")) == '{"cmd": "$(touch pwned)", "n": [1]}'


def test_a_work_item_cannot_change_the_program_arguments_or_directory() -> None:
    runner = CommandRunner({"build": CommandTemplate("build", ("make",))})
    for bad in (
        {"template": "build", "argv": ["rm", "-rf", "/"]},
        {"template": "build", "args": ["-C", "/"]},
        {"template": "build", "cwd": "/"},
        {"template": "build", "env": {"PATH": "/tmp"}},
        {"template": "build", "command": "rm -rf /"},
        {"template": "rm"},
        {"template": "../build"},
        {"template": ""},
        {"data": "x"},
        "build",
        ["build"],
        None,
    ):
        with pytest.raises(InvalidInput):
            runner.validate(bad)
    env_runner = CommandRunner({"e": CommandTemplate("e", ("true",), input_mode="env")})
    with pytest.raises(InvalidInput, match="environment variable"):
        env_runner.validate({"template": "e", "data": "x" * 200_000})
    with pytest.raises(InvalidInput, match="NUL"):
        env_runner.validate({"template": "e", "data": "a\x00b"})


async def test_cancel_kills_the_whole_process_tree(tmp_path: Path) -> None:
    script = (
        'echo "main=$$"; '
        'sleep 300 & echo "child=$!"; '
        '( sleep 300 & echo "grandchild=$!"; wait ) & echo "sub=$!"; '
        "wait"
    )
    template = CommandTemplate("tree", ("sh", "-c", script), cwd=tmp_path)
    runs, sink = setup(tmp_path, template)
    submit(runs, "tree", {"template": "tree"})
    pattern = re.compile(r"(\w+)=(\d+)")

    def pids() -> dict[str, int]:
        return {m.group(1): int(m.group(2)) for m in pattern.finditer(output(sink.events("tree")))}

    await wait_until(lambda: len(pids()) == 4, TIMEOUT, message="the tree did not start")
    tree = pids()
    assert not any(process_gone(pid) for pid in tree.values())
    runs.cancel("tree", "user cancelled")
    info = await runs.wait_finished("tree", TIMEOUT)
    assert info.status == "cancelled"
    events = sink.events("tree")
    assert events[-1].data == {"finalSeq": len(events), "status": "cancelled", "reason": "user cancelled"}
    await wait_until(
        lambda: all(process_gone(pid) for pid in tree.values()), TIMEOUT, message=f"alive: {tree}"
    )


async def test_a_tree_ignoring_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    script = 'trap \'\' TERM; sleep 300 & echo "child=$!"; echo "main=$$"; wait; wait'
    runs, sink = setup(tmp_path, CommandTemplate("stubborn", ("sh", "-c", script), cwd=tmp_path), grace=0.3)
    submit(runs, "s", {"template": "stubborn"})
    await wait_until(lambda: output(sink.events("s")).count("=") == 2, TIMEOUT)
    tree = [int(v) for v in re.findall(r"=(\d+)", output(sink.events("s")))]
    loop = asyncio.get_running_loop()
    started = loop.time()
    runs.cancel("s")
    info = await runs.wait_finished("s", TIMEOUT)
    assert info.status == "cancelled"
    assert 0.25 <= loop.time() - started < 3.0
    await wait_until(lambda: all(process_gone(pid) for pid in tree), TIMEOUT)


async def test_exit_status_stderr_missing_program_and_timeout(tmp_path: Path) -> None:
    runs, sink = setup(
        tmp_path,
        CommandTemplate("fail", ("sh", "-c", "echo out; echo err >&2; exit 3"), cwd=tmp_path),
        CommandTemplate("missing", ("/nonexistent/program",), cwd=tmp_path),
        CommandTemplate("slow", ("sleep", "300"), cwd=tmp_path, timeout=0.3),
        CommandTemplate("nodir", ("true",), cwd=tmp_path / "nope"),
    )
    for name in ("fail", "missing", "slow", "nodir"):
        submit(runs, name, {"template": name})
    await runs.wait_finished("fail", TIMEOUT)
    events = sink.events("fail")
    assert output(events, "stdout") == "out\n" and output(events, "stderr") == "err\n"
    assert events[-1].data["status"] == "failed" and events[-1].data["exitCode"] == 3
    assert "exited with status 3" in events[-1].data["reason"]
    await runs.wait_finished("missing", TIMEOUT)
    assert "cannot start '/nonexistent/program'" in sink.events("missing")[-1].data["reason"]
    await runs.wait_finished("slow", TIMEOUT)
    assert "timed out after 0.3s" in sink.events("slow")[-1].data["reason"]
    await runs.wait_finished("nodir", TIMEOUT)
    assert "working directory" in sink.events("nodir")[-1].data["reason"]


async def test_leftover_background_processes_do_not_hang_the_run_and_are_cleaned_up(tmp_path: Path) -> None:
    template = CommandTemplate("bg", ("sh", "-c", 'sleep 300 & echo "bg=$!"; echo done'), cwd=tmp_path)
    runs, sink = setup(tmp_path, template)
    submit(runs, "bg", {"template": "bg"})
    info = await runs.wait_finished("bg", TIMEOUT)
    assert info.status == "completed"
    text = output(sink.events("bg"))
    assert text.endswith("done\n")
    pid = int(re.findall(r"bg=(\d+)", text)[0])
    await wait_until(lambda: process_gone(pid), TIMEOUT)


async def test_run_environment_and_long_lines(tmp_path: Path) -> None:
    script = (
        'printf "%s %s %s" "$LINKD_RUN_ID" "$LINKD_TEMPLATE" "$EXTRA"; head -c 200000 /dev/zero | tr "\\0" a'
    )
    template = CommandTemplate("env", ("sh", "-c", script), cwd=tmp_path, env={"EXTRA": "yes"})
    runs, sink = setup(tmp_path, template)
    submit(runs, "envrun", {"template": "env"})
    await runs.wait_finished("envrun", TIMEOUT)
    text = output(sink.events("envrun"))
    assert text.startswith("envrun env yes")
    assert text.count("a") == 200000
