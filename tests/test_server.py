"""TimerServer scheduling on a mock clock: exact, instant and deterministic."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from typing import Literal

import pytest

from aiotimer import Expiry, SignalReaper, TimerServer
from aiotimer.testing import MockClock, RecordingReaper, settle

ME = os.getpid()


async def test_timer_fires_at_its_deadline_and_never_before(
    timer_server: TimerServer, mock_clock: MockClock, recording_reaper: RecordingReaper
) -> None:
    channel = timer_server.local_channel()
    channel.acquire(ME, "step", 10.0)
    await mock_clock.advance(9.999)
    assert recording_reaper.expiries == []
    await mock_clock.advance(0.001)
    assert recording_reaper.scopes == [["step"]]
    (expired,) = recording_reaper.expiries[0].timers
    assert expired.deadline == 10.0 and expired.lag == 0.0
    assert recording_reaper.expiries[0].pid == ME


async def test_release_disarms_and_reacquire_replaces(
    timer_server: TimerServer, mock_clock: MockClock, recording_reaper: RecordingReaper
) -> None:
    channel = timer_server.local_channel()
    channel.acquire(ME, "released", 1.0)
    channel.release(ME, "released")
    channel.acquire(ME, "extended", 2.0)
    channel.acquire(ME, "extended", 8.0)
    channel.release(ME, "never-acquired")  # harmless, as in torch
    await mock_clock.advance(7.9)
    assert recording_reaper.expiries == []
    await mock_clock.advance(0.1)
    assert recording_reaper.scopes == [["extended"]]


async def test_wall_clock_deadlines_are_converted_once_on_receipt(
    timer_server: TimerServer, mock_clock: MockClock, recording_reaper: RecordingReaper
) -> None:
    channel = timer_server.local_channel()
    await mock_clock.advance(50.0)
    channel.acquire(ME, "torch-style", mock_clock.wall() + 3.0, wall=True)
    assert timer_server.statistics().next_deadline_in == pytest.approx(3.0)
    # Converted on receipt: a later wall-clock step does not move the deadline.
    mock_clock.wall_offset += 1000.0
    await mock_clock.advance(2.999)
    assert recording_reaper.expiries == []
    await mock_clock.advance(0.001)
    assert recording_reaper.scopes == [["torch-style"]]


async def test_one_reaper_call_per_process_with_all_its_expired_scopes(
    timer_server: TimerServer,
    mock_clock: MockClock,
    recording_reaper: RecordingReaper,
    sleeper: Callable[[], subprocess.Popen[bytes]],
) -> None:
    other = sleeper()
    channel = timer_server.local_channel(pids=[ME, other.pid])
    channel.acquire(ME, "a", 1.0)
    channel.acquire(ME, "b", 2.0)
    channel.acquire(ME, "not yet", 50.0)
    channel.acquire(other.pid, "c", 1.5)
    await mock_clock.advance(2.0)
    assert [(e.pid, [t.scope for t in e.timers]) for e in recording_reaper.expiries] == [
        (ME, ["a", "b"]),
        (other.pid, ["c"]),
    ]
    # The recording reaper signalled nothing: the other timer stays armed.
    assert timer_server.statistics().active_timers == 1


async def test_requested_signal_zero_only_logs(
    timer_server: TimerServer, mock_clock: MockClock, recording_reaper: RecordingReaper
) -> None:
    channel = timer_server.local_channel()
    channel.acquire(ME, "log only", 1.0, signal=0)
    await mock_clock.advance(1.0)
    assert recording_reaper.expiries == []
    assert timer_server.statistics().expiries == 1


async def test_process_exit_clears_its_timers(
    timer_server: TimerServer,
    mock_clock: MockClock,
    recording_reaper: RecordingReaper,
    sleeper: Callable[[], subprocess.Popen[bytes]],
) -> None:
    proc = sleeper()
    timer_server.local_channel(pids=[proc.pid]).acquire(proc.pid, "s", 5.0)
    assert timer_server.statistics().active_timers == 1
    proc.kill()
    for _ in range(500):
        if timer_server.statistics().active_timers == 0:
            break
        await asyncio.sleep(0.01)
    assert timer_server.statistics().active_timers == 0
    await mock_clock.advance(10.0)
    assert recording_reaper.expiries == []


async def test_requests_naming_foreign_processes_are_refused_and_others_kept(
    timer_server: TimerServer, mock_clock: MockClock, recording_reaper: RecordingReaper
) -> None:
    channel = timer_server.local_channel()
    channel.acquire(1, "init", 1.0)  # pid 1 does not descend from the server
    channel.acquire(2**22 + 7, "no such pid", 1.0)
    channel.acquire(ME, "mine", 1.0)
    stats = timer_server.statistics()
    assert stats.rejected == 2 and stats.active_timers == 1
    await mock_clock.advance(1.0)
    assert recording_reaper.scopes == [["mine"]]


async def test_events_use_torch_names(
    mock_clock: MockClock, sleeper: Callable[[], subprocess.Popen[bytes]]
) -> None:
    events: list[tuple[str, Mapping[str, object]]] = []
    proc = sleeper()
    async with TimerServer(
        clock=mock_clock,
        reaper=SignalReaper(signal.SIGKILL),
        log_event=lambda n, i: events.append((n, i)),
    ) as server:
        server.local_channel(pids=[proc.pid]).acquire(proc.pid, "s", 1.0)
        await mock_clock.advance(1.0)
        stats = server.statistics()
    names = [n for n, _ in events]
    assert names == ["watchdog started", "timer expired", "kill worker process", "watchdog stopped"]
    assert events[1][1]["scope"] == "s" and events[2][1]["signal"] == signal.SIGKILL
    assert stats.kills == 1 and stats.expiries == 1 and stats.decision_lag_max == 0.0
    assert proc.wait(timeout=30) == -signal.SIGKILL


async def test_a_failing_log_event_hook_does_not_break_the_server(mock_clock: MockClock) -> None:
    def hook(name: str, info: Mapping[str, object]) -> None:
        raise ValueError("hook broke")

    reaper = RecordingReaper()
    async with TimerServer(clock=mock_clock, reaper=reaper, log_event=hook) as server:
        server.local_channel().acquire(ME, "s", 1.0)
        await mock_clock.advance(1.0)
    assert reaper.scopes == [["s"]]


async def test_lifecycle_and_repr(mock_clock: MockClock) -> None:
    server = TimerServer(clock=mock_clock)
    assert "created" in repr(server)
    await server.start()
    assert server.running and "running" in repr(server)
    with pytest.raises(RuntimeError, match="cannot start a TimerServer that is running"):
        await server.start()
    await server.aclose()
    await server.aclose()  # idempotent
    assert "closed" in repr(server)
    with pytest.raises(RuntimeError, match="not running"):
        await server.spawn("true")


async def test_serve_forever_returns_when_closed(mock_clock: MockClock) -> None:
    server = TimerServer(clock=mock_clock)
    task = asyncio.create_task(server.serve_forever())
    await settle()
    assert server.running
    await server.aclose()
    await asyncio.wait_for(task, 5)


def test_bad_arguments_name_the_parameter_and_value() -> None:
    with pytest.raises(TypeError, match="`reaper` must be callable, got 5"):
        TimerServer(reaper=5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`reap_attempts` must be an int >= 1, got 0"):
        TimerServer(reap_attempts=0)
    with pytest.raises(ValueError, match="`dump_signal` must name a signal, got 'NOPE'"):
        TimerServer(dump_signal="NOPE")
    with pytest.raises(ValueError, match="`grace` must be a finite number of seconds >= 0, got -1"):
        SignalReaper(grace=-1)
    with pytest.raises(TypeError, match="`clock` must implement"):
        TimerServer(clock=object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`realtime` must be True, False or 'auto', got 'yes'"):
        TimerServer(realtime="yes")  # type: ignore[arg-type]


async def test_the_server_wakes_just_before_a_deadline_to_warm_up_and_never_acts_early(
    timer_server: TimerServer, mock_clock: MockClock, recording_reaper: RecordingReaper
) -> None:
    timer_server.local_channel().acquire(ME, "step", 10.0)
    await mock_clock.advance(9.998)  # the warm-up alarm: touches what expiring will need
    assert timer_server.statistics().wakeups == 1
    assert recording_reaper.expiries == []
    await mock_clock.advance(0.001)
    assert recording_reaper.expiries == []
    await mock_clock.advance(0.0011)  # (9.998 + 0.001 + 0.001 falls short of 10 in floats)
    assert recording_reaper.scopes == [["step"]]
    assert timer_server.statistics().wakeups == 2


# -- realtime: the loop's thread on SCHED_RR while serving -----------------------------


def _policy() -> int:
    return os.sched_getscheduler(0) & ~os.SCHED_RESET_ON_FORK


@pytest.mark.slow
async def test_realtime_boosts_the_loop_thread_only_near_a_deadline_and_nothing_it_starts(
    mock_clock: MockClock,
    recording_reaper: RecordingReaper,
    realtime_permitted: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if not realtime_permitted:
        pytest.skip("SCHED_RR is not permitted here")
    # Forking a worker from the boosted thread runs longer than the kernel bound
    # (RLIMIT_RTTIME, 5 ms) without blocking: widen it, this test is about policy.
    monkeypatch.setattr("aiotimer._priority.RTTIME", 500_000)
    before = (_policy(), os.getpriority(os.PRIO_PROCESS, 0))
    async with TimerServer(clock=mock_clock, reaper=recording_reaper, realtime=True) as server:
        assert server.realtime and _policy() == before[0]
        channel = server.local_channel()
        channel.acquire(ME, "step", 10.0)
        await mock_clock.advance(9.89)
        assert _policy() == before[0]  # far from the deadline: the thread's own priority
        await mock_clock.advance(0.02)
        assert _policy() == os.SCHED_RR  # within LEAD (0.1 s) of it: boosted
        # Threads and processes started from the boosted thread run as normal tasks.
        assert await asyncio.to_thread(_policy) == os.SCHED_OTHER
        worker = await server.spawn(
            sys.executable,
            "-c",
            "import os; print(os.sched_getscheduler(0))",
            stdout=asyncio.subprocess.PIPE,
        )
        assert worker.stdout is not None
        assert int(await worker.stdout.readline()) == os.SCHED_OTHER
        await worker.wait()
        await mock_clock.advance(0.1)
        assert recording_reaper.scopes == [["step"]]
        assert _policy() == before[0]  # dealt with, nothing else near: back
        channel.acquire(ME, "again", mock_clock.now() + 0.05)
        assert _policy() == os.SCHED_RR  # armed within LEAD: boosted at once
    assert (_policy(), os.getpriority(os.PRIO_PROCESS, 0)) == before  # closing restores it


@pytest.mark.slow
async def test_realtime_lasts_until_a_reaper_that_waits_first_has_sent_its_signal(
    mock_clock: MockClock, realtime_permitted: bool
) -> None:
    if not realtime_permitted:
        pytest.skip("SCHED_RR is not permitted here")
    policies: list[int] = []

    async def capture_then_kill(expiry: Expiry) -> None:
        await asyncio.sleep(0.05)  # stacks being captured (real time: the boost's own clock)
        policies.append(_policy())  # when the kill would be sent

    async with TimerServer(clock=mock_clock, reaper=capture_then_kill, realtime=True) as server:
        server.local_channel().acquire(ME, "step", 1.0)
        await mock_clock.advance(1.0)
        for _ in range(100):
            if policies:
                break
            await asyncio.sleep(0.01)
        await settle()
        assert policies == [os.SCHED_RR]
        assert _policy() == os.SCHED_OTHER  # the reaper is done: back


@pytest.mark.parametrize(("realtime", "level"), [(True, "WARNING"), ("auto", "INFO")])
async def test_realtime_not_permitted_is_said_and_serves_at_normal_priority(
    mock_clock: MockClock,
    recording_reaper: RecordingReaper,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    realtime: bool | Literal["auto"],
    level: str,
) -> None:
    def refused() -> tuple[int, int] | None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr("aiotimer._priority.enter_realtime", refused)
    caplog.set_level("INFO", logger="aiotimer")
    before = _policy()
    async with TimerServer(clock=mock_clock, reaper=recording_reaper, realtime=realtime) as server:
        assert not server.realtime
        server.local_channel().acquire(ME, "step", 1.0)
        await mock_clock.advance(0.95)
        assert _policy() == before
        await mock_clock.advance(0.05)
        assert recording_reaper.scopes == [["step"]]
    (record,) = [r for r in caplog.records if "not permitted" in r.getMessage()]
    assert record.levelname == level and "CAP_SYS_NICE" in record.getMessage()


def test_without_an_asyncio_loop_start_says_it_needs_one() -> None:
    """Under anyio's trio backend (or any non-asyncio runner) no asyncio loop is running."""
    from aiotimer import TimerServer

    coro = TimerServer().start()
    with pytest.raises(RuntimeError, match="TimerServer needs an asyncio event loop"):
        coro.send(None)
