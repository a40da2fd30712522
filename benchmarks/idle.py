"""Idle cost: 100 timers due in an hour, no traffic: server wakeups and CPU per second."""

from __future__ import annotations

import asyncio
import os
import resource
import time
from typing import Any

from aiotimer import TimerServer


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def aiotimer_idle(seconds: float, timers: int = 100) -> dict[str, float]:
    """Measure an aiotimer server holding ``timers`` far-off deadlines for ``seconds``."""
    async with TimerServer() as server:
        channel = server.local_channel()
        for i in range(timers):
            channel.acquire(os.getpid(), f"idle{i}", time.monotonic() + 3600)
        await asyncio.sleep(0.05)
        wakeups0, cpu0, t0 = server.statistics().wakeups, _cpu(), time.monotonic()
        await asyncio.sleep(seconds)
        elapsed = time.monotonic() - t0
        wakeups = server.statistics().wakeups - wakeups0
        cpu = _cpu() - cpu0
    return {
        "seconds": elapsed,
        "wakeups_per_s": wakeups / elapsed,
        "cpu_ms_per_s": cpu * 1e3 / elapsed,
    }


def _switches(native_id: int) -> int:
    """Context switches of one thread: each is a wakeup (or a preemption) of it."""
    total = 0
    with open(f"/proc/self/task/{native_id}/status") as f:
        for line in f:
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                total += int(line.split()[1])
    return total


def torch_idle(
    kind: str, max_interval: float, seconds: float, timers: int = 100
) -> dict[str, float]:
    """torch's ``LocalTimerServer``/``FileTimerServer`` holding ``timers`` far-off deadlines.

    Wakeups are its watchdog thread's context switches, read from /proc.
    """
    import multiprocessing as mp
    import tempfile

    from torch.distributed.elastic.timer import (
        FileTimerClient,
        FileTimerServer,
        LocalTimerClient,
        LocalTimerServer,
    )

    far = time.time() + 3600
    with tempfile.TemporaryDirectory() as tmp:
        queue: Any = None
        if kind == "local":
            queue = mp.get_context("spawn").Queue()
            server: Any = LocalTimerServer(queue, max_interval=max_interval)
            client: Any = LocalTimerClient(queue)
        else:
            fifo = os.path.join(tmp, "timer.fifo")
            server = FileTimerServer(fifo, "idle", max_interval=max_interval)
            client = FileTimerClient(fifo)
        server.start()
        for i in range(timers):
            client.acquire(f"idle{i}", far)
        time.sleep(min(1.0, max_interval * 3) + 0.2)  # let it register them
        thread = server._watchdog_thread.native_id
        switches0, cpu0, t0 = _switches(thread), _cpu(), time.monotonic()
        time.sleep(seconds)
        elapsed = time.monotonic() - t0
        result = {
            "seconds": elapsed,
            "wakeups_per_s": (_switches(thread) - switches0) / elapsed,
            "cpu_ms_per_s": (_cpu() - cpu0) * 1e3 / elapsed,
        }
        # stop() joins for up to max_interval; at torch's defaults that is a minute.
        server._stop_signaled = True
        if max_interval <= 1:
            server.stop()
        if queue is not None:
            queue.cancel_join_thread()
            queue.close()
    return result
