"""Clocks the server schedules against: the system's monotonic clock, or a test's.

Deadlines live on one monotonic time line (``Clock.now``).  On Linux
``time.monotonic`` is CLOCK_MONOTONIC, which every process in one time
namespace shares; a worker in another namespace reads it shifted, so its
deadlines are moved onto the server's line by its offset (read from the kernel,
or learnt from its stamped requests: ``_dispatch``).  A wall-clock deadline
(torch's clients send ``time.time() + after``) is converted once, on receipt.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from ._linux import timerfd_arm_at, timerfd_create

__all__ = ["Cancellable", "Clock", "SystemClock", "monotonic_to_wall", "wall_to_monotonic"]


class Cancellable(Protocol):
    """What ``Clock.call_later`` returns: something that can be cancelled."""

    def cancel(self) -> None:
        """Stop the callback from running, if it has not run yet."""


@runtime_checkable
class Clock(Protocol):
    """The time source and alarm that a ``TimerServer`` runs on.

    An alarm may go off a little early (a loop's timers are only millisecond
    accurate): the server re-checks the time when it wakes and never acts early.
    """

    def now(self) -> float:
        """Current monotonic time in seconds (CLOCK_MONOTONIC for the system clock)."""

    def wall(self) -> float:
        """Current wall-clock time in seconds since the epoch."""

    def call_later(self, delay: float, callback: Callable[[], None]) -> Cancellable:
        """Run ``callback`` on the running loop after ``delay`` seconds."""


#: How long before its time an alarm moves from the loop's timers to a timerfd.
#: The loop's timers are up to ~2 ms late on asyncio (epoll rounds up to whole
#: milliseconds, then the wake-up) and ~1 ms early on uvloop; 5 ms covers both.
_FINE_WINDOW = 0.005


class _Alarm:
    """A ``call_later`` that ends on a timerfd, so it goes off on time.

    The loop's timer brings it to within ``_FINE_WINDOW`` of its time; a
    one-shot timerfd armed at the exact CLOCK_MONOTONIC time does the rest,
    watched by the loop like any fd: nothing blocks and nothing spins.
    """

    __slots__ = ("_callback", "_fd", "_handle", "_loop", "_when")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, when: float, callback: Callable[[], None]
    ) -> None:
        self._loop = loop
        self._when = when
        self._callback = callback
        self._fd = -1
        self._handle: asyncio.Handle | None = None
        coarse = when - time.monotonic() - _FINE_WINDOW
        if coarse > 0:
            self._handle = loop.call_later(coarse, self._refine)
        else:
            self._refine()

    def _refine(self) -> None:
        self._handle = None
        remaining = self._when - time.monotonic()
        fd = timerfd_create() if remaining > 0 else -1
        if fd < 0:  # due already, or no timerfd: the loop's timer will do
            self._handle = self._loop.call_later(max(remaining, 0.0), self._callback)
            return
        try:
            timerfd_arm_at(fd, self._when)
            self._loop.add_reader(fd, self._fire)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _fire(self) -> None:
        self._close_fd()
        self._callback()

    def _close_fd(self) -> None:
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1

    def cancel(self) -> None:
        """Stop the callback from running, if it has not run yet."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._close_fd()


class SystemClock:
    """The real clocks: ``time.monotonic`` and ``time.time``, alarms on the running loop.

    Alarms are on time to within the kernel's timer slack (tens of
    microseconds), not the loop's millisecond timer resolution: their last few
    milliseconds are waited out on a Linux timerfd.
    """

    def __repr__(self) -> str:
        return "SystemClock()"

    def now(self) -> float:
        """``time.monotonic()``: shared by all processes on the host."""
        return time.monotonic()

    def wall(self) -> float:
        """``time.time()``."""
        return time.time()

    def call_later(self, delay: float, callback: Callable[[], None]) -> Cancellable:
        """Run ``callback`` on the running loop ``delay`` seconds from now."""
        return _Alarm(asyncio.get_running_loop(), time.monotonic() + delay, callback)


def wall_to_monotonic(clock: Clock, wall_deadline: float) -> float:
    """Convert a wall-clock deadline to ``clock``'s monotonic time line."""
    return clock.now() + (wall_deadline - clock.wall())


def monotonic_to_wall(clock: Clock, deadline: float) -> float:
    """Convert a deadline on ``clock``'s monotonic time line to wall-clock seconds."""
    return deadline + (clock.wall() - clock.now())
