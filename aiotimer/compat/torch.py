"""Drop-in replacements for ``torch.distributed.elastic.timer``, served by aiotimer.

Change one import::

    from aiotimer.compat import torch as timer   # was: torch.distributed.elastic.timer

``FileTimerServer`` and ``LocalTimerServer`` keep torch's constructors and
``start()``/``stop()``, but run an asyncio ``TimerServer`` on a loop thread of
their own: a hung worker is killed at its deadline, not up to ``max_interval``
later (``max_interval`` is accepted and ignored).  The clients and ``expires``
keep torch's semantics (wall-clock deadlines, a scope re-acquired replaces
itself), so unmodified torch workers, and torch's own clients, work with them.
Importing this module does not import torch.

Every public name here means what it means in torch.  Absent on purpose:
torch's ``TimerServer``, its abstract polling base class (the
``_run_watchdog`` loop and ``register_timers``/``get_expired_timers`` hooks
are what aiotimer replaces; ``aiotimer.TimerServer`` is a different thing and
is not re-exported here), and the private state torch's own unit tests reach
into (``_run_watchdog``, ``_timers``, ``_request_count``, ``_reap_worker``,
``FileTimerClient._send_request``).

What differs from torch 2.13, on purpose:

- its ``FileTimerServer`` kills its own process after reaping a worker, which
  under torchrun kills the agent and orphans the other ranks; here that
  happens only with ``kill_self=True``;
- its ``FileTimerServer`` deletes whatever is at ``file_path``; here a path
  that exists and is not a FIFO raises ``FileExistsError``;
- torch's ``expires`` means the caller's ``file#line`` as the default scope
  ("grab the caller file + lineno"), but 2.13 takes a line of ``contextlib``
  for every caller; here it is the caller's line;
- ``FileTimerServer.run_once()`` waits until every request written so far is
  applied and leaves the server running (torch's also ends its watchdog);
- ``MultiprocessingRequestQueue.get(q.size(), timeout=0)`` returns every
  request that is ready, as ``RequestQueue.size()`` promises (torch's returns
  at most one);
- the servers' loop thread is always a daemon thread (``daemon`` is accepted
  and ignored): call ``stop()``.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import inspect
import math
import multiprocessing.queues
import os
import queue as _queue
import select
import signal as _signal
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal

from .._client import call_site
from .._clock import monotonic_to_wall
from .._events import KILL_WORKER_PROCESS, TIMER_EXPIRED, logger
from .._expiry import Expiry, Reaper
from .._loops import loop_factory
from .._protocol import encode_json_request
from .._reapers import SignalReaper
from .._server import TimerServer as _AiotimerServer  # aliased: not torch's TimerServer
from ..transports import FifoListener, bridge_queue, listen_fifo
from ..transports.fifo import check_fifo_path

if TYPE_CHECKING:
    from anyio.from_thread import BlockingPortal

__all__ = [
    # clients and the context manager
    "FileTimerClient",
    "LocalTimerClient",
    "TimerClient",
    "configure",
    "expires",
    # servers and what feeds them
    "FileTimerServer",
    "LocalTimerServer",
    "MultiprocessingRequestQueue",
    "RequestQueue",
    # requests
    "FileTimerRequest",
    "TimerRequest",
]

# -- requests -------------------------------------------------------------


class TimerRequest:
    """torch's ``TimerRequest``: ``expiration_time < 0`` means release.

    Equal to any ``TimerRequest`` with the same three fields; unhashable, as
    in torch (its fields are mutable).
    """

    __slots__ = ("expiration_time", "scope_id", "worker_id")

    def __init__(self, worker_id: Any, scope_id: str, expiration_time: float) -> None:
        self.worker_id = worker_id
        self.scope_id = scope_id
        self.expiration_time = expiration_time

    def __eq__(self, other: object) -> bool:
        # torch answers False, not NotImplemented, for anything else.
        if not isinstance(other, TimerRequest):
            return False
        return (self.worker_id, self.scope_id, self.expiration_time) == (
            other.worker_id,
            other.scope_id,
            other.expiration_time,
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(worker_id={self.worker_id!r}, scope_id={self.scope_id!r}, "
            f"expiration_time={self.expiration_time!r})"
        )


class FileTimerRequest(TimerRequest):
    """torch's ``FileTimerRequest``: what ``FileTimerServer``'s ``log_event`` receives.

    Equal only to another ``FileTimerRequest`` whose fields, ``version`` and
    ``signal`` included, are equal (so never to a plain ``TimerRequest``).
    """

    __slots__ = ("signal", "version")

    def __init__(
        self, worker_pid: int, scope_id: str, expiration_time: float, signal: int = 0
    ) -> None:
        super().__init__(worker_pid, scope_id, expiration_time)
        self.version = 1
        self.signal = signal

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FileTimerRequest):
            return False
        return super().__eq__(other) and (self.version, self.signal) == (
            other.version,
            other.signal,
        )

    __hash__ = None

    @property
    def worker_pid(self) -> int:
        """The pid the request is for."""
        pid: int = self.worker_id
        return pid

    def to_json(self) -> str:
        """The request as torch's client writes it (one JSON object, no newline).

        Raises ``ValueError`` unless ``version`` is 1, the only wire format.
        """
        if self.version != 1:
            raise ValueError(f"`version` must be 1, got {self.version!r}")
        line = encode_json_request(
            self.worker_pid, self.scope_id, self.expiration_time, self.signal
        )
        return line.decode().rstrip("\n")


# -- request queues ----------------------------------------------------------


class RequestQueue(abc.ABC):
    """torch's consumer queue of timer requests."""

    @abc.abstractmethod
    def size(self) -> int:
        """How many requests are queued now.

        More may arrive before ``get``, but none leave except through it:
        ``get(q.size(), timeout=0)`` returns that many.
        """

    @abc.abstractmethod
    def get(self, size: int, timeout: float) -> list[TimerRequest]:
        """Up to ``size`` requests, blocking for at most ``timeout`` seconds in all."""


class MultiprocessingRequestQueue(RequestQueue):
    """torch's ``RequestQueue`` over a ``multiprocessing.Queue`` (what ``LocalTimerClient`` feeds).

    ``LocalTimerServer`` does not need it (it watches the queue's pipe on its
    loop); it is here for code written against torch's queue API.
    """

    def __init__(self, mp_queue: multiprocessing.queues.Queue[Any]) -> None:
        self._mp_queue = mp_queue

    def size(self) -> int:
        """The queue's ``qsize()``."""
        return self._mp_queue.qsize()

    def get(self, size: int, timeout: float) -> list[TimerRequest]:
        """Up to ``size`` requests, waiting at most ``timeout`` seconds in all for them.

        Requests that are ready are taken even once the time is up, so
        ``get(size(), timeout=0)`` returns every request that has reached the
        queue's pipe (torch's returns at most one).  A ``timeout`` <= 0 waits
        for nothing, as in torch.
        """
        if math.isnan(timeout):
            raise ValueError(f"`timeout` must be a number of seconds, got {timeout!r}")
        deadline = time.monotonic() + timeout
        requests: list[Any] = []
        while len(requests) < size:
            try:
                item = self._mp_queue.get(True, max(deadline - time.monotonic(), 0.0))
            except _queue.Empty:
                break
            requests.append(item)
        return requests


# -- clients ---------------------------------------------------------------


class TimerClient(abc.ABC):
    """torch's client interface: deadlines are wall-clock ``time.time()`` seconds."""

    @abc.abstractmethod
    def acquire(self, scope_id: str, expiration_time: float) -> None:
        """Arm ``scope_id`` until ``expiration_time`` (wall clock)."""

    @abc.abstractmethod
    def release(self, scope_id: str) -> None:
        """Disarm ``scope_id``."""


class FileTimerClient(TimerClient):
    """Writes torch's JSON lines to a ``FileTimerServer``'s FIFO.

    Unlike torch's client it opens the FIFO once, not per request, and waits
    when the FIFO is full instead of failing.  If no server is listening it
    retries the open 10 times, 0.1 s apart, then raises ``BrokenPipeError``.
    """

    def __init__(self, file_path: str, signal: int = _signal.SIGKILL) -> None:
        self._file_path = file_path
        self.signal = int(signal)
        self._fd = -1
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def __repr__(self) -> str:
        return f"FileTimerClient({self._file_path!r}, signal={self.signal})"

    def _open(self) -> int:
        error: OSError | None = None
        for attempt in range(10):
            try:
                st = os.stat(self._file_path)
                if not stat.S_ISFIFO(st.st_mode):
                    raise BrokenPipeError(f"`file_path` {self._file_path!r} is not a FIFO")
                # Non-blocking so that no listener means ENXIO, not a hang ...
                fd = os.open(self._file_path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                error = exc
                if attempt < 9:
                    time.sleep(0.1)
                continue
            # ... then blocking, so that a full FIFO means waiting, not an error.
            os.set_blocking(fd, True)
            return fd
        raise BrokenPipeError(
            "Could not send the FileTimerRequest because FileTimerServer is not available "
            f"at {self._file_path!r}: {error}"
        )

    def _send(self, line: bytes) -> None:
        # Only a write of at most PIPE_BUF bytes reaches the FIFO whole, never
        # interleaved with another client's.
        if len(line) > select.PIPE_BUF:
            raise RuntimeError(
                f"FileTimerRequest larger than {select.PIPE_BUF} bytes is not supported: {line!r}"
            )
        if self._pid != os.getpid():
            # A forked child: the parent's lock may have been held at the fork.
            self._lock = threading.Lock()
            self._pid = os.getpid()
        with self._lock:
            for attempt in (1, 2):
                if self._fd < 0:
                    self._fd = self._open()
                try:
                    os.write(self._fd, line)
                    return
                except BrokenPipeError:
                    # The server restarted: the old FIFO lost its reader.
                    os.close(self._fd)
                    self._fd = -1
                    if attempt == 2:
                        raise

    def acquire(self, scope_id: str, expiration_time: float) -> None:
        """Arm ``scope_id`` until ``expiration_time`` (wall clock)."""
        self._send(encode_json_request(os.getpid(), scope_id, expiration_time, self.signal))

    def release(self, scope_id: str) -> None:
        """Disarm ``scope_id``."""
        self._send(encode_json_request(os.getpid(), scope_id, -1, 0))

    def __del__(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)


class LocalTimerClient(TimerClient):
    """Puts ``TimerRequest``s on a ``multiprocessing.Queue`` served by ``LocalTimerServer``."""

    def __init__(self, mp_queue: multiprocessing.queues.Queue[Any]) -> None:
        self._mp_queue = mp_queue

    def acquire(self, scope_id: str, expiration_time: float) -> None:
        """Arm ``scope_id`` until ``expiration_time`` (wall clock)."""
        self._mp_queue.put(TimerRequest(os.getpid(), scope_id, expiration_time))

    def release(self, scope_id: str) -> None:
        """Disarm ``scope_id``."""
        self._mp_queue.put(TimerRequest(os.getpid(), scope_id, -1))


_timer_client: Any = None


def configure(timer_client: Any) -> None:
    """Set the client ``expires`` uses in this process (torch's or aiotimer's; ``None``: unset)."""
    global _timer_client
    _timer_client = timer_client
    logger.info("Timer client configured to: %s", type(timer_client).__name__)


@contextlib.contextmanager
def expires(after: float, scope: str | None = None, client: Any = None) -> Iterator[None]:
    """torch's ``expires``: arm ``scope`` for ``after`` seconds around the block.

    The deadline is ``time.time() + after``.  The default scope is the
    caller's ``file#line`` (found without walking the stack).  As in torch, a
    scope re-acquired (recursion) replaces itself, and exceptions from the
    block propagate after the release.  Raises ``RuntimeError`` when no client
    is configured.
    """
    if client is None:
        if _timer_client is None:
            raise RuntimeError("Configure timer client before using countdown timers.")
        client = _timer_client
    if scope is None:
        scope = call_site(2)  # 1 is contextmanager's __enter__
    client.acquire(scope, time.time() + after)
    try:
        yield
    finally:
        client.release(scope)


# -- servers ---------------------------------------------------------------


def _kill_self_after(reaper: Reaper) -> Reaper:
    async def reap_then_kill_self(expiry: Expiry) -> None:
        result = reaper(expiry)
        if inspect.isawaitable(result):
            await result
        if expiry.signals_sent:
            logger.info("Terminating the server process=[%s] (kill_self=True)", os.getpid())
            os.kill(os.getpid(), expiry.signals_sent[-1])

    return reap_then_kill_self


class _ThreadedServer:
    """An aiotimer ``TimerServer`` on a loop thread of its own, for synchronous callers.

    The loop thread is anyio's blocking portal, kept open from ``start()`` to
    ``stop()``; the loop is uvloop's when it is installed.
    """

    def __init__(
        self,
        *,
        daemon: bool,
        reaper: Reaper | None,
        kill_self: bool,
        log_event: Callable[[str, Mapping[str, object]], None] | None,
        realtime: bool | Literal["auto"] = "auto",
    ) -> None:
        self._daemon = daemon
        self._realtime = realtime
        base = reaper if reaper is not None else SignalReaper()
        self._reaper = _kill_self_after(base) if kill_self else base
        self._log_event = log_event
        self._server = self._new_server()
        # start() and stop() may race from different threads.
        self._lock = threading.Lock()
        self._portal: BlockingPortal | None = None
        self._exit_stack: contextlib.ExitStack | None = None
        self._thread: threading.Thread | None = None
        self._started_at = 0
        self._stopped_at: int | None = None

    def _new_server(self) -> _AiotimerServer:
        return _AiotimerServer(
            reaper=self._reaper, log_event=self._log_event, realtime=self._realtime
        )

    async def _attach(self, server: _AiotimerServer) -> None:
        """Connect the transport that feeds ``server`` (on the loop thread)."""
        raise NotImplementedError

    async def _open(self) -> threading.Thread:
        server = self._server
        await server.start()
        try:
            await self._attach(server)
        except BaseException:
            await server.aclose()
            raise
        return threading.current_thread()

    def start(self) -> None:
        """Start serving; returns once clients can connect.

        Does nothing if the server is running already.  An error while starting
        (the FIFO's path taken, say) is raised here, with nothing left running.
        A server that was stopped cannot be started again: ``RuntimeError``.
        """
        from anyio.from_thread import start_blocking_portal  # only servers need anyio

        with self._lock:
            if self._portal is not None:
                logger.info("%s is already running; start() does nothing", type(self).__name__)
                return
            if self._stopped_at is not None:
                raise RuntimeError(f"{type(self).__name__} was stopped; create a new one")
            stack = contextlib.ExitStack()
            portal = stack.enter_context(
                start_blocking_portal("asyncio", backend_options={"loop_factory": loop_factory()})
            )
            try:
                self._thread = portal.call(self._open)
                self._started_at = int(time.time())
            except BaseException as exc:
                # Passing the exception on cancels whatever the portal still runs.
                stack.__exit__(type(exc), exc, exc.__traceback__)
                # The failed server is closed: a later start() begins afresh.
                self._server = self._new_server()
                raise
            self._portal, self._exit_stack = portal, stack

    def stop(self) -> None:
        """Stop serving and wait for the loop thread to finish; harmless if not running."""
        with self._lock:
            portal, stack = self._portal, self._exit_stack
            if portal is None or stack is None:
                logger.info("%s is not running; stop() does nothing", type(self).__name__)
                return
            self._portal = self._exit_stack = None
            self._stopped_at = int(time.time())
            try:
                portal.call(self._server.aclose)
            finally:
                stack.close()
                self._thread = None

    def get_last_progress_time(self) -> int:
        """torch's health-check input: the last time (``int(time.time())``) the server was live.

        Now before ``start()`` (as torch's, before its watchdog opens the FIFO)
        and while the loop thread runs (nothing polls, so nothing lags); the
        time of ``stop()`` after it; the time of ``start()`` if the loop thread
        died.
        """
        if self._stopped_at is not None:
            return self._stopped_at
        thread = self._thread
        if thread is not None and not thread.is_alive():
            return self._started_at  # the loop thread died: live at least until it started
        return int(time.time())

    @property
    def server(self) -> _AiotimerServer:
        """The underlying aiotimer server (for its ``statistics()``)."""
        return self._server


class FileTimerServer(_ThreadedServer):
    """torch's ``FileTimerServer``, on aiotimer: serves ``FileTimerClient``s on a FIFO.

    The FIFO is created by ``start()`` (mode 0600) and removed by ``stop()``.
    A path that exists and is not a FIFO raises ``FileExistsError`` (here or
    in ``start()``) and is left as it is.  ``max_interval`` is accepted for
    compatibility; it no longer bounds anything.  The loop thread is always a
    daemon thread, whatever ``daemon`` says: call ``stop()`` before exiting,
    or the FIFO is left behind.

    ``log_event(name, request)`` gets torch's events with a ``FileTimerRequest``
    (``None`` for "watchdog started"/"watchdog stopped"); its signal is 0 in
    "timer expired" (that event does not carry it) and the one sent in "kill
    worker process".  ``roots`` are pids (the torchrun agent, say) whose
    descendants requests may name, besides this process's own descendants;
    a request naming this process itself is refused.  ``reaper`` replaces the
    default (the client's signal, at once, through a pidfd).
    ``kill_self=True`` restores torch 2.13's killing of this process after a
    reap; the default leaves it alive.  ``realtime``: as ``TimerServer``'s; by
    default the loop thread (its own) runs real-time near deadlines where
    permitted.
    """

    def __init__(
        self,
        file_path: str,
        run_id: str,
        max_interval: float = 10,
        daemon: bool = True,
        log_event: Callable[[str, FileTimerRequest | None], None] | None = None,
        *,
        roots: Iterable[int] = (),
        kill_self: bool = False,
        reaper: Reaper | None = None,
        realtime: bool | Literal["auto"] = "auto",
    ) -> None:
        check_fifo_path(file_path)
        self._file_path = file_path
        del run_id  # torch's signature; torch only logs it, aiotimer names processes
        self._max_interval = max_interval
        self._roots = tuple(roots)
        self._torch_log_event = log_event
        self._listener: FifoListener | None = None
        hook = self._adapt_event if log_event is not None else None
        super().__init__(
            daemon=daemon, reaper=reaper, kill_self=kill_self, log_event=hook, realtime=realtime
        )

    def _adapt_event(self, name: str, info: Mapping[str, object]) -> None:
        assert self._torch_log_event is not None
        clock = self._server.clock
        request: FileTimerRequest | None = None
        pid = info.get("pid")
        if name == TIMER_EXPIRED and isinstance(pid, int):
            deadline = info.get("deadline")
            when = monotonic_to_wall(clock, deadline) if isinstance(deadline, int | float) else -1.0
            request = FileTimerRequest(pid, str(info.get("scope")), when, 0)
        elif name == KILL_WORKER_PROCESS and isinstance(pid, int):
            # torch hands out the expired request whose signal was sent: the
            # earliest expired scope, its deadline (``latency`` before now).
            scopes = info.get("scopes")
            scope = scopes[0] if isinstance(scopes, list) and scopes else ""
            latency = info.get("latency")
            lag = latency if isinstance(latency, int | float) else 0.0
            sig = info.get("signal")
            request = FileTimerRequest(
                pid, str(scope), clock.wall() - lag, sig if isinstance(sig, int) else 0
            )
        self._torch_log_event(name, request)

    async def _attach(self, server: _AiotimerServer) -> None:
        self._listener = await listen_fifo(server, self._file_path, roots=self._roots)

    def start(self) -> None:
        """Create the FIFO and start serving; returns once clients can connect.

        Does nothing if the server is running already.  ``FileExistsError`` if
        the path is taken by something that is not a FIFO.
        """
        logger.info(
            "Starting %s... max_interval=%s (unused), daemon=%s (the loop thread is always one), "
            "file_path=%s",
            type(self).__name__,
            self._max_interval,
            self._daemon,
            self._file_path,
        )
        super().start()

    def stop(self) -> None:
        """Stop serving and remove the FIFO; harmless if not running."""
        logger.info("Stopping %s", type(self).__name__)
        super().stop()

    def run_once(self) -> None:
        """Return once every request written to the FIFO so far has been applied.

        Applied: timers armed or released, rejections counted.  Expiries that
        this makes due are then acted on at once, as always.  Returns as soon
        as the FIFO is seen empty, so a client writing without pause delays it.
        Unlike torch's, it leaves the server running (call ``stop()``).  Does
        nothing if the server is not running.
        """
        with self._lock:
            portal = self._portal
            if portal is not None:
                portal.call(self._until_fifo_read)

    async def _until_fifo_read(self) -> None:
        # The listener reads, decodes and applies in one loop callback, so once
        # the FIFO holds no unread byte, every line written before is applied.
        while self._listener is not None and self._listener.unread_bytes() > 0:
            await asyncio.sleep(0)


class LocalTimerServer(_ThreadedServer):
    """torch's ``LocalTimerServer``, on aiotimer: serves ``LocalTimerClient``s on an mp queue.

    Kills expired workers with SIGKILL (through a pidfd), at their deadline.
    ``max_interval`` is accepted for compatibility and unused.  The loop thread
    is always a daemon thread, whatever ``daemon`` says: call ``stop()``.
    ``roots``, ``reaper`` and ``realtime`` are as for ``FileTimerServer``.
    """

    def __init__(
        self,
        mp_queue: multiprocessing.queues.Queue[Any],
        max_interval: float = 60,
        daemon: bool = True,
        *,
        roots: Iterable[int] = (),
        reaper: Reaper | None = None,
        realtime: bool | Literal["auto"] = "auto",
    ) -> None:
        self._mp_queue = mp_queue
        self._max_interval = max_interval
        self._roots = tuple(roots)
        super().__init__(
            daemon=daemon, reaper=reaper, kill_self=False, log_event=None, realtime=realtime
        )

    async def _attach(self, server: _AiotimerServer) -> None:
        await bridge_queue(server, self._mp_queue, roots=self._roots)
