"""Benchmark workers and death watching, shared by every backend."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

WORKER = str(Path(__file__).with_name("_worker.py"))
OBSERVER = str(Path(__file__).with_name("_observer.py"))
TORCH_HOST = str(Path(__file__).with_name("_torchhost.py"))
SLEEPER = str(Path(__file__).with_name("_sleeper.py"))
ROOT = str(Path(__file__).resolve().parent.parent)
# Python start-up of 64 workers on two shared cores takes seconds; allow plenty.
STARTUP_TIMEOUT = 120.0


def worker_env() -> dict[str, str]:
    """The environment benchmark workers run in (this checkout importable)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


class DeathWatch:
    """Timestamps each watched process's death from a separate observer process.

    Watching from the server's own loop would measure the loop's backlog as
    well as the deaths, and bias against whatever else that loop does.
    """

    def __init__(self) -> None:
        self.deaths: dict[int, float] = {}
        self._proc: asyncio.subprocess.Process | None = None
        self._pids: list[int] = []

    async def start(self, pids: list[int]) -> None:
        """Start observing ``pids``; returns once their pidfds are open."""
        self._pids = list(pids)
        pipe = asyncio.subprocess.PIPE
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, OBSERVER, stdin=pipe, stdout=pipe
        )
        assert self._proc.stdin is not None
        self._proc.stdin.write((" ".join(map(str, pids)) + "\n").encode())
        await self._proc.stdin.drain()
        await expect_line(self._proc.stdout, b"watching")

    async def wait_all(self, timeout: float) -> list[int]:
        """Wait until all died or ``timeout`` passed; return the pids that never died."""
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        try:
            out = await asyncio.wait_for(proc.stdout.read(), timeout)
        except TimeoutError:
            proc.stdin.write(b"stop\n")
            await proc.stdin.drain()
            out = await proc.stdout.read()
        proc.stdin.close()
        await proc.wait()
        for line in out.decode().splitlines():
            if line == "done":
                break
            pid, when = line.split()
            if when != "nan":
                self.deaths[int(pid)] = float(when)
        return [pid for pid in self._pids if pid not in self.deaths]


async def start_torch_host(
    mode: str, fifo: str = "", max_interval: float = 0.01
) -> asyncio.subprocess.Process:
    """Start ``_torchhost.py`` in ``mode``; returns once it has said ``ready``."""
    pipe = asyncio.subprocess.PIPE
    host = await asyncio.create_subprocess_exec(
        sys.executable,
        TORCH_HOST,
        mode,
        fifo,
        repr(max_interval),
        stdin=pipe,
        stdout=pipe,
        env=worker_env(),
    )
    await expect_line(host.stdout, b"ready")
    return host


async def expect_line(stream: asyncio.StreamReader | None, want: bytes) -> None:
    """Read one line from a worker and check it is ``want``."""
    assert stream is not None
    line = await asyncio.wait_for(stream.readline(), STARTUP_TIMEOUT)
    if line.strip() != want:
        raise RuntimeError(f"benchmark worker said {line!r}, expected {want!r}")


def python_worker_argv(*mode: str) -> list[str]:
    """argv of a benchmark worker in ``mode``."""
    return [sys.executable, WORKER, *mode]


class Sleeper:
    """``_sleeper.py`` in its own process: how late a normal-priority sleeper wakes meanwhile."""

    def __init__(self) -> None:
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        """Start sleeping and waking (at normal priority, whatever this process runs at)."""
        pipe = asyncio.subprocess.PIPE
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, SLEEPER, stdin=pipe, stdout=pipe
        )

    async def stop(self) -> tuple[float, float, float]:
        """Stop it; its oversleep p50, p99 and max in milliseconds."""
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        proc.stdin.close()
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        await proc.wait()
        p50, p99, top = (float(x) for x in line.split())
        return p50, p99, top
