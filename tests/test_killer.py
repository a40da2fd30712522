"""Killer: the expiry burst, reaper follow-ups, retries and escalation, on a mock clock."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import pytest
import pytest_asyncio

from aiotimer import DeadlineHeap, Expiry, KillWorkerProcess, SignalReaper
from aiotimer._events import Counters, Event, EventBus
from aiotimer._expiry import Reaper
from aiotimer._killer import CHUNK, Killer, backoff
from aiotimer._processes import ProcessRegistry, WatchedProcess
from aiotimer.testing import MockClock, RecordingReaper, settle

WAIT = 60.0


@dataclass
class Rig:
    """A killer wired to a heap, a registry and a mock clock, as the server wires them."""

    clock: MockClock
    heap: DeadlineHeap
    registry: ProcessRegistry
    killer: Killer
    counters: Counters
    events: list[Event]

    def watch(self, pid: int) -> WatchedProcess:
        return self.registry.watch(pid)

    def arm(self, process: WatchedProcess, scope: str, deadline: float, signal: int = 0) -> None:
        self.heap.set(process.id, scope, deadline, signal=signal)

    async def expire_at(self, now: float) -> None:
        self.clock.jump(now - self.clock.now())
        self.killer.expire(now)
        await settle()


@pytest_asyncio.fixture
async def rig_factory() -> AsyncIterator[Callable[[Reaper], Rig]]:
    made: list[Rig] = []

    def make(reaper: Reaper, attempts: int = 5) -> Rig:
        clock = MockClock()
        heap = DeadlineHeap()
        counters = Counters()
        bus = EventBus()
        seen: list[Event] = []
        bus.subscribe(seen.append)

        def forget(process: WatchedProcess) -> None:
            heap.drop_owner(process.id)

        registry = ProcessRegistry(forget)
        registry.bind(asyncio.get_running_loop())
        killer = Killer(heap, registry, clock, counters, bus, reaper=reaper, attempts=attempts)
        killer.bind(asyncio.get_running_loop())
        rig = Rig(clock, heap, registry, killer, counters, seen)
        made.append(rig)
        return rig

    yield make
    for rig in made:
        await rig.killer.aclose()
        rig.registry.close()


def test_backoff_doubles_up_to_its_cap() -> None:
    delays = backoff(0.05, 2.0, 0.3)
    assert [next(delays) for _ in range(5)] == [0.05, 0.1, 0.2, 0.3, 0.3]


async def test_one_reaper_call_per_process_with_all_its_expired_scopes(
    rig_factory: Callable[..., Rig], sleeper: Callable[[], subprocess.Popen[bytes]]
) -> None:
    reaper = RecordingReaper()
    rig = rig_factory(reaper)
    a, b = rig.watch(sleeper().pid), rig.watch(sleeper().pid)
    rig.arm(a, "a1", 1.0)
    rig.arm(a, "a2", 2.0)
    rig.arm(a, "not yet", 50.0)
    rig.arm(b, "b1", 1.5)
    await rig.expire_at(2.0)
    assert [(e.pid, [t.scope for t in e.timers]) for e in reaper.expiries] == [
        (a.pid, ["a1", "a2"]),
        (b.pid, ["b1"]),
    ]
    assert [t.lag for t in reaper.expiries[0].timers] == [1.0, 0.0]
    assert rig.counters.expiries == 3
    assert [e.name for e in rig.events] == ["timer expired"] * 3


@pytest.mark.parametrize("app_collects", [True, False])
async def test_no_garbage_collection_can_run_between_the_signals_of_a_burst(
    rig_factory: Callable[..., Rig],
    sleeper: Callable[[], subprocess.Popen[bytes]],
    app_collects: bool,
) -> None:
    collecting_during: list[bool] = []

    def reaper(expiry: Expiry) -> None:
        collecting_during.append(gc.isenabled())
        gc.collect(0)  # (an explicit collection is the reaper's own business)

    rig = rig_factory(reaper)
    a, b = rig.watch(sleeper().pid), rig.watch(sleeper().pid)
    rig.arm(a, "a", 1.0)
    rig.arm(b, "b", 1.0)
    if not app_collects:
        gc.disable()
    try:
        await rig.expire_at(1.0)
        assert collecting_during == [False, False]
        assert gc.isenabled() is app_collects  # as the application had it
    finally:
        gc.enable()


async def test_a_process_is_signalled_before_all_its_due_timers_are_popped(
    rig_factory: Callable[..., Rig], sleeper: Callable[[], subprocess.Popen[bytes]]
) -> None:
    seen_at_call: list[int] = []

    class Counting(RecordingReaper):
        def __call__(self, expiry: Expiry) -> None:
            seen_at_call.append(len(expiry.timers))
            super().__call__(expiry)

    reaper = Counting()
    rig = rig_factory(reaper)
    p = rig.watch(sleeper().pid)
    for i in range(10 * CHUNK):
        rig.arm(p, f"s{i}", 1.0 + i * 1e-6)
    await rig.expire_at(2.0)
    assert seen_at_call[0] <= CHUNK  # called after its first chunk, not after all of them
    assert len(reaper.expiries[0].timers) == 10 * CHUNK  # ... and the expiry saw them all


async def test_a_failing_reaper_is_retried_with_backoff_on_the_servers_clock(
    rig_factory: Callable[..., Rig],
    sleeper: Callable[[], subprocess.Popen[bytes]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    reaper = RecordingReaper(fail_times=2)
    rig = rig_factory(reaper)
    rig.arm(rig.watch(sleeper().pid), "s", 1.0)
    await rig.expire_at(1.0)
    assert reaper.calls == 1 and reaper.expiries == []
    await rig.clock.advance(0.05)
    assert reaper.calls == 2
    await rig.clock.advance(0.1)
    assert reaper.calls == 3 and reaper.scopes == [["s"]]
    assert rig.counters.reaper_errors == 2
    assert "reaper failure 1 of 2 (on purpose)" in caplog.text


async def test_a_reaper_that_always_fails_ends_in_sigkill(
    rig_factory: Callable[..., Rig],
    sleeper: Callable[[], subprocess.Popen[bytes]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    reaper = RecordingReaper(fail_times=100)
    rig = rig_factory(reaper, attempts=3)
    proc = sleeper()
    p = rig.watch(proc.pid)
    rig.arm(p, "s", 1.0)
    await rig.expire_at(1.0)
    for _ in range(5):
        await rig.clock.advance(5.0)
    assert reaper.calls == 3
    assert f"failed 3 times for pid {p.pid}; sending SIGKILL itself" in caplog.text
    assert await asyncio.to_thread(proc.wait, WAIT) == -signal.SIGKILL  # never left running
    assert not p.reaping


async def test_async_reapers_are_awaited(
    rig_factory: Callable[..., Rig], sleeper: Callable[[], subprocess.Popen[bytes]]
) -> None:
    seen: list[str] = []

    async def reaper(expiry: Expiry) -> None:
        await asyncio.sleep(0)
        seen.extend(t.scope for t in expiry.timers)

    rig = rig_factory(reaper)
    rig.arm(rig.watch(sleeper().pid), "s", 1.0)
    await rig.expire_at(1.0)
    assert seen == ["s"]


@pytest.mark.parametrize(
    ("signals", "expected"),
    [
        ([signal.SIGTERM], signal.SIGTERM),  # a torch client's own signal
        ([0], None),  # a native client: the reaper's choice
        ([-1, signal.SIGUSR1], signal.SIGUSR1),  # the first > 0 in expiry order, as torch
        ([-1, 0], None),
        ([-1, -1], "no call"),  # every timer asked to be reported only
    ],
)
async def test_the_signal_a_client_asked_for(
    rig_factory: Callable[..., Rig],
    sleeper: Callable[[], subprocess.Popen[bytes]],
    signals: list[int],
    expected: object,
) -> None:
    reaper = RecordingReaper()
    rig = rig_factory(reaper)
    p = rig.watch(sleeper().pid)
    for i, sig in enumerate(signals):
        rig.arm(p, f"s{i}", 1.0 + i, signal=sig)
    await rig.expire_at(10.0)
    if expected == "no call":
        assert reaper.expiries == [] and rig.counters.expiries == len(signals)
    else:
        assert [e.requested_signal for e in reaper.expiries] == [expected]


async def test_a_signal_is_timed_when_sent_not_when_the_server_gets_the_cpu_back(
    rig_factory: Callable[..., Rig],
    sleeper: Callable[[], subprocess.Popen[bytes]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # On a busy machine the server is often switched out inside the signal
    # syscall, after the signal is queued: that wait is not the kill's lateness.
    rig = rig_factory(SignalReaper())
    victim = sleeper()
    p = rig.watch(victim.pid)
    send = WatchedProcess.send_signal

    def switched_out(self: WatchedProcess, sig: int, *, group: bool = False) -> None:
        send(self, sig, group=group)
        rig.clock.jump(0.030)

    monkeypatch.setattr(WatchedProcess, "send_signal", switched_out)
    rig.arm(p, "s", 1.0)
    await rig.expire_at(1.0005)
    (kill,) = [e for e in rig.events if isinstance(e, KillWorkerProcess)]
    assert kill.latency == pytest.approx(0.0005)
    assert await asyncio.to_thread(victim.wait, WAIT) == -signal.SIGKILL


@pytest.fixture
def stubborn() -> Iterator[subprocess.Popen[str]]:
    """A process that ignores SIGTERM (and says so once it does)."""
    code = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    proc.stdout.close()


async def test_term_then_grace_then_kill_on_the_mock_clock(
    rig_factory: Callable[..., Rig], stubborn: subprocess.Popen[str]
) -> None:
    rig = rig_factory(SignalReaper(signal.SIGTERM, grace=5.0))
    p = rig.watch(stubborn.pid)
    rig.arm(p, "s", 1.0)
    await rig.expire_at(1.0)
    assert [e.name for e in rig.events] == ["timer expired", "kill worker process"]
    await rig.clock.advance(4.9)  # real time hardly moves: the grace is the server's clock
    await asyncio.sleep(0.05)
    assert stubborn.poll() is None
    await rig.clock.advance(0.1)
    assert await asyncio.to_thread(stubborn.wait, WAIT) == -signal.SIGKILL
    assert rig.counters.kills == 1  # one kill, escalated


async def test_a_burst_prepares_every_victim_before_reaping_any(
    rig_factory: Callable[..., Rig], sleeper: Callable[[], subprocess.Popen[bytes]]
) -> None:
    calls: list[tuple[str, int]] = []
    masks: list[bool] = []

    class Preparing(RecordingReaper):
        def prepare(self, expiry: Expiry) -> None:
            calls.append(("prepare", expiry.pid))

        def __call__(self, expiry: Expiry) -> None:
            calls.append(("reap", expiry.pid))
            masks.append(signal.SIGCHLD in signal.pthread_sigmask(signal.SIG_BLOCK, []))
            super().__call__(expiry)

    rig = rig_factory(Preparing())
    a, b = rig.watch(sleeper().pid), rig.watch(sleeper().pid)
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    rig.arm(a, "s", 1.0)
    rig.arm(b, "s", 1.0)
    await rig.expire_at(1.0)
    rig.arm(a, "t", 2.0)  # a lone expiry needs no preparing
    await rig.expire_at(2.0)
    burst = [("prepare", a.pid), ("prepare", b.pid), ("reap", a.pid), ("reap", b.pid)]
    assert calls == [*burst, ("reap", a.pid)]
    assert masks == [True, True, True]  # SIGCHLD is held back while signals go out ...
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before  # ... and only then


async def test_sigkill_victims_of_a_burst_are_moved_to_sched_batch_first(
    rig_factory: Callable[..., Rig], sleeper: Callable[[], subprocess.Popen[bytes]]
) -> None:
    policies: dict[int, int] = {}

    class Observing(SignalReaper):
        def __call__(self, expiry: Expiry):  # type: ignore[no-untyped-def]
            policies[expiry.pid] = os.sched_getscheduler(expiry.pid)
            return super().__call__(expiry)

    procs = [sleeper(), sleeper()]
    rig = rig_factory(Observing())
    for proc in procs:
        rig.arm(rig.watch(proc.pid), "s", 1.0)
    await rig.expire_at(1.0)
    assert policies == {p.pid: os.SCHED_BATCH for p in procs}
    assert [p.wait(timeout=WAIT) for p in procs] == [-signal.SIGKILL, -signal.SIGKILL]
    kills = [e for e in rig.events if e.name == "kill worker process"]
    assert len(kills) == 2 and rig.events[0].name == "timer expired"


async def test_the_warm_up_pass_is_read_only(
    rig_factory: Callable[..., Rig], sleeper: Callable[[], subprocess.Popen[bytes]]
) -> None:
    reaper = RecordingReaper()
    rig = rig_factory(reaper)
    p = rig.watch(sleeper().pid)
    for i in range(100):
        rig.arm(p, f"s{i}", 1.0)
    rig.killer.warm_up(1.0)
    assert len(rig.heap) == 100 and reaper.expiries == []


async def test_a_killed_process_timers_are_dropped_not_popped(
    rig_factory: Callable[..., Rig], sleeper: Callable[[], subprocess.Popen[bytes]]
) -> None:
    """K processes with 10,000 timers due each once kept a bystander waiting while every
    one of them was popped (~22 ms per process); a kill now drops them in O(1)."""
    from aiotimer._killer import TAKEN_WITH_A_KILL

    rig = rig_factory(SignalReaper())
    hogs = [rig.watch(sleeper().pid) for _ in range(5)]
    bystander = rig.watch(sleeper().pid)
    for hog in hogs:
        for i in range(10_000):
            rig.arm(hog, f"garbage{i}", 1.0 + i * 1e-9)
    rig.arm(bystander, "innocent", 1.002)
    await rig.expire_at(1.001)
    assert rig.counters.kills == len(hogs)
    # Nothing of theirs is left to pop: the bystander's timer is next, and alone.
    assert len(rig.heap) == 1 and rig.heap.next_deadline() == 1.002
    assert rig.heap.garbage <= len(hogs) + 1
    kills = [e for e in rig.events if isinstance(e, KillWorkerProcess)]
    assert all(len(k.scopes) <= CHUNK + TAKEN_WITH_A_KILL for k in kills)
    await rig.expire_at(1.002)
    assert rig.counters.kills == len(hogs) + 1
