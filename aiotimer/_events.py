"""What a timer server reports: typed event records, the ``log_event`` adapter, counters.

Inside, events are frozen dataclasses, so every consumer reads typed fields.
At the edge, ``log_event(name, info)`` hooks get torch's event names
("watchdog started", "timer expired", ...) and a plain mapping, as torch's
``FileTimerServer`` hands them out.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = [
    "INCIDENT_RECORDED",
    "KILL_WORKER_PROCESS",
    "REQUEST_REJECTED",
    "SIGNAL_SENT",
    "TIMER_EXPIRED",
    "WATCHDOG_STARTED",
    "WATCHDOG_STOPPED",
    "WORKER_EXITED",
    "EVENT_LOGGED",
    "BUCKETS",
    "Counters",
    "Histogram",
    "Event",
    "EventBus",
    "IncidentRecorded",
    "KillWorkerProcess",
    "LogEvent",
    "RequestRejected",
    "SignalSent",
    "Statistics",
    "TimerExpired",
    "WatchdogStarted",
    "WatchdogStopped",
    "WorkerExited",
    "logger",
]

logger = logging.getLogger("aiotimer")
# A library leaves output to the application: no "last resort" printing to stderr.
logger.addHandler(logging.NullHandler())
#: ``extra=`` for log records that say what an event also says; an application
#: that shows the events (``aiotimer run``) filters these out (``record.aiotimer_event``).
EVENT_LOGGED = {"aiotimer_event": True}

# torch's event names, so a torch ``log_event`` callback keeps working.
WATCHDOG_STARTED = "watchdog started"
WATCHDOG_STOPPED = "watchdog stopped"
TIMER_EXPIRED = "timer expired"
KILL_WORKER_PROCESS = "kill worker process"
# aiotimer's own.
WORKER_EXITED = "worker exited"
REQUEST_REJECTED = "request rejected"
SIGNAL_SENT = "signal sent"
INCIDENT_RECORDED = "incident recorded"

#: ``log_event(name, info)``: called on the loop for every event; must not block.
LogEvent = Callable[[str, Mapping[str, object]], None]


@dataclass(frozen=True)
class Event:
    """Base of every event record; ``name`` is the event's (torch-compatible) name."""

    name: ClassVar[str] = ""

    def info(self) -> dict[str, object]:
        """The fields as a mapping, as ``log_event`` hooks receive them."""
        return dict(self.__dict__)


@dataclass(frozen=True)
class WatchdogStarted(Event):
    """The server started watching."""

    name: ClassVar[str] = WATCHDOG_STARTED


@dataclass(frozen=True)
class WatchdogStopped(Event):
    """The server stopped watching."""

    name: ClassVar[str] = WATCHDOG_STOPPED


@dataclass(frozen=True)
class TimerExpired(Event):
    """A timer's deadline passed without a release.

    ``deadline`` is on the server's monotonic clock; ``lag`` is how late the
    server handled it.  ``pid`` is ``None`` if the process had already gone.
    """

    name: ClassVar[str] = TIMER_EXPIRED
    pid: int | None
    scope: str
    deadline: float
    lag: float
    #: the spawned worker the process is, or descends from (``None``: not one of ours)
    worker_pid: int | None = None


@dataclass(frozen=True)
class KillWorkerProcess(Event):
    """The first signal went to a process whose timers expired.

    ``latency`` is the delay from the earliest expired deadline to the signal.
    """

    name: ClassVar[str] = KILL_WORKER_PROCESS
    pid: int
    signal: int
    scopes: list[str]
    latency: float
    #: the spawned worker the process is, or descends from (``None``: not one of ours)
    worker_pid: int | None = None


@dataclass(frozen=True)
class SignalSent(Event):
    """A further signal went to a process already signalled: an escalation (SIGTERM -> SIGKILL).

    ``latency`` is the delay from the earliest expired deadline to this signal.
    """

    name: ClassVar[str] = SIGNAL_SENT
    pid: int
    signal: int
    latency: float
    worker_pid: int | None = None


@dataclass(frozen=True)
class WorkerExited(Event):
    """A spawned worker exited; its timers were cleared.

    ``returncode`` is its exit status as ``asyncio`` reports it (negative: killed
    by that signal), or ``None`` if the kernel no longer had it to tell.
    """

    name: ClassVar[str] = WORKER_EXITED
    pid: int
    returncode: int | None
    timers_cleared: int
    worker: Any = field(default=None, compare=False)


@dataclass(frozen=True)
class IncidentRecorded(Event):
    """An expiry's incident (stacks, actions) was recorded; ``path`` is its JSON file, if any."""

    name: ClassVar[str] = INCIDENT_RECORDED
    pid: int
    path: str | None
    summary: str
    worker_pid: int | None = None


@dataclass(frozen=True)
class RequestRejected(Event):
    """A request was refused (malformed, out of range, or naming a process it may not)."""

    name: ClassVar[str] = REQUEST_REJECTED
    channel: str
    reason: str
    #: how many rejections this event stands for (more than 1: a periodic summary)
    count: int = 1


class EventBus:
    """Delivers each event to every subscriber; a failing subscriber is logged, never raised."""

    __slots__ = ("_subscribers",)

    def __init__(self) -> None:
        self._subscribers: list[Callable[[Event], None]] = []

    def subscribe(self, subscriber: Callable[[Event], None]) -> None:
        """Call ``subscriber(event)`` for every event from now on."""
        self._subscribers.append(subscriber)

    def subscribe_log_event(self, log_event: LogEvent) -> None:
        """Call a torch-style ``log_event(name, info)`` hook for every event from now on."""
        self.subscribe(lambda event: log_event(event.name, event.info()))

    def __bool__(self) -> bool:
        return bool(self._subscribers)

    def emit(self, event: Event) -> None:
        """Deliver ``event``."""
        for subscriber in self._subscribers:
            try:
                subscriber(event)
            except Exception:
                logger.exception("event subscriber %r failed on %r", subscriber, event.name)


@dataclass(frozen=True)
class Statistics:
    """A snapshot of a server's counters (``TimerServer.statistics()``)."""

    #: timers armed now
    active_timers: int
    #: processes the server tracks (workers and the processes that sent requests)
    watched_processes: int
    #: seconds until the earliest deadline, or ``None`` when no timer is armed
    next_deadline_in: float | None
    #: requests accepted since start
    requests: int
    #: requests rejected as malformed or not entitled
    rejected: int
    #: timers that expired
    expiries: int
    #: processes a reaper signalled
    kills: int
    #: processes the guard SIGKILLed itself because the loop did not answer (see ``guard_after``)
    guard_kills: int
    #: reaper calls that raised
    reaper_errors: int
    #: times the scheduler woke up
    wakeups: int
    #: worst and mean delay from a deadline to the scheduler handling it
    expiry_lag_max: float
    expiry_lag_mean: float
    #: worst and mean delay from a deadline to the first signal sent for it
    decision_lag_max: float
    decision_lag_mean: float


#: Histogram bucket bounds, seconds (Prometheus's ``le``), for latencies from 0.1 ms to 10 s.
BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class Histogram:
    """Counts of observations per bucket of ``BUCKETS`` (not cumulative), and their sum."""

    __slots__ = ("counts", "sum", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # the last: above every bound
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count one observation."""
        self.counts[bisect.bisect_left(BUCKETS, value)] += 1
        self.total += 1
        self.sum += value

    def observe_descending(self, values: Sequence[float]) -> None:
        """Count many observations, given largest first, in O(buckets x log n)."""
        n = len(values)
        if not n:
            return
        below = 0  # how many are <= the previous bound
        for i, bound in enumerate(BUCKETS):
            # values descend: the ones <= bound are a suffix
            lo, hi = 0, n
            while lo < hi:
                mid = (lo + hi) // 2
                if values[mid] <= bound:
                    hi = mid
                else:
                    lo = mid + 1
            upto = n - lo
            self.counts[i] += upto - below
            below = upto
        self.counts[-1] += n - below
        self.total += n
        self.sum += math.fsum(values)

    def cumulative(self) -> list[tuple[float, int]]:
        """``(le, count of observations <= le)`` pairs, the last with ``le`` = +inf."""
        out = []
        running = 0
        for bound, count in zip((*BUCKETS, math.inf), list(self.counts), strict=True):
            running += count
            out.append((bound, running))
        return out


class Counters:
    """The mutable counters behind ``Statistics``; the server's parts share one."""

    __slots__ = (
        "decision_count",
        "decision_hist",
        "decision_max",
        "decision_sum",
        "expiries",
        "guard_blocked_for",
        "guard_kills",
        "kills",
        "kills_by_signal",
        "lag_count",
        "lag_hist",
        "lag_max",
        "lag_sum",
        "reaper_errors",
        "rejected",
        "rejected_by",
        "requests",
        "wakeups",
    )

    def __init__(self) -> None:
        self.requests = self.rejected = self.expiries = self.kills = 0
        self.reaper_errors = self.wakeups = 0
        #: written by the guard's thread only: its kills, and how long the loop
        #: had left a deadline unanswered at its last kill
        self.guard_kills = 0
        self.guard_blocked_for = 0.0
        self.lag_count = self.decision_count = 0
        self.lag_sum = self.lag_max = self.decision_sum = self.decision_max = 0.0
        #: rejections by kind: "malformed", "not_admitted", "over_cap"
        self.rejected_by: dict[str, int] = {}
        #: every signal the watchdog sent (escalations too), by signal name
        self.kills_by_signal: dict[str, int] = {}
        self.decision_hist = Histogram()
        self.lag_hist = Histogram()

    def record_lags(self, now: float, deadlines: Sequence[float]) -> None:
        """Count timers expired at ``deadlines`` (earliest first), handled at ``now``."""
        if not deadlines:
            return
        self.expiries += len(deadlines)
        self.lag_count += len(deadlines)
        self.lag_sum += len(deadlines) * now - sum(deadlines)
        self.lag_max = max(self.lag_max, now - deadlines[0])
        self.lag_hist.observe_descending([now - d for d in deadlines])

    def record_decision(self, lag: float) -> None:
        """Record how late the first signal for an expiry went out."""
        self.decision_count += 1
        self.decision_sum += lag
        self.decision_max = max(self.decision_max, lag)
        self.decision_hist.observe(lag)

    def record_rejected(self, kind: str, count: int = 1) -> None:
        """Count ``count`` rejections of ``kind``."""
        self.rejected += count
        self.rejected_by[kind] = self.rejected_by.get(kind, 0) + count

    def record_signal(self, name: str) -> None:
        """Count one signal the watchdog sent."""
        self.kills_by_signal[name] = self.kills_by_signal.get(name, 0) + 1

    def snapshot(
        self, *, active_timers: int, watched_processes: int, next_deadline_in: float | None
    ) -> Statistics:
        """The counters now, with the server's gauges."""
        return Statistics(
            active_timers=active_timers,
            watched_processes=watched_processes,
            next_deadline_in=next_deadline_in,
            requests=self.requests,
            rejected=self.rejected,
            expiries=self.expiries,
            kills=self.kills,
            guard_kills=self.guard_kills,
            reaper_errors=self.reaper_errors,
            wakeups=self.wakeups,
            expiry_lag_max=self.lag_max,
            expiry_lag_mean=self.lag_sum / self.lag_count if self.lag_count else 0.0,
            decision_lag_max=self.decision_max,
            decision_lag_mean=self.decision_sum / self.decision_count
            if self.decision_count
            else 0.0,
        )
