"""``python -m benchmarks``: kill latency and idle cost, on asyncio and uvloop."""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from . import idle, kill
from ._stats import median, summarize_ms


def loop_factories() -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Every loop aiotimer runs on here."""
    loops: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {"asyncio": asyncio.new_event_loop}
    try:
        import uvloop
    except ImportError:
        return loops
    loops["uvloop"] = uvloop.new_event_loop
    return loops


def run_on(factory: Callable[[], asyncio.AbstractEventLoop], coro: Coroutine[Any, Any, Any]) -> Any:
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def progress(text: str) -> None:
    print(f"  .. {text}", file=sys.stderr, flush=True)


def bench_kill(workers: list[int], reps: int, loops: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for n in workers:
        for loop_name, factory in loops.items():
            for backend, measure in kill.BACKENDS.items():
                kills: list[float] = []
                decisions: list[float] = []
                missed = 0
                per_rep_p99: list[float] = []
                for rep in range(reps):
                    progress(f"kill latency: {backend} on {loop_name}, N={n}, rep {rep + 1}/{reps}")
                    run = run_on(factory, measure(n))
                    kills += run.kill
                    decisions += run.decision
                    missed += run.missed
                    per_rep_p99.append(summarize_ms(run.kill).p99)
                rows.append(
                    {
                        "scenario": "kill",
                        "backend": backend,
                        "loop": loop_name,
                        "workers": n,
                        "reps": reps,
                        "kill_ms": summarize_ms(kills).as_dict(),
                        "decision_ms": summarize_ms(decisions).as_dict(),
                        "kill_p99_ms_median_of_reps": median(per_rep_p99),
                        "missed": missed,
                    }
                )
    return rows


def print_kill(rows: list[dict[str, Any]]) -> None:
    print("\nKill latency (deadline -> death; decision = deadline -> signal sent), ms")
    head = f"{'backend':<16}{'loop':<9}{'N':>4} {'kill p50':>9}{'p99':>9}{'max':>9}"
    head += f" {'dec p50':>9}{'p99':>9}{'max':>9} {'missed':>6} {'p99 vs floor':>13}"
    print(head)
    floors = {(r["loop"], r["workers"]): r for r in rows if r["backend"] == "floor"}
    for r in rows:
        k, d = r["kill_ms"], r["decision_ms"]
        fl = floors.get((r["loop"], r["workers"]))
        delta = ""
        if fl is not None and r["backend"] != "floor":
            delta = f"{k['p99'] - fl['kill_ms']['p99']:+.2f} ms"
        print(
            f"{r['backend']:<16}{r['loop']:<9}{r['workers']:>4} {k['p50']:>9.2f}{k['p99']:>9.2f}"
            f"{k['max']:>9.2f} {d['p50']:>9.3f}{d['p99']:>9.3f}{d['max']:>9.3f} "
            f"{r['missed']:>6} {delta:>13}"
        )


def bench_idle(seconds: float, loops: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for loop_name, factory in loops.items():
        progress(f"idle: aiotimer on {loop_name}, {seconds:g} s")
        result = run_on(factory, idle.aiotimer_idle(seconds))
        rows.append({"scenario": "idle", "backend": "aiotimer", "loop": loop_name, **result})
    return rows


def print_idle(rows: list[dict[str, Any]]) -> None:
    print("\nIdle: 100 timers due in an hour, no traffic")
    print(f"{'backend':<16}{'loop':<9}{'wakeups/s':>10}{'CPU ms/s':>10}")
    for r in rows:
        print(f"{r['backend']:<16}{r['loop']:<9}{r['wakeups_per_s']:>10.2f}{r['cpu_ms_per_s']:>10.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--workers", default="1,64", help="comma-separated N for kill latency")
    parser.add_argument("--reps", type=int, default=5, help="repetitions per kill measurement")
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--quick", action="store_true", help="a fast smoke run (< 1 minute)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--scenarios", default="kill,idle", help="comma-separated: kill, idle"
    )
    args = parser.parse_args(argv)
    workers = [int(x) for x in args.workers.split(",")]
    reps, idle_seconds = args.reps, args.idle_seconds
    if args.quick:
        workers, reps, idle_seconds = [1, 8], 1, 1.0
    scenarios = set(args.scenarios.split(","))
    loops = loop_factories()
    machine = f"{platform.node()} {platform.machine()} {platform.python_implementation()} "
    machine += f"{platform.python_version()}, {__import__('os').cpu_count()} cpus"
    results: dict[str, Any] = {"machine": machine, "started": time.time(), "rows": []}
    print(f"aiotimer benchmarks on {machine}")
    if "kill" in scenarios:
        rows = bench_kill(workers, reps, loops)
        results["rows"] += rows
        print_kill(rows)
    if "idle" in scenarios:
        rows = bench_idle(idle_seconds, loops)
        results["rows"] += rows
        print_idle(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        print(f"\nresults written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
