"""``linkd doctor`` against a real gateway and a real operator-mode nats-server; each check made
to fail on purpose gives its line, fix, JSON and exit status.

Two tests run the CLI as the user does (a separate process, secrets in a file-backed test
keyring: ``tests.linkd_support.FileKeyring``); the others run the same checks and the same
report in-process (``doctor_support.diagnose``: no cold start of Python per case), with the
``isolated_env`` fixture's in-memory keyring. The clock test serves a stand-in gateway whose
session JWT the test signs with an ``iat`` an hour in the future, as a desktop whose clock is an
hour behind would see it; the NATS server it points at is still the real one.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import keyring
import keyring.backends.fail
import pytest

from cli.nats_server import free_port
from linkd.credentials_store import TOKEN_KEY, file_store
from linkd.doctor import CHECKS, EXIT_CHECK_FAILED
from linkd.login_state import write_login
from tests.helpers import NatsServerFactory
from tests.integration.doctor_support import (
    diagnose,
    doctor,
    doctor_json,
    lines,
    listening,
    remember_login,
    stand_in_gateway,
    store_login,
)
from tests.integration.gateway_harness import OperatorServer, start_operator_server
from tests.integration.linkd_harness import live_gateway
from tests.linkd_support import MemoryKeyring, isolated_env, subprocess_env

__all__ = ["isolated_env"]

pytestmark = [pytest.mark.timeout(90), pytest.mark.skipif(sys.platform == "win32", reason="POSIX")]


@pytest.fixture
def op(nats_server_factory: NatsServerFactory, tmp_path: Path) -> OperatorServer:
    return start_operator_server(nats_server_factory, tmp_path)


# ------------------------------------------------------------------------------ the CLI process


async def test_all_checks_pass_with_a_login_a_gateway_and_an_upstream(
    op: OperatorServer, tmp_path: Path
) -> None:
    env = subprocess_env(tmp_path)
    async with live_gateway(op.env()) as gw, listening() as upstream:
        store_login(tmp_path, env, gw.url, gw.token("alice"))
        code, out, err = await doctor(env, "--upstream", upstream)
        assert code == 0, out + err
        found = lines(out)
        assert list(found) == list(CHECKS), out
        assert all(line.startswith("ok ") for line in found.values()), out
        assert f"logged in to {gw.url}" in found["login"]
        assert "the gateway issues sessions: host alice-" in found["session"]
        assert f"connected to nats://127.0.0.1:{op.server.port} (no TLS" in found["nats"], out
        assert "within" in found["clock"] and f"{upstream} accepts connections" in found["upstream"]
        assert out.splitlines()[-1] == "no check failed"

        code, checks, ok = await doctor_json(env, "--upstream", upstream)
        assert code == 0 and ok is True
        assert {c["status"] for c in checks.values()} == {"ok"}
        assert all(c["fix"] is None for c in checks.values())


async def test_gateway_down_names_the_url(tmp_path: Path) -> None:
    env = subprocess_env(tmp_path)
    url = f"http://127.0.0.1:{free_port()}"
    store_login(tmp_path, env, url, "some-token")
    code, out, err = await doctor(env)
    assert code == EXIT_CHECK_FAILED and err == ""
    found = lines(out)
    assert found["login"] == f"ok    login     logged in to {url}"
    assert found["gateway"].startswith(f"FAIL  gateway   {url} is unreachable (")
    assert found["gateway"].endswith(
        f"; fix: start the gateway, or check its URL (--gateway, LINKD_GATEWAY or linkd login --gateway; "
        f"now {url})"
    )
    assert found["session"] == "skip  session   needs a login and a reachable gateway"
    assert out.splitlines()[-1] == "1 check(s) failed"


# ------------------------------------------------------------------------------ in-process


async def test_no_login_names_linkd_login(op: OperatorServer, isolated_env: MemoryKeyring) -> None:
    async with live_gateway(op.env()) as gw:
        code, out, checks = await diagnose(gateway=gw.url)
        assert code == EXIT_CHECK_FAILED
        assert lines(out)["login"].startswith("FAIL  login     no gateway token in the OS keyring")
        fix = f"run: linkd login --gateway {gw.url} (or set LINKD_TOKEN)"
        assert lines(out)["login"].endswith(f"; fix: {fix}")
        assert checks["gateway"]["status"] == "ok"  # the gateway is still checked
        assert checks["login"]["fix"] == fix
        assert checks["session"]["status"] == "skip" and checks["nats"]["status"] == "skip"


async def test_nats_port_closed(op: OperatorServer, isolated_env: MemoryKeyring) -> None:
    closed = f"nats://127.0.0.1:{free_port()}"
    async with live_gateway(op.env(NATS_PUBLIC_URL=closed)) as gw:
        remember_login(isolated_env, gw.url, gw.token("alice"))
        code, out, checks = await diagnose()
        assert code == EXIT_CHECK_FAILED
        assert checks["session"]["status"] == "ok"
        nats = checks["nats"]
        assert nats["status"] == "fail" and nats["detail"].startswith(f"cannot connect to NATS at {closed}")
        assert nats["fix"].startswith(
            f"check that nats-server runs and that this computer can reach {closed}"
        )
        assert lines(out)["nats"].startswith(f"FAIL  nats      cannot connect to NATS at {closed}")
        assert checks["clock"]["status"] == "ok"  # the session JWT was still compared


async def test_upstream_down_is_a_warning(op: OperatorServer, isolated_env: MemoryKeyring) -> None:
    upstream = f"http://127.0.0.1:{free_port()}"
    async with live_gateway(op.env()) as gw:
        remember_login(isolated_env, gw.url, gw.token("alice"))
        code, out, checks = await diagnose(upstream=upstream)
        assert code == 0, out
        assert lines(out)["upstream"] == (
            f"WARN  upstream  {upstream} refused the connection; fix: start your dev server or change "
            "--upstream (LINKD_UPSTREAM, upstream in linkd.toml)"
        )
        assert out.splitlines()[-1] == "no check failed, 1 warning(s)"
        assert checks["upstream"]["status"] == "warn"


async def test_a_clock_an_hour_behind_the_jwt_fails_with_the_fix(
    op: OperatorServer, isolated_env: MemoryKeyring
) -> None:
    async with stand_in_gateway(op, skew=3600) as url:
        remember_login(isolated_env, url, "any-token")
        code, out, checks = await diagnose()
        assert code == EXIT_CHECK_FAILED, out
        clock = lines(out)["clock"]
        seconds = re.match(r"FAIL  clock     this computer's clock is (\d+) s behind the gateway's \(", clock)
        assert seconds is not None, clock
        assert 3500 < int(seconds.group(1)) <= 3600  # the hour, less the seconds the check took
        assert clock.endswith(
            "; fix: set this computer's clock right: turn on network time (Linux: "
            "timedatectl set-ntp true; macOS and Windows: Date & Time settings)"
        )
        assert checks["clock"]["status"] == "fail" and checks["session"]["status"] == "ok"


async def test_a_refused_token_fails_the_session_check(
    op: OperatorServer, isolated_env: MemoryKeyring
) -> None:
    async with live_gateway(op.env()) as gw:
        remember_login(isolated_env, gw.url, "not-a-token-the-gateway-made")
        code, out, checks = await diagnose()
        assert code == EXIT_CHECK_FAILED
        assert checks["gateway"]["status"] == "ok"
        session = checks["session"]
        assert session["status"] == "fail"
        assert session["detail"].startswith("the gateway refused the API token")
        assert session["fix"] == f"log in again: linkd login --gateway {gw.url}"
        assert lines(out)["session"].endswith(f"; fix: log in again: linkd login --gateway {gw.url}")
        assert checks["nats"]["status"] == "skip"


async def test_no_keyring_names_the_file_store_and_a_remembered_file_store_passes(
    isolated_env: MemoryKeyring,
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    keyring.set_keyring(keyring.backends.fail.Keyring())  # the fixture puts its own back
    write_login(url)
    code, out, checks = await diagnose()
    assert code == EXIT_CHECK_FAILED
    assert lines(out)["keyring"] == (
        "FAIL  keyring   no OS keyring backend is available on this machine; fix: install and unlock a "
        "keyring (GNOME Keyring or KWallet via Secret Service), or log in with: linkd login "
        "--insecure-file-store"
    )
    assert lines(out)["login"].startswith("skip  login     gateway ")

    # What `linkd login --insecure-file-store` leaves: the choice remembered, the token in a 0600 file.
    write_login(url, file_store=True)
    file_store().set(TOKEN_KEY, "a-token")
    code, _, checks = await diagnose()
    assert checks["keyring"]["status"] == "ok"
    assert checks["keyring"]["detail"] == (
        f"no OS keyring; secrets in {file_store().directory} (0600, remembered from `linkd login`)"
    )
    assert checks["login"]["status"] == "ok"
    assert code == EXIT_CHECK_FAILED and checks["gateway"]["status"] == "fail"  # nothing listens there
