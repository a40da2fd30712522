"""Applying decoded requests: the ``RequestSink`` every transport feeds.

A transport decodes bytes into ``Request``s (``_protocol``) and hands them here
with a reason for each thing it could not decode.  The dispatcher admits each
request's process through the registry (once per process and channel), arms or
releases its timer in the heap within the process's caps, and tells the
scheduler when the earliest deadline moved.  After each batch it lets a
deadline that has passed go first (``Scheduler.run_due``), so a busy client can
never hold back another's kill for longer than one bounded batch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ._channel import Channel
from ._clock import Cancellable, Clock, wall_to_monotonic
from ._events import EVENT_LOGGED, Counters, EventBus, RequestRejected, logger
from ._heap import DeadlineHeap
from ._processes import ProcessRegistry
from ._protocol import _AFTER, _HELLO, _RELEASE, _STAMPED, _WALL, Request
from ._scheduler import Scheduler

__all__ = ["Caps", "Dispatcher", "RejectionLog"]


@dataclass(frozen=True)
class Caps:
    """Per-process limits on what requests may arm (``None``: no limit)."""

    #: live timers one process may have
    timers_per_process: int | None = 10_000
    #: characters of the scopes of one process's live timers
    scope_chars_per_process: int | None = 1 << 20
    #: bytes the live timers of one worker tree may hold (``TIMER_BYTES`` plus the
    #: scope per timer): 64 MiB, some 300,000 timers, whatever its processes number
    timer_bytes_per_tree: int | None = 64 << 20


@dataclass
class _Period:
    """One channel's rejections in the current period."""

    name: str
    handle: Cancellable | None = None
    logged: int = 0
    suppressed: int = 0
    last: str = ""


class RejectionLog:
    """Counts every rejection exactly; logs and reports them at a bounded rate per channel.

    In each ``period`` (on the server's clock), a channel's first ``full``
    rejections are logged and reported one by one; the rest are summed up in
    one line and one event at the period's end.  A flood of garbage costs a
    handful of log records, not one per byte or per line.
    """

    def __init__(
        self,
        clock: Clock,
        counters: Counters,
        events: EventBus,
        *,
        full: int = 5,
        period: float = 10.0,
    ) -> None:
        self._clock = clock
        self._counters = counters
        self._events = events
        self.full = full
        self.period = period
        self._periods: dict[int, _Period] = {}

    def add(
        self, channel: Channel, reasons: Sequence[str], kind: str = "malformed", *, log: bool = True
    ) -> None:
        """Count, and log or summarise, the rejections ``reasons`` (of ``kind``) on ``channel``.

        Channels sharing a ``rejection_group`` (a socket listener's connections)
        share one bounded rate.  ``log=False``: count only (said already).
        """
        self._counters.record_rejected(kind, len(reasons))
        if not log:
            return
        cid, name = channel.rejection_group
        period = self._periods.get(cid)
        if period is None:
            period = self._periods[cid] = _Period(name)
            period.handle = self._clock.call_later(self.period, lambda: self._end_period(cid))
        for reason in reasons:
            if period.logged < self.full:
                period.logged += 1
                logger.warning(
                    "rejected a request on %s: %s", channel.name, reason, extra=EVENT_LOGGED
                )
                if self._events:
                    self._events.emit(RequestRejected(channel.name, reason))
            else:
                period.suppressed += 1
                period.last = reason

    def _end_period(self, cid: int) -> None:
        period = self._periods.pop(cid, None)
        if period is None or not period.suppressed:
            return
        logger.warning(
            "rejected %d more requests on %s in the last %gs (not logged one by one); the last: %s",
            period.suppressed,
            period.name,
            self.period,
            period.last,
            extra=EVENT_LOGGED,
        )
        if self._events:
            reason = f"{period.suppressed} more; the last: {period.last}"
            self._events.emit(RequestRejected(period.name, reason, period.suppressed))

    def close(self) -> None:
        """Log what is still summed up, and stop."""
        for cid, period in list(self._periods.items()):
            if period.handle is not None:
                period.handle.cancel()
            self._end_period(cid)


class Dispatcher:
    """Applies requests from channels to the heap: the server's ``RequestSink``."""

    def __init__(
        self,
        heap: DeadlineHeap,
        registry: ProcessRegistry,
        scheduler: Scheduler,
        clock: Clock,
        counters: Counters,
        events: EventBus,
        *,
        caps: Caps | None = None,
        on_channel_closed: Callable[[Channel], None] | None = None,
    ) -> None:
        self._heap = heap
        self._registry = registry
        self._scheduler = scheduler
        self._clock = clock
        self._counters = counters
        self.rejections = RejectionLog(clock, counters, events)
        self.caps = caps or Caps()
        self._on_channel_closed = on_channel_closed
        #: whether requests are applied (False once the server begins closing)
        self.open = False

    def close(self) -> None:
        """Apply nothing more; flush the rejection summaries."""
        self.open = False
        self.rejections.close()

    def reject(
        self, channel: Channel, reason: str, kind: str = "malformed", *, log: bool = True
    ) -> None:
        """Count, and log at a bounded rate (unless ``log`` is false), one refused request."""
        self.rejections.add(channel, (reason,), kind, log=log)

    def admit(self, channel: Channel, pid: int, pidfd: int | None = None) -> str | None:
        """Admit ``pid`` on ``channel`` now (a socket's peer, on accept); ``None``, or why not.

        Not counted or logged here: the caller says it once per process.
        ``pidfd`` is taken over (kept by the registry, or closed).
        """
        if not self.open:
            if pidfd is not None:
                os.close(pidfd)
            return "the timer server is closing"
        admitted = self._registry.admit(channel, pid, revalidate=True, pidfd=pidfd)
        return admitted if isinstance(admitted, str) else None

    def dispatch(
        self, channel: Channel, requests: Sequence[Request], errors: Sequence[str] = ()
    ) -> None:
        """Apply ``requests`` from ``channel``; count each of ``errors`` as a rejection."""
        if errors:
            self.rejections.add(channel, errors)
        if not self.open:
            return
        heap = self._heap
        registry = self._registry
        by_pid = registry.by_pid
        cid = channel.id
        revalidate = channel.revalidate
        max_timers = self.caps.timers_per_process
        max_chars = self.caps.scope_chars_per_process
        max_tree_bytes = self.caps.timer_bytes_per_tree
        # One reading of the clock for the batch: it arrived at one instant.
        now = self._clock.now()
        accepted = 0
        earliest = math.inf
        stamped, after, release, hello, wall = _STAMPED, _AFTER, _RELEASE, _HELLO, _WALL
        for op, pid, scope, value, sig, sent in requests:
            process = by_pid.get(pid)
            # A HELLO is a process's first word: if an exited process's pid was
            # reused, it must not be mistaken for the exited one.
            check = revalidate or op is hello
            if (
                process is None
                or process.exited
                or cid not in process.channels
                or (check and process.gone())
            ):
                admitted = registry.admit(channel, pid, revalidate=check)
                if isinstance(admitted, str):
                    self.reject(channel, admitted, "not_admitted")
                    continue
                process = admitted
            if op is stamped:
                if not process.clock_exact:
                    # Every sample is the true offset plus the request's transit:
                    # the smallest seen is the best, and never too small.
                    offset = now - sent
                    if offset < process.clock_offset:
                        process.clock_offset = offset
                deadline = value + process.clock_offset
                if deadline < now:
                    deadline = now
            elif op is release:
                heap.remove(process.id, scope, channel=cid)
                accepted += 1
                continue
            elif op is after:
                deadline = now + value
            elif op is hello:
                process.dump_signal = sig
                accepted += 1
                continue
            else:
                deadline = wall_to_monotonic(self._clock, value) if op is wall else value
                # A deadline already past counts from now: it is due at once,
                # and its lateness is measured from when it arrived.
                if deadline < now:
                    deadline = now
            timer = heap.try_set(
                process.id,
                scope,
                deadline,
                channel=cid,
                signal=sig,
                max_timers=max_timers,
                max_scope_chars=max_chars,
                group=process.tree,
                max_group_bytes=max_tree_bytes,
            )
            if timer is None:
                timers, chars = heap.usage(process.id)
                held = heap.group_bytes(process.tree)
                self.reject(
                    channel,
                    f"pid {pid} has {timers} timers with {chars} characters of scopes, its "
                    f"worker tree {process.tree} {held} bytes of timers; {scope[:80]!r} would "
                    f"exceed a cap (timers_per_process={max_timers}, "
                    f"scope_chars_per_process={max_chars}, "
                    f"timer_bytes_per_tree={max_tree_bytes})",
                    "over_cap",
                )
                continue
            accepted += 1
            if deadline < earliest:
                earliest = deadline
        self._counters.requests += accepted
        if earliest < math.inf:
            self._scheduler.deadline_added(earliest)
        # Let a deadline that passed while this batch was decoded go first.
        self._scheduler.run_due()

    def channel_closed(self, channel: Channel) -> None:
        """``channel`` will send nothing more.

        The timers armed on it stay armed: a process that closed its end of a
        pipe (or lost its transport) and then hangs must still be killed.
        They go when the process itself exits.
        """
        if self._on_channel_closed is not None:
            self._on_channel_closed(channel)
        self._registry.channel_closed(channel.id)
