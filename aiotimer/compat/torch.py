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

One behaviour differs on purpose: torch 2.13's ``FileTimerServer`` kills its own
process after reaping a worker, which under torchrun kills the agent and
orphans the other ranks.  Here that happens only with ``kill_self=True``.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import os
import signal as _signal
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from .._events import KILL_WORKER_PROCESS, TIMER_EXPIRED, logger
from .._expiry import Expiry, Reaper
from .._protocol import encode_json_request
from .._reapers import SignalReaper
from .._server import TimerServer
from ..transports.fifo import listen_fifo
from ..transports.mpqueue import bridge_queue

__all__ = [
    # clients and the context manager
    "FileTimerClient",
    "LocalTimerClient",
    "TimerClient",
    "configure",
    "expires",
    # servers
    "FileTimerServer",
    "LocalTimerServer",
    # requests
    "FileTimerRequest",
    "TimerRequest",
]

# -- requests -------------------------------------------------------------


class TimerRequest:
    """torch's ``TimerRequest``: ``expiration_time < 0`` means release."""

    __slots__ = ("expiration_time", "scope_id", "worker_id")

    def __init__(self, worker_id: Any, scope_id: str, expiration_time: float) -> None:
        self.worker_id = worker_id
        self.scope_id = scope_id
        self.expiration_time = expiration_time

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, TimerRequest)
            and type(other) is type(self)
            and (self.worker_id, self.scope_id, self.expiration_time)
            == (other.worker_id, other.scope_id, other.expiration_time)
        )

    def __hash__(self) -> int:
        return hash((self.worker_id, self.scope_id, self.expiration_time))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(worker_id={self.worker_id!r}, scope_id={self.scope_id!r}, "
            f"expiration_time={self.expiration_time!r})"
        )


class FileTimerRequest(TimerRequest):
    """torch's ``FileTimerRequest``: what ``FileTimerServer``'s ``log_event`` receives."""

    __slots__ = ("signal", "version")

    def __init__(
        self, worker_pid: int, scope_id: str, expiration_time: float, signal: int = 0
    ) -> None:
        super().__init__(worker_pid, scope_id, expiration_time)
        self.version = 1
        self.signal = signal

    @property
    def worker_pid(self) -> int:
        """The pid the request is for."""
        return int(self.worker_id)

    def to_json(self) -> str:
        """The request as torch's client writes it."""
        return json.dumps(
            {
                "version": self.version,
                "pid": self.worker_pid,
                "scope_id": self.scope_id,
                "expiration_time": self.expiration_time,
                "signal": self.signal,
            }
        )


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

    def __repr__(self) -> str:
        return f"FileTimerClient({self._file_path!r}, signal={self.signal})"

    def _open(self) -> int:
        error: OSError | None = None
        for attempt in range(10):
            try:
                st = os.stat(self._file_path)
                if not stat.S_ISFIFO(st.st_mode):
                    raise BrokenPipeError(f"{self._file_path!r} is not a FIFO")
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
        if len(line) > 4096:
            raise RuntimeError(
                f"FileTimerRequest larger than 4096 bytes is not supported: {line!r}"
            )
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

    def __init__(self, mp_queue: Any) -> None:
        self._mp_queue = mp_queue

    def acquire(self, scope_id: str, expiration_time: float) -> None:
        """Arm ``scope_id`` until ``expiration_time`` (wall clock)."""
        self._mp_queue.put(TimerRequest(os.getpid(), scope_id, expiration_time))

    def release(self, scope_id: str) -> None:
        """Disarm ``scope_id``."""
        self._mp_queue.put(TimerRequest(os.getpid(), scope_id, -1))


_timer_client: Any = None


def configure(timer_client: Any) -> None:
    """Set the process-wide client that ``expires`` uses (torch's or aiotimer's)."""
    global _timer_client
    _timer_client = timer_client
    logger.info("Timer client configured to: %s", type(timer_client).__name__)


@contextlib.contextmanager
def expires(after: float, scope: str | None = None, client: Any = None) -> Iterator[None]:
    """torch's ``expires``: arm ``scope`` for ``after`` seconds around the block.

    The default scope is the caller's ``file#line`` (found without walking the
    stack).  As in torch, a scope re-acquired (recursion) replaces itself.
    Raises ``RuntimeError`` when no client is configured.
    """
    if client is None:
        if _timer_client is None:
            raise RuntimeError("Configure timer client before using countdown timers.")
        client = _timer_client
    if scope is None:
        frame = sys._getframe(2)  # past contextmanager's __enter__
        scope = f"{frame.f_code.co_filename}#{frame.f_lineno}"
    client.acquire(scope, time.time() + after)
    try:
        yield
    finally:
        client.release(scope)


# -- servers ---------------------------------------------------------------


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _wall(deadline: float) -> float:
    return deadline + (time.time() - time.monotonic())


class _ThreadedServer:
    """An aiotimer ``TimerServer`` on a loop thread of its own, for synchronous callers."""

    def __init__(
        self,
        *,
        daemon: bool,
        reaper: Reaper | None,
        kill_self: bool,
        log_event: Callable[[str, Mapping[str, object]], None] | None,
    ) -> None:
        self._daemon = daemon
        self._kill_self = kill_self
        base = reaper if reaper is not None else SignalReaper()
        self._server = TimerServer(reaper=self._wrap(base), log_event=log_event)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started_at = int(time.time())

    def _wrap(self, reaper: Reaper) -> Reaper:
        if not self._kill_self:
            return reaper

        async def reap_then_kill_self(expiry: Expiry) -> None:
            result = reaper(expiry)
            if isinstance(result, asyncio.Future) or asyncio.iscoroutine(result):
                await result
            if expiry.signals_sent:
                logger.info("Terminating the server process=[%s] (kill_self=True)", os.getpid())
                os.kill(os.getpid(), expiry.signals_sent[-1])

        return reap_then_kill_self

    async def _setup(self) -> None:
        raise NotImplementedError

    async def _main(self, ready: threading.Event, failure: list[BaseException]) -> None:
        self._stop = asyncio.Event()
        try:
            await self._server.start()
            await self._setup()
        except BaseException as exc:
            failure.append(exc)
            await self._server.aclose()
            ready.set()
            return
        ready.set()
        try:
            await self._stop.wait()
        finally:
            await self._server.aclose()

    def start(self) -> None:
        """Start serving; returns once clients can connect."""
        if self._thread is not None:
            raise RuntimeError(f"{type(self).__name__} is already started")
        ready = threading.Event()
        failure: list[BaseException] = []
        self._loop = _new_loop()
        loop = self._loop

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._main(ready, failure))
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name=type(self).__name__, daemon=self._daemon)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]

    def stop(self) -> None:
        """Stop serving and wait for the loop thread to finish."""
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None or loop is None or stop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop may have closed already
            loop.call_soon_threadsafe(stop.set)
        thread.join()
        self._thread = None

    def get_last_progress_time(self) -> int:
        """Now while the server runs (it never stalls waiting on a poll), else its start."""
        if self._thread is not None and self._thread.is_alive():
            return int(time.time())
        return self._started_at

    @property
    def server(self) -> TimerServer:
        """The underlying aiotimer server (for its ``statistics()``)."""
        return self._server


class FileTimerServer(_ThreadedServer):
    """torch's ``FileTimerServer``, on aiotimer: serves ``FileTimerClient``s on a FIFO.

    ``max_interval`` is accepted for compatibility; it no longer bounds anything.
    ``log_event(name, request)`` gets torch's events with a ``FileTimerRequest``
    (or ``None``).  ``roots`` are pids (the torchrun agent, say) whose
    descendants requests may name, besides this process's own descendants.
    ``kill_self=True`` restores torch 2.13's killing of this process after a
    reap; the default leaves it alive.
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
    ) -> None:
        if os.path.lexists(file_path) and not stat.S_ISFIFO(os.lstat(file_path).st_mode):
            raise FileExistsError(
                f"`file_path` {file_path!r} exists and is not a FIFO; refusing to replace it"
            )
        self._file_path = file_path
        self._run_id = run_id
        self._max_interval = max_interval
        self._roots = tuple(roots)
        self._torch_log_event = log_event
        hook = self._adapt_event if log_event is not None else None
        super().__init__(daemon=daemon, reaper=reaper, kill_self=kill_self, log_event=hook)

    def _adapt_event(self, name: str, info: Mapping[str, object]) -> None:
        assert self._torch_log_event is not None
        request: FileTimerRequest | None = None
        pid = info.get("pid")
        if name == TIMER_EXPIRED and isinstance(pid, int):
            deadline = info.get("deadline")
            when = _wall(deadline) if isinstance(deadline, float) else -1.0
            request = FileTimerRequest(pid, str(info.get("scope")), when, 0)
        elif name == KILL_WORKER_PROCESS and isinstance(pid, int):
            scopes = info.get("scopes")
            scope = scopes[0] if isinstance(scopes, list) and scopes else ""
            sig = info.get("signal")
            request = FileTimerRequest(pid, str(scope), -1.0, sig if isinstance(sig, int) else 0)
        self._torch_log_event(name, request)

    async def _setup(self) -> None:
        await listen_fifo(self._server, self._file_path, roots=self._roots)

    def start(self) -> None:
        """Create the FIFO and start serving; returns once clients can connect."""
        logger.info(
            "Starting %s... max_interval=%s (unused), daemon=%s, file_path=%s",
            type(self).__name__,
            self._max_interval,
            self._daemon,
            self._file_path,
        )
        super().start()

    def stop(self) -> None:
        """Stop serving and remove the FIFO."""
        logger.info("Stopping %s", type(self).__name__)
        super().stop()


class LocalTimerServer(_ThreadedServer):
    """torch's ``LocalTimerServer``, on aiotimer: serves ``LocalTimerClient``s on an mp queue.

    Kills expired workers with SIGKILL (through a pidfd).  ``max_interval`` is
    accepted for compatibility and unused.
    """

    def __init__(
        self,
        mp_queue: Any,
        max_interval: float = 60,
        daemon: bool = True,
        *,
        roots: Iterable[int] = (),
        reaper: Reaper | None = None,
    ) -> None:
        self._mp_queue = mp_queue
        self._max_interval = max_interval
        self._roots = tuple(roots)
        super().__init__(daemon=daemon, reaper=reaper, kill_self=False, log_event=None)

    async def _setup(self) -> None:
        await bridge_queue(self._server, self._mp_queue, roots=self._roots)
