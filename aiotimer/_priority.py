"""The server thread's real-time boost: SCHED_RR while a deadline is near.

Why: on a machine whose cores are all busy with CPU-bound workers (torch's
``FileTimerClient`` retries a full FIFO at once, say), a normal-priority
server waits its turn behind them.  Measured on 2 cores with 16 such workers,
a process that only sleeps woke up to 4 ms late (one 250 Hz tick) whatever
its nice value, and the busy server acted 20-35 ms late.  A real-time thread
preempts them at once.

Why only near a deadline, and within a budget: a real-time thread that a
flood of requests keeps busy all the time would take a core for itself, and
the kernel then reserves normal tasks their share in one block (50 ms in each
second), during which the server is stopped: kills would be later than at
normal priority.  So the boost runs from ``LEAD`` before the earliest
deadline until it has been dealt with (and while a reaper still has a signal
to send), and a boosted thread that used more than ``BUDGET`` of the CPU over
the last ``PERIOD`` gives the boost up for ``COOLDOWN``: a client that keeps a
deadline near and floods the server cannot make it worse off than at normal
priority.

Why a kernel bound too: the budget above is checked after the fact, every
``PERIOD``, so a flood could hold a CPU for a whole period before it is seen
(a sleeper on that CPU woke 250 ms late).  Where the process is ours to set
up (the boost runs on the main thread, ``RLIMIT_RTTIME`` is unset, ``SIGXCPU``
unhandled), the kernel itself stops a boosted thread that runs ``RTTIME``
without blocking: it sends ``SIGXCPU``, and the handler drops the boost at
once (the hard limit stays unlimited: the kernel never kills the watchdog).
"""

from __future__ import annotations

import asyncio
import logging
import math
import resource
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

from ._clock import Cancellable, Clock
from ._events import logger
from ._linux import enter_realtime, restore_scheduling

__all__ = ["BUDGET", "COOLDOWN", "LEAD", "PERIOD", "RTTIME", "RealtimeBoost"]

#: How long before the earliest deadline the boost begins.  The alarm that
#: begins it runs at normal priority: it must come early enough to absorb the
#: delay the boost is there to avoid (up to ~35 ms, measured as above).
LEAD = 0.1
#: How often a boost that goes on checks the CPU it used.
PERIOD = 0.25
#: The share of one CPU a boosted thread may use over a ``PERIOD``: well under
#: the 95% past which the kernel stops real-time threads for 50 ms.
BUDGET = 0.5
#: How long a boost given up for using too much CPU stays off.
COOLDOWN = 1.0
#: Microseconds a boosted thread may run without blocking before the kernel says
#: so (``RLIMIT_RTTIME``; checked on the scheduler's tick, 4 ms at HZ=250): a
#: burst of 64 kills takes about 4 ms.
RTTIME = 5000


class RealtimeBoost:
    """Moves the calling (loop) thread to SCHED_RR and back, as the server asks.

    ``check()`` once at start: whether the boost is permitted here (it says so
    if not, and then does nothing).  ``near(bool)`` (the scheduler's approach)
    and ``following_up(bool)`` (reapers with a signal still to send) each ask
    for it; it is on while either does, within the CPU budget.  A thread that
    already runs real-time is left as it is.  ``clock`` schedules the budget
    checks; ``cpu_time`` reads the thread's CPU time (a test's stand-in).
    """

    __slots__ = (
        "_clock",
        "_cooling",
        "_cpu_mark",
        "_cpu_time",
        "_following_up",
        "_kernel_bound",
        "_loop",
        "_near",
        "_previous",
        "_quiet_until",
        "_timer",
        "_warn",
        "active",
        "already",
        "permitted",
    )

    def __init__(
        self,
        clock: Clock,
        *,
        warn: bool = True,
        cpu_time: Callable[[], float] = time.thread_time,
    ) -> None:
        self._clock = clock
        self._cpu_time = cpu_time
        self._warn = warn  # asked for explicitly: say so loudly when refused
        self._previous: tuple[int, int] | None = None
        self._near = self._following_up = self._cooling = False
        self._cpu_mark = 0.0
        self._quiet_until = -math.inf
        self._timer: Cancellable | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # What the kernel bound replaced (rlimit, SIGXCPU handler), to put back.
        self._kernel_bound: tuple[tuple[int, int], object] | None = None
        #: whether this thread may use SCHED_RR (known after ``check()``)
        self.permitted = False
        #: whether the thread ran real-time before (then it is left alone)
        self.already = False
        #: whether the thread runs boosted now
        self.active = False

    def check(self) -> bool:
        """Find out, by trying, whether the boost is permitted; say which (info, or warning)."""
        try:
            previous = enter_realtime()
            if previous is not None:
                restore_scheduling(previous)
        except PermissionError:
            logger.log(
                logging.WARNING if self._warn else logging.INFO,
                "real-time priority is not permitted (needs CAP_SYS_NICE or `ulimit -r` of 1 "
                "or more); serving at normal priority, where busy workers can delay kills",
            )
            self.permitted = False
            return False
        self.already = previous is None
        self.permitted = not self.already
        if self.already:
            logger.info("timer server thread runs real-time already; left as it is")
        else:
            bound = self._bound_by_kernel()
            logger.info(
                "timer server boosts its thread to real-time near deadlines%s",
                f" (at most {RTTIME / 1000:g} ms without blocking: RLIMIT_RTTIME)" if bound else "",
            )
        return True

    def _bound_by_kernel(self) -> bool:
        """Have the kernel stop a boosted thread that runs ``RTTIME`` without blocking.

        Only where this process is ours to set up: on the main thread (a
        signal handler runs there), with RLIMIT_RTTIME unset and SIGXCPU not
        handled by the application.
        """
        if threading.current_thread() is not threading.main_thread():
            return False
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        limits = resource.getrlimit(resource.RLIMIT_RTTIME)
        handler = signal.getsignal(signal.SIGXCPU)
        if limits[0] != resource.RLIM_INFINITY or handler not in (signal.SIG_DFL, None):
            return False
        try:
            signal.signal(signal.SIGXCPU, self._overran)
            resource.setrlimit(resource.RLIMIT_RTTIME, (RTTIME, limits[1]))
        except (OSError, ValueError):
            signal.signal(signal.SIGXCPU, signal.SIG_DFL)
            return False
        self._kernel_bound = (limits, handler)
        return True

    def _overran(self, signum: int, frame: FrameType | None) -> None:
        """SIGXCPU: the boosted thread ran ``RTTIME`` without blocking; drop the boost now."""
        if self._kernel_bound is not None:
            # The kernel raised the soft limit by a second as it signalled: back to ours.
            hard = self._kernel_bound[0][1]
            resource.setrlimit(resource.RLIMIT_RTTIME, (RTTIME, hard))
        if not self.active:
            return
        self._cooling = True
        self._apply()  # back to normal priority: a syscall, safe here
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._overran_later)

    def _overran_later(self) -> None:
        now = self._clock.now()
        logger.log(
            logging.WARNING if now >= self._quiet_until else logging.DEBUG,
            "the server ran %g ms on end while boosted to real-time; back to normal priority "
            "for %g s (a flood of requests while a deadline is near)",
            RTTIME / 1000,
            COOLDOWN,
        )
        if now >= self._quiet_until:
            self._quiet_until = now + 60.0
        self._cancel_timer()
        self._timer = self._clock.call_later(COOLDOWN, self._cooled_down)

    def near(self, near: bool) -> None:
        """The earliest deadline came within ``LEAD`` (or none is near any more)."""
        self._near = near
        self._apply()

    def following_up(self, busy: bool) -> None:
        """Reapers have signals still to send (stacks being captured, a grace period)."""
        self._following_up = busy
        self._apply()

    def close(self) -> None:
        """Back to the thread's own policy, for good."""
        self._near = self._following_up = False
        self._cancel_timer()
        self._cooling = False
        self._apply()
        self.permitted = False
        if self._kernel_bound is not None:
            limits, handler = self._kernel_bound
            self._kernel_bound = None
            resource.setrlimit(resource.RLIMIT_RTTIME, limits)
            signal.signal(signal.SIGXCPU, handler)  # type: ignore[arg-type]

    def _apply(self) -> None:
        want = (self._near or self._following_up) and not self._cooling
        if not self.permitted or want == self.active:
            return
        if want:
            try:
                self._previous = enter_realtime()
            except PermissionError:  # refused since check() (a lowered limit, say)
                logger.warning("real-time priority was refused; serving at normal priority")
                self.permitted = False
                return
            self.active = True
            self._cpu_mark = self._cpu_time()
            self._timer = self._clock.call_later(PERIOD, self._check_budget)
        else:
            self._cancel_timer()
            self.active = False
            previous, self._previous = self._previous, None
            if previous is not None:
                restore_scheduling(previous)

    def _check_budget(self) -> None:
        self._timer = None
        if not self.active:
            return
        used = self._cpu_time() - self._cpu_mark
        if used <= BUDGET * PERIOD:
            self._cpu_mark += used
            self._timer = self._clock.call_later(PERIOD, self._check_budget)
            return
        now = self._clock.now()
        logger.log(
            logging.WARNING if now >= self._quiet_until else logging.DEBUG,
            "the server used %.0f%% of a CPU while boosted to real-time; back to normal "
            "priority for %g s (a flood of requests while a deadline is near)",
            100 * used / PERIOD,
            COOLDOWN,
        )
        if now >= self._quiet_until:
            self._quiet_until = now + 60.0  # a sustained flood: one warning a minute
        self._cooling = True
        self._apply()
        self._timer = self._clock.call_later(COOLDOWN, self._cooled_down)

    def _cooled_down(self) -> None:
        self._timer = None
        self._cooling = False
        self._apply()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
