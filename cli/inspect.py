"""``linkctl inspect``: tail linkd's request inspector in a terminal (docs/inspector.md).

Reads the inspector's JSON API on this machine (``linkd up`` serves it on 127.0.0.1): the
recent requests first, then, with ``--follow``, each request as it finishes, one line each
(time, method, path, status, ms, bytes in/out), or NDJSON with ``--json``. Secrets are
redacted by the daemon before they reach us. The stream is opened before the list is read,
so no request that finishes in between is missed (ids already printed are skipped).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Annotated, Any, Final

import httpx
import typer

from . import exitcodes
from .common import CliError
from .sse import SseError, SseParser

__all__ = ["DEFAULT_INSPECT_URL", "format_line", "register"]

# linkd's default inspector (linkd.config.DEFAULT_INSPECT_PORT; linkctl does not import linkd,
# tests/unit/test_linkctl_inspect.py keeps the two equal).
DEFAULT_INSPECT_URL: Final = "http://127.0.0.1:4041"
URL_ENV: Final = "LINKCTL_INSPECT_URL"
CONNECT_TIMEOUT: Final = 5.0

EPILOG: Final = """\b
Examples:
  linkctl inspect                       # the recent requests, then each new one (Ctrl-C to stop)
  linkctl inspect --no-follow --status 5xx
  linkctl inspect --path /api/ --json | jq .durationMs
  linkctl inspect --url http://127.0.0.1:4050   # linkd up --inspect-port 4050

\b
Exit status:
     0  done (--no-follow)
     2  usage error (bad --status or --url)
    30  the inspector cannot be reached or read (is `linkd up` running with its inspector?)
   130  interrupted (Ctrl-C)
"""


def _size(n: Any) -> str:
    value = int(n or 0)
    if value < 1024:
        return f"{value}B"
    if value < 1024 * 1024:
        return f"{value / 1024:.1f}KiB"
    return f"{value / 1024 / 1024:.1f}MiB"


def format_line(row: dict[str, Any]) -> str:
    """``12:00:01 POST /items?page=2 201 12.3ms in 18B out 68B`` (+ error, replay)."""
    when = time.strftime("%H:%M:%S", time.localtime(float(row.get("startedAt") or 0)))
    status = row.get("status")
    shown_status = str(status) if status is not None else "-"
    duration = row.get("durationMs")
    ms = f"{duration:.1f}ms" if isinstance(duration, int | float) else "-"
    target = "".join(ch if ch.isprintable() else "?" for ch in str(row.get("target", "")))
    line = (
        f"{when} {row.get('method')} {target} {shown_status} {ms} "
        f"in {_size(row.get('requestBytes'))} out {_size(row.get('responseBytes'))}"
    )
    if row.get("error"):
        line += f" error={row['error']}"
    if row.get("replayOf"):
        line += f" (replay of {row['replayOf']})"
    return line


def _unreachable(url: str, why: str) -> CliError:
    return CliError(
        f"cannot read the inspector at {url}: {why} (is `linkd up` running with its inspector? "
        "`linkd status` prints its URL; --url or LINKCTL_INSPECT_URL)",
        exitcodes.INSPECTOR_UNREACHABLE,
    )


def _check(response: httpx.Response, url: str) -> None:
    if response.status_code != 200:
        response.read()
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:200] or response.reason_phrase
        status = exitcodes.USAGE if response.status_code == 400 else exitcodes.INSPECTOR_UNREACHABLE
        raise CliError(f"the inspector at {url} answered {response.status_code}: {message}", status)


def _events(response: httpx.Response) -> Iterator[dict[str, Any]]:
    parser = SseParser()
    for chunk in response.iter_raw():
        try:
            messages = parser.feed(chunk)
        except SseError as exc:
            raise CliError(
                f"the inspector's stream is unreadable: {exc}", exitcodes.INSPECTOR_UNREACHABLE
            ) from None
        for message in messages:
            if message.event == "exchange":
                yield json.loads(message.data)
            elif message.event == "overrun":
                print(
                    "linkctl: warning: fell behind the inspector's stream; some requests were skipped",
                    file=sys.stderr,
                )


def _emit(row: dict[str, Any], as_json: bool) -> None:
    print(json.dumps(row, separators=(",", ":")) if as_json else format_line(row), flush=True)


def inspect_command(
    url: Annotated[
        str | None,
        typer.Option(
            "--url",
            metavar="URL",
            help=f"The inspector (default {DEFAULT_INSPECT_URL}; env {URL_ENV}; `linkd status` prints it).",
            show_default=False,
        ),
    ] = None,
    follow: Annotated[
        bool, typer.Option("--follow/--no-follow", "-f", help="Keep printing requests as they finish.")
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per request (NDJSON).")] = False,
    status: Annotated[
        str | None,
        typer.Option(
            "--status",
            metavar="CLASS",
            help="Only 2xx, 3xx, 4xx, 5xx, a status (404) or error.",
            show_default=False,
        ),
    ] = None,
    path: Annotated[
        str | None,
        typer.Option(
            "--path", metavar="TEXT", help="Only requests whose path contains TEXT.", show_default=False
        ),
    ] = None,
    last: Annotated[
        int, typer.Option("--last", "-n", metavar="N", help="How many recent requests to print first.", min=0)
    ] = 20,
) -> None:
    """Tail linkd's request inspector: one line per tunnelled request (method, path, status, ms, bytes)."""
    base = (url or os.environ.get(URL_ENV, "").strip() or DEFAULT_INSPECT_URL).rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise CliError(f"--url must be an http:// URL, not {base!r}")
    query = {k: v for k, v in (("status", status), ("path", path)) if v}
    printed: set[str] = set()
    try:
        with contextlib.ExitStack() as stack:
            client = stack.enter_context(
                httpx.Client(timeout=httpx.Timeout(CONNECT_TIMEOUT, read=None), trust_env=False)
            )
            stream: httpx.Response | None = None
            if follow:  # opened first: nothing that finishes while the list is read is missed
                stream = stack.enter_context(
                    client.stream("GET", f"{base}/api/requests/stream", params=query)
                )
                _check(stream, base)
            recent = client.get(f"{base}/api/requests", params={**query, "limit": str(last)})
            _check(recent, base)
            for row in reversed(recent.json()["requests"]):
                if not row.get("inFlight"):
                    printed.add(str(row["id"]))
                    _emit(row, as_json)
            if stream is None:
                return
            for row in _events(stream):
                key = str(row["id"])
                if row.get("inFlight") or key in printed:
                    continue
                printed.add(key)
                _emit(row, as_json)
            raise _unreachable(base, "the inspector closed the stream (linkd stopped?)")
    except httpx.HTTPError as exc:
        raise _unreachable(base, str(exc) or type(exc).__name__) from None
    except (ValueError, KeyError) as exc:
        raise _unreachable(base, f"not an inspector answer ({exc})") from None


def register(app: typer.Typer) -> None:
    app.command("inspect", epilog=EPILOG)(inspect_command)
