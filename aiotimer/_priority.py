"""The server thread's real-time boost: SCHED_RR while a deadline is near.

Why: on a machine whose cores are all busy with CPU-bound workers (torch's
``FileTimerClient`` retries a full FIFO at once, say), a normal-priority
server waits its turn behind them.  Measured on 2 cores with 16 such workers,
a process that only sleeps woke up to 4 ms late (one 250 Hz tick) whatever
its nice value, and the busy server acted 20-35 ms late.  A real-time thread
preempts them at once.

Why only near a deadline: a real-time thread that a flood of requests keeps
busy all the time would take a core for itself, and the kernel then reserves
normal tasks their share in one block (50 ms in each second), during which
the server is stopped.  Boosted only from ``LEAD`` before the earliest deadline
until it is dealt with, the server spends most of a flood at normal priority
and is never stopped like that; when deadlines are always near it stays boosted.
"""

from __future__ import annotations

import logging

from ._events import logger
from ._linux import enter_realtime, restore_scheduling

__all__ = ["LEAD", "RealtimeBoost"]

#: How long before the earliest deadline the boost begins.  The alarm that
#: begins it runs at normal priority: it must come early enough to absorb the
#: delay the boost is there to avoid (up to ~35 ms, measured as above).
LEAD = 0.1


class RealtimeBoost:
    """Moves the calling (loop) thread to SCHED_RR and back, as the scheduler asks.

    ``check()`` once at start: whether the boost is permitted here (it warns if
    not, and then does nothing).  A thread that already runs real-time is left
    as it is.
    """

    __slots__ = ("_previous", "_warn", "active", "permitted")

    def __init__(self, *, warn: bool = True) -> None:
        self._warn = warn  # asked for explicitly: say so loudly when refused
        self._previous: tuple[int, int] | None = None
        #: whether this thread may use SCHED_RR (known after ``check()``)
        self.permitted = False
        #: whether the thread runs boosted now
        self.active = False

    def check(self) -> bool:
        """Find out, by trying, whether the boost is permitted; warn if not."""
        try:
            previous = enter_realtime()
        except PermissionError:
            logger.log(
                logging.WARNING if self._warn else logging.INFO,
                "real-time priority is not permitted (needs CAP_SYS_NICE or `ulimit -r` of 1 "
                "or more); serving at normal priority, where busy workers can delay kills",
            )
            self.permitted = False
            return False
        if previous is not None:
            restore_scheduling(previous)
        self.permitted = True
        return True

    def __call__(self, near: bool) -> None:
        """Boost (``near``) or go back to the thread's own policy."""
        if not self.permitted or near == self.active:
            return
        if near:
            self._previous = enter_realtime()
        elif self._previous is not None:
            restore_scheduling(self._previous)
            self._previous = None
        self.active = near
