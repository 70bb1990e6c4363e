"""``linkctl forward``: curl-like requests through httpx to the local h11 listener, over the tunnel.

One ``linkctl forward`` subprocess serves the whole module (real nats-server, a
``tunnel.serve`` desktop in a thread); its clean stop on SIGINT is checked at teardown.
The error-mapping tests that need short per-request timeouts run the forwarder in-process.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import h11
import httpx
import nats
import pytest

import tunnel
from cli.local_proxy import Forwarder
from cli.nats_server import NatsServer, NatsServerConfig
from tests.integration.linkctl_harness import HOSTNAME, STATUS, Desktop, MiB, pattern_sha256

CLI = [sys.executable, "-m", "cli"]
READY_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
HTTP_TIMEOUT = 20.0
_READY_RE = re.compile(r"forwarding (http://\S+) -> tunnel://(\S+)")


@dataclass
class ForwardProcess:
    proc: subprocess.Popen[str]
    url: str
    stderr_lines: list[str] = field(default_factory=list)
    _reader: threading.Thread | None = None

    @classmethod
    def start(cls, nats_url: str, host: str, *extra: str) -> ForwardProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LINKCTL_")}
        proc = subprocess.Popen(
            [*CLI, "forward", "--listen", "127.0.0.1:0", "--nats", nats_url, *extra, host],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert proc.stderr is not None
        lines: list[str] = []
        ready = threading.Event()
        found: list[str] = []

        def read() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                lines.append(line.rstrip("\n"))
                match = _READY_RE.search(line)
                if match and not found:
                    found.append(match.group(1))
                    ready.set()
            ready.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        if not ready.wait(READY_TIMEOUT) or not found:
            proc.kill()
            proc.wait()
            raise AssertionError("linkctl forward did not start:\n" + "\n".join(lines))
        return cls(proc, found[0], lines, reader)

    def stop(self) -> int:
        """SIGINT (Ctrl-C), as a user would; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(STOP_TIMEOUT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            if self._reader is not None:
                self._reader.join(5)


@dataclass
class Stack:
    nats_url: str
    desktop: Desktop
    forward: ForwardProcess


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with NatsServer(NatsServerConfig()) as server:
        desk = Desktop(server.url).start()
        try:
            forward = ForwardProcess.start(server.url, HOSTNAME)
            try:
                yield Stack(server.url, desk, forward)
            finally:
                status = forward.stop()
                log = "\n".join(forward.stderr_lines)
                assert status == 0, log
                assert forward.stderr_lines[-1] == "linkctl: stopping", log
                assert "Traceback" not in log, log
        finally:
            desk.close()


@pytest.fixture
def http(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.forward.url, timeout=HTTP_TIMEOUT) as client:
        yield client


def test_get(http: httpx.Client) -> None:
    response = http.get("/api/links/status")
    assert response.status_code == 200
    assert response.json() == STATUS
    assert response.headers["content-type"] == "application/json"


def test_post_with_content_length_forwards_body_and_end_to_end_headers(http: httpx.Client) -> None:
    payload = os.urandom(256 * 1024)
    response = http.post(
        "/echo?x=1",
        content=payload,
        headers=[("X-Tag", "a"), ("X-Tag", "b"), ("Connection", "keep-alive, X-Hop"), ("X-Hop", "dropped")],
    )
    assert response.status_code == 200
    echo = response.json()
    assert echo["method"] == "POST"
    assert echo["url"] == "/echo?x=1"
    assert echo["bodyLength"] == len(payload)
    assert echo["bodySha256"] == hashlib.sha256(payload).hexdigest()
    names = [name.lower() for name, _ in echo["headers"]]
    assert [v for n, v in echo["headers"] if n.lower() == "x-tag"] == ["a", "b"]
    assert ["content-length", str(len(payload))] in [[n.lower(), v] for n, v in echo["headers"]]
    for hop in ("connection", "x-hop", "host"):
        assert hop not in names


def test_what_the_browser_used_is_passed_on_as_x_forwarded_headers(http: httpx.Client) -> None:
    # So an app behind the tunnel builds redirects and links to this listener (tunnel.asgi reads them).
    echo = http.get("/echo").json()
    sent = {name.lower(): value for name, value in echo["headers"]}
    assert sent["x-forwarded-host"] == http.base_url.netloc.decode("ascii")
    assert sent["x-forwarded-proto"] == "http"
    assert sent["x-forwarded-for"] == "127.0.0.1"
    # The listener is the edge: what a client claims under these names never reaches the app.
    forged = {
        "X-Forwarded-Host": "app.example",
        "X-Forwarded-For": "203.0.113.9",
        "X-Forwarded-Proto": "https",
        "Forwarded": "for=203.0.113.9",
    }
    echo = http.get("/echo", headers=forged).json()
    sent = [(name.lower(), value) for name, value in echo["headers"]]
    assert ("x-forwarded-for", "127.0.0.1") in sent and ("x-forwarded-proto", "http") in sent
    assert not [pair for pair in sent if "203.0.113.9" in pair[1] or pair[1] in ("app.example", "https")]
    assert "forwarded" not in dict(sent)


def test_chunked_upload_streams_through(http: httpx.Client) -> None:
    digest = hashlib.sha256()
    total = 3 * MiB + 1

    def body() -> Iterator[bytes]:
        sent = 0
        while sent < total:
            piece = os.urandom(min(64 * 1024, total - sent))
            digest.update(piece)
            sent += len(piece)
            yield piece

    response = http.put("/echo", content=body())
    assert response.status_code == 200
    echo = response.json()
    assert echo["method"] == "PUT"
    assert echo["bodyLength"] == total
    assert echo["bodySha256"] == digest.hexdigest()
    assert ["transfer-encoding", "chunked"] not in [[n.lower(), v] for n, v in echo["headers"]]


@pytest.mark.parametrize("chunked", [True, False], ids=["no-length", "content-length"])
def test_20_mib_download_streams_byte_exact(http: httpx.Client, chunked: bool) -> None:
    size = 20 * MiB
    digest = hashlib.sha256()
    received = 0
    query = f"/download?size={size}" + ("&chunked=1" if chunked else "")
    with http.stream("GET", query) as response:
        assert response.status_code == 200
        if chunked:
            assert response.headers["transfer-encoding"] == "chunked"
            assert "content-length" not in response.headers
        else:
            assert response.headers["content-length"] == str(size)
        for piece in response.iter_raw():
            digest.update(piece)
            received += len(piece)
    assert received == size
    assert digest.hexdigest() == pattern_sha256(size)


def test_keep_alive_serves_two_requests_on_one_connection(http: httpx.Client) -> None:
    first = http.get("/api/links/status")
    second = http.post("/echo", content=b"second")
    assert first.status_code == second.status_code == 200
    assert second.json()["bodyLength"] == 6
    local = [r.extensions["network_stream"].get_extra_info("client_addr") for r in (first, second)]
    assert local[0] == local[1], "the second request used a new connection"


def _h11_events(conn: h11.Connection, sock: socket.socket, until: type[h11.Event]) -> list[h11.Event]:
    events: list[h11.Event] = []
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(sock.recv(65536))
            continue
        assert isinstance(event, h11.Event), event
        events.append(event)
        if isinstance(event, until):
            return events


def test_expect_100_continue_is_answered_before_the_body(stack: Stack) -> None:
    host, port = stack.forward.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=HTTP_TIMEOUT) as sock:
        conn = h11.Connection(h11.CLIENT)
        head = [("host", "localhost"), ("content-length", "5"), ("expect", "100-continue")]
        sock.sendall(conn.send(h11.Request(method="PUT", target="/echo", headers=head)))
        # Nothing of the body is sent until the listener says so.
        (interim,) = _h11_events(conn, sock, h11.InformationalResponse)
        assert isinstance(interim, h11.InformationalResponse) and interim.status_code == 100
        sock.sendall(conn.send(h11.Data(data=b"hello")) + conn.send(h11.EndOfMessage()))
        events = _h11_events(conn, sock, h11.EndOfMessage)
        response = events[0]
        assert isinstance(response, h11.Response) and response.status_code == 200
        body = b"".join(bytes(e.data) for e in events if isinstance(e, h11.Data))
        echo = json.loads(body)
        assert echo["bodySha256"] == hashlib.sha256(b"hello").hexdigest()
        assert "expect" not in [name.lower() for name, _ in echo["headers"]]


def test_http_1_0_client_gets_a_close_delimited_body(stack: Stack) -> None:
    host, port = stack.forward.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=HTTP_TIMEOUT) as sock:
        sock.sendall(b"GET /download?size=100000&chunked=1 HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"transfer-encoding" not in head.lower()
    assert hashlib.sha256(body).hexdigest() == pattern_sha256(100000)


def test_non_2xx_passes_through(http: httpx.Client) -> None:
    response = http.get("/status/404")
    assert response.status_code == 404
    assert response.reason_phrase == "Not Found"
    assert response.text == "status 404"
    assert response.headers.get_list("set-cookie") == ["a=1", "b=2"]
    assert "x-tunnel-error" not in response.headers


def test_handler_error_is_502_with_the_code(http: httpx.Client) -> None:
    response = http.get("/fail")
    assert response.status_code == 502
    assert response.headers["x-tunnel-error"] == "tunnel_handler_error"
    assert response.text.startswith("tunnel_handler_error: ")


def test_body_cut_mid_way_is_never_a_complete_response(http: httpx.Client) -> None:
    with pytest.raises(httpx.RemoteProtocolError), http.stream("GET", f"/broken-download?size={MiB}") as r:
        assert r.status_code == 200
        for _ in r.iter_raw():
            pass


def test_unreachable_host_is_502_with_the_code(stack: Stack) -> None:
    forward = ForwardProcess.start(stack.nats_url, "nobody.test", "--quiet")
    try:
        response = httpx.get(f"{forward.url}/anything", timeout=HTTP_TIMEOUT)
        assert response.status_code == 502
        assert response.headers["x-tunnel-error"] == "tunnel_unreachable"
        assert response.text.startswith("tunnel_unreachable: ")
    finally:
        assert forward.stop() == 0
    assert not any('"GET /anything"' in line for line in forward.stderr_lines)  # --quiet


# -- in-process: timeouts mapped to 504 -----------------------------------------------------------


@pytest.fixture
async def forwarder(stack: Stack) -> AsyncIterator[str]:
    nc = await nats.connect(stack.nats_url)
    client = tunnel.TunnelClient(nc)
    fw = Forwarder(client, HOSTNAME, timeout=0.3)
    server = await fw.start("127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        await fw.close()
        await client.aclose()
        await nc.close()


async def test_a_timeout_is_504_with_the_code(forwarder: str) -> None:
    async with httpx.AsyncClient(base_url=forwarder, timeout=HTTP_TIMEOUT) as client:
        response = await client.get("/hang")
        assert response.status_code == 504
        assert response.headers["x-tunnel-error"] == "tunnel_timeout"
        # The connection stays usable after an error answer.
        again = await client.get("/api/links/status")
        assert again.status_code == 200
        assert json.loads(again.text) == STATUS
