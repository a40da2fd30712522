"""TimerServer: a watchdog that embeds in the caller's running asyncio loop.

A thin facade: it owns the lifecycle, spawns workers, and wires the parts
together.  One request's way through them::

    transport (bytes) -> _protocol (requests) -> Dispatcher -> ProcessRegistry
    (admission) -> DeadlineHeap -> Scheduler (alarm) -> Killer (burst) -> reaper
    -> pidfd signal -> exit seen by the registry -> the process's timers dropped
"""

from __future__ import annotations

import asyncio
import enum
import math
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ._channel import Channel, Listener, RequestSink
from ._clock import Clock, SystemClock
from ._dispatch import Caps, Dispatcher
from ._events import (
    Counters,
    EventBus,
    IncidentRecorded,
    LogEvent,
    Statistics,
    WatchdogStarted,
    WatchdogStopped,
    logger,
)
from ._expiry import Reaper
from ._guard import Guard
from ._heap import DeadlineHeap
from ._incident import Incident
from ._incidents import DEFAULT_DUMP_TIMEOUT, IncidentReaper
from ._killer import Killer
from ._linux import ProcessGone, descendants, live_processes
from ._metrics import MetricsServer
from ._priority import LEAD, RealtimeBoost
from ._processes import ProcessRegistry, WatchedProcess
from ._reapers import SignalReaper
from ._recorder import DEFAULT_MAX_INCIDENTS
from ._scheduler import Scheduler
from ._validate import check_count, check_seconds, check_signal
from ._workers import Worker, WorkerSet, start_worker_process
from .transports._local import LocalChannel
from .transports._pipe import PipeChannel

__all__ = ["TimerServer"]


@dataclass(frozen=True)
class _Settings:
    """A ``TimerServer``'s arguments, checked."""

    reaper: Reaper
    incidents: IncidentReaper | None
    clock: Clock
    dump_signal: signal.Signals | None
    attempts: int
    timeout: float
    caps: Caps
    per_channel: int | None
    boost: RealtimeBoost | None


def _checked(
    reaper: Reaper | None,
    clock: Clock | None,
    log_event: LogEvent | None,
    dump_signal: int | str | None,
    reap_attempts: int,
    reap_timeout: float,
    max_timers: int | None,
    max_scope_chars: int | None,
    max_per_channel: int | None,
    max_tree_bytes: int | None,
    incident_dir: str | os.PathLike[str] | None,
    dump_timeout: float,
    max_incidents: int | None,
    realtime: bool | Literal["auto"],
) -> _Settings:
    """Check the arguments (errors name the parameter and its value) and settle the defaults."""
    if reaper is not None and not callable(reaper):
        raise TypeError(f"`reaper` must be callable, got {reaper!r}")
    if clock is not None and not isinstance(clock, Clock):
        raise TypeError(f"`clock` must implement aiotimer.Clock, got {clock!r}")
    if not isinstance(realtime, bool) and realtime != "auto":
        raise ValueError(f"`realtime` must be True, False or 'auto', got {realtime!r}")
    if log_event is not None and not callable(log_event):
        raise TypeError(f"`log_event` must be callable, got {log_event!r}")
    reaper = SignalReaper() if reaper is None else reaper
    if incident_dir is not None and not isinstance(reaper, IncidentReaper):
        reaper = IncidentReaper(
            incident_dir, kill=reaper, dump_timeout=dump_timeout, max_incidents=max_incidents
        )
    incidents = reaper if isinstance(reaper, IncidentReaper) else None
    if dump_signal is None and (incidents is not None or getattr(reaper, "dump_stacks", False)):
        # Clients register a stack dump only when something will ask for it.
        dump_signal = getattr(reaper, "dump_signal", None)
    clock = SystemClock() if clock is None else clock
    return _Settings(
        reaper=reaper,
        incidents=incidents,
        clock=clock,
        dump_signal=None if dump_signal is None else check_signal("dump_signal", dump_signal),
        attempts=check_count("reap_attempts", reap_attempts) or 1,
        timeout=check_seconds("reap_timeout", reap_timeout),
        caps=Caps(
            check_count("max_timers_per_process", max_timers, optional=True),
            check_count("max_scope_chars_per_process", max_scope_chars, optional=True),
            check_count("max_timer_bytes_per_tree", max_tree_bytes, optional=True),
        ),
        per_channel=check_count("max_processes_per_channel", max_per_channel, optional=True),
        # Asked for explicitly (True), a refusal is a warning; "auto" says it at info level.
        boost=RealtimeBoost(clock, warn=realtime is True) if realtime else None,
    )


class _Transports:
    """The channels and listeners feeding a server: kept, told of exits, closed in order."""

    def __init__(self) -> None:
        self.channels: dict[int, Channel] = {}
        self.listeners: list[Listener] = []

    def add(self, channel: Channel) -> None:
        """Keep ``channel`` (it is closed with the server)."""
        self.channels[channel.id] = channel

    def add_listener(self, listener: Listener) -> None:
        """Keep ``listener`` (``aclose()``-d with the server, the last added first)."""
        self.listeners.append(listener)
        if isinstance(listener, Channel):
            self.add(listener)

    def forget(self, channel: Channel) -> None:
        """``channel`` closed itself."""
        self.channels.pop(channel.id, None)

    def process_exited(self, process: WatchedProcess) -> None:
        """Tell the channels ``process`` was admitted on that it exited."""
        for cid in process.channels:
            channel = self.channels.get(cid)
            if channel is not None:
                channel.process_exited(process.pid)

    async def aclose(self) -> None:
        """Close every listener, then every channel."""
        for listener in reversed(self.listeners):
            try:
                await listener.aclose()
            except Exception:
                logger.exception("closing %r failed", listener)
        for channel in list(self.channels.values()):
            channel.close()
        self.channels.clear()


class _State(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


class TimerServer:
    """Watches deadlines that workers arm and acts on a worker when one passes.

    Embed it in a running loop with ``async with TimerServer() as server:``, then
    ``await server.spawn(...)`` workers.  One alarm is kept on the earliest
    deadline; nothing polls.  ``reaper``: called once per process with its
    expired timers (default ``SignalReaper()``: SIGKILL through a pidfd); a reaper
    that raises is retried ``reap_attempts`` times, one that runs past
    ``reap_timeout`` seconds is cancelled and its process SIGKILLed.  ``clock``:
    the time source (``MockClock`` in tests).  ``log_event``: torch's event hook.
    ``dump_signal``: the signal spawned workers register a stack dump on.
    ``incident_dir``/``dump_timeout``: explain every expiry first (see
    ``IncidentReaper``), keeping at most ``max_incidents`` incidents in the
    directory (the oldest of its own removed first; ``None``: no bound).
    Caps, so no client can exhaust the server (``None``: no
    cap; over a cap, a request is rejected with its reason):
    ``max_timers_per_process``, ``max_scope_chars_per_process``,
    ``max_processes_per_channel``, ``max_timer_bytes_per_tree`` (the timers of a
    worker and its descendants, at ``TIMER_BYTES`` (200) plus the scope each).
    ``realtime``: run the loop's thread on SCHED_RR from shortly before each deadline until it
    is dealt with, so that CPU-bound neighbours cannot hold back a kill (see ``realtime``);
    needs CAP_SYS_NICE or ``ulimit -r`` >= 1, and without it the server logs a warning
    (``"auto"``: an info line) and runs at normal priority.  ``guard_after``: if the loop leaves
    a deadline unhandled this many seconds and does not answer, a thread SIGKILLs the due
    processes itself (see ``aiotimer._guard``; ``None``: no guard; only on the system clock).
    """

    def __init__(
        self,
        *,
        reaper: Reaper | None = None,
        clock: Clock | None = None,
        log_event: LogEvent | None = None,
        dump_signal: int | str | None = None,
        reap_attempts: int = 5,
        reap_timeout: float = 30.0,
        max_timers_per_process: int | None = 10_000,
        max_scope_chars_per_process: int | None = 1 << 20,
        max_processes_per_channel: int | None = 1024,
        max_timer_bytes_per_tree: int | None = 64 << 20,
        incident_dir: str | os.PathLike[str] | None = None,
        dump_timeout: float = DEFAULT_DUMP_TIMEOUT,
        max_incidents: int | None = DEFAULT_MAX_INCIDENTS,
        realtime: bool | Literal["auto"] = False,
        guard_after: float | None = 5.0,
    ) -> None:
        settings = _checked(
            reaper,
            clock,
            log_event,
            dump_signal,
            reap_attempts,
            reap_timeout,
            max_timers_per_process,
            max_scope_chars_per_process,
            max_processes_per_channel,
            max_timer_bytes_per_tree,
            incident_dir,
            dump_timeout,
            max_incidents,
            realtime,
        )
        self._clock = settings.clock
        self.dump_signal = settings.dump_signal
        self._incidents = settings.incidents
        if self._incidents is not None:
            self._incidents.attach(related=self._related_pids, on_incident=self._incident)
        reaper = settings.reaper
        self._counters = counters = Counters()
        #: every event, typed; ``subscribe`` to it (``log_event`` is one subscriber)
        self.events = EventBus()
        if log_event is not None:
            self.events.subscribe_log_event(log_event)
        self._heap = heap = DeadlineHeap()
        registry = self._registry = ProcessRegistry(
            self._process_exited, max_per_channel=settings.per_channel
        )
        boost = self._boost = settings.boost
        killer = self._killer = Killer(
            heap, registry, self._clock, counters, self.events,
            reaper=reaper, attempts=settings.attempts, timeout=settings.timeout,
            on_follow_ups=None if boost is None else boost.following_up,
        )  # fmt: skip
        self._scheduler = Scheduler(
            self._clock, heap, counters, on_due=killer.expire, on_warm_up=killer.warm_up,
            approach=LEAD, on_approach=None if boost is None else boost.near,
        )  # fmt: skip
        self._transports = _Transports()
        self._dispatcher = Dispatcher(
            heap, registry, self._scheduler, self._clock, counters, self.events,
            caps=settings.caps, on_channel_closed=self._transports.forget,
        )  # fmt: skip
        self._state = _State.CREATED
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed: asyncio.Event | None = None
        self._workers = WorkerSet(self.events)
        # A mock clock's deadlines are not on the guard thread's time line: no guard then;
        # nor in observe mode, which promises never to signal.
        guard_after = None if guard_after is None else check_seconds("guard_after", guard_after)
        observing = self._incidents is not None and self._incidents.observe
        self._guard = (
            Guard(heap, registry.by_id, counters, after=guard_after)
            if guard_after is not None and isinstance(self._clock, SystemClock) and not observing
            else None
        )

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

    @property
    def sink(self) -> RequestSink:
        """Where transports deliver decoded requests."""
        return self._dispatcher

    def running_loop(self) -> asyncio.AbstractEventLoop:
        """The loop the server runs on; ``RuntimeError`` if it is not running."""
        if self._state is not _State.RUNNING or self._loop is None:
            raise RuntimeError(f"the TimerServer is {self._state.value}, not running")
        return self._loop

    async def start(self) -> None:
        """Start watching on the running loop; returns at once."""
        if self._state is not _State.CREATED:
            raise RuntimeError(f"cannot start a TimerServer that is {self._state.value}")
        try:
            self._loop = loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "TimerServer needs an asyncio event loop (asyncio's own or uvloop; under "
                "anyio, backend='asyncio'); none is running in this thread"
            ) from None
        self._closed = asyncio.Event()
        self._registry.bind(loop)
        self._killer.bind(loop)
        if self._incidents is not None:
            self._incidents.open()
        if self._boost is not None:
            self._boost.check()
        self._state = _State.RUNNING
        self._dispatcher.open = True
        self._scheduler.start()
        if self._guard is not None:
            self._guard.start(loop)
        logger.info("timer server started (clock=%r, reaper=%r)", self._clock, self._killer.reaper)
        self.events.emit(WatchdogStarted())

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
        self._dispatcher.close()
        self._scheduler.stop()
        if self._guard is not None:
            self._guard.stop()  # before the registry closes the pidfds it reads
        # An incident being captured is finished first (a few seconds at most):
        # it is what the person paged afterwards reads.
        await self._killer.aclose(
            self._incidents.dump_timeout + 4.0 if self._incidents is not None else 0.0
        )
        if self._boost is not None:
            self._boost.close()
        await self._transports.aclose()
        await self._workers.kill_all()
        self._registry.close()
        if self._incidents is not None:
            self._incidents.close()
        self._state = _State.CLOSED
        assert self._closed is not None
        self._closed.set()
        logger.info("timer server stopped")
        self.events.emit(WatchdogStopped())

    @property
    def realtime(self) -> bool:
        """Whether the boost was asked for (``True``/``"auto"``) and is permitted (once started).

        Then the loop's thread runs SCHED_RR from ``LEAD`` (0.1 s) before the
        earliest deadline until it is dealt with, and at its own priority
        otherwise; threads and processes it starts run as normal tasks.  Also
        true if the thread ran real-time already (``chrt``): it is left as it is.
        """
        return self._boost is not None and (self._boost.permitted or self._boost.already)

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

    def add_listener(self, listener: Listener) -> None:
        """Register a transport listener to be ``aclose()``-d with the server."""
        self._transports.add_listener(listener)

    def add_channel(self, channel: Channel) -> None:
        """Register a transport's channel (a socket connection): it is told when a process
        admitted on it exits, closed with the server, and forgotten once it closes."""
        self._transports.add(channel)

    @property
    def dump_dir(self) -> str | None:
        """Where clients write their stack dumps for incidents (``None``: no incidents)."""
        if self._incidents is None or self._incidents.dump_dir is None:
            return None
        return os.fspath(self._incidents.dump_dir)

    def local_channel(
        self,
        *,
        roots: Sequence[int] = (),
        pids: Sequence[int] | None = None,
        name: str = "local channel",
    ) -> LocalChannel:
        """A channel for requests made in this process (the launcher's own code, tests)."""
        return LocalChannel(self._dispatcher, roots=roots, pids=pids, name=name)

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
        built-in reaper can signal as a whole.  The worker is SIGKILLed if this
        process dies, however it dies (``PR_SET_PDEATHSIG``), so no worker is
        ever left unwatched.  Other keyword arguments go to
        ``asyncio.create_subprocess_exec`` (``stdout=PIPE``, ``cwd=``, ...).
        """
        loop = self.running_loop()
        if reaper is not None and not callable(reaper):
            raise TypeError(f"`reaper` must be callable, got {reaper!r}")
        dump = None if self.dump_signal is None else int(self.dump_signal)
        dump_dir = self._incidents.dump_dir if self._incidents is not None else None
        process, read_fd = await start_worker_process(
            program,
            args,
            env=env,
            dump_signal=dump,
            dump_dir=dump_dir,
            process_group=process_group,
            **kwargs,
        )
        worker = Worker(process, reaper=reaper, process_group=process_group)
        self._workers.add(worker)
        channel = PipeChannel(self._dispatcher, worker.tree, read_fd, loop)
        self._transports.add(channel)
        try:
            watched = self._registry.watch(process.pid, spawned=worker.tree)
        except ProcessGone:
            # Reaped already (quick workers, a busy loop): it had no timer to
            # clear, and its exit is still reported once.
            logger.info("worker %d exited before it could be watched", process.pid)
            self._workers.exited(worker, process.returncode, 0)
        else:
            worker.watched = watched
            self._registry.attach(watched, channel.id)
        logger.info("spawned worker %d: %s", process.pid, program)
        return worker

    def _related_pids(self) -> list[int]:
        """The processes of the job: every one watched, and the spawned workers' descendants."""
        pids = set(self._registry.by_pid)
        workers = {worker.pid for worker in self._workers.snapshot()}
        return sorted(pids | workers | descendants(workers, live_processes()))

    def _incident(self, incident: Incident) -> None:
        path = None if incident.path is None else str(incident.path)
        self.events.emit(
            IncidentRecorded(incident.pid, path, incident.summary(), incident.worker_pid)
        )

    def _process_exited(self, process: WatchedProcess) -> None:
        """The registry saw ``process`` exit: drop its timers, and its worker if it was one."""
        dropped = self._heap.drop_owner(process.id)
        cleared = 0 if dropped is None else dropped.count
        self._transports.process_exited(process)
        spawned = process.spawned
        if spawned is not None and spawned.pid == process.pid:
            worker = self._workers.get(process.pid)
            if worker is not None:
                self._workers.exited(worker, process.returncode, cleared)

    # -- introspection ---------------------------------------------------

    def statistics(self) -> Statistics:
        """A snapshot of the server's counters."""
        nxt = self._heap.next_deadline()
        return self._counters.snapshot(
            active_timers=len(self._heap),
            watched_processes=len(self._registry),
            next_deadline_in=None if nxt == math.inf else nxt - self._clock.now(),
        )

    def serve_metrics(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        health_threshold: float = 1.0,
        workers: Callable[[], Mapping[str, int]] | None = None,
        restarts: Callable[[], int] | None = None,
    ) -> MetricsServer:
        """Serve Prometheus metrics and ``/healthz`` on ``host:port``; see ``MetricsServer``."""
        metrics = MetricsServer(
            lambda: (self._counters, len(self._heap), len(self._registry)),
            self.running_loop(),
            host=host,
            port=port,
            health_threshold=health_threshold,
            workers=workers or (lambda: {"running": len(self._workers)}),
            restarts=restarts,
        )
        self.add_listener(metrics)
        return metrics

    @property
    def workers(self) -> frozenset[Worker]:
        """Spawned workers that have not exited yet."""
        return self._workers.snapshot()
