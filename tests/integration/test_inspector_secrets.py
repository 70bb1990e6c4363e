"""Secrets never appear in linkd's inspector: its list, details, stream, replay answers, page,
nor in the daemon's logs (beside tests/integration/test_secrets.py, same rule, the inspector's part).

A request carries ``Authorization: Bearer ...``, a cookie, an API-key header, a ``?token=`` and
a JSON body with a password; the upstream answers with a ``Set-Cookie``, a token header and an
``access_token`` in its JSON body. Every text the inspector serves, and every log record at
DEBUG, is searched for each secret. A replay still sends the real values (held in memory).
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import aiohttp
import pytest

from contract.logs import JsonFormatter
from tests.helpers import NatsServerFactory, wait_until
from tests.integration.inspector_harness import LOGIN_COOKIE, LOGIN_TOKEN, inspected_link

pytestmark = pytest.mark.timeout(90)
TIMEOUT = 10.0

BEARER = "s3cr3t-bearer-9d1c2b7e"
COOKIE = "s3cr3t-cookie-55aa"
API_KEY = "s3cr3t-apikey-0b0b"
QUERY_TOKEN = "s3cr3t-query-token-77"
PASSWORD = "s3cr3t-password-hunter2"
SECRETS = (BEARER, COOKIE, API_KEY, QUERY_TOKEN, PASSWORD, LOGIN_TOKEN, LOGIN_COOKIE)


def leaks(text: str) -> list[str]:
    return [secret for secret in SECRETS if secret in text]


async def test_no_secret_in_the_inspector_its_api_its_stream_or_the_logs(
    nats_server_factory: NatsServerFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG)
    # As `linkd up` runs below --log-level debug (linkd.logs): httpx's request lines and
    # httpcore's wire traces, which print URLs and response headers as they are, stay quiet.
    for library in ("httpx", "httpcore"):
        monkeypatch.setattr(logging.getLogger(library), "level", logging.WARNING)
    served: dict[str, str] = {}
    async with inspected_link(nats_server_factory, tmp_path) as link, aiohttp.ClientSession() as http:
        base = link.inspector_url
        stream = await http.get(f"{base}/api/requests/stream")
        headers = [
            ("Authorization", f"Bearer {BEARER}"),
            ("Cookie", f"theme=dark; sid={COOKIE}"),
            ("X-Api-Key", API_KEY),
            ("Content-Type", "application/json"),
        ]
        body = json.dumps({"user": "ann", "password": PASSWORD}).encode()
        status, answer = await link.fetch(
            f"/login?next=/home&token={QUERY_TOKEN}", method="POST", headers=headers, body=body
        )
        assert status == 200 and LOGIN_TOKEN.encode() in answer  # the caller gets the real answer

        rows: list[dict[str, object]] = []

        async def listed() -> bool:
            nonlocal rows
            async with http.get(f"{base}/api/requests") as resp:
                served["list"] = await resp.text()
            rows = json.loads(served["list"])["requests"]
            return bool(rows) and not rows[0]["inFlight"]

        await wait_until(listed, TIMEOUT, message="the request was never listed as finished")
        request_id = str(rows[0]["id"])
        async with http.get(f"{base}/api/requests/{request_id}") as resp:
            served["detail"] = await resp.text()
        detail = json.loads(served["detail"])
        # Redacted, not dropped: the names are there, the values are not.
        names = [name.lower() for name, _ in detail["request"]["headers"]]
        assert {"authorization", "cookie", "x-api-key"} <= set(names)
        assert "token=[redacted]" in detail["target"] and "next=/home" in detail["target"]
        assert json.loads(detail["request"]["body"]["text"]) == {"user": "ann", "password": "[redacted]"}
        assert json.loads(detail["response"]["body"]["text"])["access_token"] == "[redacted]"

        # Replay as captured: the upstream gets the real values; the answer shows none.
        async with http.post(f"{base}/api/requests/{request_id}/replay", json={}) as resp:
            assert resp.status == 200
            served["replay"] = await resp.text()
        seen = link.upstream.seen[-1]
        assert seen.headers["Authorization"] == f"Bearer {BEARER}" and seen.headers["X-Api-Key"] == API_KEY
        assert COOKIE in seen.headers["Cookie"] and QUERY_TOKEN in seen.path_qs
        assert json.loads(seen.body)["password"] == PASSWORD
        # Replay edited from what the page shows: the placeholders keep the real values.
        edit = {
            "target": detail["target"],
            "headers": detail["request"]["headers"],
            "body": detail["request"]["body"]["text"].replace("ann", "bob"),
        }
        async with http.post(f"{base}/api/requests/{request_id}/replay", json=edit) as resp:
            assert resp.status == 200
            served["replay-edited"] = await resp.text()
        seen = link.upstream.seen[-1]
        assert seen.headers["Authorization"] == f"Bearer {BEARER}" and QUERY_TOKEN in seen.path_qs
        assert json.loads(seen.body) == {"user": "bob", "password": PASSWORD}

        for path in ("/", "/api/requests?path=login", f"/api/requests?path={QUERY_TOKEN}"):
            async with http.get(base + path) as resp:
                served[path] = await resp.text()
        assert json.loads(served[f"/api/requests?path={QUERY_TOKEN}"])["requests"] == []

        chunks: list[bytes] = []

        async def read_stream() -> None:
            async for chunk in stream.content.iter_any():
                chunks.append(chunk)
                if b"".join(chunks).count(b'"inFlight":false') >= 3:
                    return

        await asyncio.wait_for(read_stream(), TIMEOUT)
        stream.close()
        served["stream"] = b"".join(chunks).decode()
        assert "/login" in served["stream"]

    for where, text in served.items():
        assert not leaks(text), f"secrets in the inspector's {where}: {leaks(text)}"
    formatter = JsonFormatter()
    logs = "\n".join(formatter.format(record) for record in caplog.records)
    assert "/login" in logs  # the access log saw the request
    bad = [f"{r.name}: {r.getMessage()[:300]}" for r in caplog.records if leaks(formatter.format(r))]
    assert not leaks(logs), f"secrets in the logs: {leaks(logs)} {bad}"
