"""Dispatcher: applying decoded requests to the heap, with a fake registry and no processes."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from helpers import timers_of

from aiotimer import DeadlineHeap
from aiotimer._dispatch import Dispatcher
from aiotimer._events import Counters, Event, EventBus
from aiotimer._protocol import SIGNAL_LOG_ONLY, Op, Request
from aiotimer._scheduler import Scheduler
from aiotimer.testing import MockClock
from aiotimer.transports import Channel


@dataclass
class FakeProcess:
    id: int
    pid: int
    exited: bool = False
    alive: bool = True
    dump_signal: int = 0
    channels: set[int] = field(default_factory=set)
    clock_offset: float = math.inf
    clock_exact: bool = False
    tree: int = 0

    def gone(self) -> bool:
        self.exited = self.exited or not self.alive
        return self.exited


class FakeRegistry:
    """Admits the pids it is told to, refuses the rest; counts admissions."""

    def __init__(self, allowed: set[int]) -> None:
        self.allowed = allowed
        self.by_pid: dict[int, FakeProcess] = {}
        self.admissions: list[tuple[int, int]] = []
        self._ids = iter(range(1, 10**6))

    def __iter__(self) -> Iterator[FakeProcess]:
        return iter(list(self.by_pid.values()))

    def admit(self, channel: Any, pid: int, *, revalidate: bool = False) -> FakeProcess | str:
        self.admissions.append((channel.id, pid))
        if pid not in self.allowed:
            return f"pid {pid} is not allowed here"
        known = self.by_pid.get(pid)
        if known is None or known.exited:
            known = self.by_pid[pid] = FakeProcess(next(self._ids), pid)
        known.channels.add(channel.id)
        return known


class FakeChannel(Channel):
    def __init__(self, name: str, *, revalidate: bool = False) -> None:
        self.name = name
        self.revalidate = revalidate
        super().__init__(sink=None)  # type: ignore[arg-type]

    def entitled(self, pid: int) -> str | None:
        return None


@dataclass
class Rig:
    clock: MockClock
    heap: DeadlineHeap
    registry: FakeRegistry
    dispatcher: Dispatcher
    scheduler: Scheduler
    counters: Counters
    events: list[Event]
    due: list[float]


@pytest.fixture
def rig() -> Rig:
    clock = MockClock(start=100.0)
    heap = DeadlineHeap()
    counters = Counters()
    bus = EventBus()
    events: list[Event] = []
    bus.subscribe(events.append)
    due: list[float] = []
    scheduler = Scheduler(clock, heap, counters, on_due=due.append)
    registry = FakeRegistry({10, 11})
    dispatcher = Dispatcher(heap, registry, scheduler, clock, counters, bus)  # type: ignore[arg-type]
    dispatcher.open = True
    return Rig(clock, heap, registry, dispatcher, scheduler, counters, events, due)


def acquire(pid: int, scope: str, deadline: float, sig: int = 0) -> Request:
    return Request(Op.ACQUIRE, pid, scope, deadline, sig)


def release(pid: int, scope: str) -> Request:
    return Request(Op.RELEASE, pid, scope, 0.0)


async def test_acquire_arms_and_release_disarms(rig: Rig) -> None:
    ch = FakeChannel("a")
    rig.dispatcher.dispatch(ch, [acquire(10, "s", 105.0), acquire(10, "t", 107.0)])
    rig.dispatcher.dispatch(ch, [release(10, "s"), release(10, "never armed")])
    owner = rig.registry.by_pid[10].id
    assert [t.scope for t in timers_of(rig.heap, owner)] == ["t"]
    assert rig.counters.requests == 4 and rig.counters.rejected == 0


async def test_a_request_on_one_channel_never_touches_a_timer_armed_on_another(rig: Rig) -> None:
    a, b = FakeChannel("a"), FakeChannel("b")
    rig.dispatcher.dispatch(a, [acquire(10, "step", 105.0)])
    rig.dispatcher.dispatch(b, [release(10, "step"), acquire(10, "step", 500.0)])
    owner = rig.registry.by_pid[10].id
    assert rig.heap.get(owner, "step", channel=a.id) is not None
    assert rig.heap.get(owner, "step", channel=a.id).deadline == 105.0  # type: ignore[union-attr]
    assert rig.heap.get(owner, "step", channel=b.id).deadline == 500.0  # type: ignore[union-attr]


async def test_a_process_is_admitted_once_per_channel(rig: Rig) -> None:
    a, b = FakeChannel("a"), FakeChannel("b")
    rig.dispatcher.dispatch(a, [acquire(10, f"s{i}", 105.0) for i in range(50)])
    rig.dispatcher.dispatch(b, [acquire(10, "x", 105.0)])
    assert rig.registry.admissions == [(a.id, 10), (b.id, 10)]


async def test_refused_and_undecodable_requests_are_counted_and_reported(rig: Rig) -> None:
    ch = FakeChannel("a")
    rig.dispatcher.dispatch(ch, [acquire(99, "s", 105.0), acquire(11, "t", 105.0)], ["garbled"])
    assert rig.counters.rejected == 2 and rig.counters.requests == 1
    reasons = [e.info()["reason"] for e in rig.events]
    assert reasons == ["garbled", "pid 99 is not allowed here"]
    assert len(rig.heap) == 1


async def test_wall_clock_deadlines_are_converted_once_on_receipt(rig: Rig) -> None:
    ch = FakeChannel("a")
    wall = rig.clock.wall()
    rig.dispatcher.dispatch(ch, [Request(Op.ACQUIRE_WALL, 10, "s", wall + 3.0)])
    (timer,) = timers_of(rig.heap, rig.registry.by_pid[10].id)
    assert timer.deadline == pytest.approx(rig.clock.now() + 3.0)


async def test_the_signal_asked_for_is_kept_with_the_timer(rig: Rig) -> None:
    ch = FakeChannel("a")
    rig.dispatcher.dispatch(ch, [acquire(10, "kill", 105.0, 15), acquire(10, "log", 105.0, -1)])
    timers = {t.scope: t.signal for t in timers_of(rig.heap, rig.registry.by_pid[10].id)}
    assert timers == {"kill": 15, "log": SIGNAL_LOG_ONLY}


async def test_hello_records_the_dump_signal(rig: Rig) -> None:
    rig.dispatcher.dispatch(FakeChannel("a"), [Request(Op.HELLO, 10, "", 0.0, 12)])
    assert rig.registry.by_pid[10].dump_signal == 12 and len(rig.heap) == 0


async def test_an_earlier_deadline_reaches_the_scheduler(rig: Rig) -> None:
    rig.scheduler.start()
    ch = FakeChannel("a")
    rig.dispatcher.dispatch(ch, [acquire(10, "late", 200.0)])
    assert rig.scheduler.armed == 200.0
    rig.dispatcher.dispatch(ch, [acquire(10, "early", 150.0), acquire(11, "later", 300.0)])
    assert rig.scheduler.armed == 150.0


async def test_a_closed_dispatcher_applies_nothing_but_still_counts_rejections(rig: Rig) -> None:
    rig.dispatcher.open = False
    rig.dispatcher.dispatch(FakeChannel("a"), [acquire(10, "s", 105.0)], ["bad"])
    assert len(rig.heap) == 0 and rig.counters.rejected == 1 and rig.counters.requests == 0


async def test_revalidating_channels_recheck_a_known_pid_on_every_request(rig: Rig) -> None:
    ch = FakeChannel("fifo", revalidate=True)
    rig.dispatcher.dispatch(ch, [acquire(10, "s", 105.0)])
    old = rig.registry.by_pid[10]
    old.alive = False  # exited; its pid now names a new process
    rig.dispatcher.dispatch(ch, [acquire(10, "t", 106.0)])
    new = rig.registry.by_pid[10]
    assert new is not old
    assert [t.scope for t in timers_of(rig.heap, new.id)] == ["t"]


async def test_stamped_deadlines_learn_the_clock_offset_and_are_never_early(rig: Rig) -> None:
    ch = FakeChannel("pipe")
    now = rig.clock.now()  # 100.0 on the server's clock; this client's clock reads 40 less
    # Sent at client time 60.0 (server 100.0), read 0.5 s later: an offset sample of 40.5.
    rig.clock.jump(0.5)
    rig.dispatcher.dispatch(ch, [Request(Op.ACQUIRE_STAMPED, 10, "a", 61.0, 0, 60.0)])
    # Another sent at client 60.5 and read at once: a better sample, 40.0.
    rig.dispatcher.dispatch(ch, [Request(Op.ACQUIRE_STAMPED, 10, "b", 62.0, 0, 60.5)])
    owner = rig.registry.by_pid[10].id
    deadlines = {t.scope: t.deadline for t in timers_of(rig.heap, owner)}
    assert deadlines["a"] == pytest.approx(61.0 + 40.5)  # late by the transit, never early
    assert deadlines["b"] == pytest.approx(62.0 + 40.0)
    assert rig.registry.by_pid[10].clock_offset == pytest.approx(40.0)
    assert now + 1.0 < deadlines["a"]


async def test_a_kernel_read_offset_is_used_as_it_is(rig: Rig) -> None:
    ch = FakeChannel("pipe")
    rig.dispatcher.dispatch(ch, [Request(Op.HELLO, 11, "", 0.0)])
    process = rig.registry.by_pid[11]
    process.clock_offset, process.clock_exact = 100.0, True  # a time namespace at -100 s
    rig.dispatcher.dispatch(ch, [Request(Op.ACQUIRE_STAMPED, 11, "s", 5.0, 0, 2.0)])
    (timer,) = timers_of(rig.heap, process.id)
    assert timer.deadline == 105.0
