"""Applying decoded requests: the ``RequestSink`` every transport feeds.

A transport decodes bytes into ``Request``s (``_protocol``) and hands them here
with a reason for each one it could not decode.  The dispatcher admits each
request's process through the registry (once per process and channel), arms or
releases its timer in the heap, and tells the scheduler when the earliest
deadline moved.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from ._clock import Clock, wall_to_monotonic
from ._events import Counters, EventBus, RequestRejected, logger
from ._heap import DeadlineHeap
from ._processes import ProcessRegistry
from ._protocol import Op, Request
from ._scheduler import Scheduler
from .transports._base import Channel

__all__ = ["Dispatcher"]


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
        on_channel_closed: Callable[[Channel], None] | None = None,
    ) -> None:
        self._heap = heap
        self._on_channel_closed = on_channel_closed
        self._registry = registry
        self._scheduler = scheduler
        self._clock = clock
        self._counters = counters
        self._events = events
        #: whether requests are applied (False once the server begins closing)
        self.open = False

    def reject(self, channel: Channel, reason: str) -> None:
        """Count, log and report one refused request."""
        self._counters.rejected += 1
        logger.warning("rejected a request on %s: %s", channel.name, reason)
        if self._events:
            self._events.emit(RequestRejected(channel.name, reason))

    def dispatch(
        self, channel: Channel, requests: Sequence[Request], errors: Sequence[str] = ()
    ) -> None:
        """Apply ``requests`` from ``channel``; log each of ``errors`` as a rejection."""
        for error in errors:
            self.reject(channel, error)
        if not self.open:
            return
        heap = self._heap
        by_pid = self._registry.by_pid
        cid = channel.id
        revalidate = channel.revalidate
        accepted = 0
        earliest = math.inf
        for op, pid, scope, value, sig in requests:
            process = by_pid.get(pid)
            if (
                process is None
                or process.exited
                or cid not in process.channels
                or (revalidate and process.gone())
            ):
                admitted = self._registry.admit(channel, pid, revalidate=revalidate)
                if isinstance(admitted, str):
                    self.reject(channel, admitted)
                    continue
                process = admitted
            accepted += 1
            if op is Op.ACQUIRE:
                deadline = value
            elif op is Op.RELEASE:
                heap.remove(process.id, scope, channel=cid)
                continue
            elif op is Op.ACQUIRE_WALL:
                deadline = wall_to_monotonic(self._clock, value)
            else:
                process.dump_signal = sig
                continue
            heap.set(process.id, scope, deadline, channel=cid, signal=sig)
            if deadline < earliest:
                earliest = deadline
        self._counters.requests += accepted
        if earliest < math.inf:
            self._scheduler.deadline_added(earliest)

    def channel_closed(self, channel: Channel) -> None:
        """``channel`` will send nothing more: clear the timers armed on it."""
        if self._on_channel_closed is not None:
            self._on_channel_closed(channel)
        cid = channel.id
        for process in self._registry:
            if cid in process.channels:
                process.channels.discard(cid)
                for timer in self._heap.timers_of(process.id):
                    if timer.channel == cid:
                        self._heap.remove(process.id, timer.scope, channel=cid)
