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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

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
from ._heap import DeadlineHeap
from ._incidents import DEFAULT_DUMP_TIMEOUT, Incident, IncidentReaper
from ._killer import Killer
from ._linux import ProcessGone, descendants, live_processes
from ._metrics import MetricsServer
from ._processes import ProcessRegistry, WatchedProcess
from ._reapers import SignalReaper
from ._scheduler import Scheduler
from ._validate import check_count, check_seconds, check_signal
from ._workers import Worker, WorkerSet, start_worker_process
from .transports._base import Channel, Listener, RequestSink
from .transports._local import LocalChannel
from .transports._pipe import PipeChannel

__all__ = ["TimerServer"]


class _State(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


class TimerServer:
    """Watches deadlines that workers arm and acts on a worker when one passes.

    Embed it in a running loop with ``async with TimerServer() as server:`` (or
    ``await server.start()`` ... ``await server.aclose()``), then
    ``await server.spawn(...)`` workers.  One alarm is kept on the earliest
    deadline; nothing polls.

    ``reaper`` is called once per process with its expired timers (default:
    ``SignalReaper()``, an immediate SIGKILL through a pidfd).  ``clock`` is the
    time source (``aiotimer.testing.MockClock`` in tests).  ``log_event`` receives
    torch's event names plus aiotimer's own.  ``dump_signal`` is the signal that
    spawned workers register a stack dump on (default: the reaper's
    ``dump_signal`` if it has one).  A reaper that raises is retried
    ``reap_attempts`` times with exponential backoff; one whose follow-up runs
    longer than ``reap_timeout`` seconds is cancelled and its process killed
    with SIGKILL.

    ``incident_dir``: on every expiry, first capture the hung process's stacks
    (and its job's) into an incident there, then reap; the kill goes out at
    most ``dump_timeout`` seconds after the deadline (see ``IncidentReaper``).

    Caps, so that no client can exhaust the server: ``max_timers_per_process``
    live timers and ``max_scope_chars_per_process`` characters of their scopes
    per process, ``max_processes_per_channel`` processes admitted per channel
    (``None``: no cap).  A request over a cap is rejected with its reason.
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
        incident_dir: str | os.PathLike[str] | None = None,
        dump_timeout: float = DEFAULT_DUMP_TIMEOUT,
    ) -> None:
        if reaper is not None and not callable(reaper):
            raise TypeError(f"`reaper` must be callable, got {reaper!r}")
        if clock is not None and not isinstance(clock, Clock):
            raise TypeError(f"`clock` must implement aiotimer.Clock, got {clock!r}")
        if log_event is not None and not callable(log_event):
            raise TypeError(f"`log_event` must be callable, got {log_event!r}")
        attempts = check_count("reap_attempts", reap_attempts) or 1
        caps = Caps(
            check_count("max_timers_per_process", max_timers_per_process, optional=True),
            check_count("max_scope_chars_per_process", max_scope_chars_per_process, optional=True),
        )
        per_channel = check_count(
            "max_processes_per_channel", max_processes_per_channel, optional=True
        )
        timeout = check_seconds("reap_timeout", reap_timeout)
        reaper = SignalReaper() if reaper is None else reaper
        if incident_dir is not None and not isinstance(reaper, IncidentReaper):
            reaper = IncidentReaper(incident_dir, kill=reaper, dump_timeout=dump_timeout)
        self._incidents = reaper if isinstance(reaper, IncidentReaper) else None
        if self._incidents is not None:
            self._incidents.attach(related=self._related_pids, on_incident=self._incident)
        self._clock: Clock = SystemClock() if clock is None else clock
        if dump_signal is None:
            wanted = getattr(reaper, "dump_signal", None)
            asks = self._incidents is not None or getattr(reaper, "dump_stacks", False)
            dump_signal = wanted if asks else None
        self.dump_signal = None if dump_signal is None else check_signal("dump_signal", dump_signal)

        self._counters = counters = Counters()
        #: every event, typed; ``subscribe`` to it (``log_event`` is one subscriber)
        self.events = EventBus()
        if log_event is not None:
            self.events.subscribe_log_event(log_event)
        self._heap = heap = DeadlineHeap()
        self._registry = ProcessRegistry(self._process_exited, max_per_channel=per_channel)
        self._killer = Killer(
            heap,
            self._registry,
            self._clock,
            counters,
            self.events,
            reaper=reaper,
            attempts=attempts,
            timeout=timeout,
        )
        killer = self._killer
        self._scheduler = Scheduler(
            self._clock, heap, counters, on_due=killer.expire, on_warm_up=killer.warm_up
        )
        self._channels: dict[int, Channel] = {}
        self._dispatcher = Dispatcher(
            heap,
            self._registry,
            self._scheduler,
            self._clock,
            counters,
            self.events,
            caps=caps,
            on_channel_closed=self._forget_channel,
        )
        self._state = _State.CREATED
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed: asyncio.Event | None = None
        self._workers = WorkerSet(self.events)
        self._listeners: list[Listener] = []

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
        self._loop = loop = asyncio.get_running_loop()
        self._closed = asyncio.Event()
        self._registry.bind(loop)
        self._killer.bind(loop)
        if self._incidents is not None:
            self._incidents.open()
        self._state = _State.RUNNING
        self._dispatcher.open = True
        self._scheduler.start()
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
        # An incident being captured is finished first (a few seconds at most):
        # it is what the person paged afterwards reads.
        await self._killer.aclose(
            self._incidents.dump_timeout + 4.0 if self._incidents is not None else 0.0
        )
        for listener in reversed(self._listeners):
            try:
                await listener.aclose()
            except Exception:
                logger.exception("closing %r failed", listener)
        for channel in list(self._channels.values()):
            channel.close()
        self._channels.clear()
        await self._workers.kill_all()
        self._registry.close()
        if self._incidents is not None:
            self._incidents.close()
        self._state = _State.CLOSED
        assert self._closed is not None
        self._closed.set()
        logger.info("timer server stopped")
        self.events.emit(WatchdogStopped())

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
        self._listeners.append(listener)
        if isinstance(listener, Channel):
            self._channels[listener.id] = listener

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
        channel = PipeChannel(self._dispatcher, worker, read_fd, loop)
        self._channels[channel.id] = channel
        try:
            watched = self._registry.watch(process.pid, worker=worker)
        except ProcessGone:
            logger.info("worker %d exited before it could be watched", process.pid)
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

    def _forget_channel(self, channel: Channel) -> None:
        self._channels.pop(channel.id, None)

    def _process_exited(self, process: WatchedProcess) -> None:
        """The registry saw ``process`` exit: drop its timers, and its worker if it was one."""
        cleared = self._heap.remove_owner(process.id)
        for cid in process.channels:
            channel = self._channels.get(cid)
            if channel is not None:
                channel.process_exited(process.pid)
        worker = process.worker
        if worker is not None and worker.pid == process.pid:
            self._workers.exited(worker, process.returncode, len(cleared))

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
        """Serve Prometheus metrics and ``/healthz`` on ``host:port`` (0: a free port).

        Needs ``prometheus_client`` (``pip install 'aiotimer[metrics]'``).  Read at
        scrape time, from a thread: nothing is added to the kill path.  Closed
        with the server.  ``workers()`` and ``restarts()`` let a launcher report
        its workers by state and its restarts (default: running spawned workers).
        """
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
