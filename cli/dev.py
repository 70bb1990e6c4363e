"""``linkctl dev``: the whole stack on this machine (nats-server, gateway, linkd) until Ctrl-C.

``--cluster N`` runs N nats-server nodes as one cluster instead of the single server (see
:class:`cli.nats_cluster.NatsCluster`): the gateway and linkd get every node's URL and the run
streams are replicated on min(N, 3) nodes, so a node can be killed to watch the failover.

The processes are managed by :class:`cli.stack.LocalStack`; this module is the command:
options, the "what is running" summary, the watch loop, and a clean stop on SIGINT/SIGTERM
or when a child dies (its last log lines, then exit status 8).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, Final
from urllib.parse import urlsplit

import typer

from . import exitcodes
from .common import CliError
from .stack import (
    DEFAULT_READY_TIMEOUT,
    DEFAULT_USER,
    STATE_DIR_ENV,
    LocalStack,
    StackOptions,
    default_state_dir,
)
from .term import Painter

__all__ = ["ClusterOpt", "StateDirOpt", "print_summary", "register", "stack_options", "stack_signals"]

WATCH_INTERVAL: Final = 0.2
UPSTREAM_ENV: Final = "LINKD_UPSTREAM"
# A local cluster of more nodes than this is a typo, not a test of anything.
MAX_CLUSTER: Final = 9

EPILOG: Final = """\b
Examples:
  linkctl dev                                   # state in ~/.local/share/natslink/linkctl-dev
  linkctl dev --state-dir ./.linkctl-dev --gateway-port 8080
  linkctl dev --json > stack.json               # one JSON object once everything is ready
  linkctl dev --cluster 3                       # 3 nats-server nodes; kill -9 one, the stack carries on
  linkctl dev --upstream http://127.0.0.1:3000  # linkd also serves your local web app
  linkd status                                  # in another terminal: finds the stack's linkd
  source ~/.local/share/natslink/linkctl-dev/dev.env   # in another terminal: LINKCTL_GATEWAY, LINKCTL_TOKEN

\b
Exit status:
     0  stopped by Ctrl-C or SIGTERM, everything shut down cleanly
     2  bad option, or the state directory is in use by another stack
     8  a part of the stack did not start or died (its last log lines are printed)
"""

Opt = typer.Option

StateDirOpt = Annotated[
    Path | None,
    Opt(
        "--state-dir",
        metavar="DIR",
        envvar=STATE_DIR_ENV,
        help="Keys, logs and JetStream data (default: ~/.local/share/natslink/linkctl-dev).",
        show_default=False,
    ),
]


def stack_options(
    state_dir: Path,
    user: str,
    nats_port: int,
    websocket_port: int,
    gateway_port: int,
    ready_timeout: float,
    cluster: int = 1,
    upstream: str | None = None,
    tls: bool = False,
) -> StackOptions:
    for flag, port in (("--nats-port", nats_port), ("--websocket-port", websocket_port)):
        if not 0 <= port <= 65535:
            raise CliError(f"{flag}: {port} is not a port (0-65535; 0 picks a free one)")
    if not 0 <= gateway_port <= 65535:
        raise CliError(f"--gateway-port: {gateway_port} is not a port (0-65535; 0 picks a free one)")
    if ready_timeout <= 0:
        raise CliError(f"--ready-timeout: must be more than 0 seconds (got {ready_timeout:g})")
    if not user.strip() or len(user) > 256:
        raise CliError("--user: give a user id of 1 to 256 characters")
    if not 1 <= cluster <= MAX_CLUSTER:
        raise CliError(f"--cluster: give 1 to {MAX_CLUSTER} nats-server nodes (got {cluster})")
    if upstream is not None:
        upstream = _check_upstream(upstream)
    if tls and cluster > 1:
        raise CliError("--tls runs a single nats-server for now: leave out --cluster")
    return StackOptions(
        state_dir=state_dir.expanduser().resolve(),
        user=user.strip(),
        nats_port=nats_port,
        websocket_port=websocket_port,
        gateway_port=gateway_port,
        ready_timeout=ready_timeout,
        cluster=cluster,
        upstream=upstream,
        tls=tls,
    )


def _check_upstream(raw: str) -> str:
    url = raw.strip()
    try:
        parts = urlsplit(url)
        _ = parts.port
    except ValueError as exc:
        raise CliError(f"--upstream / {UPSTREAM_ENV}: {raw!r} is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CliError(f"--upstream / {UPSTREAM_ENV}: {raw!r} must be an http:// or https:// URL with a host")
    return url.rstrip("/")


def ignored_linkd_settings(environ: Mapping[str, str] | None = None) -> list[str]:
    """``LINKD_*`` variables of this environment that the stack's linkd does not get (it runs with
    its own config dir and settings; ``LINKD_UPSTREAM`` is taken, as ``--upstream``)."""
    env = os.environ if environ is None else environ
    return sorted(name for name in env if name.startswith("LINKD_") and name != UPSTREAM_ENV)


ClusterOpt = Annotated[
    int,
    Opt(
        "--cluster",
        metavar="N",
        help=(
            "nats-server nodes. 1: one server. N > 1: an N-node cluster (routes, clustered JetStream, "
            "operator mode, a websocket listener on every node, state in nats-cluster-N/); the gateway "
            "and linkd get every node's URL and runs are replicated on min(N, 3) nodes. A node that "
            "dies is reported; the stack stops only once fewer than a majority run. "
            "--nats-port/--websocket-port then apply to node n1."
        ),
    ),
]


@contextmanager
def stack_signals() -> Iterator[list[str]]:
    """SIGINT/SIGTERM raise KeyboardInterrupt (so a start in progress unwinds and stops what it
    started); yields a list that records the signal names seen."""
    seen: list[str] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        seen.append(signal.Signals(signum).name)
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield seen
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextmanager
def ignoring_signals() -> Iterator[None]:
    """While stopping (bounded), a second Ctrl-C must not leave half the stack running."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def summary(stack: LocalStack) -> dict[str, Any]:
    pids = stack.pids()
    info: dict[str, Any] = {
        "stateDir": str(stack.state_dir),
        "startedInSeconds": round(stack.started_in, 3),
        "user": stack.options.user,
        "tunnelHostname": stack.tunnel_hostname,
        "desktopHostname": stack.desktop_hostname,
        "nats": {
            "url": stack.nats_url,
            "websocketUrl": stack.websocket_url,
            "monitorUrl": stack.monitor_url,
            "creds": str(stack.state_dir / "linkctl.creds"),
            # With --tls: the dev CA (--nats-ca / LINKCTL_NATS_CA) and what linkd is handed.
            "ca": str(stack.ca_file) if stack.ca_file is not None else None,
            "publicUrl": stack.public_nats_url,
            "pid": pids.get("nats-server"),
            "log": str(stack.state_dir / "nats" / "nats-server.log"),
        },
        "gateway": {
            "url": stack.gateway_url,
            "pid": pids.get("gateway"),
            "log": str(stack.state_dir / "gateway" / "gateway.log"),
        },
        "linkd": {
            "pid": pids.get("linkd"),
            "log": str(stack.state_dir / "linkd" / "linkd.log"),
            "upstream": stack.options.upstream,
            "statusFile": str(stack.state_dir / "linkd" / "linkd-status.json"),
        },
        "token": stack.token,
        "envFile": str(stack.state_dir / "dev.env"),
    }
    nats = info["nats"]
    nats["cluster"] = stack.options.cluster
    if stack.cluster is not None:
        nodes = stack.cluster.nodes
        nats["urls"] = stack.nats_urls
        nats["runsReplicas"] = stack.options.runs_replicas
        nats["pid"] = nodes[0].pid
        nats["log"] = str(nodes[0].log_path)
        nats["nodes"] = [
            {
                "name": stack.cluster.node_name(i),
                "url": node.url,
                "websocketUrl": node.websocket_url,
                "monitorUrl": node.monitor_url,
                "pid": node.pid,
                "log": str(node.log_path),
            }
            for i, node in enumerate(nodes)
        ]
    return info


def print_summary(stack: LocalStack, paint: Painter, *, next_steps: bool = True) -> None:
    info = summary(stack)
    nats, gw = info["nats"], info["gateway"]
    host = stack.tunnel_hostname
    if stack.cluster is None:
        rows = [
            ("nats-server", f"{nats['url']}  websocket {nats['websocketUrl']}  pid {nats['pid']}"),
            ("", f"monitor {nats['monitorUrl']}  JetStream in {stack.state_dir / 'nats'}"),
        ]
        logs = nats["log"]
    else:
        rows = [
            (
                "nats-server",
                f"{len(nats['nodes'])}-node cluster, runs replicated x{nats['runsReplicas']}, "
                f"JetStream in {stack.cluster_dir}",
            )
        ]
        rows += [
            (
                f"  {node['name']}",
                f"{node['url']}  websocket {node['websocketUrl']}  monitor {node['monitorUrl']}  "
                f"pid {node['pid']}",
            )
            for node in nats["nodes"]
        ]
        logs = str(stack.cluster_dir / "n*" / "nats-server.log")
    if nats["ca"] is not None:
        rows.append(("", f"TLS: trust {nats['ca']}; linkd connects to {nats['publicUrl']}"))
    rows += [
        ("gateway", f"{gw['url']}  pid {gw['pid']}"),
        ("linkd", f"pid {info['linkd']['pid']}  online as {host} (desktop {stack.desktop_hostname!r})"),
    ]
    if stack.options.upstream is not None:
        rows.append(("", f"upstream {stack.options.upstream} (every other path of tunnel://{host}/)"))
    rows.append(("user", stack.options.user))
    out = [
        "",
        paint(f"Local stack ready in {stack.started_in:.2f} s", "bold", "green")
        + f"  (state: {stack.state_dir})",
        "",
    ]
    out += [f"  {paint(name.ljust(12), 'dim')} {value}" for name, value in rows]
    if next_steps:
        creds = nats["creds"]
        if nats["ca"] is not None:
            creds = f"{creds} --nats-ca {nats['ca']}"
        out += [
            "",
            paint("Use it from another terminal:", "bold"),
            f"  export LINKCTL_GATEWAY={gw['url']}",
            f"  export LINKCTL_TOKEN={stack.token}",
            f"  # or: source {info['envFile']}",
            "",
            paint("Then try:", "bold"),
            "  linkctl status --gateway $LINKCTL_GATEWAY",
            "  linkctl session",
            '  linkctl runs send mock \'{"count": 5, "delayMs": 300}\' --attach',
            f"  linkctl status {host} --nats {nats['url']} --creds {creds}",
            f"  linkctl fetch tunnel://{host}/api/links/status --nats {nats['url']} --creds {creds}",
            "",
            f"Logs: {logs}, {gw['log']}, {info['linkd']['log']}",
            paint("Ctrl-C stops everything.", "dim"),
        ]
    print("\n".join(out), flush=True)


def _watch(stack: LocalStack) -> int:
    """Until a signal (KeyboardInterrupt) or a child's death; the exit status.

    A cluster node that dies is reported once and the stack carries on, as the cluster does;
    ``dead_child`` names one only when fewer than a majority of the nodes run.
    """
    reported: set[str] = set()
    while True:
        for node in stack.lost_nodes():
            if node.name not in reported:
                reported.add(node.name)
                running = sum(1 for c in stack.children if c.cluster_node and c.returncode is None)
                print(
                    f"linkctl: warning: {node.name} (pid {node.pid}) exited with status {node.returncode}; "
                    f"the cluster carries on with {running} of {stack.options.cluster} nodes "
                    f"(log: {node.log_path})",
                    file=sys.stderr,
                    flush=True,
                )
        dead = stack.dead_child()
        if dead is not None:
            print(
                f"linkctl: error: {dead.name} (pid {dead.pid}) exited with status {dead.returncode}; "
                f"last lines of {dead.log_path}:\n{dead.log_tail()}",
                file=sys.stderr,
                flush=True,
            )
            return exitcodes.STACK_FAILED
        time.sleep(WATCH_INTERVAL)


def dev_command(
    state_dir: StateDirOpt = None,
    user: Annotated[
        str, Opt("--user", metavar="ID", help="The development user (token subject).")
    ] = DEFAULT_USER,
    nats_port: Annotated[
        int, Opt("--nats-port", metavar="PORT", help="NATS client port (0: a free one).")
    ] = 0,
    websocket_port: Annotated[
        int, Opt("--websocket-port", metavar="PORT", help="NATS websocket port (0: a free one).")
    ] = 0,
    gateway_port: Annotated[
        int, Opt("--gateway-port", metavar="PORT", help="Gateway HTTP port (0: a free one).")
    ] = 0,
    ready_timeout: Annotated[
        float, Opt("--ready-timeout", metavar="SECONDS", help="How long each part may take to be ready.")
    ] = DEFAULT_READY_TIMEOUT,
    as_json: Annotated[
        bool,
        Opt("--json", help="Progress on stderr; one JSON object (URLs, pids, token) on stdout when ready."),
    ] = False,
    cluster: ClusterOpt = 1,
    upstream: Annotated[
        str | None,
        Opt(
            "--upstream",
            metavar="URL",
            envvar=UPSTREAM_ENV,
            help="linkd serves this local HTTP service for every other path (its --upstream).",
            show_default=False,
        ),
    ] = None,
    tls: Annotated[
        bool,
        Opt(
            "--tls",
            help="The production shape: TLS on the NATS port and wss on its websocket port (a dev CA in "
            "the state dir's tls/, trusted by the gateway, linkd and the printed linkctl commands); "
            "linkd connects over wss://.",
        ),
    ] = False,
) -> None:
    """Run nats-server, the gateway and linkd for a dev user on this machine until Ctrl-C."""
    options = stack_options(
        state_dir if state_dir is not None else default_state_dir(),
        user,
        nats_port,
        websocket_port,
        gateway_port,
        ready_timeout,
        cluster,
        upstream,
        tls,
    )
    progress = sys.stderr if as_json else sys.stdout
    paint = Painter.for_stream(sys.stdout)

    def say(line: str) -> None:
        print(line, file=progress, flush=True)

    stack = LocalStack(options, say=say)
    say(f"linkctl dev: starting the local stack in {options.state_dir}")
    ignored = ignored_linkd_settings()
    if ignored:
        say(
            "linkctl dev: note: the stack's linkd has its own settings and does not get "
            f"{', '.join(ignored)} from this environment (--upstream / {UPSTREAM_ENV} is passed on)"
        )
    status = exitcodes.OK
    ready = False
    with stack_signals() as seen:
        try:
            stack.start()
            ready = True
            if as_json:
                print(json.dumps(summary(stack)), flush=True)
            else:
                print_summary(stack, paint)
            status = _watch(stack)
        except KeyboardInterrupt:
            say(f"\nlinkctl dev: {seen[-1] if seen else 'interrupted'}: stopping")
            if not ready:  # interrupted while starting
                status = exitcodes.INTERRUPTED
        finally:
            with ignoring_signals():
                stack.stop()
    say("linkctl dev: everything stopped")
    raise typer.Exit(status)


def register(app: typer.Typer) -> None:
    app.command("dev", epilog=EPILOG)(dev_command)
