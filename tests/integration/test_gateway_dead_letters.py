"""Poison events (issue 15, "Must show"): bounded redelivery, a dead letter, a named failure.

Real processes only (``runs_harness``): a JetStream nats-server, one ``studio-gateway serve``
and a ``linkd up`` daemon running a mock run. The poison is real: an event whose ``type`` is a
JSON array makes the projector's apply step raise (``TypeError: unhashable type`` in
:func:`studio_gateway.runs.state.apply_event`'s membership test). It is published on the run's
own subject with the user's own desktop credentials, as a buggy daemon would.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, Final

import httpx
import jwt
import nats
import pytest
from nats.aio.client import RawCredentials

import tunnel
from contract.run_protocol import run_event_subject, uplink_inbox_prefix
from studio_gateway.nats_jwt import KeyKind, creds_text, new_key
from studio_gateway.runs.admin import DEAD_LETTERS_PATH, OPERATOR_SCOPE
from studio_gateway.runs.projector import MAX_POISON_DELIVERIES
from studio_gateway.settings import DEFAULT_JWT_AUDIENCE
from tests.helpers import settled_value, wait_until
from tests.integration.runs_harness import REPO_ROOT, SECRET, LinkdProcess, RunsStack
from tests.prom import sample_value

pytestmark = [pytest.mark.timeout(120)]

USER: Final = "poisoned@example.com"
TIMEOUT: Final = 30.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunsStack]:
    stack = RunsStack.start(tmp_path_factory.mktemp("runs-dead-letters"), gateways=1)
    try:
        yield stack
    finally:
        stack.close()


@pytest.fixture(scope="module")
def desktop(stack: RunsStack) -> LinkdProcess:
    return stack.daemon(USER)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=15.0) as client:
        yield client


def operator_token(scope: str = OPERATOR_SCOPE) -> str:
    now = int(time.time())
    claims = {"sub": "ops@example.com", "aud": DEFAULT_JWT_AUDIENCE, "iat": now, "exp": now + 600}
    return jwt.encode({**claims, "scope": scope}, SECRET, algorithm="HS256")


async def metric(stack: RunsStack, http: httpx.AsyncClient, sample: str) -> float:
    text = (await http.get(f"{stack.gateways[0].url}/metrics")).text
    value = sample_value(text, sample)  # by name and label set: the exposition sorts labels
    return 0.0 if value is None else value


async def publish_as_desktop(stack: RunsStack, http: httpx.AsyncClient, run_id: str, event: Any) -> None:
    """A JetStream publish on the run's subject with a fresh session of the user's own desktop."""
    key = new_key(KeyKind.USER)
    resp = await http.post(
        f"{stack.gateways[0].url}/api/links/session",
        json={"publicKey": key.public_key},
        headers={"Authorization": f"Bearer {stack.token(USER)}"},
    )
    assert resp.status_code == 200, resp.text
    session = resp.json()
    subjects = tunnel.HostSubjects.for_host(session["tunnelHostname"])
    nc = await nats.connect(
        stack.nats.url,
        user_credentials=RawCredentials(creds_text(session["credentials"]["jwt"], key.seed)),
        inbox_prefix=uplink_inbox_prefix(subjects).encode(),
        allow_reconnect=False,
    )
    try:
        ack = await nc.jetstream().publish(
            run_event_subject(subjects, run_id),
            json.dumps(event).encode(),
            headers={"Nats-Msg-Id": f"{run_id}:poison"},
            timeout=10,
        )
        assert not ack.duplicate
    finally:
        await nc.close()


async def linkctl(stack: RunsStack, token: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    """``linkctl runs dead-letters ARGS`` against the stack's gateway with ``token``."""
    env = {**os.environ, "LINKCTL_GATEWAY": stack.gateways[0].url, "LINKCTL_TOKEN": token}
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "cli", "runs", "dead-letters", *args],
        env=env,
        cwd=str(REPO_ROOT),
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
    )


async def test_a_poison_event_is_dead_lettered_counted_listed_and_fails_its_run(
    stack: RunsStack, desktop: LinkdProcess, http: httpx.AsyncClient
) -> None:
    api = stack.api(USER, http)
    run_id = (await api.create("mock", {"count": 400, "delayMs": 20}))["runId"]
    await api.wait_state(run_id, lambda s: (s["seq"] or 0) >= 3, TIMEOUT, "the run never got going")
    poison = {"runId": run_id, "fence": 1, "seq": 1, "ts": int(time.time() * 1000), "type": ["output"]}
    await publish_as_desktop(stack, http, run_id, poison)

    state = await api.wait_state(
        run_id, lambda s: s["status"] != "in_progress", TIMEOUT, "the poisoned run never ended"
    )
    assert state["status"] == "failed" and state["failureKind"] == "event_rejected", state
    assert "dead letter" in state["failureReason"] and "TypeError" in state["failureReason"], state
    assert state["fence"] == 2, state
    # Counted once the gateway has its write's acknowledgement, which a reader may beat.
    dead = "studio_runs_dead_letters_total"
    assert await settled_value(lambda: metric(stack, http, dead), 1, TIMEOUT, what=dead) == 1
    finished = 'studio_runs_finished_total{status="failed",failure_kind="event_rejected"}'
    assert await settled_value(lambda: metric(stack, http, finished), 1, TIMEOUT, what=finished) == 1

    # Listed for an operator, with what it takes to look into it.
    url = f"{stack.gateways[0].url}{DEAD_LETTERS_PATH}"
    listing = await http.get(url, headers={"Authorization": f"Bearer {operator_token()}"})
    assert listing.status_code == 200, listing.text
    doc = listing.json()
    assert doc["total"] == 1, doc
    (letter,) = doc["deadLetters"]
    assert letter["runId"] == run_id and letter["seq"] == 1 and letter["streamSeq"] > 0, letter
    assert letter["deliveries"] >= MAX_POISON_DELIVERIES and "TypeError" in letter["error"], letter
    assert json.loads(letter["data"]) == poison and letter["subject"].endswith(f".runs.{run_id}")
    only = await http.get(
        url, params={"runId": "run_other"}, headers={"Authorization": f"Bearer {operator_token()}"}
    )
    assert only.json() == {"deadLetters": [], "total": 0}
    # Not for a plain user's token (the run's owner included), nor without one.
    for headers in ({"Authorization": f"Bearer {stack.token(USER)}"}, {}):
        refused = await http.get(url, headers=headers)
        assert refused.status_code in (401, 403), refused.text
    assert (await http.get(url, headers={"Authorization": f"Bearer {stack.token(USER)}"})).status_code == 403

    # linkctl lists it too.
    done = await linkctl(stack, operator_token(), "--json")
    assert done.returncode == 0, done.stderr.decode()
    assert [d["runId"] for d in json.loads(done.stdout)["deadLetters"]] == [run_id]
    human = await linkctl(stack, operator_token())
    assert human.returncode == 0 and run_id.encode() in human.stdout and b"TypeError" in human.stdout
    refused_cli = await linkctl(stack, stack.token(USER))
    assert refused_cli.returncode == 2 and b"runs:admin" in refused_cli.stderr, refused_cli.stderr

    # Bounded: the daemon's run goes on publishing (late events, ignored), and the poison is
    # never delivered again.
    poison_errors = 'studio_runs_projector_errors_total{kind="poison"}'
    tried = await metric(stack, http, poison_errors)
    assert 1 <= tried <= MAX_POISON_DELIVERIES  # one per delivery that reached the apply step
    terminal = 'studio_runs_uplink_events_total{result="terminal"}'
    await wait_until(
        lambda: any(e["type"] == "done" for e in desktop.events(run_id)), TIMEOUT, message="no done"
    )

    async def done_seen() -> bool:
        return await metric(stack, http, terminal) >= 1 and (await api.get(run_id))["status"] == "failed"

    await wait_until(done_seen, TIMEOUT, message="the daemon's late events never reached the projector")
    last = desktop.events(run_id)[-1]["seq"]

    async def all_late_seen() -> bool:
        applied = await metric(stack, http, 'studio_runs_uplink_events_total{result="applied"}')
        late = await metric(stack, http, terminal)
        return applied + late >= last

    await wait_until(all_late_seen, TIMEOUT, message="not every event of the run was handled")
    assert await metric(stack, http, poison_errors) == tried
    assert await metric(stack, http, "studio_runs_dead_letters_total") == 1
    assert (await api.get(run_id)) == state
