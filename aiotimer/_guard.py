"""A watchdog on the watchdog: a thread that kills due processes itself if the loop is blocked.

Every kill is the loop's (the scheduler's alarm, the killer's burst), so a bug
of ours that blocks the loop would leave every hang running.  ``Guard`` is a
daemon thread that costs the kill path nothing: it wakes once a ``period``, or
when the earliest deadline will be ``after`` seconds past, and reads the heap
(never writes it).  Only if a deadline is that far past does it ping the loop
(``call_soon_threadsafe``); if no answer comes within ``answer_within`` it
SIGKILLs the due processes through duplicates of their pidfds, never by bare
pid, so a reused pid is never hit.  Each process is killed once; the kills are
logged and counted (``Statistics.guard_kills``, ``/metrics``, ``/healthz``).
"""

from __future__ import annotations

import asyncio
import math
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol

from ._events import logger
from ._linux import ProcessGone, pidfd_signal

if TYPE_CHECKING:
    from ._events import Counters
    from ._heap import DeadlineHeap, Timer

__all__ = ["Guard", "Guarded"]

#: How often the heap walk is retried when the loop changes the heap under it.
_SCAN_ATTEMPTS = 5

#: The shortest sleep between checks: a deadline just past is re-checked at once, not spun on.
_MIN_DELAY = 0.001


class Guarded(Protocol):
    """What the guard needs of a process: the registry's ``WatchedProcess`` fits."""

    @property
    def pid(self) -> int:
        """Its pid, for the log line and group lookups only."""

    @property
    def pidfd(self) -> int:
        """Its pidfd (< 0 once closed)."""

    @property
    def exited(self) -> bool:
        """Whether the loop has seen it exit (set before its pidfd is closed)."""


def _running(pidfd: int) -> bool:
    """Whether the process behind ``pidfd`` has not exited (a zombie still takes signals)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return not poller.poll(0)


def _sigkill(process: Guarded) -> bool:
    """SIGKILL ``process`` through a pidfd of its own; whether it was running until then."""
    fd = process.pidfd
    if fd < 0 or process.exited:
        return False
    try:
        mine = os.dup(fd)
    except OSError:  # closed in between: it exited
        return False
    try:
        # The loop marks a process exited before it closes its pidfd: if it is
        # still not exited now, ``fd`` was this process's pidfd when it was
        # duplicated, not a reused descriptor number.
        if process.exited or process.pidfd != fd or not _running(mine):
            return False
        pidfd_signal(mine, process.pid, signal.SIGKILL)
        return True
    except ProcessGone:
        return False
    finally:
        os.close(mine)


class Guard:
    """Kills the processes whose deadline is ``after`` seconds past if the loop does not answer.

    ``heap`` and ``processes`` (the registry's ``by_id``) are the loop's and are
    only read here.  ``now`` is the clock the heap's deadlines are on (it must be
    the system's monotonic clock for the thread).  ``counters.guard_kills`` and
    ``counters.guard_blocked_for`` are written here and nowhere else.  ``check()``
    is one round of the thread's work, callable directly in tests.
    """

    __slots__ = (
        "_answer_within",
        "_counters",
        "_heap",
        "_killed",
        "_loop",
        "_now",
        "_period",
        "_ping",
        "_processes",
        "_stopping",
        "_thread",
        "after",
    )

    def __init__(
        self,
        heap: DeadlineHeap,
        processes: Mapping[int, Guarded],
        counters: Counters,
        *,
        after: float,
        period: float = 1.0,
        answer_within: float = 0.5,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        #: how long past its deadline a process must be, unkilled, before the loop is asked
        self.after = after
        # A period no longer than ``after`` keeps the heap walk to deadlines
        # already past, which a live loop pops at once: a few entries at most.
        self._period = min(period, after)
        self._answer_within = answer_within
        self._heap = heap
        self._processes = processes
        self._counters = counters
        self._now = now
        self._loop: asyncio.AbstractEventLoop | None = None
        # Ids of the processes killed here, so a loop still blocked after a
        # round does not have them killed again (registry ids are never reused).
        self._killed: set[int] = set()
        self._stopping = threading.Event()
        self._ping = threading.Event()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        state = "running" if self._thread is not None else "stopped"
        return f"<Guard {state} after={self.after:g}s kills={self.kills}>"

    @property
    def kills(self) -> int:
        """Processes this guard SIGKILLed because the loop did not answer."""
        return self._counters.guard_kills

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Ping ``loop`` from now on (``start`` binds too; tests bind and call ``check``)."""
        self._loop = loop

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Guard ``loop``: start the thread."""
        self.bind(loop)
        self._thread = threading.Thread(target=self._run, name="aiotimer-guard", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread (before the registry closes its pidfds) and wait briefly for it."""
        self._stopping.set()
        self._ping.set()  # ends a wait for the loop's answer at once
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=2.0)

    def _run(self) -> None:
        delay = 0.0
        while not self._stopping.wait(delay):
            try:
                delay = self.check(self._now())
            except Exception:  # a bug here must not end the guard
                logger.exception("the guard's check failed")
                delay = self._period

    def check(self, now: float) -> float:
        """One round at time ``now``: ask the loop, kill if it is blocked; the seconds to sleep."""
        overdue, next_check = self._scan(now)
        if not overdue:
            return min(self._period, max(next_check - now, _MIN_DELAY))
        if self._loop_answers():
            # The loop is alive: the scheduler has them in hand, or a reaper does.
            return self._period
        self._kill(overdue, now)
        return self._period

    def _scan(self, now: float) -> tuple[dict[int, float], float]:
        """Processes to kill (id -> earliest overdue deadline) and when to look again."""
        until = now - self.after
        window: list[Timer] | None = None
        for _ in range(_SCAN_ATTEMPTS):
            try:
                window = self._heap.due(until + self._period)
                break
            except (IndexError, RuntimeError):
                continue  # the loop changed the heap under the walk: walk it again
        if window is None:
            return {}, now + _MIN_DELAY
        if self._killed:
            # Forget processes the registry forgot: their ids will never come back.
            self._killed = {i for i in self._killed if i in self._processes}
        overdue: dict[int, float] = {}
        next_check = math.inf
        for deadline, owner, _scope, _channel, sig in window:
            if owner in self._killed:
                continue
            if deadline > until:
                next_check = min(next_check, deadline + self.after)
            elif sig >= 0:  # a negative signal asked for a report only: never killed
                overdue[owner] = min(overdue.get(owner, math.inf), deadline)
        me = os.getpid()
        for owner in list(overdue):
            process = self._processes.get(owner)
            # Never this process: killing it would end the watchdog for every
            # other worker; its own hang is what /healthz reports.
            if process is None or process.exited or process.pid == me:
                del overdue[owner]
        return overdue, next_check

    def _loop_answers(self) -> bool:
        """Whether the loop runs a callback within ``answer_within`` seconds."""
        loop = self._loop
        if loop is None:
            return True  # not bound: nothing to guard yet
        self._ping.clear()
        try:
            loop.call_soon_threadsafe(self._ping.set)
        except RuntimeError:  # the loop is closed: it will never kill anything again
            return False
        # Stopping sets the event too: a closing server is never killed for.
        return self._ping.wait(self._answer_within)

    def _kill(self, overdue: dict[int, float], now: float) -> None:
        """SIGKILL each process in ``overdue`` once; count and log the ones that were running."""
        pids: list[int] = []
        earliest = math.inf
        for owner, deadline in overdue.items():
            if self._stopping.is_set():  # the server is closing its pidfds
                return
            self._killed.add(owner)
            process = self._processes.get(owner)
            if process is not None and _sigkill(process):
                pids.append(process.pid)
                earliest = min(earliest, deadline)
        if not pids:
            return
        blocked_for = now - earliest
        self._counters.guard_kills += len(pids)
        self._counters.guard_blocked_for = blocked_for
        logger.error(
            "the watchdog's loop did not answer for %.1fs with deadlines due; "
            "the guard SIGKILLed %d process%s itself: pid %s",
            blocked_for,
            len(pids),
            "" if len(pids) == 1 else "es",
            ", ".join(str(pid) for pid in sorted(pids)),
        )
