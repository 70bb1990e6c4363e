"""``command``: run a command template the *user* configured, with the work item's input as data.

Work item input::

    {"template": "build",     # the name of a [runners.command.<name>] table in linkd.toml
     "data": "..."}           # optional; a string as is, any other JSON value as JSON text

The program and its arguments come from the template only: the input reaches the
process as bytes on stdin (``input = "stdin"``, the default) or in the environment
variable ``LINKD_INPUT`` (``input = "env"``). It is never put into argv and no
shell ever parses it, so ``; rm -rf x`` or ``$(...)`` in the input is just text.
Unknown input fields are refused (no way to sneak in arguments or a working directory).

The process runs in its own session (a new process group, ``start_new_session``),
in the template's working directory, with ``LINKD_RUN_ID``, ``LINKD_THREAD_ID``
and ``LINKD_TEMPLATE`` in its environment. stdout and stderr stream as output
events, line by line. Cancelling the run, or a template timeout, sends SIGTERM to
the whole process group, then SIGKILL after the grace period; so does the end of
the main process, for anything it left running in its group. A non-zero exit
status ends the run ``failed`` with ``exitCode``.

Messages while it runs (context and signals, ``POST /api/runs/{id}/context|signals``): the
process finds the path of an append-only file in ``LINKD_MESSAGES_FILE`` (created empty
before it starts, in a private temporary directory, removed after the run). Each message
the desktop accepts is appended as one JSON line, ``{"messageId", "kind": "context",
"context": ...}`` or ``{"messageId", "kind": "signal", "signal": {"signalType", "severity",
"payload"}}``, and flushed before the desktop acknowledges it; a program that cares tails the
file (stdin stays what it was: the input, then end of file). Once the process has exited, a
message is refused (``409 message_not_accepted``).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import os
import shutil
import signal
import tempfile
from collections.abc import AsyncGenerator, Mapping
from pathlib import Path
from typing import Any, Final

from contract.run_messages import CONTEXT, SIGNAL

from ..config import CommandTemplate
from .base import InvalidInput, MessageRefused, Output, RunFailed, RunMessage, RunnerEvent, Stage, WorkItem

__all__ = ["MAX_ENV_INPUT_BYTES", "MESSAGES_FILE_ENV", "CommandRunner", "terminate_process_group"]

# The environment variable naming the run's messages file (see the module doc).
MESSAGES_FILE_ENV: Final = "LINKD_MESSAGES_FILE"

# Linux refuses one environment string longer than 128 KiB (MAX_ARG_STRLEN); stay well below.
MAX_ENV_INPUT_BYTES: Final = 100_000
MAX_STDIN_INPUT_BYTES: Final = 64 * 1024 * 1024
# Output is read in blocks this big; a longer line without a newline is sent in pieces.
READ_BLOCK: Final = 64 * 1024
# After the main process exits, output still in the pipes is read for at most this long.
DRAIN_AFTER_EXIT: Final = 0.5
# How often the loop looks at the process and the deadline while output is quiet.
POLL_INTERVAL: Final = 0.2
_INPUT_KEYS: Final = frozenset({"template", "data"})


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_group(proc: asyncio.subprocess.Process, sig: int) -> None:
    if hasattr(os, "killpg"):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
    elif proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill() if sig != signal.SIGTERM else proc.terminate()


async def terminate_process_group(proc: asyncio.subprocess.Process, grace: float) -> None:
    """SIGTERM the process group of ``proc`` (its session), SIGKILL whatever is left after ``grace``.

    Cancelling this coroutine escalates to SIGKILL at once.
    """
    has_groups = hasattr(os, "killpg")
    if proc.returncode is not None and (not has_groups or not _group_alive(proc.pid)):
        return
    _signal_group(proc, signal.SIGTERM)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    try:
        while loop.time() < deadline:
            if proc.returncode is not None and (not has_groups or not _group_alive(proc.pid)):
                return
            await asyncio.sleep(0.02)
    except asyncio.CancelledError:
        _signal_group(proc, signal.SIGKILL)
        raise
    _signal_group(proc, signal.SIGKILL)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(proc.wait(), 5.0)


async def _read_lines(
    stream: asyncio.StreamReader | None, name: str, queue: asyncio.Queue[tuple[str, str] | None]
) -> None:
    """Put ``(name, line)`` items on ``queue`` until EOF, then ``None``."""
    try:
        if stream is None:
            return
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = ""
        while True:
            block = await stream.read(READ_BLOCK)
            if not block:
                break
            pending += decoder.decode(block)
            while True:
                cut = pending.find("\n")
                if cut < 0:
                    break
                await queue.put((name, pending[: cut + 1]))
                pending = pending[cut + 1 :]
            if len(pending) >= READ_BLOCK:
                await queue.put((name, pending))
                pending = ""
        pending += decoder.decode(b"", final=True)
        if pending:
            await queue.put((name, pending))
    finally:
        queue.put_nowait(None)


async def _write_stdin(stdin: asyncio.StreamWriter | None, data: bytes) -> None:
    if stdin is None:
        return
    try:
        if data:
            stdin.write(data)
            await stdin.drain()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the program does not read its input: its business
    finally:
        with contextlib.suppress(OSError):
            stdin.close()


class CommandRunner:
    name: Final = "command"
    message_kinds: Final = frozenset({CONTEXT, SIGNAL})

    def __init__(self, templates: Mapping[str, CommandTemplate], *, kill_grace: float = 5.0) -> None:
        self.templates = dict(templates)
        self.kill_grace = kill_grace
        # The messages file of each run whose process is running.
        self._message_files: dict[str, Path] = {}

    def deliver(self, item: WorkItem, message: RunMessage) -> None:
        """Append ``message`` to the run's messages file as one JSON line (flushed)."""
        path = self._message_files.get(item.run_id)
        if path is None:
            raise MessageRefused("the command is not running (it has not started yet, or it exited)")
        line = json.dumps(message.as_json(), separators=(",", ":")) + "\n"
        try:
            with path.open("a", encoding="utf-8") as out:
                out.write(line)
        except OSError as exc:
            raise MessageRefused(f"cannot write the messages file ({exc.strerror or exc})") from None

    def _parse(self, input: Any) -> tuple[CommandTemplate, str]:
        if not isinstance(input, Mapping):
            raise InvalidInput('command input must be a JSON object: {"template": "<name>", "data": ...}')
        unknown = sorted(set(input) - _INPUT_KEYS)
        if unknown:
            raise InvalidInput(
                f"command input has unknown field {unknown[0]!r}: only 'template' and 'data' are accepted "
                "(programs and arguments come from the local configuration)"
            )
        name = input.get("template")
        if not isinstance(name, str) or not name:
            raise InvalidInput("command input needs 'template': the name of a configured command template")
        template = self.templates.get(name)
        if template is None:
            known = ", ".join(sorted(self.templates)) or "none configured"
            raise InvalidInput(f"no command template named {name!r} on this desktop (known: {known})")
        raw = input.get("data", "")
        data = raw if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False)
        size = len(data.encode("utf-8"))
        if template.input_mode == "env":
            if size > MAX_ENV_INPUT_BYTES or "\x00" in data:
                raise InvalidInput(
                    f"template {name!r} takes its input in an environment variable: at most "
                    f"{MAX_ENV_INPUT_BYTES} bytes and no NUL characters"
                )
        elif size > MAX_STDIN_INPUT_BYTES:
            raise InvalidInput(f"command input data is larger than {MAX_STDIN_INPUT_BYTES} bytes")
        return template, data

    def validate(self, input: Any) -> None:
        self._parse(input)

    def resumable(self, item: WorkItem) -> bool:
        """The template says it is idempotent (``resumable = true``): run it again after a restart."""
        try:
            template, _ = self._parse(item.input)
        except InvalidInput:
            return False
        return template.resumable

    def _environment(self, template: CommandTemplate, item: WorkItem, data: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(template.env)
        env["LINKD_RUN_ID"] = item.run_id
        env["LINKD_THREAD_ID"] = item.thread_id
        env["LINKD_TEMPLATE"] = template.name
        env.pop("LINKD_INPUT", None)
        env.pop(MESSAGES_FILE_ENV, None)
        if template.input_mode == "env":
            env["LINKD_INPUT"] = data
        return env

    async def run(self, item: WorkItem) -> AsyncGenerator[RunnerEvent, None]:
        template, data = self._parse(item.input)
        yield Stage("preparing")
        cwd = template.cwd if template.cwd is not None else Path.home()
        if not cwd.is_dir():
            raise RunFailed(f"the working directory of template {template.name!r} does not exist: {cwd}")
        use_stdin = template.input_mode == "stdin"
        messages_dir = Path(tempfile.mkdtemp(prefix="linkd-messages-"))
        messages_file = messages_dir / "messages.jsonl"
        messages_file.touch(mode=0o600)
        env = self._environment(template, item, data)
        env[MESSAGES_FILE_ENV] = str(messages_file)
        try:
            proc = await asyncio.create_subprocess_exec(
                *template.argv,
                stdin=asyncio.subprocess.PIPE if use_stdin else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=cwd,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            shutil.rmtree(messages_dir, ignore_errors=True)
            raise RunFailed(f"cannot start {template.argv[0]!r}: {exc.strerror or exc}") from None
        self._message_files[item.run_id] = messages_file
        queue: asyncio.Queue[tuple[str, str] | None] = asyncio.Queue(maxsize=256)
        helpers = [
            asyncio.create_task(_read_lines(proc.stdout, "stdout", queue)),
            asyncio.create_task(_read_lines(proc.stderr, "stderr", queue)),
            asyncio.create_task(_write_stdin(proc.stdin, data.encode("utf-8") if use_stdin else b"")),
        ]
        loop = asyncio.get_running_loop()
        deadline = None if template.timeout is None else loop.time() + template.timeout
        timed_out = False
        try:
            yield Stage("running")
            open_streams = 2
            exited_at: float | None = None
            while open_streams:
                now = loop.time()
                if deadline is not None and now >= deadline:
                    timed_out = True
                    break
                if proc.returncode is not None:
                    exited_at = now if exited_at is None else exited_at
                    if now - exited_at >= DRAIN_AFTER_EXIT:
                        break  # something else in the group holds the pipes open; it is killed below
                try:
                    entry = await asyncio.wait_for(queue.get(), POLL_INTERVAL)
                except TimeoutError:
                    continue
                if entry is None:
                    open_streams -= 1
                else:
                    yield Output(entry[1], entry[0])
            if not timed_out:
                if deadline is None:
                    await proc.wait()
                else:
                    try:
                        await asyncio.wait_for(proc.wait(), max(0.0, deadline - loop.time()))
                    except TimeoutError:
                        timed_out = True
        finally:
            self._message_files.pop(item.run_id, None)
            try:
                await terminate_process_group(proc, self.kill_grace)
            finally:  # even when a second cancel cut the grace short
                shutil.rmtree(messages_dir, ignore_errors=True)
                for task in helpers:
                    task.cancel()
                await asyncio.gather(*helpers, return_exceptions=True)
        if timed_out:
            raise RunFailed(f"template {template.name!r} timed out after {template.timeout:g}s")
        code = proc.returncode
        if code is None or code == 0:
            return
        if code < 0:
            try:
                signame = signal.Signals(-code).name
            except ValueError:
                signame = f"signal {-code}"
            raise RunFailed(f"{template.argv[0]} was killed by {signame}", exitCode=code)
        raise RunFailed(f"{template.argv[0]} exited with status {code}", exitCode=code)
