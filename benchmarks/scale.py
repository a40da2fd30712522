"""Scale: K active timers, from 1e3 to 1e6.

Per K: the cost to add and to release one timer through the server's request
path, the cost of an expiry pass (one timer due among K), the CPU the server
uses per second while the K timers sit idle, and the memory per timer.  torch's
LocalTimerServer is measured doing the same things with its own data structure
(``register_timers``/``get_expired_timers``, an O(K) scan per pass).
"""

from __future__ import annotations

import asyncio
import gc
import os
import resource
import time
import tracemalloc
from typing import Any

from aiotimer import DeadlineHeap, TimerServer
from aiotimer.testing import MockClock, RecordingReaper
from aiotimer.transports import Op, Request

OPS = 20_000  # timed adds/releases per K


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def aiotimer_scale(k: int, idle_seconds: float) -> dict[str, float]:
    """Measure aiotimer's server with ``k`` live timers (on a mock clock: no kills).

    Requests go in through the server's public request path (``server.sink``, what
    every transport feeds); the expiry pass is timed on a ``DeadlineHeap`` of the
    same size, the structure the server's alarm pops from.
    """
    pid = os.getpid()
    clock = MockClock()
    # One process arms all K timers: the per-process caps are lifted for it.
    async with TimerServer(
        clock=clock,
        reaper=RecordingReaper(),
        max_timers_per_process=None,
        max_scope_chars_per_process=None,
    ) as server:
        channel = server.local_channel()
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        # Fill through the request path, in batches as a transport delivers them.
        batch = 10_000
        for start in range(0, k, batch):
            channel.submit(
                Request(Op.ACQUIRE, pid, f"w{i}", 1000.0 + i * 1e-6)
                for i in range(start, min(k, start + batch))
            )
        bytes_per_timer = (tracemalloc.get_traced_memory()[0] - before) / k
        tracemalloc.stop()
        assert server.statistics().active_timers == k

        adds = [Request(Op.ACQUIRE, pid, f"x{i}", 2000.0 + i * 1e-6) for i in range(OPS)]
        releases = [Request(Op.RELEASE, pid, f"x{i}", 0.0) for i in range(OPS)]
        dispatch = server.sink.dispatch
        t0 = time.perf_counter()
        for r in adds:
            dispatch(channel, (r,))
        t1 = time.perf_counter()
        for r in releases:
            dispatch(channel, (r,))
        t2 = time.perf_counter()

        # An expiry pass: one timer due among k.
        heap = DeadlineHeap()
        for i in range(k):
            heap.set(pid, f"w{i}", 1000.0 + i * 1e-6)
        passes = []
        for i in range(20):
            heap.set(10**9 + i, "due", -1.0)
            t = time.perf_counter()
            expired = []
            while (timer := heap.pop_due(0.0)) is not None:  # what the killer's burst does
                expired.append(timer)
            passes.append(time.perf_counter() - t)
            assert len(expired) == 1
        cpu0, w0 = _cpu(), server.statistics().wakeups
        await asyncio.sleep(idle_seconds)
        idle_cpu = (_cpu() - cpu0) / idle_seconds
        wakeups = (server.statistics().wakeups - w0) / idle_seconds
    return {
        "add_us": (t1 - t0) / OPS * 1e6,
        "release_us": (t2 - t1) / OPS * 1e6,
        "expiry_pass_us": sorted(passes)[len(passes) // 2] * 1e6,
        "idle_cpu_ms_per_s": idle_cpu * 1e3,
        "idle_wakeups_per_s": wakeups,
        "bytes_per_timer": bytes_per_timer,
    }


def torch_scale(k: int) -> dict[str, float]:
    """The same measurements on torch's LocalTimerServer data structure (no thread)."""
    import multiprocessing as mp

    from torch.distributed.elastic.timer import LocalTimerServer, TimerRequest

    queue: Any = mp.get_context("spawn").Queue()
    server = LocalTimerServer(queue, max_interval=60)
    pid = os.getpid()
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    server.register_timers([TimerRequest(pid, f"w{i}", 1e12 + i) for i in range(k)])
    bytes_per_timer = (tracemalloc.get_traced_memory()[0] - before) / k
    tracemalloc.stop()
    adds = [TimerRequest(pid, f"x{i}", 2e12 + i) for i in range(OPS)]
    releases = [TimerRequest(pid, f"x{i}", -1) for i in range(OPS)]
    t0 = time.perf_counter()
    for r in adds:
        server.register_timers([r])
    t1 = time.perf_counter()
    for r in releases:
        server.register_timers([r])
    t2 = time.perf_counter()
    passes = []
    for _ in range(3 if k >= 100_000 else 20):
        t = time.perf_counter()
        server.get_expired_timers(time.time())
        passes.append(time.perf_counter() - t)
    queue.close()
    queue.join_thread()
    return {
        "add_us": (t1 - t0) / OPS * 1e6,
        "release_us": (t2 - t1) / OPS * 1e6,
        "expiry_pass_us": sorted(passes)[len(passes) // 2] * 1e6,
        "bytes_per_timer": bytes_per_timer,
    }
