"""The guard: a thread that SIGKILLs due processes itself when the watchdog's loop is blocked."""

from __future__ import annotations

import asyncio
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from aiotimer import TimerServer
from aiotimer._events import Counters
from aiotimer._guard import Guard, _sigkill
from aiotimer._heap import DeadlineHeap
from aiotimer.testing import MockClock

GUARD_AFTER = 1.0
# Generous: two shared cores, a thread to schedule, a ping to wait out (0.5 s).
MARGIN = 4.0

HANG = "import aiotimer, time\nwith aiotimer.expires(after=0.3):\n    time.sleep(600)\n"


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


def wait_exited(pidfd: int, timeout: float) -> bool:
    """Block (the loop too, if called on it) until the process behind ``pidfd`` exits."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(int(timeout * 1000)))


def guard_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "aiotimer-guard"]


# -- with a server, real processes and a really blocked loop ---------------------


async def test_a_blocked_loop_does_not_leave_a_hang_unkilled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="aiotimer")
    async with TimerServer(guard_after=GUARD_AFTER) as server:
        metrics = server.serve_metrics(health_threshold=0.2)
        health = f"http://127.0.0.1:{metrics.port}/healthz"
        worker = await server.spawn(sys.executable, "-c", HANG)
        pidfd = os.pidfd_open(worker.pid)
        try:
            until = time.monotonic() + 30
            while (left := server.statistics().next_deadline_in) is None:
                assert time.monotonic() < until, "the worker never armed its timer"
                await asyncio.sleep(0.01)
            deadline = time.monotonic() + left
            # Block the loop on purpose, as a bug of ours would: no alarm can go off now.
            killed = wait_exited(pidfd, timeout=0.3 + GUARD_AFTER + MARGIN)
            killed_at = time.monotonic()
            blocked = get(health)  # still blocked: the guard's line comes with the 503
        finally:
            os.close(pidfd)
        assert killed, "the guard did not kill the worker"
        assert deadline + GUARD_AFTER <= killed_at < deadline + GUARD_AFTER + MARGIN
        await asyncio.wait_for(worker.wait(), 10)
        assert worker.returncode == -signal.SIGKILL
        assert server.statistics().guard_kills == 1
        status, text = await asyncio.to_thread(get, health)
        _, scraped = await asyncio.to_thread(get, metrics.url)
    assert blocked[0] == 503
    lines = blocked[1].splitlines()
    assert lines[0] == "the watchdog's loop has been blocked for over 0.2s"
    assert lines[1].startswith("the guard killed 1 process because the loop did not answer for ")
    # The loop answers again: healthy, and what the guard did is still said.
    assert status == 200 and text.splitlines() == ["ok", lines[1]]
    assert "aiotimer_guard_kills_total 1.0" in scraped.splitlines()
    said = [r for r in caplog.records if r.name == "aiotimer" and "guard" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.ERROR
    assert said[0].getMessage().endswith(f"the guard SIGKILLed 1 process itself: pid {worker.pid}")
    assert "\n" not in said[0].getMessage()


async def test_the_guard_runs_only_while_the_server_does_and_only_on_the_system_clock() -> None:
    before = len(guard_threads())
    async with TimerServer():
        assert len(guard_threads()) == before + 1
    assert len(guard_threads()) == before
    async with TimerServer(guard_after=None):
        assert len(guard_threads()) == before
    async with TimerServer(clock=MockClock()):
        assert len(guard_threads()) == before


def test_guard_after_is_checked_naming_the_parameter_and_value() -> None:
    with pytest.raises(
        ValueError, match="`guard_after` must be a finite number of seconds > 0, got 0"
    ):
        TimerServer(guard_after=0)
    with pytest.raises(TypeError, match="`guard_after` must be a number of seconds, got '5'"):
        TimerServer(guard_after="5")  # type: ignore[arg-type]


# -- the decision, on an injected time line: no thread, check() called directly ---------


@dataclass
class FakeProcess:
    pid: int
    pidfd: int
    exited: bool = False


@pytest.fixture
def stopped_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A loop that never runs: it never answers the guard's ping, as a blocked one."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture
def running_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A loop running on a thread of its own: it answers the guard's ping."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()


Start = Callable[[], subprocess.Popen[bytes]]


def watched(procs: dict[int, FakeProcess], owner: int, proc: subprocess.Popen[bytes]) -> None:
    procs[owner] = FakeProcess(proc.pid, os.pidfd_open(proc.pid))


def close_all(procs: dict[int, FakeProcess]) -> None:
    for process in procs.values():
        os.close(process.pidfd)


def test_before_a_deadline_is_after_past_the_guard_sleeps_until_then_and_kills_nothing(
    sleeper: Start, stopped_loop: asyncio.AbstractEventLoop
) -> None:
    heap, procs, counters = DeadlineHeap(), dict[int, FakeProcess](), Counters()
    proc = sleeper()
    watched(procs, 1, proc)
    heap.set(1, "a", 10.0)
    guard = Guard(heap, procs, counters, after=5.0, period=1.0, answer_within=0.05)
    guard.bind(stopped_loop)
    try:
        assert guard.check(now=2.0) == 1.0  # nothing near: the period
        assert guard.check(now=10.0) == 1.0  # due, 5 s to go: a period first
        assert guard.check(now=14.5) == pytest.approx(0.5)  # then exactly until 10 + 5
        assert proc.poll() is None and counters.guard_kills == 0
    finally:
        close_all(procs)


def test_a_loop_that_answers_is_left_to_act_itself(
    sleeper: Start, running_loop: asyncio.AbstractEventLoop
) -> None:
    heap, procs, counters = DeadlineHeap(), dict[int, FakeProcess](), Counters()
    proc = sleeper()
    watched(procs, 1, proc)
    heap.set(1, "a", 10.0)
    guard = Guard(heap, procs, counters, after=5.0, period=1.0, answer_within=5.0)
    guard.bind(running_loop)
    try:
        assert guard.check(now=15.1) == 1.0
        assert proc.poll() is None and counters.guard_kills == 0
    finally:
        close_all(procs)


def test_a_blocked_loop_s_due_processes_are_killed_once_each_and_said_why(
    sleeper: Start, stopped_loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="aiotimer")
    heap, procs, counters = DeadlineHeap(), dict[int, FakeProcess](), Counters()
    hung, later, report_only, exited, seen_exited = (sleeper() for _ in range(5))
    for owner, proc in enumerate((hung, later, report_only, exited, seen_exited), start=1):
        watched(procs, owner, proc)
    procs[6] = FakeProcess(os.getpid(), -1)  # this process: never killed, even with a timer
    heap.set(1, "hung", 10.0)
    heap.set(1, "hung too", 9.5)
    heap.set(2, "later", 14.0)
    heap.set(3, "report only", 9.0, signal=-1)  # asked for no signal: the guard sends none
    heap.set(4, "exited", 9.0)
    heap.set(5, "seen exited", 9.0)
    heap.set(6, "me", 9.0)
    exited.kill()
    exited.wait()  # gone, its pidfd still open: not counted as a kill
    procs[5].exited = True  # the loop saw it exit: skipped
    guard = Guard(heap, procs, counters, after=5.0, period=1.0, answer_within=0.05)
    guard.bind(stopped_loop)
    try:
        assert guard.check(now=15.1) == 1.0
        assert hung.wait(timeout=10) == -signal.SIGKILL
        assert later.poll() is None and report_only.poll() is None and seen_exited.poll() is None
        assert counters.guard_kills == guard.kills == 1
        assert counters.guard_blocked_for == pytest.approx(15.1 - 9.5)

        def said() -> list[str]:
            return [r.getMessage() for r in caplog.records if r.name == "aiotimer"]

        assert said() == [
            "the watchdog's loop did not answer for 5.6s with deadlines due; "
            f"the guard SIGKILLed 1 process itself: pid {hung.pid}"
        ]
        # Still blocked a round later: nothing is killed twice, nothing more is said.
        guard.check(now=16.0)
        assert counters.guard_kills == 1 and len(said()) == 1
        # Its deadline 5 s past too, the next one goes.
        guard.check(now=19.1)
        assert later.wait(timeout=10) == -signal.SIGKILL
        assert counters.guard_kills == 2 and report_only.poll() is None
    finally:
        close_all({k: p for k, p in procs.items() if p.pidfd >= 0})


def test_a_closed_loop_answers_no_more(
    sleeper: Start, stopped_loop: asyncio.AbstractEventLoop
) -> None:
    heap, procs, counters = DeadlineHeap(), dict[int, FakeProcess](), Counters()
    proc = sleeper()
    watched(procs, 1, proc)
    heap.set(1, "a", 10.0)
    stopped_loop.close()
    guard = Guard(heap, procs, counters, after=5.0, period=1.0, answer_within=5.0)
    guard.bind(stopped_loop)
    try:
        guard.check(now=15.1)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        close_all(procs)


class ClosedUnderTheGuard:
    """A process the loop sees exit (and closes the pidfd of) just after the guard reads it."""

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.reads = 0

    @property
    def exited(self) -> bool:
        self.reads += 1
        return self.reads > 1


def test_a_pidfd_closed_under_the_guard_is_never_signalled_by_its_reused_number(
    sleeper: Start,
) -> None:
    victim, bystander = sleeper(), sleeper()
    number = os.pidfd_open(victim.pid)
    process = ClosedUnderTheGuard(victim.pid, number)
    # The guard reads the number; then the loop sees the victim exit and closes its
    # pidfd, and the number comes back as another process's pidfd.  The guard checks
    # ``exited`` again once it holds its own copy, so it signals neither.
    os.close(number)
    reused = os.pidfd_open(bystander.pid)
    try:
        assert reused == number
        assert _sigkill(process) is False
        assert process.reads == 2
        assert bystander.poll() is None and victim.poll() is None
    finally:
        os.close(reused)
