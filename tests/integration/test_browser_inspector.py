"""linkd's inspector page in a real browser (headless Chromium, tests/integration/chromium.py).

A request made through the link shows in the open page within 1 s, with its headers and body
in the detail pane; clicking Replay re-sends it to the upstream and the page shows the new
result beside the original. The test saves a screenshot to ``test-artifacts/inspector.png``
under the repository root.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest

from tests.helpers import NatsServerFactory, wait_until
from tests.integration.chromium import Chromium, Page
from tests.integration.inspector_harness import inspected_link

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / "test-artifacts" / "inspector.png"
PAGE_TIMEOUT = 15.0
APPEARS_WITHIN = 1.0


async def row_status(page: Page, target: str) -> str | None:
    """The status cell of the newest row for ``target`` (None while it is not listed)."""
    value = await page.evaluate(
        "(() => { const rows = [...document.querySelectorAll('#requests tbody tr')]"
        f".filter(r => r.cells[2].title === {json.dumps(target)});"
        " return rows.length ? rows[0].cells[3].textContent : null; })()"
    )
    return None if value is None else str(value)


async def test_requests_show_live_and_replay_shows_beside_the_original(
    nats_server_factory: NatsServerFactory, tmp_path: Path
) -> None:
    async with inspected_link(nats_server_factory, tmp_path) as link, Chromium.launch() as page:
        await page.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1400, "height": 900, "deviceScaleFactor": 1, "mobile": False},
        )
        await page.navigate(link.inspector_url + "/")
        await page.wait_for_text("live", "live", PAGE_TIMEOUT)

        status, _ = await link.fetch(
            "/orders?page=2",
            method="POST",
            headers=[("Content-Type", "application/json"), ("X-Trace", "browser-1")],
            body=b'{"item": "teapot", "qty": 2}',
        )
        answered = time.monotonic()
        assert status == 200
        await wait_until(
            lambda: _is(row_status(page, "/orders?page=2"), "200"),
            APPEARS_WITHIN + 5,
            interval=0.02,
            message="the request never showed in the page",
        )
        shown_after = time.monotonic() - answered
        assert shown_after < APPEARS_WITHIN, f"the page showed the request after {shown_after:.2f}s"
        print(f"the page showed the request {shown_after * 1000:.0f} ms after its answer")

        # The detail pane: its headers and bodies.
        await page.evaluate("document.querySelector('#requests tbody tr').click()")
        await wait_until(
            lambda: _contains(page.text("detail-original"), "browser-1"),
            PAGE_TIMEOUT,
            message=lambda: "the detail pane never showed the request",
        )
        original = await page.text("detail-original")
        assert "Original: POST /orders?page=2" in original
        assert "X-Trace" in original and '{"item": "teapot", "qty": 2}' in original
        assert '"path": "/orders?page=2"' in original  # the upstream's JSON answer

        # Replay: the upstream gets it again; the page shows the result beside the original.
        seen_before = len(link.upstream.seen)
        await page.evaluate("document.getElementById('replay').click()")
        await wait_until(
            lambda: _contains(page.text("replay-status"), "replayed as"),
            PAGE_TIMEOUT,
            message=lambda: "the replay result never showed",
        )
        assert len(link.upstream.seen) == seen_before + 1
        again = link.upstream.seen[-1]
        assert (again.method, again.path_qs, again.headers["X-Trace"]) == (
            "POST",
            "/orders?page=2",
            "browser-1",
        )
        replay_pane = await page.text("detail-replay")
        assert "Replay: POST /orders?page=2" in replay_pane and "200" in replay_pane
        assert f'"n": {len(link.upstream.seen)}' in replay_pane  # the new answer, not the old one
        side_by_side = await page.evaluate(
            "(() => { const a = document.getElementById('detail-original').getBoundingClientRect();"
            " const b = document.getElementById('detail-replay').getBoundingClientRect();"
            " return b.width > 0 && b.left >= a.right - 1 && Math.abs(a.top - b.top) < 2; })()"
        )
        assert side_by_side
        await wait_until(
            lambda: _contains(page.text("requests"), "replay"),
            PAGE_TIMEOUT,
            message="the replay was never listed",
        )

        shot = await page.send("Page.captureScreenshot", {"format": "png"})
        png = base64.b64decode(shot["data"])
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        SCREENSHOT.write_bytes(png)
    assert SCREENSHOT.stat().st_size > 1000
    assert SCREENSHOT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


async def _is(value: object, expected: str) -> bool:
    return await value == expected  # type: ignore[misc]


async def _contains(value: object, part: str) -> bool:
    return part in await value  # type: ignore[misc]
