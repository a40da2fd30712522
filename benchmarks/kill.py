"""Kill latency: N workers arm a timer due 0.5 s ahead and hang; how soon does each die?

Reports, per backend, deadline -> death (p50/p99/max), the server's decision
latency (deadline -> signal sent) where the backend reports it, and how many
were never killed; the floor is the same workers killed directly by the harness
through pidfds at the deadline.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from aiotimer import TimerServer
from aiotimer._events import KILL_WORKER_PROCESS

from ._procs import DeathWatch, expect_line, python_worker_argv, worker_env

#: How far ahead of "all armed" the common deadline lies.
LEAD = 0.5
#: How long after the deadline a worker may take to die before it counts as missed.
MISS_AFTER = 15.0


@dataclass
class KillRun:
    """One repetition: per-worker latencies in seconds."""

    kill: list[float] = field(default_factory=list)
    decision: list[float] = field(default_factory=list)
    missed: int = 0


async def _start(spawn, n: int):  # type: ignore[no-untyped-def]
    procs = [await spawn() for _ in range(n)]
    await asyncio.gather(*(expect_line(p.stdout, b"ready") for p in procs))
    return procs


async def _arm(procs, deadline: float) -> None:  # type: ignore[no-untyped-def]
    for p in procs:
        p.stdin.write(f"{deadline!r}\n".encode())
    await asyncio.gather(*(p.stdin.drain() for p in procs))
    await asyncio.gather(*(expect_line(p.stdout, b"armed") for p in procs))
    if time.monotonic() >= deadline:
        raise RuntimeError("workers armed after the deadline: raise LEAD")


async def _collect(watch: DeathWatch, pids: list[int], deadline: float) -> KillRun:
    run = KillRun()
    run.missed = len(await watch.wait_all(LEAD + MISS_AFTER))
    run.kill = [watch.deaths[pid] - deadline for pid in pids if pid in watch.deaths]
    return run


async def floor(n: int) -> KillRun:
    """The same workers killed directly by the harness at the deadline, through pidfds."""
    pipe = asyncio.subprocess.PIPE
    argv = python_worker_argv("none")

    async def spawn():  # type: ignore[no-untyped-def]
        return await asyncio.create_subprocess_exec(
            *argv, stdin=pipe, stdout=pipe, env=worker_env()
        )

    procs = await _start(spawn, n)
    watch = DeathWatch()
    pidfds = [os.pidfd_open(p.pid) for p in procs]
    await watch.start([p.pid for p in procs])
    deadline = time.monotonic() + LEAD
    await _arm(procs, deadline)
    loop = asyncio.get_running_loop()
    run_decision: list[float] = []

    def kill_all() -> None:
        now = time.monotonic()
        if now < deadline:  # the loop may fire a little early; never kill early
            loop.call_soon(kill_all)
            return
        # Timed per signal, as the servers' decision latency is.
        for fd in pidfds:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
            run_decision.append(time.monotonic() - deadline)

    loop.call_later(max(0.0, deadline - time.monotonic() - 0.001), kill_all)
    run = await _collect(watch, [p.pid for p in procs], deadline)
    for fd in pidfds:
        os.close(fd)
    await asyncio.gather(*(p.wait() for p in procs))
    run.decision = run_decision
    return run


async def aiotimer_pipe(n: int) -> KillRun:
    """aiotimer's TimerServer in this loop, workers spawned over pipes."""
    decisions: list[float] = []

    def on_event(name: str, info: Mapping[str, object]) -> None:
        latency = info.get("latency")
        if name == KILL_WORKER_PROCESS and isinstance(latency, float):
            decisions.append(latency)

    pipe = asyncio.subprocess.PIPE
    async with TimerServer(log_event=on_event) as server:
        argv = python_worker_argv("aiotimer")

        async def spawn():  # type: ignore[no-untyped-def]
            return await server.spawn(*argv, stdin=pipe, stdout=pipe, env=worker_env())

        workers = await _start(spawn, n)
        watch = DeathWatch()
        await watch.start([w.pid for w in workers])
        deadline = time.monotonic() + LEAD
        await _arm(workers, deadline)
        run = await _collect(watch, [w.pid for w in workers], deadline)
        run.decision = decisions
    return run


#: backend name -> coroutine function measuring one repetition at N workers
BACKENDS = {"floor": floor, "aiotimer-pipe": aiotimer_pipe}
