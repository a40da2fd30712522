"""What a reaper is handed when timers expire: an ``Expiry``, and the ``Reaper`` protocol."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._events import logger
from ._linux import ProcessGone, pidfd_no_wakeup_preemption

if TYPE_CHECKING:
    from ._clock import Clock
    from ._heap import Timer
    from ._processes import SpawnedTree, WatchedProcess

__all__ = ["ExpiredTimer", "Expiry", "Reaper"]


@dataclass(frozen=True)
class ExpiredTimer:
    """One timer that expired: its scope, its deadline and how late it was handled."""

    scope: str
    deadline: float
    lag: float


class Expiry:
    """One process and the timers of it that expired, as a reaper is handed them.

    Signals go through the process's pidfd, so a process that has exited (its
    pid possibly reused) is never signalled: ``send_signal`` returns ``False``.
    Waiting (``wait_exit``, ``sleep``) runs on the server's clock, so a test's
    ``MockClock`` drives a reaper's grace periods too.
    """

    __slots__ = (
        "_clock",
        "_expired",
        "_now",
        "_on_signal",
        "_process",
        "_timers",
        "requested_signal",
        "signal_times",
        "signals_sent",
    )

    def __init__(
        self,
        process: WatchedProcess,
        timers: list[Timer],
        now: float,
        requested_signal: int | None,
        on_signal: Callable[[Expiry, int], None],
        clock: Clock,
    ) -> None:
        # Built in the middle of a kill burst: ``timers`` may still grow while
        # the burst goes on, and is converted only when read.
        self._process = process
        self._timers = timers
        self._now = now
        self._expired: tuple[ExpiredTimer, ...] = ()
        #: the signal the client asked for (torch's FIFO clients send one), if any
        self.requested_signal = requested_signal
        self._on_signal = on_signal
        self._clock = clock
        #: every signal sent to the process through this expiry, in order
        self.signals_sent: list[int] = []
        #: when each of them was sent (the server clock's time)
        self.signal_times: list[float] = []

    def __repr__(self) -> str:
        scopes = ", ".join(t.scope for t in self.timers)
        return f"<Expiry pid={self.pid} scopes=[{scopes}]>"

    @property
    def timers(self) -> tuple[ExpiredTimer, ...]:
        """The process's expired timers, earliest first."""
        if len(self._expired) != len(self._timers):
            now = self._now
            self._expired = tuple(
                ExpiredTimer(t.scope, t.deadline, now - t.deadline) for t in self._timers
            )
        return self._expired

    def scopes(self, limit: int | None = None) -> list[str]:
        """The expired scopes, earliest first (the first ``limit`` of them)."""
        timers = self._timers if limit is None else self._timers[:limit]
        return [t.scope for t in timers]

    @property
    def clock(self) -> Clock:
        """The server's clock (deadlines are on it)."""
        return self._clock

    @property
    def pid(self) -> int:
        """The process whose timers expired."""
        return self._process.pid

    @property
    def deadline(self) -> float:
        """The earliest of the expired deadlines."""
        return self._timers[0].deadline

    @property
    def worker_pid(self) -> int | None:
        """The pid of the spawned worker this process is (or descends from), if any."""
        spawned = self._process.spawned
        return None if spawned is None else spawned.pid

    @property
    def spawned(self) -> SpawnedTree | None:
        """The process the server spawned that this one is (or descends from), if any."""
        return self._process.spawned

    @property
    def dump_signal(self) -> int:
        """The signal on which this process said it dumps its stacks (0: it did not say)."""
        return self._process.dump_signal

    @property
    def exited(self) -> bool:
        """Whether the process has exited."""
        return self._process.exited

    def send_signal(self, sig: int, *, group: bool = False) -> bool:
        """Send ``sig`` (to the process group with ``group``); ``False`` if it has exited."""
        # The time is read before the syscall: on a busy machine the kernel
        # often switches the server out inside it, once the signal is queued
        # and the target woken (a torch worker's many threads each wake), and
        # the server's wait for its next turn is not the signal's lateness.
        at = self._clock.now()
        try:
            self._process.send_signal(sig, group=group)
        except ProcessGone:
            return False
        self.signals_sent.append(sig)
        self.signal_times.append(at)
        self._on_signal(self, sig)
        return True

    def no_wakeup_preemption(self) -> bool:
        """Keep this process, once signalled, from preempting the server (SCHED_BATCH).

        For a process about to be killed; see ``SignalReaper.prepare``.
        """
        process = self._process
        return pidfd_no_wakeup_preemption(process.pidfd, process.pid)

    def dump_stacks(self) -> bool:
        """Ask the process to print its stacks (``dump_signal``); ``False`` if it cannot.

        Not a kill: it does not count as the expiry's first signal.
        """
        if self.dump_signal <= 0:
            return False
        try:
            self._process.send_signal(self.dump_signal)
        except ProcessGone:
            return False
        logger.info("asked pid %d to dump its stacks", self.pid)
        return True

    async def sleep(self, delay: float) -> None:
        """Sleep ``delay`` seconds on the server's clock."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        handle = self._clock.call_later(delay, lambda: _resolve(done))
        try:
            await done
        finally:
            handle.cancel()

    async def wait_exit(self, timeout: float | None = None) -> bool:
        """Wait for the process to exit; ``False`` if ``timeout`` seconds (server clock) passed."""
        exit_future = self._process.exit_future()
        if exit_future.done():
            return True
        if timeout is None:
            await asyncio.shield(exit_future)
            return True
        loop = asyncio.get_running_loop()
        timed_out: asyncio.Future[None] = loop.create_future()
        handle = self._clock.call_later(timeout, lambda: _resolve(timed_out))
        try:
            await asyncio.wait((exit_future, timed_out), return_when=asyncio.FIRST_COMPLETED)
        finally:
            handle.cancel()
            timed_out.cancel()
        return exit_future.done()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


#: A reaper: any callable taking an ``Expiry``; it may be a coroutine function.
Reaper = Callable[[Expiry], Awaitable[object] | object]
