"""``linkctl fetch tunnel://HOST/PATH``: curl for the tunnel.

The request body streams from a file or stdin, the response body streams to stdout or
a file: nothing is held whole in memory. Typed tunnel errors end the command with one
line ``linkctl: <code>: <message>`` and an exit status per code (:mod:`cli.exitcodes`).
"""

from __future__ import annotations

import os
import re
import stat
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from http import HTTPStatus
from importlib import metadata
from pathlib import Path
from typing import Annotated, BinaryIO, Final

import typer

import tunnel

from . import exitcodes
from .common import (
    DEFAULT_NATS_URL,
    CliError,
    CredsOpt,
    NatsCaOpt,
    NatsCertOpt,
    NatsKeyOpt,
    NatsOptions,
    NatsUrlOpt,
    PrefixOpt,
    TokenOpt,
    TunnelFailure,
    nats_connection,
    run,
)
from .progress import Progress
from .streams import Sink, read_in_thread
from .term import Painter, color_enabled

__all__ = ["FetchRequest", "parse_header", "register"]

FORM_CONTENT_TYPE: Final = "application/x-www-form-urlencoded"
_TOKEN_RE: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE_RE: Final = re.compile(r"[\r\n\x00]")

EPILOG: Final = """\b
Examples:
  linkctl fetch tunnel://desk.example/api/links/status
  linkctl fetch -i -H 'Accept: application/json' 'tunnel://desk.example/api/items?limit=5'
  linkctl fetch -H 'Content-Type: application/json' -d '{"name": "x"}' tunnel://desk.example/api/items
  linkctl fetch -X PUT --data-binary @model.bin tunnel://desk.example/files/model.bin
  tar c src | linkctl fetch --data-binary @- tunnel://desk.example/upload
  linkctl fetch -o model.bin tunnel://desk.example/files/model.bin

As in curl: -d/--data-binary make the default method POST and the default
Content-Type application/x-www-form-urlencoded (set -H 'Content-Type: ...' for
anything else); -d @FILE reads FILE whole and drops its newlines, --data-binary
@FILE streams it unchanged (@- is stdin). The response body streams to stdout or
-o FILE as it arrives. A non-2xx response is printed like any other and exits 0,
unless --fail.

""" + exitcodes.describe()

TIMEOUTS_PANEL: Final = "Timeouts"


def _version() -> str:
    try:
        return metadata.version("natslink")
    except metadata.PackageNotFoundError:
        return "0"


def parse_header(raw: str) -> tuple[str, str]:
    """``'Name: value'`` -> ("Name", "value"); ``'Name:'`` is an empty value."""
    name, colon, value = raw.partition(":")
    name = name.strip()
    if not colon or not name:
        raise CliError(f"-H: {raw!r} is not 'Name: value'")
    if not _TOKEN_RE.fullmatch(name):
        raise CliError(f"-H: {name!r} is not a valid header name")
    value = value.strip()
    if _BAD_VALUE_RE.search(value):
        raise CliError(f"-H: the value of {name!r} contains a line break or NUL")
    return name, value


def _has_header(headers: list[tuple[str, str]], name: str) -> bool:
    return any(n.lower() == name for n, _ in headers)


@dataclass
class FetchRequest:
    """A fetch, validated from the flags before anything touches the network."""

    url: str
    hostname: str
    method: str
    headers: list[tuple[str, str]]
    body: bytes | AsyncIterator[bytes] | None = None
    body_file: BinaryIO | None = None
    include: bool = False
    output: Path | None = None
    #: ``-o -``: write to stdout even when it is a terminal and the body looks binary.
    force_stdout: bool = False
    fail: bool = False
    progress: bool = True
    verbose: bool = False
    timeout: float | None = None
    first_frame_timeout: float | None = tunnel.DEFAULT_FIRST_FRAME_TIMEOUT
    idle_timeout: float | None = tunnel.DEFAULT_IDLE_TIMEOUT

    def close(self) -> None:
        if self.body_file is not None and self.body_file is not sys.stdin.buffer:
            self.body_file.close()


def _read_data_arg(value: str) -> bytes:
    """One ``-d`` value: text, or ``@FILE``/``@-`` read whole with CR/LF removed (as curl)."""
    if not value.startswith("@"):
        return value.encode("utf-8")
    name = value[1:]
    try:
        raw = sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
    except OSError as exc:
        raise CliError(f"-d: cannot read {name!r}: {exc.strerror or exc}") from None
    return raw.replace(b"\r", b"").replace(b"\n", b"")


def _open_body(value: str) -> tuple[bytes | AsyncIterator[bytes], BinaryIO | None, int | None]:
    """``--data-binary``: (body, open file, length when known)."""
    if not value.startswith("@"):
        data = value.encode("utf-8")
        return data, None, len(data)
    name = value[1:]
    if name == "-":
        return read_in_thread(sys.stdin.buffer), sys.stdin.buffer, None
    try:
        source = open(name, "rb")  # noqa: SIM115 -- closed by FetchRequest.close
    except OSError as exc:
        raise CliError(f"--data-binary: cannot read {name!r}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(source.fileno())
    except OSError:
        info = None
    length = info.st_size if info is not None and stat.S_ISREG(info.st_mode) else None
    return read_in_thread(source), source, length


def _positive(flag: str, value: float | None) -> float | None:
    if value is not None and value <= 0:
        raise CliError(f"{flag}: must be more than 0 seconds (got {value:g})")
    return value


def build_request(
    url: str,
    *,
    method: str | None,
    headers: list[str],
    data: list[str],
    data_binary: str | None,
    include: bool,
    head: bool,
    output: str | None,
    fail: bool,
    silent: bool,
    verbose: bool,
    timeout: float | None,
    first_frame_timeout: float,
    idle_timeout: float,
) -> FetchRequest:
    try:
        hostname, _target = tunnel.parse_tunnel_url(url)
    except tunnel.TunnelError as exc:
        hint = " (expected tunnel://HOST/PATH)" if "tunnel://" not in exc.message else ""
        raise CliError(f"bad URL: {exc.message}{hint}") from None
    header_list = [parse_header(raw) for raw in headers]
    if data and data_binary is not None:
        raise CliError("give -d/--data or --data-binary, not both")
    if head and (data or data_binary is not None):
        raise CliError("-I/--head sends no body: drop -d/--data-binary")
    if method is not None and not _TOKEN_RE.fullmatch(method):
        raise CliError(f"-X: {method!r} is not an HTTP method")
    if output is not None and output != "-":
        parent = Path(output).expanduser().resolve().parent
        if not parent.is_dir():
            raise CliError(f"-o: directory {str(parent)!r} does not exist")
        if Path(output).expanduser().is_dir():
            raise CliError(f"-o: {output!r} is a directory")
    request = FetchRequest(
        url=url,
        hostname=hostname,
        method=method or ("HEAD" if head else "GET"),
        headers=header_list,
        include=include or head,
        output=None if output in (None, "-") else Path(output).expanduser(),
        force_stdout=output == "-",
        fail=fail,
        progress=not silent,
        verbose=verbose,
        timeout=_positive("--timeout", timeout),
        first_frame_timeout=_positive("--first-frame-timeout", first_frame_timeout),
        idle_timeout=_positive("--idle-timeout", idle_timeout),
    )
    length: int | None = None
    if data:
        request.body = b"&".join(_read_data_arg(value) for value in data)
        length = len(request.body)
    elif data_binary is not None:
        request.body, request.body_file, length = _open_body(data_binary)
    if request.body is not None:
        if method is None:
            request.method = "POST"
        if not _has_header(header_list, "content-type"):
            header_list.append(("Content-Type", FORM_CONTENT_TYPE))
        if length is not None and not _has_header(header_list, "content-length"):
            header_list.append(("Content-Length", str(length)))
    if not _has_header(header_list, "user-agent"):
        header_list.append(("User-Agent", f"linkctl/{_version()}"))
    if not _has_header(header_list, "accept"):
        header_list.append(("Accept", "*/*"))
    return request


def _status_line(response: tunnel.FetchResponse) -> str:
    reason = response.reason
    if not reason:
        try:
            reason = HTTPStatus(response.status).phrase
        except ValueError:
            reason = ""
    return f"HTTP/1.1 {response.status} {reason}".rstrip()


def _head_bytes(response: tunnel.FetchResponse, paint: Painter) -> bytes:
    lines = [paint(_status_line(response), "bold")]
    lines += [f"{paint(name, 'bold')}: {value}" for name, value in response.headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")


def _open_sink(request: FetchRequest) -> Sink:
    if request.output is None:
        return Sink(sys.stdout.buffer, "to stdout", flush_each=True, close=False)
    try:
        target = open(request.output, "wb")  # noqa: SIM115 -- Sink.close closes it
    except OSError as exc:
        raise CliError(
            f"-o: cannot write {str(request.output)!r}: {exc.strerror or exc}", exitcodes.WRITE_ERROR
        ) from None
    return Sink(target, repr(str(request.output)), flush_each=False, close=True)


async def fetch(request: FetchRequest, nats: NatsOptions) -> int:
    """Perform one fetch; returns the exit status (raises CliError for the failures)."""
    async with nats_connection(nats) as nc:
        client = tunnel.TunnelClient(nc, prefix=nats.prefix)
        try:
            return await _exchange(client, request, nats)
        finally:
            await client.aclose()


async def _exchange(client: tunnel.TunnelClient, request: FetchRequest, nats: NatsOptions) -> int:
    err = sys.stderr
    paint_err = Painter.for_stream(err)
    if request.verbose:
        err.write(paint_err(f"* NATS {nats.display}, prefix {nats.prefix}\n", "dim"))
        err.write(f"> {request.method} {request.url}\n")
        for name, value in request.headers:
            err.write(f"> {name}: {value}\n")
        err.flush()
    started = time.perf_counter()
    try:
        response = await client.fetch(
            request.url,
            method=request.method,
            headers=request.headers,
            body=request.body,
            timeout=request.timeout,
            first_frame_timeout=request.first_frame_timeout,
            idle_timeout=request.idle_timeout,
        )
    except tunnel.TunnelError as exc:
        raise TunnelFailure(exc, request.hostname) from None
    async with response:
        if request.verbose:
            elapsed = (time.perf_counter() - started) * 1000
            err.write(paint_err(f"* request {response.request_id}: head after {elapsed:.1f} ms\n", "dim"))
            err.write(f"< {_status_line(response)}\n")
            for name, value in response.headers:
                err.write(f"< {name}: {value}\n")
            err.flush()
        if request.fail and response.status >= 400:
            raise CliError(
                f"the desktop answered {_status_line(response)[9:]} (--fail)", exitcodes.HTTP_ERROR
            )
        sink = _open_sink(request)
        to_terminal = request.output is None and color_enabled(sys.stdout)
        total = _content_length(response)
        progress = Progress(
            err,
            total,
            enabled=request.progress and not to_terminal and _isatty(err),
        )
        try:
            if request.include:
                await sink.write(_head_bytes(response, Painter(to_terminal)))
            try:
                guard_binary = request.output is None and not request.force_stdout and _isatty(sys.stdout)
                async for chunk in response.aiter_bytes():
                    if guard_binary:
                        guard_binary = False
                        if b"\x00" in chunk:
                            raise CliError(
                                "the body is binary and stdout is a terminal: "
                                "use -o FILE (or -o - to print it anyway)",
                                exitcodes.WRITE_ERROR,
                            )
                    await sink.write(chunk)
                    progress.update(len(chunk))
            except tunnel.TunnelError as exc:
                progress.abandon()
                raise TunnelFailure(exc, request.hostname) from None
            except BaseException:
                progress.abandon()
                raise
            progress.finish()
        finally:
            sink.close()
    if request.verbose:
        elapsed = (time.perf_counter() - started) * 1000
        err.write(paint_err(f"* {sink.written} bytes in {elapsed:.1f} ms\n", "dim"))
        err.flush()
    return exitcodes.OK


def _content_length(response: tunnel.FetchResponse) -> int | None:
    value = response.header("content-length")
    if value is None or not value.strip().isdigit():
        return None
    return int(value.strip())


def _isatty(stream: object) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except ValueError:
        return False


Opt = typer.Option


def fetch_command(
    url: Annotated[str, typer.Argument(metavar="URL", help="tunnel://HOST/PATH?QUERY", show_default=False)],
    method: Annotated[
        str | None,
        Opt("-X", "--request", metavar="METHOD", help="Method (default GET, or POST with a body)."),
    ] = None,
    header: Annotated[
        list[str] | None,
        Opt("-H", "--header", metavar="'NAME: VALUE'", help="Request header; repeat for more (order kept)."),
    ] = None,
    data: Annotated[
        list[str] | None,
        Opt("-d", "--data", metavar="TEXT|@FILE", help="Request body; repeats are joined with '&'."),
    ] = None,
    data_binary: Annotated[
        str | None,
        Opt("--data-binary", metavar="@FILE|@-|TEXT", help="Request body streamed as is from FILE or stdin."),
    ] = None,
    include: Annotated[bool, Opt("-i", "--include", help="Write the status line and headers first.")] = False,
    head: Annotated[bool, Opt("-I", "--head", help="Send HEAD and show the response head.")] = False,
    output: Annotated[
        str | None,
        Opt(
            "-o",
            "--output",
            metavar="FILE",
            help="Write the body to FILE, with a progress bar on a terminal (-: stdout, even binary).",
        ),
    ] = None,
    fail: Annotated[
        bool, Opt("-f", "--fail", help="Exit 22, printing no body, when the status is 400 or more.")
    ] = False,
    silent: Annotated[
        bool, Opt("-s", "--silent", help="No progress bar (errors are still printed).")
    ] = False,
    verbose: Annotated[
        bool, Opt("-v", "--verbose", help="Show the request and response heads on stderr.")
    ] = False,
    timeout: Annotated[
        float | None,
        Opt(
            "--timeout",
            metavar="SECONDS",
            help="Overall deadline for the whole exchange (default: none).",
            rich_help_panel=TIMEOUTS_PANEL,
        ),
    ] = None,
    first_frame_timeout: Annotated[
        float,
        Opt(
            "--first-frame-timeout",
            metavar="SECONDS",
            help="How long the desktop may take to answer at all.",
            rich_help_panel=TIMEOUTS_PANEL,
        ),
    ] = tunnel.DEFAULT_FIRST_FRAME_TIMEOUT,
    idle_timeout: Annotated[
        float,
        Opt(
            "--idle-timeout",
            metavar="SECONDS",
            help="Longest silence (no data, no heartbeat) before the desktop counts as gone.",
            rich_help_panel=TIMEOUTS_PANEL,
        ),
    ] = tunnel.DEFAULT_IDLE_TIMEOUT,
    nats: NatsUrlOpt = DEFAULT_NATS_URL,
    creds: CredsOpt = None,
    token: TokenOpt = None,
    prefix: PrefixOpt = tunnel.DEFAULT_PREFIX,
    nats_ca: NatsCaOpt = None,
    nats_cert: NatsCertOpt = None,
    nats_key: NatsKeyOpt = None,
) -> None:
    """Send one HTTP request to a linked desktop and stream the response, like curl."""
    request = build_request(
        url,
        method=method,
        headers=header or [],
        data=data or [],
        data_binary=data_binary,
        include=include,
        head=head,
        output=output,
        fail=fail,
        silent=silent,
        verbose=verbose,
        timeout=timeout,
        first_frame_timeout=first_frame_timeout,
        idle_timeout=idle_timeout,
    )
    try:
        options = NatsOptions.from_flags(
            nats, creds, token, prefix, nats_ca=nats_ca, nats_cert=nats_cert, nats_key=nats_key
        )
        status = run(fetch(request, options))
    finally:
        request.close()
    raise typer.Exit(status)


def register(app: typer.Typer) -> None:
    app.command("fetch", epilog=EPILOG)(fetch_command)
