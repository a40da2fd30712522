"""Processes the server watches: pidfd-backed exit watching, and spawned workers."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from ._process import ProcessGone, open_pidfd, pidfd_signal

if TYPE_CHECKING:
    from ._reap import Reaper

__all__ = ["WatchedProcess", "Worker", "pidfd_child_watcher"]

_ids = itertools.count(1)


@contextlib.asynccontextmanager
async def pidfd_child_watcher() -> AsyncIterator[None]:
    """On Python 3.11's own asyncio loop, reap child processes through pidfds meanwhile.

    There, asyncio waits for each child in a thread of its own.  When many
    workers are killed together, those threads wake as the workers die and
    preempt the server while it is still signalling the rest.  Python 3.12+
    watches children through pidfds already, and uvloop has its own watcher, so
    elsewhere this does nothing.  The child watcher is process-wide: an
    application that owns its loop wraps its main coroutine in this (``aiotimer
    run`` and the benchmarks do); a library embedding the server leaves that
    choice to its application.
    """
    loop = asyncio.get_running_loop()
    if sys.version_info >= (3, 12) or not isinstance(loop, asyncio.SelectorEventLoop):
        yield
        return
    previous = asyncio.get_child_watcher()
    watcher = asyncio.PidfdChildWatcher()
    asyncio.set_child_watcher(watcher)
    watcher.attach_loop(loop)
    try:
        yield
    finally:
        asyncio.set_child_watcher(previous)


class WatchedProcess:
    """A process known to the server, held by a pidfd so its pid cannot be reused under us.

    Its exit is seen on the loop (a pidfd becomes readable when its process
    exits) with no thread and no polling.
    """

    __slots__ = (
        "_exit_waiters",
        "_loop",
        "_on_exit",
        "dump_signal",
        "exited",
        "id",
        "pid",
        "pidfd",
        "reaping",
        "requested_signals",
        "worker",
    )

    def __init__(
        self,
        pid: int,
        loop: asyncio.AbstractEventLoop,
        on_exit: Callable[[WatchedProcess], None],
        *,
        worker: Worker | None = None,
        pidfd: int | None = None,
    ) -> None:
        self.id = next(_ids)
        self.pid = pid
        self.pidfd = open_pidfd(pid) if pidfd is None else pidfd
        self.worker = worker
        self.exited = False
        self.reaping = False
        self.dump_signal = 0
        #: per-scope kill signals that torch's FIFO clients asked for
        self.requested_signals: dict[str, int] = {}
        self._loop = loop
        self._on_exit = on_exit
        self._exit_waiters: list[asyncio.Future[None]] = []
        loop.add_reader(self.pidfd, self._exited)

    def __repr__(self) -> str:
        state = "exited" if self.exited else ("reaping" if self.reaping else "running")
        return f"<WatchedProcess pid={self.pid} {state}>"

    def _exited(self) -> None:
        if self.exited:
            return
        self.exited = True
        self.close()
        for waiter in self._exit_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._exit_waiters.clear()
        self._on_exit(self)

    def close(self) -> None:
        """Stop watching and close the pidfd (the server does this on exit and on close)."""
        if self.pidfd >= 0:
            self._loop.remove_reader(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = -1

    def send_signal(self, sig: int, *, group: bool = False) -> None:
        """Signal this very process (or its group) via its pidfd; ``ProcessGone`` if exited."""
        if self.pidfd < 0:
            raise ProcessGone(f"process {self.pid} has exited")
        pidfd_signal(self.pidfd, self.pid, sig, group=group)

    async def wait_exit(self, timeout: float | None = None) -> bool:
        """Wait until the process exits; return ``False`` if ``timeout`` passed first."""
        if self.exited:
            return True
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._exit_waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except TimeoutError:
            return False
        finally:
            if waiter in self._exit_waiters:
                self._exit_waiters.remove(waiter)
        return True


class Worker:
    """A worker process that a ``TimerServer`` spawned and watches.

    Mirrors ``asyncio.subprocess.Process``: ``pid``, ``returncode``, ``stdin``,
    ``stdout``, ``stderr`` (streams when asked for with ``PIPE``) and ``wait()``.
    """

    def __init__(
        self,
        process: asyncio.subprocess.Process,
        *,
        reaper: Reaper | None,
        process_group: bool,
    ) -> None:
        self._process = process
        self.reaper = reaper
        self.process_group = process_group
        #: scopes of this worker's expired timers, in the order they expired
        self.expired_scopes: list[str] = []
        #: whether the watchdog signalled this worker
        self.killed_by_watchdog = False
        self.watched: WatchedProcess | None = None

    def __repr__(self) -> str:
        return f"<Worker pid={self.pid} returncode={self.returncode}>"

    @property
    def pid(self) -> int:
        """The worker's process id."""
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        """Exit status once it has exited (negative: killed by that signal), else ``None``."""
        return self._process.returncode

    @property
    def stdin(self) -> asyncio.StreamWriter | None:
        """The worker's stdin stream, when spawned with ``stdin=PIPE``."""
        return self._process.stdin

    @property
    def stdout(self) -> asyncio.StreamReader | None:
        """The worker's stdout stream, when spawned with ``stdout=PIPE``."""
        return self._process.stdout

    @property
    def stderr(self) -> asyncio.StreamReader | None:
        """The worker's stderr stream, when spawned with ``stderr=PIPE``."""
        return self._process.stderr

    async def wait(self) -> int:
        """Wait for the worker to exit and return its return code."""
        return await self._process.wait()

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the worker (through its pidfd while it is watched)."""
        if self.watched is not None and not self.watched.exited:
            with contextlib.suppress(ProcessGone):
                self.watched.send_signal(sig)
            return
        if self._process.returncode is None:
            self._process.send_signal(sig)

    def terminate(self) -> None:
        """Send SIGTERM."""
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """Send SIGKILL."""
        self.send_signal(signal.SIGKILL)
