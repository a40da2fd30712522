"""SystemClock alarms on real time: never early, cancellable, and leak-free."""

from __future__ import annotations

import asyncio
import os
import random
import select
import sys
import time

import pytest

from aiotimer import SystemClock, TimerServer, _clock
from aiotimer._linux import timerfd_arm_at, timerfd_create
from aiotimer.testing import MockClock, RecordingReaper

# Real time on shared, noisy cores: an alarm must never be early, and it must
# go off, but how late it is on this machine is a benchmark's business.
GENEROUS = 10.0


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_alarms_are_never_early() -> None:
    clock = SystemClock()
    loop = asyncio.get_running_loop()
    # Delays inside the timerfd window, across it, and already due.
    for delay in [0.0, -1.0, 0.0005, 0.003, 0.006, *(random.uniform(0, 0.02) for _ in range(10))]:
        fired: asyncio.Future[float] = loop.create_future()
        target = clock.now() + max(delay, 0.0)
        clock.call_later(delay, lambda f=fired: f.set_result(time.monotonic()))  # type: ignore[misc]
        at = await asyncio.wait_for(fired, GENEROUS)
        assert at >= target, f"alarm with delay {delay} went off {target - at:.6f}s early"


async def test_a_cancelled_alarm_never_runs_and_leaves_no_fd_open() -> None:
    clock = SystemClock()
    before = _open_fds()
    ran: list[str] = []
    near = clock.call_later(0.002, lambda: ran.append("near"))  # on a timerfd at once
    far = clock.call_later(0.05, lambda: ran.append("far"))  # still on the loop's timer
    assert _open_fds() == before + 1
    near.cancel()
    far.cancel()
    assert _open_fds() == before
    await asyncio.sleep(0.1)
    assert ran == []
    assert _open_fds() == before


async def test_a_fired_alarm_closes_its_timerfd() -> None:
    clock = SystemClock()
    before = _open_fds()
    done = asyncio.Event()
    clock.call_later(0.001, done.set)
    await asyncio.wait_for(done.wait(), GENEROUS)
    assert _open_fds() == before


async def test_without_a_timerfd_alarms_fall_back_to_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_clock, "timerfd_create", lambda: -1)
    clock = SystemClock()
    done = asyncio.Event()
    clock.call_later(0.002, done.set)
    await asyncio.wait_for(done.wait(), GENEROUS)


def test_a_timerfd_armed_in_the_past_is_readable_at_once() -> None:
    fd = timerfd_create()
    assert fd >= 0
    try:
        assert select.select([fd], [], [], 0)[0] == []
        timerfd_arm_at(fd, time.monotonic() - 1.0)
        assert select.select([fd], [], [], GENEROUS)[0] == [fd]
    finally:
        os.close(fd)


def test_a_timerfd_is_not_readable_before_its_time() -> None:
    fd = timerfd_create()
    try:
        when = time.monotonic() + 0.02
        timerfd_arm_at(fd, when)
        assert select.select([fd], [], [], GENEROUS)[0] == [fd]
        assert time.monotonic() >= when
    finally:
        os.close(fd)


@pytest.mark.slow
async def test_a_mock_clock_does_not_drive_a_spawned_workers_deadline() -> None:
    """Issue 23, item 8, documented (MockClock's docstring, the README): a spawned worker
    stamps its deadline with its CLOCK_MONOTONIC, so on a mock clock it lands the machine's
    uptime ahead, and advancing the mock clock by the block's `after` expires nothing."""
    clock, reaper = MockClock(), RecordingReaper()
    code = (
        "import time, aiotimer\nwith aiotimer.expires(after=1, scope='step'):\n    time.sleep(60)"
    )
    async with TimerServer(clock=clock, reaper=reaper) as server:
        worker = await server.spawn(sys.executable, "-c", code)
        deadline = time.monotonic() + GENEROUS * 6
        while server.statistics().active_timers == 0:
            assert time.monotonic() < deadline, "the worker's timer never arrived"
            await asyncio.sleep(0.01)
        due_in = server.statistics().next_deadline_in
        assert due_in == pytest.approx(time.monotonic() + 1 - clock.now(), abs=GENEROUS)
        await clock.advance(1.0)
        assert reaper.expiries == []
        worker.kill()
        await asyncio.wait_for(worker.wait(), GENEROUS * 6)
