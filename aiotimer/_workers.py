"""Workers: the processes a ``TimerServer`` spawned, as their launcher sees them."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable
from typing import Protocol

from ._linux import ProcessGone

__all__ = ["Worker"]


class _Watch(Protocol):
    """How the server watches a worker (a ``WatchedProcess``): its exit, a pidfd signal."""

    @property
    def exited(self) -> bool:
        """Whether the process has exited."""

    def send_signal(self, sig: int, *, group: bool = False) -> None:
        """Signal the process through its pidfd."""


class Worker:
    """A worker process that a ``TimerServer`` spawned and watches.

    Mirrors ``asyncio.subprocess.Process``: ``pid``, ``returncode``, ``stdin``,
    ``stdout``, ``stderr`` (streams when asked for with ``PIPE``) and ``wait()``.
    """

    def __init__(
        self,
        process: asyncio.subprocess.Process,
        *,
        reaper: Callable[..., object] | None,
        process_group: bool,
    ) -> None:
        self._process = process
        self.reaper = reaper
        self.process_group = process_group
        #: scopes of this worker's expired timers, in the order they expired
        self.expired_scopes: list[str] = []
        #: whether the watchdog signalled this worker
        self.killed_by_watchdog = False
        self.watched: _Watch | None = None

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
