"""Benchmark workers and death watching, shared by every backend."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from pathlib import Path

WORKER = str(Path(__file__).with_name("_worker.py"))
ROOT = str(Path(__file__).resolve().parent.parent)
# Python start-up of 64 workers on two shared cores takes seconds; allow plenty.
STARTUP_TIMEOUT = 120.0


def worker_env() -> dict[str, str]:
    """The environment benchmark workers run in (this checkout importable)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


class DeathWatch:
    """Records, on the loop, when each watched process exits (its pidfd turns readable)."""

    def __init__(self) -> None:
        self.deaths: dict[int, float] = {}
        self._fds: dict[int, int] = {}
        self._loop = asyncio.get_running_loop()
        self._all_dead: asyncio.Event = asyncio.Event()

    def watch(self, pid: int) -> None:
        """Start watching ``pid``."""
        fd = os.pidfd_open(pid)
        self._fds[pid] = fd
        self._loop.add_reader(fd, self._died, pid)

    def _died(self, pid: int) -> None:
        self.deaths[pid] = time.monotonic()
        fd = self._fds.pop(pid)
        self._loop.remove_reader(fd)
        os.close(fd)
        if not self._fds:
            self._all_dead.set()

    async def wait_all(self, timeout: float) -> None:
        """Wait until every watched process died, or ``timeout`` seconds."""
        if not self._fds:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._all_dead.wait(), timeout)

    def close(self) -> list[int]:
        """Stop watching; return the pids that never died."""
        alive = list(self._fds)
        for fd in self._fds.values():
            self._loop.remove_reader(fd)
            os.close(fd)
        self._fds.clear()
        return alive


async def expect_line(stream: asyncio.StreamReader | None, want: bytes) -> None:
    """Read one line from a worker and check it is ``want``."""
    assert stream is not None
    line = await asyncio.wait_for(stream.readline(), STARTUP_TIMEOUT)
    if line.strip() != want:
        raise RuntimeError(f"benchmark worker said {line!r}, expected {want!r}")


def python_worker_argv(*mode: str) -> list[str]:
    """argv of a benchmark worker in ``mode``."""
    return [sys.executable, WORKER, *mode]
