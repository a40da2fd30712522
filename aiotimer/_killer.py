"""Where a kill is decided: the expiry burst, reaper follow-ups and retries.

When deadlines pass, ``Killer.expire`` pops the due timers and calls each
process's reaper once, with every timer of it that expired.  Signals go out
first, in one burst, before any bookkeeping, logging or event: with many
processes expiring together, each is signalled as close to its deadline as the
machine allows.  Due timers are popped ``CHUNK`` at a time, and the processes
a chunk reached are signalled before the next chunk is popped; a process to be
killed leaves the heap with its first due timer (``detach``), so its other
timers, however many, cost the rest nothing.
A reaper that returns an awaitable is followed up in a task; one that raises is
retried with backoff.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import operator
import signal as _signal
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any

from ._clock import Clock
from ._events import (
    EVENT_LOGGED,
    Counters,
    EventBus,
    KillWorkerProcess,
    SignalSent,
    TimerExpired,
    logger,
)
from ._expiry import Expiry, Reaper
from ._heap import DeadlineHeap, OwnerTimers, Timer
from ._linux import pidfd_alive, signal_name
from ._processes import ProcessRegistry, WatchedProcess

__all__ = ["CHUNK", "FollowUps", "Killer", "backoff"]

#: Timers popped between two rounds of signals in a burst.
CHUNK = 64
#: Most heap entries a warm-up pass looks at.
WARM_UP_LIMIT = 256
#: "timer expired" events per process and burst (the rest are counted, and logged in sum).
EVENTS_PER_PROCESS = 100
_SCOPES_LOGGED = 5
#: Of a killed process's timers not yet popped, how many due ones its expiry lists
#: (the rest are dropped with it in O(1), and counted).
TAKEN_WITH_A_KILL = 16
#: Processes reported per loop turn after a burst: a burst of many processes is
#: reported over several turns, so a deadline due meanwhile is not held back.
REPORT_CHUNK = 8

_CHILD_SIGNALS = frozenset({_signal.SIGCHLD})
_DEADLINE = operator.itemgetter(0)

# One reaper call made in a burst: reaper, expiry, process, what it returned, what it raised.
_Call = tuple[Reaper, Expiry, WatchedProcess, object, Exception | None]


def backoff(first: float = 0.05, factor: float = 2.0, cap: float = 2.0) -> Iterator[float]:
    """Delays between retries: ``first``, then ``factor`` times as long, at most ``cap``."""
    delay = first
    while True:
        yield delay
        delay = min(delay * factor, cap)


def _requested_signal(timers: list[Timer]) -> int | None:
    """The signal the clients asked for: the first > 0 in expiry order, as torch does.

    ``None`` leaves the choice to the reaper (a timer said nothing); 0 means
    every timer asked for the expiry only to be reported.
    """
    for timer in timers:
        if timer.signal > 0:
            return timer.signal
        if timer.signal == 0:
            return None
    return 0


class FollowUps:
    """Reaper calls that go on after the burst: awaited, retried with backoff, timed out."""

    def __init__(
        self,
        clock: Clock,
        counters: Counters,
        *,
        attempts: int,
        timeout: float,
        on_busy: Callable[[bool], None] | None = None,
    ) -> None:
        self._on_busy = on_busy  # told when the first follow-up starts and the last ends
        self._clock = clock
        self._counters = counters
        self._attempts = attempts
        self._timeout = timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run follow-ups on ``loop``."""
        self._loop = loop

    async def aclose(self, grace: float = 0.0) -> None:
        """Let follow-ups finish for up to ``grace`` seconds, then cancel the rest."""
        tasks = list(self._tasks)
        if tasks and grace > 0:
            await asyncio.wait(tasks, timeout=grace)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def start(
        self,
        reaper: Reaper,
        expiry: Expiry,
        process: WatchedProcess,
        pending: Awaitable[object] | None,
        attempt: int,
    ) -> None:
        """Finish (``pending``) or retry (from ``attempt``) a reaper call in a task of its own.

        The task is cancelled, and the process SIGKILLed, if it runs longer than
        the timeout on the server's clock.
        """
        assert self._loop is not None
        coro: Coroutine[Any, Any, None] = self._retry(reaper, expiry, process, pending, attempt)
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        if len(self._tasks) == 1 and self._on_busy is not None:
            self._on_busy(True)
        handle = self._clock.call_later(
            self._timeout, lambda: self._timed_out(reaper, expiry, task)
        )

        def done(task: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            handle.cancel()
            if not self._tasks and self._on_busy is not None:
                self._on_busy(False)

        task.add_done_callback(done)

    def _timed_out(self, reaper: Reaper, expiry: Expiry, task: asyncio.Task[None]) -> None:
        if task.done():
            return
        task.cancel()
        if expiry.exited:
            return
        logger.error(
            "reaper %r did not finish with pid %d within %gs; cancelled it, sending SIGKILL",
            reaper,
            expiry.pid,
            self._timeout,
        )
        expiry.send_signal(_signal.SIGKILL)

    def failed(self, reaper: Reaper, expiry: Expiry, attempt: int, error: BaseException) -> None:
        """Count and log a reaper call that raised."""
        self._counters.reaper_errors += 1
        logger.error(
            "reaper %r failed for pid %d (attempt %d of %d)",
            reaper,
            expiry.pid,
            attempt,
            self._attempts,
            exc_info=error,
        )

    async def _retry(
        self,
        reaper: Reaper,
        expiry: Expiry,
        process: WatchedProcess,
        pending: Awaitable[object] | None,
        attempt: int,
    ) -> None:
        """Finish a reaper call that returned an awaitable, and retry failures with backoff."""
        delays = backoff()
        try:
            while True:
                if pending is not None:
                    try:
                        await pending
                        return
                    except Exception as exc:
                        self.failed(reaper, expiry, attempt, exc)
                    attempt += 1
                if expiry.exited or attempt > self._attempts:
                    break
                await expiry.sleep(next(delays))
                try:
                    result = reaper(expiry)
                except Exception as exc:
                    self.failed(reaper, expiry, attempt, exc)
                    attempt += 1
                    pending = None
                    continue
                if not isinstance(result, Awaitable):
                    return
                pending = result
            if not expiry.exited:
                # The reaper failed every time: the hang is still killed.
                logger.error(
                    "reaper %r failed %d times for pid %d; sending SIGKILL itself",
                    reaper,
                    self._attempts,
                    expiry.pid,
                )
                expiry.send_signal(_signal.SIGKILL)
        finally:
            process.reaping = False


class Killer:
    """Decides and carries out what happens to processes whose timers expired."""

    def __init__(
        self,
        heap: DeadlineHeap,
        registry: ProcessRegistry,
        clock: Clock,
        counters: Counters,
        events: EventBus,
        *,
        reaper: Reaper,
        attempts: int,
        timeout: float = 30.0,
        on_follow_ups: Callable[[bool], None] | None = None,
    ) -> None:
        self._heap = heap
        self._registry = registry
        self._clock = clock
        self._counters = counters
        self._events = events
        self.reaper = reaper
        self._follow_ups = FollowUps(
            clock, counters, attempts=attempts, timeout=timeout, on_busy=on_follow_ups
        )
        # During a burst: first signals, accounted for once the burst is over.
        self._kill_events: list[tuple[Expiry, int, float]] | None = None
        # A killed process's timers, dropped from the heap in O(1) and freed
        # one process per loop turn (10,000 timers take about 0.5 ms to free).
        self._trash: list[OwnerTimers] = []
        # owner -> its timers dropped with its kill and not listed in its expiry
        self._untold: dict[int, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run follow-ups on ``loop``."""
        self._loop = loop
        self._follow_ups.bind(loop)

    async def aclose(self, grace: float = 0.0) -> None:
        """Let follow-ups finish for up to ``grace`` seconds, then cancel the rest."""
        await self._follow_ups.aclose(grace)

    # -- before the burst ----------------------------------------------------

    def warm_up(self, deadline: float) -> None:
        """Touch what expiring at ``deadline`` will need, so it is in cache then.

        Idle for a while, the machine evicts the server's data and code from
        the CPU caches; cold, a 64-process expiry takes twice as long.  This pass
        is read-only (a timer released in the meantime costs nothing), looks at
        a bounded number of heap entries, and makes one syscall per process.
        """
        by_id = self._registry.by_id
        seen: set[int] = set()
        for timer in self._heap.due(deadline, limit=WARM_UP_LIMIT):
            owner = timer.owner
            if owner in seen:
                continue
            seen.add(owner)
            process = by_id.get(owner)
            if process is not None and process.pidfd >= 0:
                # The same syscall as the kill, with signal 0: warms the kernel side too.
                pidfd_alive(process.pidfd)

    # -- the burst -----------------------------------------------------------

    def expire(self, now: float) -> None:
        """Act on every timer due at ``now``: signals first, then bookkeeping and events."""
        by_id = self._registry.by_id
        pop = self._heap.pop_due
        detach = self._heap.detach
        attach = self._heap.attach
        groups: dict[int, list[Timer]] = {}  # owner -> its due timers, earliest first
        expiries: dict[int, Expiry] = {}
        undecided: list[tuple[Expiry, WatchedProcess]] = []
        calls: list[_Call] = []
        kill_events: list[tuple[Expiry, int, float]] = []
        self._kill_events = kill_events
        # The first victims die while the rest are being signalled; their
        # SIGCHLDs would interrupt the burst (uvloop handles them), so they
        # wait until it is over.
        mask = _signal.pthread_sigmask(_signal.SIG_BLOCK, _CHILD_SIGNALS)
        # Nor may a garbage collection fall between two signals: the burst
        # allocates, and a full collection of a big heap (a launcher that
        # imported torch) stops the loop for tens of milliseconds.
        collecting = gc.isenabled()
        gc.disable()
        try:
            more = True
            while more:
                # On the kill path: every microsecond here delays a signal, so
                # the loop keeps to locals and builds nothing it can defer.
                victims: list[tuple[Expiry, WatchedProcess]] = []
                for _ in range(CHUNK):
                    timer = pop(now)
                    if timer is None:
                        more = False
                        break
                    owner = timer[1]
                    group = groups.get(owner)
                    if group is not None:  # the expiry sees it: the list is shared
                        group.append(timer)
                        continue
                    group = groups[owner] = [timer]
                    process = by_id.get(owner)
                    if process is None or process.exited:
                        continue  # reported, not reaped
                    signal = timer[4]
                    expiry = Expiry(
                        process,
                        group,
                        now,
                        signal if signal > 0 else None,
                        self._signalled,
                        self._clock,
                    )
                    expiries[owner] = expiry
                    if signal < 0:  # decided once all its due timers are in
                        undecided.append((expiry, process))
                    else:
                        victims.append((expiry, process))
                        # Its other timers wait outside the heap until it is
                        # reaped: the next pops find the next process, so a
                        # process with 10,000 timers due costs one pop, not 64.
                        detach(owner)
                self._reap(victims, calls)
                for expiry, process in victims:
                    if expiry.signals_sent:
                        # Killed: its other due timers are dropped in one go, not
                        # popped one by one (a million of them took seconds).
                        self._take_rest(groups[process.id], process.id, now)
                    else:  # not killed: its other due timers are popped as ever
                        attach(process.id)
                        more = True
            decided: list[tuple[Expiry, WatchedProcess]] = []
            for expiry, process in undecided:
                requested = _requested_signal(groups[process.id])
                if requested == 0:
                    logger.info("pid %d asked for no signal on expiry; not reaping", process.pid)
                    continue
                expiry.requested_signal = requested
                decided.append((expiry, process))
            self._reap(decided, calls)
        finally:
            if collecting:
                gc.enable()
            _signal.pthread_sigmask(_signal.SIG_SETMASK, mask)
            self._kill_events = None
        for call in calls:
            self._reaper_called(*call)
        untold, self._untold = self._untold, {}
        jobs: list[Callable[[], None]] = [
            functools.partial(self._report, now, owner, timers, untold.get(owner, 0))
            for owner, timers in groups.items()
        ]
        jobs += [functools.partial(self._killed, *kill) for kill in kill_events]
        self._run_jobs(jobs)
        if self._trash:
            self._free_trash()

    def _run_jobs(self, jobs: list[Callable[[], None]]) -> None:
        """Run ``jobs`` (reports, in order): ``REPORT_CHUNK`` now, the rest on later turns."""
        for job in jobs[:REPORT_CHUNK]:
            job()
        rest = jobs[REPORT_CHUNK:]
        if rest:
            if self._loop is None:
                self._run_jobs(rest)
            else:
                self._loop.call_soon(self._run_jobs, rest)

    def _free_trash(self) -> None:
        """Free one dropped process's timers, and come back next turn for the next."""
        if self._trash:
            self._trash.pop()
        if self._trash and self._loop is not None:
            self._loop.call_soon(self._free_trash)
        elif self._trash:
            self._trash.clear()

    def _drop(self, owner: int) -> OwnerTimers | None:
        """Drop every timer of ``owner`` in O(1); they are freed on later turns."""
        dropped = self._heap.drop_owner(owner)
        if dropped is not None and dropped.count > TAKEN_WITH_A_KILL:
            self._trash.append(dropped)
        return dropped

    def _take_rest(self, group: list[Timer], owner: int, now: float) -> None:
        """Drop ``owner``'s other timers; a few due ones join ``group`` (earliest first).

        O(1) in its number of timers: a process killed with 10,000 timers due
        delays nobody else's deadline by popping or counting them.
        """
        dropped = self._drop(owner)
        if dropped is None:
            return
        rest = dropped.due(now, TAKEN_WITH_A_KILL)
        rest.sort(key=_DEADLINE)
        group.extend(rest)
        if dropped.count > len(rest):
            self._untold[owner] = dropped.count - len(rest)

    def _reap(self, victims: list[tuple[Expiry, WatchedProcess]], calls: list[_Call]) -> None:
        """Call the reaper of each victim not already being reaped; record what it returned."""
        burst: list[tuple[Reaper, Expiry, WatchedProcess]] = []
        default = self.reaper
        for expiry, process in victims:
            if process.reaping:
                continue
            process.reaping = True
            spawned = process.spawned
            reaper = (spawned.reaper if spawned is not None else None) or default
            burst.append((reaper, expiry, process))
        if len(burst) > 1:
            self._prepare(burst)
        append = calls.append
        for reaper, expiry, process in burst:
            try:
                append((reaper, expiry, process, reaper(expiry), None))
            except Exception as exc:
                append((reaper, expiry, process, None, exc))

    @staticmethod
    def _prepare(burst: list[tuple[Reaper, Expiry, WatchedProcess]]) -> None:
        """Call each reaper's optional ``prepare(expiry)`` before any of them reaps."""
        for reaper, expiry, _ in burst:
            prepare = getattr(reaper, "prepare", None)
            if prepare is None:
                continue
            try:
                prepare(expiry)
            except Exception:
                logger.exception("reaper %r failed to prepare pid %d", reaper, expiry.pid)

    # -- after the burst -----------------------------------------------------

    def _report(self, now: float, owner: int, timers: list[Timer], untold: int) -> None:
        """Count ``owner``'s expired timers; log one line and emit its events.

        Its first ``EVENTS_PER_PROCESS`` expired timers each get a "timer
        expired" event (torch emits one per timer up to the one that decides the
        signal); a burst of a million timers costs one log line, not a million.
        ``untold``: its timers dropped with its kill, not listed one by one.
        """
        counters = self._counters
        events = self._events
        process = self._registry.by_id.get(owner)
        pid = process.pid if process is not None else None
        spawned = None if process is None else process.spawned
        worker_pid = None if spawned is None else spawned.pid
        counters.record_lags(now, [t[0] for t in timers])
        scopes = ", ".join(repr(t.scope) for t in timers[:_SCOPES_LOGGED])
        more = len(timers) - _SCOPES_LOGGED
        logger.warning(
            "%s of pid %s expired: %s%s; the first %.3f ms after its deadline%s",
            "timer" if len(timers) == 1 else f"{len(timers)} timers",
            pid,
            scopes,
            f" and {more} more" if more > 0 else "",
            (now - timers[0].deadline) * 1e3,
            f"; {untold} other timers dropped with it" if untold else "",
            extra=EVENT_LOGGED,
        )
        if events:
            for timer in timers[:EVENTS_PER_PROCESS]:
                lag = now - timer.deadline
                events.emit(TimerExpired(pid, timer.scope, timer.deadline, lag, worker_pid))

    def _reaper_called(
        self,
        reaper: Reaper,
        expiry: Expiry,
        process: WatchedProcess,
        result: object,
        error: Exception | None,
    ) -> None:
        """Book-keep a reaper call made in a burst; follow up on what it returned."""
        if expiry.signals_sent:
            # It is being killed: its other timers would only call the reaper
            # again.  A reaper that failed or signalled nothing leaves them armed.
            self._drop(process.id)
        spawned = process.spawned
        if spawned is not None and spawned.pid == process.pid:
            spawned.expired_scopes.extend(expiry.scopes(EVENTS_PER_PROCESS))
        if error is not None:
            self._follow_ups.failed(reaper, expiry, 1, error)
            self._follow_ups.start(reaper, expiry, process, None, 2)
        elif isinstance(result, Awaitable):
            self._follow_ups.start(reaper, expiry, process, result, 1)
        else:
            process.reaping = False

    # -- kills -----------------------------------------------------------------

    def _signalled(self, expiry: Expiry, sig: int) -> None:
        at = expiry.signal_times[-1]
        if len(expiry.signals_sent) != 1:  # an escalation: reported as it happens
            self._counters.record_signal(signal_name(sig))
            logger.warning(
                "sent %s to pid %d (%.3f s after its deadline)",
                signal_name(sig),
                expiry.pid,
                at - expiry.deadline,
                extra=EVENT_LOGGED,
            )
            if self._events:
                self._events.emit(
                    SignalSent(expiry.pid, sig, at - expiry.deadline, expiry.worker_pid)
                )
            return
        if self._kill_events is not None:  # in a burst: account for it after the burst
            self._kill_events.append((expiry, sig, at))
        else:
            self._killed(expiry, sig, at)

    def _killed(self, expiry: Expiry, sig: int, at: float) -> None:
        """Account for the first signal sent to ``expiry``'s process, at time ``at``."""
        latency = at - expiry.deadline
        self._counters.kills += 1
        self._counters.record_decision(latency)
        self._counters.record_signal(signal_name(sig))
        spawned = expiry.spawned
        if spawned is not None and spawned.pid == expiry.pid:
            spawned.killed_by_watchdog = True
        logger.warning(
            "sent %s to pid %d (%.3f ms after its deadline)",
            signal_name(sig),
            expiry.pid,
            latency * 1e3,
            extra=EVENT_LOGGED,
        )
        if self._events:
            scopes = expiry.scopes(EVENTS_PER_PROCESS)
            self._events.emit(
                KillWorkerProcess(expiry.pid, sig, scopes, latency, expiry.worker_pid)
            )
