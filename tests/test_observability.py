"""Observability: the JSON event log, Prometheus metrics and /healthz, as monitoring reads them."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO

import pytest

from aiotimer import JsonEventLog, TimerServer
from aiotimer._events import BUCKETS, Histogram
from aiotimer.testing import MockClock, RecordingReaper

pytest.importorskip("prometheus_client")

ROOT = Path(__file__).resolve().parent.parent
WAIT = 120.0
ME = os.getpid()


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metrics_url(lines: list[str], stderr: IO[str]) -> str:
    """The launcher's metrics URL from its first lines (notices may come before it)."""
    while len(lines) < 20:
        lines.append(stderr.readline())
        found = re.search(r"metrics on (http://\S+/metrics)", lines[-1])
        if found:
            return found.group(1)
        assert lines[-1], lines  # the launcher exited
    raise AssertionError(lines)


def metric(text: str, name: str) -> float:
    """The value of one sample (``name`` with its labels) in Prometheus text, 0 if absent."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


@pytest.mark.slow
def test_a_job_is_scraped_while_it_runs_and_its_event_log_is_json_lines(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    code = textwrap.dedent("""
        import os, time, aiotimer
        if os.environ["RANK"] == "0":
            with aiotimer.expires(after=0.3, scope="hang"):
                time.sleep(600)
        time.sleep(8)  # rank 1 keeps the job running while it is scraped
    """)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "aiotimer",
            "run",
            "-n",
            "2",
            "--restart-policy",
            "rank",
            "--metrics-port",
            "0",
            "--event-log",
            str(events),
            "--dump-timeout",
            "0",
            "--",
            sys.executable,
            "-c",
            code,
        ],
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        url = metrics_url([], proc.stderr)
        deadline = time.monotonic() + 60
        while True:
            status, text = get(url)
            assert status == 200
            if metric(text, 'aiotimer_kills_total{signal="SIGKILL"}') >= 1:
                break
            assert time.monotonic() < deadline, text
            time.sleep(0.1)
        assert metric(text, "aiotimer_expiries_total") == 1
        assert metric(text, 'aiotimer_kills_total{signal="SIGKILL"}') == 1
        assert metric(text, "aiotimer_decision_latency_seconds_count") == 1
        assert metric(text, 'aiotimer_workers{state="running"}') == 1  # rank 1
        assert metric(text, 'aiotimer_workers{state="failed"}') == 1  # rank 0, killed
        assert metric(text, "aiotimer_requests_total") >= 2
        assert get(url.replace("/metrics", "/healthz")) == (200, "ok\n")
        _, err = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 124, err
    records = [json.loads(line) for line in events.read_text().splitlines()]  # every line parses
    names = [r["event"] for r in records]
    assert names.index("timer expired") < names.index("kill worker process")
    expired = records[names.index("timer expired")]
    killed = records[names.index("kill worker process")]
    assert expired["scope"] == "hang" and expired["rank"] == "0" and expired["lateness"] >= 0
    # The deadline is wall-clock time, as `time` is (issue 23, item 8: it was monotonic
    # seconds); the monotonic reading is kept beside it.
    late = datetime.fromisoformat(expired["time"]) - datetime.fromisoformat(expired["deadline"])
    assert timedelta(0) <= late < timedelta(seconds=5), (expired["time"], expired["deadline"])
    assert isinstance(expired["deadline_monotonic"], float)
    assert killed["signal"] == "SIGKILL" and killed["pid"] == expired["pid"]
    assert names[0] == "watchdog started" and names[-1] == "watchdog stopped"


HANGS_ONCE = textwrap.dedent("""
    import os, time, aiotimer
    if os.environ["RANK"] == "1" and os.environ["AIOTIMER_RESTART_COUNT"] == "0":
        with aiotimer.expires(after=0.3, scope="hang"):
            time.sleep(600)
""")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("policy", "max_restarts", "restarts", "status"),
    [("group", 1, 2, 0), ("rank", 1, 1, 0), ("group", 0, 0, 124)],
)
def test_metrics_linger_after_the_job_and_count_rank_restarts(
    tmp_path: Path, policy: str, max_restarts: int, restarts: int, status: int
) -> None:
    """Issue 23, item 5: the launcher used to exit ~70 ms after the last kill, taking
    /metrics with it.  ``aiotimer_restarts_total`` counts ranks started again: a group
    restart of 2 ranks counts 2, one rank restarted alone counts 1."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "aiotimer", "run", "-n", "2", "--restart-policy", policy,
         "--max-restarts", str(max_restarts), "--metrics-port", "0", "--metrics-linger", "60",
         "--dump-timeout", "0", "--", sys.executable, "-c", HANGS_ONCE],
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        lines: list[str] = []
        url = metrics_url(lines, proc.stderr)
        while "metrics stay up 60s more" not in lines[-1]:
            lines.append(proc.stderr.readline())
            assert lines[-1], lines  # the launcher exited without lingering
        assert any("summary" in line for line in lines), lines  # said before the linger
        start = time.monotonic()
        code, text = get(url)  # the job is over, its metrics are still served
        assert code == 200
        assert metric(text, 'aiotimer_kills_total{signal="SIGKILL"}') == 1
        assert metric(text, "aiotimer_restarts_total") == restarts
        assert metric(text, 'aiotimer_workers{state="running"}') == 0
        ended = "succeeded" if status == 0 else "failed"
        assert metric(text, f'aiotimer_workers{{state="{ended}"}}') >= 1
        assert get(url.replace("/metrics", "/healthz")) == (200, "ok\n")
        proc.send_signal(signal.SIGTERM)  # a stop signal ends the linger ...
        _, err = proc.communicate(timeout=WAIT)
        assert time.monotonic() - start < 30
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == status, "".join(lines) + err  # ... and the status is the job's
    assert "the metrics linger no longer" in err


async def test_healthz_turns_503_while_the_loop_is_blocked_and_200_after() -> None:
    async with TimerServer() as server:
        metrics = server.serve_metrics(health_threshold=0.3)
        health = f"http://127.0.0.1:{metrics.port}/healthz"
        assert (await asyncio.to_thread(get, health))[0] == 200
        seen: list[int] = []
        probe = threading.Thread(target=lambda: seen.append(get(health)[0]))
        probe.start()
        time.sleep(1.0)  # the loop is blocked, on purpose
        probe.join()
        assert seen == [503]
        assert (await asyncio.to_thread(get, health))[0] == 200
        assert (await asyncio.to_thread(get, f"http://127.0.0.1:{metrics.port}/nope"))[0] == 404


async def test_metrics_count_what_happened_on_a_mock_clock() -> None:
    clock = MockClock()
    async with TimerServer(clock=clock, reaper=RecordingReaper()) as server:
        metrics = server.serve_metrics()
        channel = server.local_channel()
        channel.acquire(ME, "a", 1.0)
        channel.acquire(ME, "b", 5.0)
        channel.acquire(1, "not mine", 1.0)  # refused
        await clock.advance(1.0)
        _, text = await asyncio.to_thread(get, metrics.url)
    assert metric(text, "aiotimer_requests_total") == 2
    assert metric(text, 'aiotimer_rejected_total{reason="not_admitted"}') == 1
    assert metric(text, "aiotimer_expiries_total") == 1
    assert metric(text, "aiotimer_active_timers") == 1
    assert metric(text, 'aiotimer_expiry_lag_seconds_bucket{le="0.0001"}') == 1


def test_histogram_buckets_from_many_values_at_once_match_one_by_one() -> None:
    values = sorted([0.00005, 0.0003, 0.0003, 0.002, 0.7, 3.0, 50.0, 0.0001], reverse=True)
    many, single = Histogram(), Histogram()
    many.observe_descending(values)
    for v in values:
        single.observe(v)
    assert many.counts == single.counts and many.total == single.total == len(values)
    assert many.cumulative()[-1] == (float("inf"), len(values))
    assert len(many.cumulative()) == len(BUCKETS) + 1


async def test_the_event_log_is_a_log_event_hook() -> None:
    out = io.StringIO()
    clock = MockClock()
    log = JsonEventLog(stream=out, rank_of=lambda pid: "7", clock=clock)
    async with TimerServer(clock=clock, reaper=RecordingReaper(), log_event=log) as server:
        server.local_channel().acquire(ME, "step", 1.0)
        await clock.advance(1.0)
    log.close()  # written by the log's own thread: wait for it
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["event"] for r in records] == [
        "watchdog started",
        "timer expired",
        "watchdog stopped",
    ]
    assert records[1]["rank"] == "7" and records[1]["scope"] == "step" and records[1]["pid"] == ME
    # the deadline on the server's clock, written as that clock's wall-clock time
    assert records[1]["deadline"] == "2023-11-14T22:13:21.000000+00:00"
    assert records[1]["deadline_monotonic"] == 1.0


def test_bad_arguments_name_the_parameter_and_value() -> None:
    with pytest.raises(ValueError, match="give `path` or `stream`"):
        JsonEventLog()


async def test_report_only_expiries_of_one_scope_are_one_line_with_a_count() -> None:
    """Report-only torch requests (signal 0, deadline past) wrote 82 MB of event log in
    10 s.  Now a process's repeats in one scope within the window are one line with a
    count (and since when); another scope, or the first after a quiet window, is its own."""
    out = io.StringIO()
    clock = MockClock()
    log = JsonEventLog(stream=out, clock=clock)  # a window of 10 s
    async with TimerServer(clock=clock, reaper=RecordingReaper(), log_event=log) as server:
        channel = server.local_channel()
        for n in range(1, 41):  # 40 expiries of 'tick' in 5 s, report-only
            channel.acquire(ME, "tick", n / 8, signal=-1)
            await clock.advance(1 / 8)
        channel.acquire(ME, "tock", 5.125, signal=-1)
        await clock.advance(1 / 8)
        await clock.advance(15.0)  # quiet: the window is over
        channel.acquire(ME, "tick", 20.25, signal=-1)
        await clock.advance(1 / 8)
    log.close()
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(r["event"], r.get("scope"), r.get("count")) for r in records] == [
        ("watchdog started", None, None),
        ("timer expired", "tick", None),
        ("timer expired", "tock", None),
        ("timer expired", "tick", 39),  # written with the next event after its window
        ("timer expired", "tick", 1),  # written when the watchdog stopped
        ("watchdog stopped", None, None),
    ]
    summary = records[3]
    assert summary["pid"] == ME and summary["deadline_monotonic"] == 5.0  # the last repeat's
    # ``time`` is when each was logged: the first repeat's is ``since``, the last's ``time``
    assert records[1]["time"] <= summary["since"] <= summary["time"] <= records[4]["time"]
    assert summary["deadline"] == "2023-11-14T22:13:25.000000+00:00"
    with pytest.raises(ValueError, match="`repeat_window` must be a finite number"):
        JsonEventLog(stream=out, repeat_window=-1)
