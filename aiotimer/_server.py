"""TimerServer: a watchdog that embeds in the caller's running asyncio loop."""

from __future__ import annotations

import asyncio
import enum
import math
import os
import signal as _signal
from collections.abc import Awaitable, Coroutine, Mapping, Sequence
from typing import Any

from ._clock import Cancellable, Clock, SystemClock
from ._events import (
    KILL_WORKER_PROCESS,
    REQUEST_REJECTED,
    TIMER_EXPIRED,
    WATCHDOG_STARTED,
    WATCHDOG_STOPPED,
    WORKER_EXITED,
    Counters,
    LogEvent,
    Statistics,
    emit,
    logger,
)
from ._heap import DeadlineHeap, Timer
from ._process import ProcessGone, open_pidfd, pidfd_alive
from ._protocol import ENV_DUMP_SIGNAL, ENV_FD, Op, Request
from ._reap import Expiry, Reaper, SignalReaper
from ._validate import check_signal
from ._workers import WatchedProcess, Worker
from .transports._base import Channel
from .transports._local import LocalChannel
from .transports._pipe import PipeChannel

__all__ = ["TimerServer"]

# How long before a deadline the server wakes to warm up for it (see _warm_up).
_WARM_UP = 0.002

_CHILD_SIGNALS = frozenset({_signal.SIGCHLD})

# How long aclose() waits for a worker it killed to be reaped.
_CLOSE_WAIT = 5.0


def _signal_name(sig: int) -> str:
    try:
        return _signal.Signals(sig).name
    except ValueError:
        return str(sig)


class _State(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


class TimerServer:
    """Watches deadlines that workers arm and acts on a worker when one passes.

    Embed it in a running loop with ``async with TimerServer() as server:`` (or
    ``await server.start()`` ... ``await server.aclose()``), then
    ``await server.spawn(...)`` workers.  One scheduler coroutine sleeps until the
    earliest deadline; nothing polls.

    ``reaper`` is called once per process with its expired timers (default:
    ``SignalReaper()``, an immediate SIGKILL through a pidfd).  ``clock`` is the
    time source (``aiotimer.testing.MockClock`` in tests).  ``log_event`` receives
    torch's event names plus aiotimer's own.  ``dump_signal`` is the signal that
    spawned workers register a stack dump on (default: the reaper's
    ``dump_signal`` if it has one).  A reaper that raises is retried
    ``reap_attempts`` times with exponential backoff.
    """

    def __init__(
        self,
        *,
        reaper: Reaper | None = None,
        clock: Clock | None = None,
        log_event: LogEvent | None = None,
        dump_signal: int | str | None = None,
        reap_attempts: int = 5,
    ) -> None:
        if reaper is not None and not callable(reaper):
            raise TypeError(f"`reaper` must be callable, got {reaper!r}")
        if clock is not None and not isinstance(clock, Clock):
            raise TypeError(f"`clock` must implement aiotimer.Clock, got {clock!r}")
        if log_event is not None and not callable(log_event):
            raise TypeError(f"`log_event` must be callable, got {log_event!r}")
        if isinstance(reap_attempts, bool) or not isinstance(reap_attempts, int):
            raise TypeError(f"`reap_attempts` must be an int >= 1, got {reap_attempts!r}")
        if reap_attempts < 1:
            raise ValueError(f"`reap_attempts` must be an int >= 1, got {reap_attempts!r}")
        self._reaper: Reaper = SignalReaper() if reaper is None else reaper
        self._clock: Clock = SystemClock() if clock is None else clock
        self._log_event = log_event
        if dump_signal is None:
            wanted = getattr(self._reaper, "dump_signal", None)
            dump_signal = wanted if getattr(self._reaper, "dump_stacks", False) else None
        self.dump_signal = None if dump_signal is None else check_signal("dump_signal", dump_signal)
        self._reap_attempts = reap_attempts

        self._heap = DeadlineHeap()
        self._counters = Counters()
        self._state = _State.CREATED
        self._loop: asyncio.AbstractEventLoop | None = None
        self._alarm_handle: Cancellable | None = None
        self._armed = math.inf
        self._warmed_for = math.inf
        self._closed: asyncio.Event | None = None
        # pid -> the live process with that pid; id -> process, for expiries
        self._processes: dict[int, WatchedProcess] = {}
        self._by_id: dict[int, WatchedProcess] = {}
        self._channels: set[Channel] = set()
        self._workers: set[Worker] = set()
        self._reapers: set[asyncio.Task[None]] = set()
        self._listeners: list[Any] = []
        # During an expiry burst: kill events held back until the burst is over.
        self._kill_events: list[tuple[Expiry, int, float]] | None = None
        self._reaped: dict[int, WatchedProcess] = {}

    def __repr__(self) -> str:
        return (
            f"<TimerServer {self._state.value} timers={len(self._heap)} "
            f"workers={len(self._workers)} clock={self._clock!r}>"
        )

    # -- lifecycle -------------------------------------------------------

    @property
    def clock(self) -> Clock:
        """The clock deadlines are kept on."""
        return self._clock

    @property
    def running(self) -> bool:
        """Whether the server has started and not begun closing."""
        return self._state is _State.RUNNING

    async def start(self) -> None:
        """Start the scheduler on the running loop; returns at once."""
        if self._state is not _State.CREATED:
            raise RuntimeError(f"cannot start a TimerServer that is {self._state.value}")
        self._loop = asyncio.get_running_loop()
        self._closed = asyncio.Event()
        self._state = _State.RUNNING
        logger.info("timer server started (clock=%r, reaper=%r)", self._clock, self._reaper)
        emit(self._log_event, WATCHDOG_STARTED, {})

    async def aclose(self) -> None:
        """Stop watching: cancel reapers, close transports, kill and reap spawned workers."""
        if self._state in (_State.CLOSING, _State.CLOSED):
            if self._closed is not None:
                await self._closed.wait()
            return
        if self._state is _State.CREATED:
            self._state = _State.CLOSED
            return
        self._state = _State.CLOSING
        self._disarm()
        tasks = list(self._reapers)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for listener in reversed(self._listeners):
            try:
                await listener.aclose()
            except Exception:
                logger.exception("closing %r failed", listener)
        for channel in list(self._channels):
            channel.close()
        self._channels.clear()
        for worker in list(self._workers):
            if worker.returncode is None:
                worker.kill()
        for worker in list(self._workers):
            try:
                await asyncio.wait_for(worker.wait(), _CLOSE_WAIT)
            except TimeoutError:
                logger.error("worker %d did not exit after SIGKILL", worker.pid)
        for process in list(self._processes.values()):
            process.close()
        self._processes.clear()
        self._by_id.clear()
        self._state = _State.CLOSED
        assert self._closed is not None
        self._closed.set()
        logger.info("timer server stopped")
        emit(self._log_event, WATCHDOG_STOPPED, {})

    async def __aenter__(self) -> TimerServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def serve_forever(self) -> None:
        """Start if needed, then wait until ``aclose()`` (closes the server if cancelled)."""
        if self._state is _State.CREATED:
            await self.start()
        assert self._closed is not None
        try:
            await self._closed.wait()
        finally:
            await asyncio.shield(self.aclose())

    def add_listener(self, listener: Any) -> None:
        """Register a transport listener to be ``aclose()``-d with the server."""
        self._listeners.append(listener)
        if isinstance(listener, Channel):
            self._channels.add(listener)

    def local_channel(
        self,
        *,
        roots: Sequence[int] = (),
        pids: Sequence[int] | None = None,
        name: str = "local channel",
    ) -> LocalChannel:
        """A channel for requests made in this process (the launcher's own code, tests)."""
        return LocalChannel(self, roots=roots, pids=pids, name=name)

    def _require_running(self) -> asyncio.AbstractEventLoop:
        if self._state is not _State.RUNNING or self._loop is None:
            raise RuntimeError(f"the TimerServer is {self._state.value}, not running")
        return self._loop

    # -- workers ---------------------------------------------------------

    async def spawn(
        self,
        program: str | os.PathLike[str],
        *args: str | os.PathLike[str],
        env: Mapping[str, str] | None = None,
        reaper: Reaper | None = None,
        process_group: bool = False,
        **kwargs: Any,
    ) -> Worker:
        """Start ``program args...`` as a watched worker and return its handle.

        The worker finds its request pipe through ``AIOTIMER_FD`` in its
        environment; ``aiotimer.expires``/``aiotimer.timer`` need no set-up in it.
        ``reaper`` overrides the server's for this worker.  With
        ``process_group`` the worker leads a new process group, which the
        built-in reaper can signal as a whole.  Other keyword arguments go to
        ``asyncio.create_subprocess_exec`` (``stdout=PIPE``, ``cwd=``, ...).
        """
        loop = self._require_running()
        if reaper is not None and not callable(reaper):
            raise TypeError(f"`reaper` must be callable, got {reaper!r}")
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        child_env = dict(os.environ if env is None else env)
        child_env[ENV_FD] = str(write_fd)
        if self.dump_signal is not None:
            child_env[ENV_DUMP_SIGNAL] = str(int(self.dump_signal))
        else:
            child_env.pop(ENV_DUMP_SIGNAL, None)
        pass_fds = (*kwargs.pop("pass_fds", ()), write_fd)
        if process_group:
            kwargs["start_new_session"] = True
        try:
            process = await asyncio.create_subprocess_exec(
                program, *args, env=child_env, pass_fds=pass_fds, **kwargs
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        worker = Worker(process, reaper=reaper, process_group=process_group)
        self._workers.add(worker)
        channel = PipeChannel(self, worker, read_fd, loop)
        self._channels.add(channel)
        try:
            watched = WatchedProcess(process.pid, loop, self._process_exited, worker=worker)
        except ProcessGone:
            logger.info("worker %d exited before it could be watched", process.pid)
        else:
            worker.watched = watched
            self._track(watched)
            channel.processes[process.pid] = watched
        logger.info("spawned worker %d: %s", process.pid, program)
        return worker

    def _track(self, process: WatchedProcess) -> None:
        self._processes[process.pid] = process
        self._by_id[process.id] = process

    def _process_exited(self, process: WatchedProcess) -> None:
        pid = process.pid
        if self._processes.get(pid) is process:
            del self._processes[pid]
        for channel in self._channels:  # forget it in the channels' entitlement caches
            if channel.processes.get(pid) is process:
                del channel.processes[pid]
        self._by_id.pop(process.id, None)
        cleared = self._heap.remove_owner(process.id)
        process.requested_signals.clear()
        worker = process.worker
        if worker is not None and worker.pid == process.pid:
            self._workers.discard(worker)
            emit(
                self._log_event,
                WORKER_EXITED,
                {"pid": process.pid, "worker": worker, "timers_cleared": len(cleared)},
            )
        if cleared:
            logger.debug("pid %d exited; cleared %d timers", process.pid, len(cleared))

    def _channel_closed(self, channel: Channel) -> None:
        self._channels.discard(channel)
        for process in channel.processes.values():
            self._heap.remove_owner(process.id)
            process.requested_signals.clear()
        channel.processes.clear()

    # -- requests --------------------------------------------------------

    def _reject(self, channel: Channel, reason: str) -> None:
        self._counters.rejected += 1
        logger.warning("rejected a request on %s: %s", channel.name, reason)
        emit(self._log_event, REQUEST_REJECTED, {"channel": channel.name, "reason": reason})

    def _admit(self, channel: Channel, pid: int) -> WatchedProcess | None:
        """The process ``pid`` names, if ``channel`` may arm timers for it."""
        known = self._processes.get(pid)
        if known is not None and not known.exited:
            reason = channel.entitled(pid)
            if reason is not None:
                self._reject(channel, reason)
                return None
            channel.processes[pid] = known
            return known
        # Hold the process by a pidfd before checking who it is: if the pid is
        # reused after the check, the pidfd shows the old process gone.
        try:
            pidfd = open_pidfd(pid)
        except ProcessGone:
            self._reject(channel, f"pid {pid} does not exist")
            return None
        except OSError as exc:
            self._reject(channel, f"pid {pid} cannot be watched: {exc}")
            return None
        reason = channel.entitled(pid)
        if reason is None and not pidfd_alive(pidfd):
            reason = f"pid {pid} exited while it was checked"
        if reason is not None:
            os.close(pidfd)
            self._reject(channel, reason)
            return None
        assert self._loop is not None
        worker = getattr(channel, "worker", None)
        process = WatchedProcess(pid, self._loop, self._process_exited, worker=worker, pidfd=pidfd)
        self._track(process)
        channel.processes[pid] = process
        return process

    def _dispatch(
        self, channel: Channel, requests: Sequence[Request], errors: Sequence[str]
    ) -> None:
        """Apply decoded requests from ``channel``; called by transports on the loop."""
        for error in errors:
            self._reject(channel, error)
        if self._state is not _State.RUNNING:
            return
        heap = self._heap
        known = channel.processes
        accepted = 0
        earliest = math.inf
        for request in requests:
            op, pid, scope, value, sig = request
            process = known.get(pid)
            if process is None or process.exited:
                process = self._admit(channel, pid)
                if process is None:
                    continue
            accepted += 1
            if op is Op.ACQUIRE:
                deadline = value
            elif op is Op.RELEASE:
                heap.remove(process.id, scope)
                if sig is not None:
                    process.requested_signals.pop(scope, None)
                continue
            elif op is Op.ACQUIRE_WALL:
                clock = self._clock
                deadline = clock.now() + (value - clock.wall())
            else:
                process.dump_signal = sig or 0
                continue
            heap.set(process.id, scope, deadline)
            if sig is not None:
                process.requested_signals[scope] = sig
            if deadline < earliest:
                earliest = deadline
        self._counters.requests += accepted
        if earliest < self._armed:
            self._arm()

    # -- scheduling ------------------------------------------------------

    def _arm(self) -> None:
        """Set the alarm for the earliest deadline (re-setting it if that changed)."""
        deadline = self._heap.next_deadline()
        if deadline == self._armed:
            return
        self._disarm()
        if deadline == math.inf:
            return
        self._armed = deadline
        clock = self._clock
        delay = deadline - clock.now()
        if delay > _WARM_UP and deadline != self._warmed_for:
            delay -= _WARM_UP  # first an alarm to warm up; _alarm() then sets the exact one
        self._alarm_handle = clock.call_later(delay if delay > 0 else 0.0, self._alarm)

    def _disarm(self) -> None:
        if self._alarm_handle is not None:
            self._alarm_handle.cancel()
            self._alarm_handle = None
        self._armed = math.inf

    def _alarm(self) -> None:
        """The alarm went off: act on what is due, then set the next alarm."""
        # This is the loop's callback itself: what is due is acted on at once,
        # with no task switch or loop turn in between.
        self._alarm_handle = None
        self._armed = math.inf
        self._counters.wakeups += 1
        try:
            now = self._clock.now()
            due = self._heap.next_deadline()
            # An alarm may go off a little early; the deadline is re-checked
            # against the clock itself, so nothing ever expires early.
            if due <= now:
                self._expire(now)
            elif due != self._warmed_for:
                self._warmed_for = due
                self._warm_up(due)
        except Exception:  # a bug here must not stop the watchdog
            logger.exception("handling expired timers failed")
        finally:
            if self._state is _State.RUNNING:
                self._arm()

    def _warm_up(self, deadline: float) -> None:
        """Touch what expiring at ``deadline`` will need, so it is in cache then.

        Idle for a while, the machine evicts the server's data and code from
        the CPU caches; cold, a 64-process expiry takes twice as long.  This pass
        is read-only: a timer released in the meantime costs nothing.
        """
        by_id = self._by_id
        for timer in self._heap.due(deadline):
            process = by_id.get(timer.owner)
            if process is not None and process.pidfd >= 0:
                # The same syscall as the kill, with signal 0: warms the kernel side too.
                pidfd_alive(process.pidfd)

    def _expire(self, now: float) -> None:
        # Signals go out first, in one burst, before any bookkeeping or logging:
        # with many processes expiring together, every one of them is signalled
        # as close to its deadline as the machine allows.  Events are emitted
        # afterwards, in torch's order ("timer expired" before "kill worker
        # process").
        groups = self._heap.pop_expired(now)
        kill_events: list[tuple[Expiry, int, float]] = []
        self._kill_events = kill_events
        try:
            burst = self._claim(groups, now)
            mask = None
            if len(burst) > 1:
                self._prepare(burst)
                # The first victims die while the rest are being signalled; their
                # SIGCHLDs would interrupt the burst (uvloop handles them), so
                # they wait until it is over.
                mask = _signal.pthread_sigmask(_signal.SIG_BLOCK, _CHILD_SIGNALS)
            outcomes: list[tuple[object, Exception | None]] = []
            append = outcomes.append
            try:
                for reaper, expiry, _ in burst:
                    try:
                        append((reaper(expiry), None))
                    except Exception as exc:
                        append((None, exc))
            finally:
                if mask is not None:
                    _signal.pthread_sigmask(_signal.SIG_SETMASK, mask)
        finally:
            self._kill_events = None
        for (reaper, expiry, process), (result, error) in zip(burst, outcomes, strict=True):
            self._reaper_called(reaper, expiry, process, result, error)
        counters = self._counters
        for owner, timers in groups:
            known = self._by_id.get(owner) or self._reaped.get(owner)
            pid = known.pid if known is not None else None
            for timer in timers:
                lag = now - timer.deadline
                counters.expiries += 1
                counters.record_lag(lag)
                logger.warning(
                    "timer %r of pid %s expired (%.3f ms after its deadline)",
                    timer.scope,
                    pid,
                    lag * 1e3,
                )
                emit(
                    self._log_event,
                    TIMER_EXPIRED,
                    {"pid": pid, "scope": timer.scope, "deadline": timer.deadline, "lag": lag},
                )
        self._reaped.clear()
        for expiry, sig, at in kill_events:
            self._killed(expiry, sig, at)

    def _claim(
        self, groups: list[tuple[int, list[Timer]]], now: float
    ) -> list[tuple[Reaper, Expiry, WatchedProcess]]:
        """The processes of ``groups`` to reap now, each marked reaping, with its reaper."""
        # On the kill path: every microsecond here delays the last signal of a
        # burst, so the loop keeps to locals and builds nothing it can defer.
        by_id = self._by_id
        reaped = self._reaped
        default = self._reaper
        on_signal = self._signalled
        burst: list[tuple[Reaper, Expiry, WatchedProcess]] = []
        for owner, timers in groups:
            process = by_id.get(owner)
            if process is None or process.exited:
                continue
            # Remember it for the log lines even if it dies during the burst.
            reaped[owner] = process
            requested = (
                self._requested_signal(process, timers) if process.requested_signals else None
            )
            if requested is not None and requested <= 0:
                logger.info("pid %d asked for no signal on expiry; not reaping", process.pid)
                continue
            if process.reaping:
                continue
            process.reaping = True
            worker = process.worker
            reaper = (worker.reaper if worker is not None else None) or default
            burst.append((reaper, Expiry(process, timers, now, requested, on_signal), process))
        return burst

    @staticmethod
    def _prepare(burst: list[tuple[Reaper, Expiry, WatchedProcess]]) -> None:
        """Call each reaper's optional ``prepare(expiry)`` for a burst, before any reaping."""
        for reaper, expiry, _ in burst:
            prepare = getattr(reaper, "prepare", None)
            if prepare is None:
                continue
            try:
                prepare(expiry)
            except Exception:
                logger.exception("reaper %r failed to prepare pid %d", reaper, expiry.pid)

    def _reaper_called(
        self,
        reaper: Reaper,
        expiry: Expiry,
        process: WatchedProcess,
        result: object,
        error: Exception | None,
    ) -> None:
        """Book-keep a reaper call made in a burst; follow up on what it returned."""
        # The process is being killed: its other timers go with it.
        self._heap.remove_owner(process.id)
        process.requested_signals.clear()
        worker = process.worker
        if worker is not None and worker.pid == process.pid:
            worker.expired_scopes.extend(t.scope for t in expiry.timers)
        if error is not None:
            self._reaper_failed(reaper, expiry, 1, error)
            self._spawn_reap(self._reap(reaper, expiry, process, None, 2))
        elif result is not None and isinstance(result, Awaitable):
            self._spawn_reap(self._reap(reaper, expiry, process, result, 1))
        else:
            process.reaping = False

    def _spawn_reap(self, coro: Coroutine[Any, Any, None]) -> None:
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._reapers.add(task)
        task.add_done_callback(self._reapers.discard)

    def _reaper_failed(
        self, reaper: Reaper, expiry: Expiry, attempt: int, error: Exception
    ) -> None:
        self._counters.reaper_errors += 1
        logger.error(
            "reaper %r failed for pid %d (attempt %d of %d)",
            reaper,
            expiry.pid,
            attempt,
            self._reap_attempts,
            exc_info=error,
        )

    @staticmethod
    def _requested_signal(process: WatchedProcess, timers: list[Timer]) -> int | None:
        """The signal torch clients asked for: the first > 0 in expiry order, as torch does."""
        if not process.requested_signals:
            return None
        asked = [process.requested_signals.get(t.scope) for t in timers]
        for sig in asked:
            if sig is not None and sig > 0:
                return sig
        if all(sig is not None for sig in asked):
            return 0
        return None

    def _signalled(self, expiry: Expiry, sig: int) -> None:
        if len(expiry.signals_sent) != 1:
            return
        at = self._clock.now()
        if self._kill_events is not None:  # in a burst: account for it after the burst
            self._kill_events.append((expiry, sig, at))
        else:
            self._killed(expiry, sig, at)

    def _killed(self, expiry: Expiry, sig: int, at: float) -> None:
        """Account for the first signal sent to ``expiry``'s process, at time ``at``."""
        latency = at - expiry.deadline
        self._counters.kills += 1
        self._counters.record_decision(latency)
        worker = expiry.worker
        if worker is not None and worker.pid == expiry.pid:
            worker.killed_by_watchdog = True
        logger.warning(
            "sent %s to pid %d (%.3f ms after its deadline)",
            _signal_name(sig),
            expiry.pid,
            latency * 1e3,
        )
        emit(
            self._log_event,
            KILL_WORKER_PROCESS,
            {
                "pid": expiry.pid,
                "signal": sig,
                "scopes": [t.scope for t in expiry.timers],
                "latency": latency,
            },
        )

    async def _sleep(self, delay: float) -> None:
        assert self._loop is not None
        done: asyncio.Future[None] = self._loop.create_future()

        def wake() -> None:
            if not done.done():
                done.set_result(None)

        handle = self._clock.call_later(delay, wake)
        try:
            await done
        finally:
            handle.cancel()

    async def _reap(
        self,
        reaper: Reaper,
        expiry: Expiry,
        process: WatchedProcess,
        pending: Awaitable[object] | None,
        attempt: int,
    ) -> None:
        """Finish a reaper call that returned an awaitable, and retry failures with backoff."""
        backoff = 0.05
        try:
            while True:
                if pending is not None:
                    try:
                        await pending
                        return
                    except Exception as exc:
                        self._reaper_failed(reaper, expiry, attempt, exc)
                    attempt += 1
                if expiry.exited or attempt > self._reap_attempts:
                    break
                await self._sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                try:
                    result = reaper(expiry)
                except Exception as exc:
                    self._reaper_failed(reaper, expiry, attempt, exc)
                    attempt += 1
                    pending = None
                    continue
                if not isinstance(result, Awaitable):
                    return
                pending = result
            if not expiry.exited:
                logger.error("gave up reaping pid %d; it is still running", expiry.pid)
        finally:
            process.reaping = False

    # -- introspection ---------------------------------------------------

    def statistics(self) -> Statistics:
        """A snapshot of the server's counters."""
        c = self._counters
        nxt = self._heap.next_deadline()
        return Statistics(
            active_timers=len(self._heap),
            watched_processes=len(self._processes),
            next_deadline_in=None if nxt == math.inf else nxt - self._clock.now(),
            requests=c.requests,
            rejected=c.rejected,
            expiries=c.expiries,
            kills=c.kills,
            reaper_errors=c.reaper_errors,
            wakeups=c.wakeups,
            expiry_lag_max=c.lag_max,
            expiry_lag_mean=c.lag_sum / c.lag_count if c.lag_count else 0.0,
            decision_lag_max=c.decision_max,
            decision_lag_mean=c.decision_sum / c.decision_count if c.decision_count else 0.0,
        )

    @property
    def workers(self) -> frozenset[Worker]:
        """Spawned workers that have not exited yet."""
        return frozenset(self._workers)
