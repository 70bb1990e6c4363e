"""linkd's ``/metrics`` on the inspector's loopback listener: a real daemon, gateway, nats-server
and upstream; requests through the tunnel counted, both formats parsed with ``prometheus_client``.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.helpers import NatsServerFactory, wait_until
from tests.integration.inspector_harness import InspectedLink, inspected_link
from tests.integration.linkd_harness import EVENT_TIMEOUT
from tests.prom import parse_samples, sample_value

OPENMETRICS = "application/openmetrics-text; version=1.0.0"
GETS = 5
BODY = b"x" * 1234


async def scrape(link: InspectedLink, accept: str | None = None) -> str:
    headers = {"Accept": accept} if accept else {}
    async with httpx.AsyncClient(timeout=EVENT_TIMEOUT) as http:
        resp = await http.get(f"{link.inspector_url}/metrics", headers=headers)
    assert resp.status_code == 200, resp.text
    expected = "application/openmetrics-text; version=1.0.0" if accept else "text/plain; version=0.0.4"
    assert resp.headers["content-type"].startswith(expected)
    return resp.text


async def test_linkd_metrics_count_tunnelled_requests_bytes_and_errors(
    nats_server_factory: NatsServerFactory, tmp_path: Path
) -> None:
    async with inspected_link(nats_server_factory, tmp_path) as link:
        for i in range(GETS):
            status, _ = await link.fetch(f"/item/{i}")
            assert status == 200
        status, _ = await link.fetch("/upload", method="POST", body=BODY)
        assert status == 200
        status, _ = await link.fetch("/fail")
        assert status == 503
        await link.upstream.stop()  # now the upstream refuses connections: a 502 noted as such
        status, _ = await link.fetch("/gone")
        assert status == 502

        async def all_counted() -> bool:
            text = await scrape(link)
            return sample_value(text, 'linkd_requests_total{route="upstream",code="2xx"}') == GETS + 1 and (
                sample_value(text, 'linkd_requests_total{route="upstream",code="5xx"}') == 2
            )

        await wait_until(all_counted, EVENT_TIMEOUT, message="the requests were not all counted")
        for accept in (None, OPENMETRICS):
            om = accept is not None
            text = await scrape(link, accept)
            names = {s.name for s in parse_samples(text, openmetrics=om)}

            def value(sample: str, text: str = text, om: bool = om) -> float | None:
                return sample_value(text, sample, openmetrics=om)

            assert value('linkd_request_bytes_total{route="upstream"}') == len(BODY)
            assert (value('linkd_response_bytes_total{route="upstream"}') or 0) > 0
            assert value('linkd_request_duration_seconds_count{route="upstream"}') == GETS + 3
            assert value('linkd_upstream_errors_total{code="upstream_unreachable"}') == 1
            assert value("linkd_connected") == 1
            assert value("linkd_nats_reconnects_total") == 0
            assert value("linkd_runs_active") == 0
            assert {"process_cpu_seconds_total", "python_info"} <= names
