"""Clocks the server schedules against: the system's monotonic clock, or a test's.

Deadlines live on one monotonic time line (``Clock.now``).  On Linux
``time.monotonic`` is CLOCK_MONOTONIC, which every process on the host shares,
so a worker's monotonic deadline needs no conversion; a wall-clock deadline
(torch's clients send ``time.time() + after``) is converted once, on receipt.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

__all__ = ["Cancellable", "Clock", "SystemClock"]


class Cancellable(Protocol):
    """What ``Clock.call_later`` returns: something that can be cancelled."""

    def cancel(self) -> None:
        """Stop the callback from running, if it has not run yet."""


@runtime_checkable
class Clock(Protocol):
    """The time source and alarm that a ``TimerServer`` runs on."""

    #: How much earlier than a deadline the alarm is set.  The loop's own timer
    #: may be late by up to its resolution (epoll waits whole milliseconds), so the
    #: server wakes this much early and then yields to the loop until the deadline
    #: has truly passed: it never fires early and is rarely more than a loop
    #: iteration late.
    margin: float

    def now(self) -> float:
        """Current monotonic time in seconds (CLOCK_MONOTONIC for the system clock)."""

    def wall(self) -> float:
        """Current wall-clock time in seconds since the epoch."""

    def call_later(self, delay: float, callback: Callable[[], None]) -> Cancellable:
        """Run ``callback`` on the running loop after ``delay`` seconds."""


class SystemClock:
    """The real clocks: ``time.monotonic`` and ``time.time``, alarms on the running loop."""

    margin = 0.001

    def __repr__(self) -> str:
        return "SystemClock()"

    def now(self) -> float:
        """``time.monotonic()``: shared by all processes on the host."""
        return time.monotonic()

    def wall(self) -> float:
        """``time.time()``."""
        return time.time()

    def call_later(self, delay: float, callback: Callable[[], None]) -> Cancellable:
        """Schedule ``callback`` with the running loop's ``call_later``."""
        return asyncio.get_running_loop().call_later(delay, callback)


def wall_to_monotonic(clock: Clock, wall_deadline: float) -> float:
    """Convert a wall-clock deadline to ``clock``'s monotonic time line."""
    return clock.now() + (wall_deadline - clock.wall())
