"""The multiprocessing-queue bridge (torch's LocalTimerClient transport) on every loop."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import subprocess
import time
from collections.abc import Callable

from aiotimer import TimerServer
from aiotimer.compat.torch import TimerRequest
from aiotimer.testing import MockClock, RecordingReaper
from aiotimer.transports import bridge_queue


async def test_requests_are_applied_in_order_and_bad_items_rejected(
    mock_clock: MockClock, sleeper: Callable[[], subprocess.Popen[bytes]]
) -> None:
    pid = sleeper().pid
    queue = mp.get_context("spawn").Queue()
    reaper = RecordingReaper()
    try:
        async with TimerServer(clock=mock_clock, reaper=reaper) as server:
            await bridge_queue(server, queue)
            wall = mock_clock.wall()
            queue.put(TimerRequest(pid, "a", wall + 1))
            queue.put(TimerRequest(pid, "a", -1))  # released ...
            queue.put("not a request")
            queue.put(TimerRequest(pid, "a", wall + 2))  # ... and armed again
            queue.put(TimerRequest(pid, "b", float("nan")))
            deadline = time.monotonic() + 30
            while server.statistics().requests + server.statistics().rejected < 5:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.005)
            stats = server.statistics()
            assert stats.requests == 3 and stats.rejected == 2
            await mock_clock.advance(1.0)
            assert reaper.expiries == []
            await mock_clock.advance(1.0)
            assert reaper.scopes == [["a"]]
    finally:
        queue.close()
        queue.join_thread()
