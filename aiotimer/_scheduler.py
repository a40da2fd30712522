"""One alarm on the earliest deadline: never early, never polling, warmed up before it goes off.

The scheduler owns the alarm and nothing else.  When requests change the
earliest deadline it re-sets the alarm; when the alarm goes off it re-checks
the clock (an alarm may be a little early: a loop's timers are only
millisecond-accurate) and hands what is due to ``on_due``.  A little before a
deadline (``WARM_UP``) it first calls ``on_warm_up`` for a read-only pass that
brings the data the expiry will touch into the CPU caches.  Optionally, it also
says when the earliest deadline comes within ``approach`` seconds and when it
moves away again (``on_approach(True/False)``): the server's real-time boost.
It knows nothing of processes or signals: tests drive it with a mock clock and
plain integer owners.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ._clock import Cancellable, Clock
from ._events import Counters, logger
from ._heap import DeadlineHeap

__all__ = ["WARM_UP", "Scheduler"]

#: How long before a deadline the scheduler wakes to warm up for it.
WARM_UP = 0.002


class Scheduler:
    """Keeps one alarm set on ``heap``'s earliest deadline and acts when it passes.

    ``on_due(now)`` is called, on the loop, with the clock's time once the
    earliest deadline is ``<= now``; ``on_warm_up(deadline)`` shortly before;
    ``on_approach(True)`` once the earliest deadline is ``approach`` seconds away
    or less, and ``on_approach(False)`` once none is: seen when the alarm goes
    off or is re-set (so after a release, at the latest when the alarm set for
    the released deadline goes off), and on ``stop()``.  The approach alarm
    counts in ``wakeups`` like the others.
    """

    __slots__ = (
        "_approach",
        "_approaching",
        "_armed",
        "_clock",
        "_counters",
        "_handle",
        "_heap",
        "_on_approach",
        "_on_due",
        "_on_warm_up",
        "_running",
        "_warmed_for",
    )

    def __init__(
        self,
        clock: Clock,
        heap: DeadlineHeap,
        counters: Counters,
        *,
        on_due: Callable[[float], None],
        on_warm_up: Callable[[float], None] | None = None,
        approach: float = 0.0,
        on_approach: Callable[[bool], None] | None = None,
    ) -> None:
        self._clock = clock
        self._heap = heap
        self._counters = counters
        self._on_due = on_due
        self._on_warm_up = on_warm_up
        self._handle: Cancellable | None = None
        self._armed = math.inf
        self._warmed_for = math.inf
        self._running = False
        self._approach = approach
        self._on_approach = on_approach
        self._approaching = False

    def __repr__(self) -> str:
        state = "running" if self._running else "stopped"
        return f"<Scheduler {state} armed={self._armed}>"

    @property
    def armed(self) -> float:
        """The time the alarm is set for (``math.inf``: none)."""
        return self._armed

    def start(self) -> None:
        """Begin keeping the alarm (for whatever the heap already holds)."""
        self._running = True
        self.rearm()

    def stop(self) -> None:
        """Cancel the alarm and stop keeping it."""
        self._running = False
        self._disarm()
        self._set_approaching(False)

    def deadline_added(self, deadline: float) -> None:
        """A timer was armed until ``deadline``: re-set the alarm if that is sooner."""
        if deadline < self._armed and self._running:
            self.rearm()

    def rearm(self) -> None:
        """Set the alarm for the earliest deadline (re-setting it if that changed)."""
        deadline = self._heap.next_deadline()
        if deadline == math.inf or not self._running:
            self._disarm()
            self._set_approaching(False)
            return
        if deadline == self._armed:
            return
        self._disarm()
        self._armed = deadline
        clock = self._clock
        delay = deadline - clock.now()
        if self._on_approach is not None:
            far = delay > self._approach
            self._set_approaching(not far)
            if far:
                # First an alarm when it comes near; _alarm() then sets the next.
                self._handle = clock.call_later(delay - self._approach, self._near)
                return
        if self._on_warm_up is not None and delay > WARM_UP and deadline != self._warmed_for:
            delay -= WARM_UP  # first an alarm to warm up; _alarm() then sets the exact one
        self._handle = clock.call_later(delay if delay > 0 else 0.0, self._alarm)

    def _set_approaching(self, approaching: bool) -> None:
        if approaching != self._approaching and self._on_approach is not None:
            self._approaching = approaching
            try:
                self._on_approach(approaching)
            except Exception:  # a failed boost must not stop the watchdog
                logger.exception("on_approach(%s) failed", approaching)

    def run_due(self) -> None:
        """Act now if the earliest deadline has passed (between batches of other work)."""
        if self._armed <= self._clock.now():
            self._alarm()

    def _disarm(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._armed = math.inf

    def _near(self) -> None:
        # The earliest deadline is now ``approach`` away: rearm() says so and
        # sets the warm-up alarm (or acts, if the loop ran this late).
        self._counters.wakeups += 1
        self._disarm()
        self.rearm()

    def _alarm(self) -> None:
        # This is the loop's callback itself: what is due is acted on at once,
        # with no task switch or loop turn in between.
        self._disarm()
        self._counters.wakeups += 1
        try:
            now = self._clock.now()
            due = self._heap.next_deadline()
            # An alarm may go off a little early; the deadline is re-checked
            # against the clock itself, so nothing ever expires early.
            if due <= now:
                self._on_due(now)
            elif due != self._warmed_for and self._on_warm_up is not None:
                self._warmed_for = due
                self._on_warm_up(due)
        except Exception:  # a bug here must not stop the watchdog
            logger.exception("handling expired timers failed")
        finally:
            self.rearm()
