"""Event hook, logging and statistics of a timer server."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

__all__ = [
    "KILL_WORKER_PROCESS",
    "REQUEST_REJECTED",
    "TIMER_EXPIRED",
    "WATCHDOG_STARTED",
    "WATCHDOG_STOPPED",
    "WORKER_EXITED",
    "LogEvent",
    "Statistics",
]

logger = logging.getLogger("aiotimer")
# A library leaves output to the application: no "last resort" printing to stderr.
logger.addHandler(logging.NullHandler())

# torch's event names, so a torch ``log_event`` callback keeps working.
WATCHDOG_STARTED = "watchdog started"
WATCHDOG_STOPPED = "watchdog stopped"
TIMER_EXPIRED = "timer expired"
KILL_WORKER_PROCESS = "kill worker process"
# aiotimer's own.
WORKER_EXITED = "worker exited"
REQUEST_REJECTED = "request rejected"

#: ``log_event(name, info)``: called on the loop for every event; must not block.
LogEvent = Callable[[str, Mapping[str, object]], None]


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


class Counters:
    """The mutable counters behind ``Statistics``; the server owns one."""

    __slots__ = (
        "decision_count",
        "decision_max",
        "decision_sum",
        "expiries",
        "kills",
        "lag_count",
        "lag_max",
        "lag_sum",
        "reaper_errors",
        "rejected",
        "requests",
        "wakeups",
    )

    def __init__(self) -> None:
        self.requests = self.rejected = self.expiries = self.kills = 0
        self.reaper_errors = self.wakeups = 0
        self.lag_count = self.decision_count = 0
        self.lag_sum = self.lag_max = self.decision_sum = self.decision_max = 0.0

    def record_lag(self, lag: float) -> None:
        """Record how late the scheduler handled one expired timer."""
        self.lag_count += 1
        self.lag_sum += lag
        self.lag_max = max(self.lag_max, lag)

    def record_decision(self, lag: float) -> None:
        """Record how late the first signal for an expiry went out."""
        self.decision_count += 1
        self.decision_sum += lag
        self.decision_max = max(self.decision_max, lag)


def emit(log_event: LogEvent | None, name: str, info: Mapping[str, object]) -> None:
    """Call the user's event hook; a failing hook is logged, never raised into the server."""
    if log_event is None:
        return
    try:
        log_event(name, info)
    except Exception:
        logger.exception("log_event hook failed on %r", name)
