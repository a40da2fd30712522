"""RealtimeBoost: when the loop's thread is real-time, on a mock clock with a stand-in CPU clock."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from aiotimer import _priority
from aiotimer._priority import BUDGET, COOLDOWN, PERIOD, RealtimeBoost
from aiotimer.testing import MockClock


class Policy:
    """Stands in for the thread's scheduling policy: records every switch."""

    def __init__(self, *, already: bool = False, refuse: bool = False) -> None:
        self.realtime = already
        self.refuse = refuse
        self.switches: list[str] = []

    def enter(self) -> tuple[int, int] | None:
        if self.refuse:
            raise PermissionError(1, "Operation not permitted")
        if self.realtime:
            return None
        self.realtime = True
        self.switches.append("rr")
        return (os.SCHED_OTHER, 0)

    def restore(self, previous: tuple[int, int]) -> None:
        self.realtime = False
        self.switches.append("other")


def ours(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """aiotimer's records: asyncio's debug mode logs a slow callback (a preempted one too)."""
    return [r for r in caplog.records if r.name == "aiotimer"]


@pytest.fixture
def make(
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Callable[..., tuple[RealtimeBoost, Policy, MockClock, list[float]]]]:
    built: list[RealtimeBoost] = []

    def build(**policy: bool) -> tuple[RealtimeBoost, Policy, MockClock, list[float]]:
        fake = Policy(**policy)
        monkeypatch.setattr(_priority, "enter_realtime", fake.enter)
        monkeypatch.setattr(_priority, "restore_scheduling", fake.restore)
        clock = MockClock()
        cpu = [0.0]
        boost = RealtimeBoost(clock, cpu_time=lambda: cpu[0])
        built.append(boost)
        return boost, fake, clock, cpu

    yield build
    for boost in built:  # puts back the process's RLIMIT_RTTIME and SIGXCPU handler
        boost.close()


async def test_boosted_while_a_deadline_is_near_or_a_reaper_still_has_a_signal_to_send(
    make: Callable[..., tuple[RealtimeBoost, Policy, MockClock, list[float]]],
) -> None:
    boost, policy, _, _ = make()
    assert boost.check() and policy.switches == ["rr", "other"]  # tried once, put back
    policy.switches.clear()
    boost.near(True)
    boost.following_up(True)  # stacks being captured before the kill
    boost.near(False)  # the deadline was dealt with: the kill is still to come
    assert policy.realtime and policy.switches == ["rr"]
    boost.following_up(False)
    assert not policy.realtime and policy.switches == ["rr", "other"]
    boost.near(True)
    boost.close()
    assert not policy.realtime and not boost.active
    boost.near(True)  # closed: nothing more
    assert not policy.realtime


async def test_a_boosted_thread_that_uses_too_much_cpu_gives_the_boost_up_for_a_while(
    make: Callable[..., tuple[RealtimeBoost, Policy, MockClock, list[float]]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    boost, policy, clock, cpu = make()
    boost.check()
    boost.near(True)
    cpu[0] += BUDGET * PERIOD * 0.9  # busy, within the budget: kept
    await clock.advance(PERIOD)
    assert policy.realtime
    cpu[0] += BUDGET * PERIOD * 1.5  # a flood while a deadline is kept near
    await clock.advance(PERIOD)
    assert not policy.realtime
    assert [r.levelname for r in ours(caplog)] == ["WARNING"]
    await clock.advance(COOLDOWN)  # still near: boosted again
    assert policy.realtime
    cpu[0] += PERIOD  # and again: given up, said at debug level only (a minute apart)
    await clock.advance(PERIOD)
    assert not policy.realtime
    assert [r.levelname for r in ours(caplog) if r.levelname != "DEBUG"] == ["WARNING"]
    boost.near(False)
    await clock.advance(COOLDOWN)
    assert not policy.realtime  # nothing near when the cooldown ended


async def test_a_thread_already_real_time_is_left_alone_and_a_later_refusal_is_said_once(
    make: Callable[..., tuple[RealtimeBoost, Policy, MockClock, list[float]]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    boost, policy, _, _ = make(already=True)
    assert boost.check() and boost.already and not boost.permitted
    boost.near(True)
    boost.near(False)
    assert policy.realtime and policy.switches == []

    boost, policy, _, _ = make()
    boost.check()
    policy.refuse = True  # a limit lowered after start, say
    boost.near(True)
    boost.near(False)
    boost.near(True)
    assert not policy.realtime and not boost.permitted
    assert [r.getMessage() for r in ours(caplog)] == [
        "real-time priority was refused; serving at normal priority"
    ]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_restoring_keeps_reset_on_fork_where_clearing_it_is_refused() -> None:
    # Without CAP_SYS_NICE a thread may set SCHED_RESET_ON_FORK but not clear it (a
    # thread made real-time through RLIMIT_RTPRIO is in that state when it goes back).
    code = (
        "import os\n"
        "from aiotimer._linux import restore_scheduling\n"
        "os.sched_setscheduler(0, os.SCHED_OTHER | os.SCHED_RESET_ON_FORK, os.sched_param(0))\n"
        "restore_scheduling((os.SCHED_OTHER, 0))\n"
        "print(os.sched_getscheduler(0) == os.SCHED_OTHER | os.SCHED_RESET_ON_FORK)\n"
    )
    no_nice = ["setpriv", "--bounding-set=-sys_nice", "--inh-caps=-sys_nice", "--"]
    result = subprocess.run(
        [*no_nice, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"


@pytest.mark.slow
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_the_kernel_drops_a_boost_that_runs_on_without_blocking(
    realtime_permitted: bool, loop: str
) -> None:
    """A boosted thread that never blocks is stopped by RLIMIT_RTTIME within a few ms,
    not at the next budget check (a sleeper on its CPU once woke 250 ms late).

    In a process of its own, as ``aiotimer run`` has: the bound is process-wide state.
    """
    if not realtime_permitted:
        pytest.skip("SCHED_RR is not permitted here")
    code = """
import asyncio, logging, os, resource, signal, sys, time
from aiotimer import TimerServer
logging.basicConfig(level=logging.WARNING)
from aiotimer._loops import available_loops
from aiotimer._priority import RTTIME

def rr():
    return os.sched_getscheduler(0) & ~os.SCHED_RESET_ON_FORK == os.SCHED_RR

async def main():
    before = resource.getrlimit(resource.RLIMIT_RTTIME)
    async with TimerServer(realtime=True) as server:
        assert resource.getrlimit(resource.RLIMIT_RTTIME)[0] == RTTIME
        server.local_channel().acquire(os.getpid(), "nearer", server.clock.now() + 0.05)
        assert rr()
        start = time.thread_time()
        while rr() and time.thread_time() - start < 1.0:
            pass
        spun = time.thread_time() - start
        server.local_channel().release(os.getpid(), "nearer")
        await asyncio.sleep(0.01)
    assert resource.getrlimit(resource.RLIMIT_RTTIME) == before
    assert signal.getsignal(signal.SIGXCPU) == signal.SIG_DFL
    print(spun)

asyncio.Runner(loop_factory=available_loops()[sys.argv[1]]).run(main())
"""
    result = subprocess.run(
        [sys.executable, "-c", code, loop], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    spun = float(result.stdout.strip())
    # The soft limit (5 ms) and a scheduler tick or two, not a budget period (0.25 s).
    assert spun < 0.05, f"still real-time after {spun * 1e3:.0f} ms of CPU"
    assert "back to normal priority" in result.stderr or "ran 5 ms on end" in result.stderr
