"""Smoke run of scripts/benchmark.py: a tiny load, checked for zero loss and order kept.

The benchmark proper is not a test (see scripts/BENCHMARK.md); this only keeps the script working.
ncat is included when it is on PATH.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "benchmark.py"


def run_benchmark(*args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", "--no-pin", *args], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def test_throughput_smoke() -> None:
    server = "both" if shutil.which("ncat") else "securechat"
    report = run_benchmark(
        "--mode",
        "throughput",
        "--server",
        server,
        "--clients",
        "5",
        "--senders",
        "2",
        "--lines",
        "20",
        "--idle-timeout",
        "3",
    )
    assert report["mode"] == "throughput"
    for name, res in report["results"].items():
        assert "error" not in res, res
        assert res["expected"] == 2 * 20 * 4, res
        assert res["delivered"] == res["expected"], (name, res)
        assert res["lost"] == 0, (name, res)
        assert res["order_violations"] == 0, (name, res)
        assert res["duplicates"] == 0, (name, res)
        assert res["lat_max_ms"] is not None and res["lat_max_ms"] >= 0
    sc = report["results"]["securechat"]
    assert sc["threads_connected"] >= 5  # one thread per client: /proc was read
    assert sc["rss_connected_mib"] > 0


def test_web_hold_smoke() -> None:
    """WebSocket clients beside line clients on one server: every line reaches every client of both kinds."""
    report = run_benchmark("--mode", "web", "--clients", "20", "--lines", "2", "--idle-timeout", "3")
    assert list(report["results"]) == ["securechat-web", "securechat"]
    for name, res in report["results"].items():
        assert "error" not in res, res
        assert res["expected"] == 2 * 19, (name, res)
        assert res["delivered"] == res["expected"] and res["order_violations"] == 0, (name, res)
        assert res["reach_all_max_ms"] is not None, (name, res)
