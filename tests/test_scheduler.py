"""Scheduler: one alarm on the earliest deadline, on a mock clock, with plain integer owners."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from helpers import pop_expired

from aiotimer import DeadlineHeap
from aiotimer._events import Counters
from aiotimer._scheduler import WARM_UP, Scheduler
from aiotimer.testing import MockClock, settle


class Recorder:
    """Stands in for the killer: pops what is due and records (time, owners)."""

    def __init__(self, heap: DeadlineHeap) -> None:
        self.heap = heap
        self.due: list[tuple[float, list[int]]] = []
        self.warm: list[float] = []
        self.approach: list[bool] = []

    def on_due(self, now: float) -> None:
        self.due.append((now, [owner for owner, _ in pop_expired(self.heap, now)]))

    def on_warm_up(self, deadline: float) -> None:
        self.warm.append(deadline)


def make(
    clock: MockClock | None = None, *, warm_up: bool = True, approach: float | None = None
) -> tuple[MockClock, DeadlineHeap, Scheduler, Recorder, Counters]:
    clock = clock or MockClock()
    heap = DeadlineHeap()
    recorder = Recorder(heap)
    counters = Counters()
    scheduler = Scheduler(
        clock,
        heap,
        counters,
        on_due=recorder.on_due,
        on_warm_up=recorder.on_warm_up if warm_up else None,
        approach=approach or 0.0,
        on_approach=None if approach is None else recorder.approach.append,
    )
    scheduler.start()
    return clock, heap, scheduler, recorder, counters


def arm(heap: DeadlineHeap, scheduler: Scheduler, owner: int, deadline: float) -> None:
    heap.set(owner, "s", deadline)
    scheduler.deadline_added(deadline)


async def test_acts_at_the_deadline_and_never_before() -> None:
    clock, heap, scheduler, recorder, _ = make(warm_up=False)
    arm(heap, scheduler, 1, 10.0)
    await clock.advance(9.999)
    assert recorder.due == []
    await clock.advance(0.001)
    assert recorder.due == [(10.0, [1])]
    assert scheduler.armed == float("inf")


class EarlyClock(MockClock):
    """A clock whose alarms go off half a second early, as a loop's timer may."""

    def call_later(self, delay: float, callback: Callable[[], None]):  # type: ignore[no-untyped-def]
        return super().call_later(max(0.0, delay - 0.5), callback)


async def test_an_early_alarm_is_rechecked_against_the_clock() -> None:
    clock, heap, scheduler, recorder, counters = make(EarlyClock(), warm_up=False)
    arm(heap, scheduler, 1, 10.0)
    await clock.advance(9.5)  # the alarm goes off now, half a second early
    assert recorder.due == [] and counters.wakeups >= 1
    await clock.advance(0.5)
    assert recorder.due == [(10.0, [1])]


async def test_an_earlier_deadline_resets_the_alarm_and_a_later_one_does_not() -> None:
    clock, heap, scheduler, recorder, _ = make(warm_up=False)
    arm(heap, scheduler, 1, 100.0)
    assert scheduler.armed == 100.0
    arm(heap, scheduler, 2, 5.0)
    assert scheduler.armed == 5.0
    arm(heap, scheduler, 3, 50.0)
    assert scheduler.armed == 5.0
    await clock.advance(5.0)
    assert recorder.due == [(5.0, [2])]
    assert scheduler.armed == 50.0  # re-set for what is left


async def test_nothing_wakes_while_nothing_is_due() -> None:
    clock, heap, scheduler, recorder, counters = make()
    await clock.advance(3600.0)
    assert counters.wakeups == 0
    arm(heap, scheduler, 1, clock.now() + 3600.0)
    await clock.advance(3599.0)
    assert counters.wakeups == 0 and recorder.due == []


async def test_a_warm_up_pass_runs_just_before_the_deadline() -> None:
    clock, heap, scheduler, recorder, counters = make()
    arm(heap, scheduler, 1, 10.0)
    await clock.advance(10.0 - WARM_UP)
    assert recorder.warm == [10.0] and recorder.due == [] and counters.wakeups == 1
    await clock.advance(WARM_UP / 2)
    assert recorder.due == []
    await clock.advance(WARM_UP)
    assert recorder.due == [(clock.now(), [1])] and counters.wakeups == 2


async def test_a_deadline_already_past_is_acted_on_at_once() -> None:
    clock, heap, scheduler, recorder, _ = make()
    await clock.advance(50.0)
    arm(heap, scheduler, 1, 10.0)
    await settle()
    assert recorder.due == [(50.0, [1])]


async def test_a_release_before_the_deadline_leaves_nothing_to_do() -> None:
    clock, heap, scheduler, recorder, _ = make(warm_up=False)
    arm(heap, scheduler, 1, 10.0)
    heap.remove(1, "s")
    await clock.advance(20.0)
    assert recorder.due == []


class BusyLoopClock(MockClock):
    """A clock whose alarms never get their loop turn: the loop is busy elsewhere."""

    def call_later(self, delay: float, callback: Callable[[], None]):  # type: ignore[no-untyped-def]
        return super().call_later(delay + 1e9, callback)


async def test_run_due_acts_between_batches_when_the_alarm_has_not_run_yet() -> None:
    clock, heap, scheduler, recorder, _ = make(BusyLoopClock(), warm_up=False)
    arm(heap, scheduler, 1, 10.0)
    scheduler.run_due()  # not due: nothing
    assert recorder.due == []
    clock.jump(10.0)  # time passed, but the alarm has not had its turn
    assert recorder.due == []
    scheduler.run_due()
    assert recorder.due == [(10.0, [1])]


async def test_an_error_while_acting_is_logged_and_the_alarm_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock, heap, scheduler, recorder, _ = make(warm_up=False)
    failures = [RuntimeError("a bug, on purpose")]
    on_due = recorder.on_due

    def failing_once(now: float) -> None:
        if failures:
            pop_expired(heap, now)
            raise failures.pop()
        on_due(now)

    scheduler._on_due = failing_once
    arm(heap, scheduler, 1, 1.0)
    await clock.advance(1.0)
    assert "handling expired timers failed" in caplog.text
    arm(heap, scheduler, 2, 2.0)
    await clock.advance(1.0)
    assert recorder.due == [(2.0, [2])]


async def test_stop_cancels_the_alarm() -> None:
    clock, heap, scheduler, recorder, _ = make(warm_up=False)
    arm(heap, scheduler, 1, 1.0)
    scheduler.stop()
    await clock.advance(5.0)
    assert recorder.due == []
    arm(heap, scheduler, 2, 6.0)  # stopped: nothing is armed
    assert scheduler.armed == float("inf")


# -- approach: said when the earliest deadline comes near, and when none is ------------


async def test_approach_is_said_once_the_earliest_deadline_is_that_near_and_not_before() -> None:
    clock, heap, scheduler, recorder, _ = make(approach=0.1)
    arm(heap, scheduler, 1, 10.0)
    arm(heap, scheduler, 2, 10.05)
    await clock.advance(9.89)
    assert recorder.approach == []
    await clock.advance(0.01 + 1e-9)  # (9.89 + 0.01 falls short of 10 - 0.1 in floats)
    assert recorder.approach == [True]
    assert recorder.warm == []  # the warm-up pass is not moved to the approach
    await clock.advance(10.0 - WARM_UP - clock.now())
    assert recorder.warm == [10.0]  # it still runs just before the deadline
    await clock.advance(WARM_UP)  # the first is due; the second is near still: no change
    assert [owners for _, owners in recorder.due] == [[1]] and recorder.approach == [True]
    await clock.advance(0.05)
    assert recorder.due[-1][1] == [2] and recorder.approach == [True, False]


async def test_approach_ends_when_the_near_deadline_is_released_and_a_far_one_is_left() -> None:
    clock, heap, scheduler, recorder, _ = make(approach=0.1, warm_up=False)
    arm(heap, scheduler, 1, 1.0)
    arm(heap, scheduler, 2, 5.0)
    await clock.advance(0.95)
    assert recorder.approach == [True]
    heap.remove(1, "s")
    scheduler.rearm()
    assert recorder.approach == [True, False]
    await clock.advance(4.0)  # near the second one: said again
    assert recorder.approach == [True, False, True]


async def test_a_deadline_armed_within_approach_is_near_at_once_and_stop_ends_it() -> None:
    _, heap, scheduler, recorder, _ = make(approach=0.1)
    arm(heap, scheduler, 1, 0.05)
    assert recorder.approach == [True]
    scheduler.stop()
    assert recorder.approach == [True, False]


async def test_a_failing_approach_callback_is_logged_and_the_deadline_still_acted_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = MockClock()
    heap = DeadlineHeap()
    recorder = Recorder(heap)

    def broken(near: bool) -> None:
        raise OSError("sched_setscheduler failed")

    scheduler = Scheduler(
        clock, heap, Counters(), on_due=recorder.on_due, approach=0.1, on_approach=broken
    )
    scheduler.start()
    arm(heap, scheduler, 1, 1.0)
    await clock.advance(1.0)
    assert recorder.due == [(1.0, [1])]
    assert "on_approach(True) failed" in caplog.text
