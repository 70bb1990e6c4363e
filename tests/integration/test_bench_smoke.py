"""Smoke test of scripts/bench_tunnel.py: it runs end to end and reports every figure.

No assertion on the ratios or absolute speeds: timing on a shared 2-core machine is noise.
What can fail here is the plumbing: the responder process, the server lifecycle, a
measurement that silently produced nothing, or stray output breaking ``--json``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.bench_scripts import is_positive_number, run_json

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_tunnel.py"
RUN_TIMEOUT = 120.0

FIGURE_KEYS = (
    "raw_req_p50_ms",
    "raw_req_p99_ms",
    "raw_req_concurrent_rps",
    "raw_download_mbps",
    "raw_upload_mbps",
    "tunnel_get_p50_ms",
    "tunnel_get_p99_ms",
    "tunnel_get_concurrent_rps",
    "tunnel_download_mbps",
    "tunnel_upload_mbps",
    # Direct HTTP: aiohttp client and server on loopback.
    "http_get_p50_ms",
    "http_get_concurrent_rps",
    "httpx_tunnel_get_p50_ms",
    "httpx_tunnel_get_concurrent_rps",
    # Offline detection: raw no-responders, then first contacts with a host nobody serves.
    "raw_offline_ms",
    "tunnel_offline_ms",
    "tunnel_offline_tapped_ms",
    # WebSockets: the same echo server direct and through the tunnel + linkd's upstream proxy.
    "ws_direct_rtt_p50_ms",
    "ws_tunnel_rtt_p50_ms",
    "ws_direct_push_mps",
    "ws_tunnel_push_mps",
    "ws_direct_send_mps",
    "ws_tunnel_send_mps",
    "ws_direct_pipelined_mps",
    "ws_tunnel_pipelined_mps",
)
RATIO_KEYS = (
    "ratio_get_p50",
    "ratio_get_p99",
    "ratio_concurrent_rps",
    "ratio_download",
    "ratio_upload",
    "tunnel_vs_http_p50",
    "tunnel_vs_http_concurrent",
    "httpx_vs_http_p50",
    "ratio_offline",
    "ws_ratio_rtt_p50",
    "ws_ratio_push",
    "ws_ratio_send",
    "ws_ratio_pipelined",
)
TARGET_KEYS = (
    "ratio_get_p50_target_met",
    "ratio_concurrent_rps_target_met",
    "ratio_download_target_met",
    "ratio_upload_target_met",
    "offline_ms_target_met",
    "offline_tapped_ms_target_met",
    "false_offline_target_met",
    "false_offline_tapped_target_met",
)
# Counts of what must not happen: summed over the rounds, zero when all is well.
COUNT_KEYS = ("tunnel_false_offline", "tunnel_false_offline_tapped")


@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_quick_json_run_reports_every_figure_as_one_json_object() -> None:
    # --rounds 2: every figure is still a median over rounds.
    result = run_json("bench_tunnel.py", "--quick", "--rounds", "2", timeout=RUN_TIMEOUT)
    for key in (*FIGURE_KEYS, *RATIO_KEYS):
        assert is_positive_number(result.get(key)), f"{key} = {result.get(key)!r}"
    for key in TARGET_KEYS:
        assert isinstance(result.get(key), bool), f"{key} = {result.get(key)!r}"
    for key in COUNT_KEYS:
        assert result[key] == sum(result["samples"][key]), key
        assert all(isinstance(v, int) and v >= 0 for v in result["samples"][key]), key
    assert result["quick"] is True
    # Every figure is a median over several rounds, each of which measured something.
    rounds = result["rounds"]
    assert isinstance(rounds, int) and rounds >= 2
    for key in FIGURE_KEYS:
        samples = result["samples"][key]
        assert len(samples) == rounds and all(is_positive_number(v) for v in samples), key
    # The ratios are computed from the reported medians, not from something else.
    assert result["ratio_get_p50"] == pytest.approx(result["tunnel_get_p50_ms"] / result["raw_req_p50_ms"])
    # Each bulk direction against the raw figure for that direction.
    assert result["ratio_download"] == pytest.approx(
        result["tunnel_download_mbps"] / result["raw_download_mbps"]
    )
    assert result["ratio_upload"] == pytest.approx(result["tunnel_upload_mbps"] / result["raw_upload_mbps"])
    assert result["tunnel_vs_http_p50"] == pytest.approx(
        result["tunnel_get_p50_ms"] / result["http_get_p50_ms"]
    )
    assert result["ws_ratio_rtt_p50"] == pytest.approx(
        result["ws_tunnel_rtt_p50_ms"] / result["ws_direct_rtt_p50_ms"]
    )
    assert result["ws_ratio_pipelined"] == pytest.approx(
        result["ws_tunnel_pipelined_mps"] / result["ws_direct_pipelined_mps"]
    )
    assert result["ws_messages"] > 0 and result["ws_message_bytes"] > 0 and result["offline_tries"] > 0


def test_help_describes_the_benchmark_without_starting_anything() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=30, check=False
    )
    assert proc.returncode == 0
    assert "--quick" in proc.stdout and "--json" in proc.stdout
    assert "{all,raw,tunnel,http,offline,ws}" in proc.stdout  # each group can be run alone
    assert "--role" not in proc.stdout  # internal flag stays hidden
