"""Idle cost: 100 timers due in an hour, no traffic: server wakeups and CPU per second."""

from __future__ import annotations

import asyncio
import os
import resource
import time

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
