"""The benchmark harness's --quick mode produces every figure (it asserts no speed)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def test_quick_run_produces_every_figure(tmp_path: Path) -> None:
    chart = tmp_path / "chart.png"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--quick",
            "--out",
            str(tmp_path),
            "--chart",
            str(chart),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads((tmp_path / "latest.json").read_text())
    rows = data["rows"]
    has_torch = importlib.util.find_spec("torch") is not None

    def rows_of(scenario: str) -> list[dict[str, object]]:
        return [r for r in rows if r["scenario"] == scenario]

    kill_backends = {(r["backend"], r["loop"]) for r in rows_of("kill")}
    expected = {("floor (plain)", "-"), ("aiotimer-pipe", "asyncio"), ("aiotimer-pipe", "uvloop")}
    if has_torch:
        expected |= {
            ("floor (torch)", "-"),
            ("aiotimer-fifo", "asyncio"),
            ("aiotimer-fifo", "uvloop"),
            ("torch-file@0.01", "-"),
            ("torch-local@0.01", "-"),
        }
    assert expected <= kill_backends
    for r in rows_of("kill"):
        assert r["missed"] == 0
        for key in ("p50", "p99", "max"):
            assert math.isfinite(r["kill_ms"][key])  # type: ignore[index]
        if not str(r["backend"]).startswith("floor"):
            assert math.isfinite(r["decision_ms"]["p99"])  # type: ignore[index]

    tput = {r["backend"] for r in rows_of("throughput")}
    assert {"aiotimer-pipe"} <= tput
    if has_torch:
        assert {"aiotimer-fifo", "torch-file@0.01", "torch-local@0.01"} <= tput
    for r in rows_of("throughput"):
        assert r["pairs_sent_per_s"] > 0 and r["requests_processed_per_s"] > 0  # type: ignore[operator]
        assert r["backlog"] >= 0 and r["client_errors"] >= 0  # type: ignore[operator]

    for r in rows_of("scale"):
        for key in ("add_us", "release_us", "expiry_pass_us", "bytes_per_timer"):
            assert math.isfinite(r[key]) and r[key] > 0  # type: ignore[arg-type, operator]
    assert {r["backend"] for r in rows_of("idle")} >= {"aiotimer"}
    assert {r["call"] for r in rows_of("client")} >= {
        "expires(scope=...)",
        "expires()",
        "timer(scope=...)",
    }
    assert chart.stat().st_size > 10_000
    md = (tmp_path / "latest.md").read_text()
    for title in ("Kill latency", "Throughput", "Scale", "Idle", "Client cost"):
        assert title in md
