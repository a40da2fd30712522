"""TimerServer scheduling on a mock clock: exact, instant and deterministic."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Callable, Mapping

import pytest

from aiotimer import Expiry, Reaper, SignalReaper, TimerServer
from aiotimer.testing import MockClock, RecordingReaper, settle
from aiotimer.transports._local import LocalChannel

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


class EarlyClock(MockClock):
    """A clock whose alarms go off half a second early, as a loop's timer may."""

    def call_later(self, delay: float, callback: Callable[[], None]):  # type: ignore[no-untyped-def]
        return super().call_later(max(0.0, delay - 0.5), callback)


async def test_an_early_wakeup_is_rechecked_against_the_clock() -> None:
    clock = EarlyClock()
    reaper = RecordingReaper()
    async with TimerServer(clock=clock, reaper=reaper) as server:
        server.local_channel().acquire(ME, "step", 10.0)
        await clock.advance(9.5)  # the alarm fires now, half a second early
        assert reaper.expiries == []
        assert server.statistics().wakeups >= 1
        await clock.advance(0.5)
        assert reaper.scopes == [["step"]]
        assert reaper.expiries[0].timers[0].lag >= 0


async def test_an_earlier_deadline_rearms_the_alarm(
    timer_server: TimerServer, mock_clock: MockClock, recording_reaper: RecordingReaper
) -> None:
    channel = timer_server.local_channel()
    channel.acquire(ME, "late", 100.0)
    await settle()
    channel.acquire(ME, "early", 5.0)
    await mock_clock.advance(5.0)
    assert recording_reaper.scopes == [["early"]]


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


async def test_no_wakeups_while_no_deadline_is_due(
    timer_server: TimerServer, mock_clock: MockClock
) -> None:
    await mock_clock.advance(3600.0)
    assert timer_server.statistics().wakeups == 0
    timer_server.local_channel().acquire(ME, "in an hour", mock_clock.now() + 3600.0)
    await mock_clock.advance(3599.0)
    assert timer_server.statistics().wakeups == 0


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
    # The process being reaped loses its other timers too (it is being killed).
    assert timer_server.statistics().active_timers == 0


async def test_a_failing_reaper_is_logged_and_retried_with_backoff(
    mock_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    reaper = RecordingReaper(fail_times=2)
    async with TimerServer(clock=mock_clock, reaper=reaper) as server:
        channel = server.local_channel()
        channel.acquire(ME, "step", 1.0)
        await mock_clock.advance(1.0)
        assert reaper.calls == 1 and reaper.expiries == []
        await mock_clock.advance(0.05)
        assert reaper.calls == 2
        await mock_clock.advance(0.1)
        assert reaper.calls == 3 and reaper.scopes == [["step"]]
        assert server.statistics().reaper_errors == 2
        assert "reaper failure 1 of 2 (on purpose)" in caplog.text
        # The server keeps serving.
        channel.acquire(ME, "next", mock_clock.now() + 1.0)
        await mock_clock.advance(1.0)
        assert reaper.scopes[-1] == ["next"]


async def test_a_reaper_that_always_fails_is_given_up_on(mock_clock: MockClock) -> None:
    reaper = RecordingReaper(fail_times=100)
    async with TimerServer(clock=mock_clock, reaper=reaper, reap_attempts=3) as server:
        server.local_channel().acquire(ME, "step", 1.0)
        await mock_clock.advance(1.0)
        for _ in range(5):
            await mock_clock.advance(5.0)
        assert reaper.calls == 3
        assert server.running


async def test_async_reapers_are_awaited(mock_clock: MockClock) -> None:
    seen: list[str] = []

    async def reaper(expiry: Expiry) -> None:
        await asyncio.sleep(0)
        seen.extend(t.scope for t in expiry.timers)

    async with TimerServer(clock=mock_clock, reaper=reaper) as server:
        server.local_channel().acquire(ME, "s", 1.0)
        await mock_clock.advance(1.0)
    assert seen == ["s"]


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


@contextlib.asynccontextmanager
async def _two_expire_together(
    clock: MockClock, reaper: Reaper, sleeper: Callable[[], subprocess.Popen[bytes]]
) -> AsyncIterator[tuple[LocalChannel, int, int]]:
    """A server whose two processes ``a`` and ``b`` have just expired in one burst."""
    a, b = sleeper().pid, sleeper().pid
    async with TimerServer(clock=clock, reaper=reaper) as server:
        channel = server.local_channel(pids=[a, b])
        channel.acquire(a, "s", 1.0)
        channel.acquire(b, "s", 1.0)
        await clock.advance(1.0)
        yield channel, a, b


async def test_a_burst_prepares_every_process_before_reaping_any(
    mock_clock: MockClock, sleeper: Callable[[], subprocess.Popen[bytes]]
) -> None:
    calls: list[tuple[str, int]] = []

    class Preparing(RecordingReaper):
        def prepare(self, expiry: Expiry) -> None:
            calls.append(("prepare", expiry.pid))

        def __call__(self, expiry: Expiry) -> None:
            calls.append(("reap", expiry.pid))
            super().__call__(expiry)

    async with _two_expire_together(mock_clock, Preparing(), sleeper) as (channel, a, b):
        # A lone expiry needs no preparing.
        channel.acquire(a, "t", 2.0)
        await mock_clock.advance(1.0)
    assert calls == [("prepare", a), ("prepare", b), ("reap", a), ("reap", b), ("reap", a)]


async def test_sigkill_victims_of_a_burst_are_moved_to_sched_batch_first(
    mock_clock: MockClock, sleeper: Callable[[], subprocess.Popen[bytes]]
) -> None:
    policies: dict[int, int] = {}

    class Observing(SignalReaper):
        def __call__(self, expiry: Expiry):  # type: ignore[no-untyped-def]
            policies[expiry.pid] = os.sched_getscheduler(expiry.pid)
            return super().__call__(expiry)

    procs = [sleeper(), sleeper()]
    async with TimerServer(clock=mock_clock, reaper=Observing()) as server:
        channel = server.local_channel(pids=[p.pid for p in procs])
        for p in procs:
            channel.acquire(p.pid, "s", 1.0)
        await mock_clock.advance(1.0)
    assert policies == {p.pid: os.SCHED_BATCH for p in procs}
    assert [p.wait(timeout=30) for p in procs] == [-signal.SIGKILL, -signal.SIGKILL]


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


async def test_an_error_while_expiring_is_logged_and_the_watchdog_keeps_going(
    timer_server: TimerServer,
    mock_clock: MockClock,
    recording_reaper: RecordingReaper,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    claim = timer_server._claim
    failures = [RuntimeError("a bug, on purpose")]

    def failing_once(*args: object) -> object:
        if failures:
            raise failures.pop()
        return claim(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(timer_server, "_claim", failing_once)
    channel = timer_server.local_channel()
    channel.acquire(ME, "lost to the bug", 1.0)
    await mock_clock.advance(1.0)
    assert "handling expired timers failed" in caplog.text
    channel.acquire(ME, "next", 2.0)
    await mock_clock.advance(1.0)
    assert recording_reaper.scopes == [["next"]]


async def test_a_burst_blocks_sigchld_only_while_it_signals(
    mock_clock: MockClock, sleeper: Callable[[], subprocess.Popen[bytes]]
) -> None:
    masks: list[set[signal.Signals]] = []

    class Observing(RecordingReaper):
        def __call__(self, expiry: Expiry) -> None:
            masks.append(signal.pthread_sigmask(signal.SIG_BLOCK, []))
            super().__call__(expiry)

    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    async with _two_expire_together(mock_clock, Observing(), sleeper):
        pass
    assert [signal.SIGCHLD in m for m in masks] == [True, True]
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
