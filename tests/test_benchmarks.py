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
    expected = {
        ("floor (plain)", "-"),
        ("aiotimer-pipe", "asyncio"),
        ("aiotimer-pipe", "uvloop"),
        ("aiotimer-socket", "asyncio"),
        ("aiotimer-socket", "uvloop"),
    }
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
    assert {"aiotimer-pipe", "aiotimer-socket"} <= tput
    if has_torch:
        assert {"aiotimer-fifo", "torch-file@0.01", "torch-local@0.01"} <= tput
    for r in rows_of("throughput"):
        assert r["pairs_sent_per_s"] > 0 and r["requests_processed_per_s"] > 0  # type: ignore[operator]
        assert isinstance(r["backlog"], int) and isinstance(r["client_errors"], int)

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


def test_isolation_scenario_kills_every_bystander(tmp_path: Path) -> None:
    """``--scenarios isolation --quick``: every case on every loop and priority, every
    bystander killed and measured, every hostile worker killed, and the hostility real
    (output held back, FIFO dumps refused, incidents lost to the full disk)."""
    from aiotimer._loops import available_loops

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--scenarios",
            "isolation",
            "--quick",
            "--out",
            str(tmp_path),
            "--chart",
            str(tmp_path / "chart.png"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads((tmp_path / "latest.json").read_text())["rows"]
    assert rows and all(r["scenario"] == "isolation" for r in rows)
    skipped = {r["case"] for r in rows if r["skipped"]}
    assert skipped <= {"full disk"}  # only a tmpfs mount may be refused (not root)
    loops = set(available_loops())
    for case in {"stalled stdout", "hostile dump path", "full disk"} - skipped:
        ran = [r for r in rows if r["case"] == case]
        for loop in loops:
            priorities = sorted(r["priority"] for r in ran if r["loop"] == loop)
            assert priorities in (
                ["normal", "realtime"],
                ["normal", "normal (realtime refused)"],
            ), (case, loop, priorities)
        for r in ran:
            n = r["bystanders"]
            assert n >= 1 and r["missed"] == 0 and r["other_kills"] == 0, r
            for key in ("decision_ms", "signal_ms"):
                summary = r[key]
                assert summary["n"] == n, r
                assert 0 <= summary["min"] <= summary["p50"] <= summary["p99"] <= summary["max"]
                assert math.isfinite(summary["max"])
            effect = r["effect"]
            if case == "stalled stdout":
                assert effect["queued_bytes"] + effect["dropped_bytes"] > 0, r
            else:
                assert r["hostile"] >= 1 and r["hostile_killed"] == r["hostile"], r
            if case == "hostile dump path":
                assert effect["fifo_refused"] == r["hostile"], r
            if case == "full disk":
                assert effect["incidents_lost"] == r["hostile"], r
                assert effect["log_write_errors"] > 0, r
    assert "Isolation" in (tmp_path / "latest.md").read_text()
