"""aiotimer's benchmark harness: aiotimer against torch's timer servers, in one run.

    python -m benchmarks            # the full run (several minutes), into benchmarks/results/local/
    python -m benchmarks --quick    # every figure, small sizes (about a minute)
    python -m benchmarks --publish  # a full run that updates docs/benchmarks.md's tables and chart

Scenarios: kill (kill latency vs the floor), throughput, scale, idle, client;
aiotimer's rows run on asyncio and on uvloop.  Prints tables with progress on
stderr, and writes JSON, a Markdown table and a PNG chart.  Performance claims
are ratios measured in the same run on the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from aiotimer._loops import available_loops, pidfd_child_watcher

from . import client, hardening, idle, isolation, kill, scale, throughput
from ._stats import median, summarize_ms

ROOT = Path(__file__).resolve().parent.parent
#: What the docs publish: only ``--publish`` writes here.
PUBLISHED = ROOT / "benchmarks" / "results"
PUBLISHED_CHART = ROOT / "docs" / "benchmark.png"
#: The page that shows the published tables, between these two lines (``--publish`` rewrites
#: what lies between them and nothing else).
PUBLISHED_PAGE = ROOT / "docs" / "benchmarks.md"
PUBLISHED_BEGIN = (
    "<!-- published tables: begin (python -m benchmarks --publish writes what follows) -->"
)
PUBLISHED_END = "<!-- published tables: end -->"
SCENARIOS = (
    "kill",
    "throughput",
    "scale",
    "idle",
    "client",
    "load",
    "garbage",
    "burst",
    "capture",
    "isolation",
)


def loop_factories() -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Every loop aiotimer runs on here."""
    return available_loops()


def run_on(factory: Callable[[], asyncio.AbstractEventLoop], coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` to completion on a new loop from ``factory``.

    On Python 3.11's own loop, children are watched through pidfds, as 3.12+
    does by default, rather than by a thread each (see ``pidfd_child_watcher``).
    """

    async def on_own_loop() -> Any:
        async with pidfd_child_watcher():
            return await coro

    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(on_own_loop())


def progress(text: str) -> None:
    """A progress line on stderr."""
    print(f"  .. {text}", file=sys.stderr, flush=True)


class Report:
    """Collects tables for the terminal and for Markdown."""

    def __init__(self) -> None:
        self.sections: list[tuple[str, list[str], list[list[str]]]] = []

    def table(self, title: str, headers: list[str], rows: list[list[str]]) -> None:
        """Print a table now and keep it for the Markdown report."""
        self.sections.append((title, headers, rows))
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
        print(f"\n{title}")
        print(
            "  ".join(
                h.ljust(w) if i == 0 else h.rjust(w)
                for i, (h, w) in enumerate(zip(headers, widths, strict=True))
            )
        )
        for row in rows:
            print(
                "  ".join(
                    c.ljust(w) if i == 0 else c.rjust(w)
                    for i, (c, w) in enumerate(zip(row, widths, strict=True))
                )
            )

    def markdown(self, header: str) -> str:
        """Every table as Markdown."""
        out = [header]
        for title, headers, rows in self.sections:
            out += [
                "",
                f"**{title}**",
                "",
                "| " + " | ".join(headers) + " |",
                "|" + "|".join("---" for _ in headers) + "|",
            ]
            out += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(out) + "\n"


def published_tables(latest_md: str, commit: str | None) -> str:
    """``latest.md`` as the benchmarks page shows it: each table's bold title a heading (the
    page links to them), and the first line naming the commit measured."""
    header, _, tables = latest_md.partition("\n")
    if commit and header.endswith("."):
        header = f"{header[:-1]}, at commit {commit}."
    lines = [
        f"#### {line[2:-2]}" if line.startswith("**") and line.endswith("**") else line
        for line in tables.rstrip("\n").split("\n")
    ]
    return "\n".join([header, *lines])


def publish_into(page: str, tables: str) -> str:
    """``page`` with what lies between its published-tables lines replaced by ``tables``.

    Raises ``ValueError`` unless the page has each line exactly once, begin before end."""
    begin, end = page.count(PUBLISHED_BEGIN), page.count(PUBLISHED_END)
    if begin != 1 or end != 1 or page.index(PUBLISHED_BEGIN) > page.index(PUBLISHED_END):
        raise ValueError(
            f"the page needs the line {PUBLISHED_BEGIN!r} once, then {PUBLISHED_END!r} once"
        )
    head, rest = page.split(PUBLISHED_BEGIN)
    _, tail = rest.split(PUBLISHED_END)
    return f"{head}{PUBLISHED_BEGIN}\n\n{tables.strip()}\n\n{PUBLISHED_END}{tail}"


def git_commit() -> str | None:
    """The short hash of the commit measured, if this is a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def fmt(value: float, digits: int = 2) -> str:
    """A number for a table ('-' for NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if abs(value) >= 1e5:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def ratio(ours: float, theirs: float) -> str:
    """How many times ``theirs`` is ``ours`` (e.g. latency torch/ours): '12.3x'."""
    if not ours or math.isnan(ours) or math.isnan(theirs):
        return "-"
    return f"{theirs / ours:.1f}x"


def versus_torch(
    backend: str, torch_values: dict[str, float], compare: Callable[[float], str]
) -> str:
    """'file@0.01:3.1x local@0.01:2.0x' for an aiotimer row; empty for the others."""
    if not backend.startswith("aiotimer"):
        return ""
    return " ".join(f"{n.replace('torch-', '')}:{compare(v)}" for n, v in torch_values.items())


# -- kill latency ---------------------------------------------------------------


def bench_kill(
    workers: Sequence[int],
    reps: int,
    loops: dict[str, Any],
    has_torch: bool,
    torch_defaults: bool,
    report: Report,
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for n in workers:
        for backend in kill.backends(torch_defaults):
            if backend.needs_torch and not has_torch:
                continue
            defaults = backend.name.endswith(("@10", "@60"))
            if defaults and n > 1:
                continue  # seconds per run: N=1 shows the point
            names = loops if backend.on_every_loop else {"asyncio": loops["asyncio"]}
            for loop_name, factory in names.items():
                kills: list[float] = []
                decisions: list[float] = []
                missed = 0
                p99s: list[float] = []
                for rep in range(1 if defaults else reps):
                    progress(f"kill: {backend.name} on {loop_name}, N={n}, rep {rep + 1}")
                    run = run_on(factory, backend.measure(n))
                    kills += run.kill
                    decisions += run.decision
                    missed += run.missed
                    p99s.append(summarize_ms(run.kill).p99)
                rows.append(
                    {
                        "scenario": "kill",
                        "backend": backend.name,
                        "kind": backend.kind,
                        "floor": backend.is_floor,
                        "loop": loop_name if backend.on_every_loop else "-",
                        "workers": n,
                        "reps": reps,
                        "missed": missed,
                        "kill_ms": summarize_ms(kills).as_dict(),
                        "decision_ms": summarize_ms(decisions).as_dict(),
                        "kill_p99_ms_median_of_reps": median(p99s),
                        "kill_samples_ms": [k * 1e3 for k in kills],
                    }
                )
    table = []
    for r in rows:
        floor = next(
            f
            for f in rows
            if f["floor"] and f["kind"] == r["kind"] and f["workers"] == r["workers"]
        )
        k, d, fk = r["kill_ms"], r["decision_ms"], floor["kill_ms"]
        vs_floor = (
            "-" if r["floor"] else f"{k['p99'] - fk['p99']:+.2f} ms ({k['p99'] / fk['p99']:.2f}x)"
        )
        torch_p99 = {
            t["backend"]: t["kill_ms"]["p99"]
            for t in rows
            if t["backend"].startswith("torch") and t["workers"] == r["workers"]
        }
        vs_torch = versus_torch(
            r["backend"], torch_p99, lambda p99, mine=k["p99"]: ratio(mine, p99)
        )
        table.append(
            [
                r["backend"],
                r["loop"],
                str(r["workers"]),
                fmt(k["p50"]),
                fmt(k["p99"]),
                fmt(k["max"]),
                fmt(d["p50"], 3),
                fmt(d["p99"], 3),
                str(r["missed"]),
                vs_floor,
                vs_torch,
            ]
        )
    report.table(
        "Kill latency, ms: deadline -> death (kill) and deadline -> signal sent (decision)",
        [
            "backend",
            "loop",
            "N",
            "kill p50",
            "p99",
            "max",
            "dec p50",
            "dec p99",
            "missed",
            "p99 vs floor",
            "p99 speed-up vs torch",
        ],
        table,
    )
    return rows


# -- throughput -----------------------------------------------------------------


def bench_throughput(
    workers: Sequence[int], seconds: float, loops: dict[str, Any], has_torch: bool, report: Report
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for w in workers:
        for name, (measure, every_loop, needs_torch) in throughput.BACKENDS.items():
            if needs_torch and not has_torch:
                continue
            names = loops if every_loop else {"asyncio": loops["asyncio"]}
            for loop_name, factory in names.items():
                progress(f"throughput: {name} on {loop_name}, W={w}, {seconds:g} s")
                t = run_on(factory, measure(w, seconds))
                rows.append(
                    {
                        "scenario": "throughput",
                        "backend": name,
                        "loop": loop_name if every_loop else "-",
                        "workers": w,
                        "seconds": seconds,
                        "pairs_sent_per_s": t.sent_pairs_per_s,
                        "requests_processed_per_s": t.processed_per_s,
                        "backlog": t.backlog,
                        "backlog_pct": 100.0 * t.backlog / max(1, 2 * t.pairs),
                        "client_errors": t.errors,
                    }
                )
    table = []
    for r in rows:
        torch_rates = {
            t["backend"]: t["requests_processed_per_s"]
            for t in rows
            if t["backend"].startswith("torch") and t["workers"] == r["workers"]
        }
        ours = r["requests_processed_per_s"]
        vs = versus_torch(r["backend"], torch_rates, lambda rate, mine=ours: ratio(rate, mine))
        table.append(
            [
                r["backend"],
                r["loop"],
                str(r["workers"]),
                fmt(r["pairs_sent_per_s"], 0),
                fmt(r["requests_processed_per_s"] / 2, 0),
                fmt(r["requests_processed_per_s"], 0),
                f"{r['backlog']} ({r['backlog_pct']:.1f}%)",
                str(r["client_errors"]),
                vs,
            ]
        )
    report.table(
        "Throughput: acquire+release pairs as fast as the clients can",
        [
            "backend",
            "loop",
            "W",
            "pairs/s sent",
            "pairs/s processed",
            "requests/s processed",
            "backlog",
            "client errors",
            "processed vs torch",
        ],
        table,
    )
    return rows


# -- scale ----------------------------------------------------------------------


def bench_scale(
    ks: Sequence[int], idle_seconds: float, has_torch: bool, report: Report
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for k in ks:
        progress(f"scale: aiotimer, K={k:,}")
        rows.append(
            {
                "scenario": "scale",
                "backend": "aiotimer",
                "k": k,
                **asyncio.run(scale.aiotimer_scale(k, idle_seconds)),
            }
        )
        if has_torch:
            progress(f"scale: torch LocalTimerServer, K={k:,}")
            rows.append(
                {"scenario": "scale", "backend": "torch-local", "k": k, **scale.torch_scale(k)}
            )
    table = [
        [
            r["backend"],
            f"{r['k']:,}",
            fmt(r["add_us"]),
            fmt(r["release_us"]),
            fmt(r["expiry_pass_us"]),
            fmt(r.get("idle_cpu_ms_per_s", math.nan), 3),
            fmt(r.get("idle_wakeups_per_s", math.nan)),
            fmt(r["bytes_per_timer"], 0),
        ]
        for r in rows
    ]
    report.table(
        "Scale: K active timers (costs in microseconds; an expiry pass = one timer due among K)",
        [
            "backend",
            "K",
            "add us",
            "release us",
            "expiry pass us",
            "idle CPU ms/s",
            "idle wakeups/s",
            "bytes/timer",
        ],
        table,
    )
    return rows


# -- idle -------------------------------------------------------------------------


def bench_idle(
    seconds: float, loops: dict[str, Any], has_torch: bool, torch_defaults: bool, report: Report
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for loop_name, factory in loops.items():
        progress(f"idle: aiotimer on {loop_name}, {seconds:g} s")
        rows.append(
            {
                "scenario": "idle",
                "backend": "aiotimer",
                "loop": loop_name,
                **run_on(factory, idle.aiotimer_idle(seconds)),
            }
        )
    if has_torch:
        settings = [("file", 0.01), ("local", 0.01)]
        if torch_defaults:
            settings += [("file", 10.0), ("local", 60.0)]
        for kind, interval in settings:
            progress(f"idle: torch-{kind}@{interval:g}, {seconds:g} s")
            rows.append(
                {
                    "scenario": "idle",
                    "backend": f"torch-{kind}@{interval:g}",
                    "loop": "-",
                    **idle.torch_idle(kind, interval, seconds),
                }
            )
    report.table(
        "Idle: 100 timers due in an hour, no traffic",
        ["backend", "loop", "wakeups/s", "CPU ms/s"],
        [
            [r["backend"], r["loop"], fmt(r["wakeups_per_s"]), fmt(r["cpu_ms_per_s"], 3)]
            for r in rows
        ],
    )
    return rows


# -- client cost ------------------------------------------------------------------


def bench_client(calls: int, has_torch: bool, report: Report) -> list[dict[str, Any]]:
    progress("client cost: aiotimer")
    ours = client.aiotimer_client(calls)
    theirs: dict[str, float] = {}
    if has_torch:
        progress("client cost: torch")
        theirs = client.torch_client(calls)
    rows = [
        {"scenario": "client", "backend": "aiotimer", "call": k, "us_per_call": v}
        for k, v in ours.items()
    ]
    rows += [
        {"scenario": "client", "backend": "torch", "call": k, "us_per_call": v}
        for k, v in theirs.items()
    ]
    best = ours.get("expires(scope=...)", math.nan)
    report.table(
        "Client cost: one enter+exit of a deadline block, microseconds",
        ["backend", "call", "us per call", "vs aiotimer expires(scope=...)"],
        [
            [r["backend"], r["call"], fmt(r["us_per_call"]), ratio(best, r["us_per_call"])]
            for r in rows
        ],
    )
    progress("client cost: imports in a fresh interpreter")
    imports = client.import_cost_ms()
    rows += [{"scenario": "imports", "import": k, "ms_above_bare": v} for k, v in imports.items()]
    report.table(
        "Client import cost: a worker's imports, ms above a bare interpreter (median of 15)",
        ["import", "ms"],
        [[k, fmt(v)] for k, v in imports.items()],
    )
    return rows


# -- hardening: kills under load, garbage, bursts ---------------------------------------


def _ms(values: Sequence[float], key: str) -> str:
    return fmt(summarize_ms(values).as_dict()[key], 3) if values else "-"


def bench_hardening(
    scenarios: set[str],
    loops: dict[str, Any],
    has_torch: bool,
    *,
    flooders: int,
    bystanders: int,
    garbage_bytes: int,
    connects: int,
    reps: int,
    bursts: Sequence[tuple[int, int]],
    report: Report,
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    if "load" in scenarios:
        table = []
        variants = [
            (name, measure, realtime)
            for name, measure in (("pipe", hardening.load_pipe), ("fifo", hardening.load_fifo))
            if name == "pipe" or has_torch
            for realtime in (False, True)
        ]
        for name, measure, realtime in variants:
            for loop_name, factory in loops.items():
                wanted = "realtime" if realtime else "normal"
                progress(f"load: {flooders} flooders over the {name}, {wanted}, on {loop_name}")
                out = run_on(
                    factory, asyncio.wait_for(measure(flooders, bystanders, realtime), 600)
                )
                priority = "realtime" if out.realtime else "normal"
                if realtime and not out.realtime:
                    priority += " (realtime refused)"
                rows.append(
                    {
                        "scenario": "load",
                        "transport": name,
                        "loop": loop_name,
                        "priority": priority,
                        "flooders": flooders,
                        "decision_ms": summarize_ms(out.decisions).as_dict(),
                        "sleeper_wake_late_ms": dict(
                            zip(("p50", "p99", "max"), out.sleeper_ms, strict=True)
                        ),
                        "flood_pairs_per_s": out.pairs_per_s,
                        "missed": out.missed,
                        "other_kills": out.others,
                    }
                )
                table.append(
                    [
                        name,
                        loop_name,
                        priority,
                        str(flooders),
                        str(len(out.decisions)),
                        _ms(out.decisions, "p50"),
                        _ms(out.decisions, "p99"),
                        _ms(out.decisions, "max"),
                        fmt(out.sleeper_ms[1], 3),
                        fmt(out.pairs_per_s, 0),
                        str(out.missed),
                        str(out.others),
                    ]
                )
        report.table(
            "Kill under load: bystanders hang while flooders run acquire+release pairs "
            "(server thread at normal priority, then real-time; 'sleeper p99': how late a "
            "separate normal-priority process woke from 1 ms sleeps meanwhile, the floor "
            "for any process at normal priority)",
            [
                "transport",
                "loop",
                "server priority",
                "flooders",
                "kills",
                "dec p50 ms",
                "dec p99 ms",
                "max",
                "sleeper p99 ms",
                "flood pairs/s",
                "missed",
                "other kills",
            ],
            table,
        )
    if "garbage" in scenarios:
        table = []
        for name, measure in (
            ("pipe", hardening.garbage_pipe),
            ("fifo", hardening.garbage_fifo),
            ("socket", hardening.garbage_socket),
        ):
            if name == "fifo" and not has_torch:
                continue
            size = {"pipe": garbage_bytes, "fifo": garbage_bytes // 2}.get(name, connects)
            unit = "connects" if name == "socket" else "bytes"
            for loop_name, factory in loops.items():
                progress(f"garbage: {size:,} {unit} on the {name}, on {loop_name}")
                out = run_on(factory, asyncio.wait_for(measure(size, reps), 600))
                rows.append(
                    {
                        "scenario": "garbage",
                        "transport": name,
                        "loop": loop_name,
                        unit: size,
                        "decision_ms": summarize_ms(out.decisions).as_dict(),
                        "log_records": out.log_records,
                        "server_cpu_s": out.server_cpu_s,
                        "missed": out.missed,
                    }
                )
                table.append(
                    [
                        name,
                        loop_name,
                        f"{size:,} {unit}",
                        _ms(out.decisions, "p50"),
                        _ms(out.decisions, "max"),
                        str(out.log_records),
                        fmt(out.server_cpu_s, 3),
                        str(out.missed),
                    ]
                )
        report.table(
            "Garbage: junk on one client's transport across a bystander's deadline",
            [
                "transport",
                "loop",
                "hostile input",
                "dec p50 ms",
                "dec max ms",
                "log records",
                "server CPU s",
                "missed",
            ],
            table,
        )
    if "burst" in scenarios:
        table = []
        for workers, each in bursts:
            for loop_name, factory in loops.items():
                progress(f"burst: {workers} x {each:,} timers due at once, on {loop_name}")
                out = run_on(factory, asyncio.wait_for(hardening.burst(workers, each), 600))
                first = min(out.decisions) if out.decisions else math.nan
                rows.append(
                    {
                        "scenario": "burst",
                        "loop": loop_name,
                        "workers": workers,
                        "timers_each": each,
                        "first_signal_ms": first * 1e3,
                        "last_signal_ms": max(out.decisions, default=math.nan) * 1e3,
                        "loop_blocked_ms": out.loop_blocked * 1e3,
                        "missed": out.missed,
                    }
                )
                table.append(
                    [
                        f"{workers} x {each:,}",
                        loop_name,
                        fmt(first * 1e3, 3),
                        fmt(max(out.decisions, default=math.nan) * 1e3, 3),
                        fmt(out.loop_blocked * 1e3, 1),
                        str(out.missed),
                    ]
                )
        report.table(
            "Bursts: timers all due at one instant",
            [
                "workers x timers",
                "loop",
                "first signal ms late",
                "last signal ms late",
                "loop free again ms",
                "missed",
            ],
            table,
        )
    return rows


def bench_capture(sizes: Sequence[int], reps: int, report: Report) -> list[dict[str, Any]]:
    """The kill delay incident capture adds (uvloop: what ``aiotimer run`` uses)."""
    rows: list[dict[str, Any]] = []
    factory = loop_factories().get("uvloop", asyncio.new_event_loop)
    for n in sizes:
        for with_capture in (False, True):
            label = "with capture" if with_capture else "without"
            progress(f"capture: {n} hung worker(s), {label}")
            out = run_on(factory, hardening.capture(n, with_capture, reps))
            rows.append(
                {
                    "scenario": "capture",
                    "workers": n,
                    "capture": with_capture,
                    "decision_ms": summarize_ms(out.decisions).as_dict(),
                    "missed": out.missed,
                }
            )
    report.table(
        "Incident capture: deadline -> signal, ms, with the hung stacks captured first or not",
        ["N", "capture", "dec p50", "dec p99", "max", "missed"],
        [
            [
                str(r["workers"]),
                "py-spy, 1 s bound" if r["capture"] else "off",
                fmt(r["decision_ms"]["p50"], 2),
                fmt(r["decision_ms"]["p99"], 2),
                fmt(r["decision_ms"]["max"], 2),
                str(r["missed"]),
            ]
            for r in rows
        ],
    )
    return rows


def bench_isolation(bystanders: int, loops: dict[str, Any], report: Report) -> list[dict[str, Any]]:
    """Bystanders' decision latency while a neighbour is hostile (see ``isolation``)."""
    rows: list[dict[str, Any]] = []
    table: list[list[str]] = []
    for case, measure in isolation.MEASURES.items():
        skipped = None
        for realtime in (False, True):
            for loop_name, factory in loops.items():
                wanted = "realtime" if realtime else "normal"
                progress(f"isolation: {case}, {wanted}, on {loop_name}, {bystanders} bystanders")
                out = run_on(factory, asyncio.wait_for(measure(bystanders, realtime), 300))
                if out.skipped is not None:
                    skipped = out.skipped
                    break
                priority = "realtime" if out.realtime else "normal"
                if realtime and not out.realtime:
                    priority += " (realtime refused)"
                rows.append(
                    {
                        "scenario": "isolation",
                        "case": case,
                        "loop": loop_name,
                        "priority": priority,
                        "bystanders": out.bystanders,
                        "hostile": out.hostile,
                        "decision_ms": summarize_ms(out.decisions).as_dict(),
                        "signal_ms": summarize_ms(out.signals).as_dict(),
                        "missed": out.missed,
                        "other_kills": out.others,
                        "hostile_killed": out.hostile_killed,
                        "effect": out.effect,
                        "decision_samples_ms": [d * 1e3 for d in out.decisions],
                        "skipped": None,
                    }
                )
                table.append(
                    [
                        case,
                        loop_name,
                        priority,
                        str(out.bystanders),
                        _ms(out.decisions, "p50"),
                        _ms(out.decisions, "p99"),
                        _ms(out.decisions, "max"),
                        _ms(out.signals, "p99"),
                        str(out.missed),
                        str(out.others),
                        out.effect_text(),
                    ]
                )
            if skipped is not None:
                break
        if skipped is not None:
            progress(f"isolation: {case} skipped: {skipped}")
            rows.append({"scenario": "isolation", "case": case, "skipped": skipped})
            table.append([case, "-", f"skipped: {skipped}", *["-"] * 8])
    report.table(
        "Isolation: bystanders hang while a neighbour is hostile; decision = deadline -> "
        "expiry handled (TimerExpired.lag), signal = deadline -> SIGKILL sent "
        f"(target: bystander decision p99 <= {isolation.TARGET_P99 * 1e3:g} ms)",
        [
            "case",
            "loop",
            "server priority",
            "bystanders",
            "dec p50 ms",
            "dec p99 ms",
            "dec max ms",
            "signal p99 ms",
            "missed",
            "other kills",
            "what the hostility cost",
        ],
        table,
    )
    return rows


# -- chart --------------------------------------------------------------------------


def chart(rows: list[dict[str, Any]], path: Path, machine: str) -> bool:
    """Kill-latency distributions and throughput per backend, as one PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        progress("matplotlib is not installed: no chart (pip install -e '.[bench]')")
        return False
    kills = [r for r in rows if r["scenario"] == "kill" and r["kill_samples_ms"]]
    tput = [r for r in rows if r["scenario"] == "throughput"]
    if not kills and not tput:
        return False
    sizes = sorted({r["workers"] for r in kills})
    panels = [n for n in (sizes[:1] + sizes[-1:]) if n] if sizes else []
    panels = list(dict.fromkeys(panels))
    fig, grid = plt.subplots(1, len(panels) + 1, figsize=(7 * (len(panels) + 1), 6), squeeze=False)
    axes = list(grid[0])
    for ax, n in zip(axes, panels, strict=False):
        sel = [r for r in kills if r["workers"] == n]
        labels = [r["backend"] + (f" ({r['loop']})" if r["loop"] != "-" else "") for r in sel]
        ax.boxplot([r["kill_samples_ms"] for r in sel], orientation="horizontal")
        ax.set_yticks(range(1, len(sel) + 1), labels)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("deadline -> death, ms (log scale)")
        ax.set_title(f"Kill latency, {n} hung worker{'s' if n > 1 else ''}")
    ax = axes[-1]
    if tput:
        w_max = max(r["workers"] for r in tput)
        sel = [r for r in tput if r["workers"] == w_max]
        labels = [r["backend"] + (f" ({r['loop']})" if r["loop"] != "-" else "") for r in sel]
        y = range(len(sel))
        ax.barh([i + 0.2 for i in y], [r["pairs_sent_per_s"] for r in sel], 0.4, label="sent")
        ax.barh(
            [i - 0.2 for i in y],
            [r["requests_processed_per_s"] / 2 for r in sel],
            0.4,
            label="processed",
        )
        ax.set_yticks(list(y), labels)
        ax.set_xlabel(f"acquire+release pairs per second ({w_max} workers)")
        ax.set_title("Throughput")
        ax.legend()
    fig.suptitle(f"aiotimer vs torch.distributed.elastic.timer — {machine}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def machine_line() -> str:
    """What the figures were measured on."""
    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return (
        f"{os.cpu_count()} x {model}, Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def ints(text: str) -> list[int]:
    """'1,16,64' -> [1, 16, 64]."""
    return [int(float(x)) for x in text.split(",") if x]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks; see ``--help``."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="every figure, small sizes (< 1 min)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset")
    parser.add_argument("--workers", type=ints, default=[1, 16, 64], help="kill: N hung workers")
    parser.add_argument("--reps", type=int, default=3, help="kill: repetitions per N")
    parser.add_argument("--throughput-workers", type=ints, default=[1, 4, 16])
    parser.add_argument("--seconds", type=float, default=3.0, help="throughput: window")
    parser.add_argument("--scale", type=ints, default=[1000, 10_000, 100_000, 1_000_000])
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--calls", type=int, default=20_000, help="client: calls per figure")
    parser.add_argument("--flooders", type=int, default=16, help="load: flooding workers")
    parser.add_argument("--bystanders", type=int, default=20, help="load: hung bystanders")
    parser.add_argument(
        "--isolation-bystanders", type=int, default=12, help="isolation: bystanders per run"
    )
    parser.add_argument("--garbage-bytes", type=int, default=4 << 20, help="garbage: bytes")
    parser.add_argument(
        "--garbage-connects", type=int, default=10_000, help="garbage: connects to the socket"
    )
    parser.add_argument(
        "--bursts",
        default="10x10000,1x1000000",
        help="burst: WORKERSxTIMERS, comma-separated",
    )
    parser.add_argument(
        "--no-torch-defaults",
        action="store_true",
        help="skip torch at its default max_interval (slow: seconds per run)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where latest.json and latest.md go (default: benchmarks/results/local/, "
        "untracked; with --publish: benchmarks/results/)",
    )
    parser.add_argument(
        "--chart",
        type=Path,
        default=None,
        help="the chart's path (default: OUT/benchmark.png; with --publish: docs/benchmark.png)",
    )
    parser.add_argument(
        "--with-metrics",
        action="store_true",
        help="kill: aiotimer's servers serve Prometheus metrics, scraped every 100 ms",
    )
    parser.add_argument(
        "--publish",
        action="store_true",
        help="write the published tables (docs/benchmarks.md) and chart (a full run only)",
    )
    parser.add_argument(
        "--replot", action="store_true", help="only redraw the chart from --out's latest.json"
    )
    args = parser.parse_args(argv)
    if args.publish and args.quick:
        parser.error("--publish: only a full run updates the published figures, not --quick")
    if args.publish:
        try:  # before a run of many minutes, not after it
            publish_into(PUBLISHED_PAGE.read_text(), "")
        except (OSError, ValueError) as e:
            parser.error(f"--publish: {PUBLISHED_PAGE}: {e}")
    if args.out is None:
        args.out = PUBLISHED if args.publish else ROOT / "benchmarks" / "results" / "local"
    if args.chart is None:
        args.chart = PUBLISHED_CHART if args.publish else args.out / "benchmark.png"
    kill.WITH_METRICS = args.with_metrics
    if args.replot:
        saved = json.loads((args.out / "latest.json").read_text())
        return 0 if chart(saved["rows"], args.chart, saved["machine"]) else 1
    torch_defaults = not args.no_torch_defaults
    if args.quick:
        args.workers, args.reps, args.throughput_workers = [2], 1, [2]
        args.seconds, args.scale, args.idle_seconds, args.calls = 0.5, [1000, 10_000], 0.5, 2000
        args.flooders, args.bystanders, args.garbage_bytes = 2, 2, 256 * 1024
        args.garbage_connects = 500
        args.bursts = "2x1000"
        args.isolation_bystanders = 2
        torch_defaults = False
    unknown = set(args.scenarios.split(",")) - set(SCENARIOS)
    if unknown:
        parser.error(f"--scenarios: unknown {sorted(unknown)}; choose from {', '.join(SCENARIOS)}")
    scenarios = set(args.scenarios.split(","))
    has_torch = importlib.util.find_spec("torch") is not None
    if not has_torch:
        progress("torch is not installed: torch rows are skipped (pip install torch==2.13.0)")
    loops = loop_factories()
    machine = machine_line()
    print(f"aiotimer benchmarks on {machine}{' (quick)' if args.quick else ''}")
    report = Report()
    started = time.time()
    rows: list[dict[str, Any]] = []
    if "kill" in scenarios:
        rows += bench_kill(args.workers, args.reps, loops, has_torch, torch_defaults, report)
    if "throughput" in scenarios:
        rows += bench_throughput(args.throughput_workers, args.seconds, loops, has_torch, report)
    if "scale" in scenarios:
        rows += bench_scale(args.scale, min(args.idle_seconds, 1.0), has_torch, report)
    if "idle" in scenarios:
        rows += bench_idle(args.idle_seconds, loops, has_torch, torch_defaults, report)
    if "client" in scenarios:
        rows += bench_client(args.calls, has_torch, report)
    if "capture" in scenarios:
        rows += bench_capture([1, 2] if args.quick else [1, 16], 1 if args.quick else 3, report)
    if scenarios & {"load", "garbage", "burst"}:
        bursts = [tuple(int(x) for x in b.split("x")) for b in args.bursts.split(",") if b]
        rows += bench_hardening(
            scenarios,
            loops,
            has_torch,
            flooders=args.flooders,
            bystanders=args.bystanders,
            garbage_bytes=args.garbage_bytes,
            connects=args.garbage_connects,
            reps=1 if args.quick else 3,
            bursts=[(w, t) for w, t in bursts],
            report=report,
        )
    if "isolation" in scenarios:
        rows += bench_isolation(args.isolation_bystanders, loops, report)
    elapsed = time.time() - started
    command = "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {
        "machine": machine,
        "command": command.strip(),
        "started": started,
        "seconds": elapsed,
        "quick": args.quick,
        "rows": rows,
    }
    (args.out / "latest.json").write_text(json.dumps(results, indent=1))
    header = f"Measured on {machine} with `{command.strip()}` ({elapsed:.0f} s)."
    (args.out / "latest.md").write_text(report.markdown(header))
    if args.publish:
        tables = published_tables(report.markdown(header), git_commit())
        PUBLISHED_PAGE.write_text(publish_into(PUBLISHED_PAGE.read_text(), tables))
    drew = chart(rows, args.chart, machine)
    print(
        f"\n{elapsed:.0f} s; results in {args.out / 'latest.json'} and {args.out / 'latest.md'}"
        + (f"; chart in {args.chart}" if drew else "")
        + (f"; tables in {PUBLISHED_PAGE}" if args.publish else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
