"""Kill latency: N workers arm a timer due shortly and hang; how soon does each die?

Reports, per backend, deadline -> death (observed through pidfds by a separate
process), the server's decision latency (deadline -> signal sent) where the
backend reports it, and how many were never killed.  The floor is the same kind
of workers killed directly by the harness through pidfds at the deadline.

Workers come in two kinds with their own floors: ``plain`` (a fresh Python
process per worker: aiotimer's spawned pipe workers) and ``torch`` (forked from
one process that imported torch, as real trainers have it imported; torch's
servers and aiotimer's FIFO listener serve torch's own clients in these).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial

from aiotimer import Event, KillWorkerProcess, TimerServer
from aiotimer.transports import listen_fifo, listen_socket

from ._procs import DeathWatch, expect_line, python_worker_argv, start_torch_host, worker_env

#: How far ahead of "all armed" the common deadline lies.
LEAD = 0.5
#: How long after the deadline (plus a torch server's max_interval) a worker may
#: take to die before it counts as missed.
MISS_AFTER = 10.0


@dataclass
class KillRun:
    """One repetition: per-worker latencies in seconds."""

    kill: list[float] = field(default_factory=list)
    decision: list[float] = field(default_factory=list)
    missed: int = 0


def _kill_at(deadline: float, pidfds: list[int], decisions: list[float]) -> None:
    """Have the loop SIGKILL every pidfd at ``deadline`` (never before it).

    The loop's timers are only millisecond-accurate, so the last few
    milliseconds are slept out in one precise blocking sleep: the floor is as
    punctual as this machine allows (blocking the harness's loop costs it nothing).
    """
    loop = asyncio.get_running_loop()

    def kill_all() -> None:
        remaining = deadline - time.monotonic()
        if remaining > 0:
            time.sleep(remaining)
        for fd in pidfds:  # timed per signal, as the servers' decisions are
            signal.pidfd_send_signal(fd, signal.SIGKILL)
            decisions.append(time.monotonic() - deadline)

    loop.call_later(max(0.0, deadline - time.monotonic() - 0.005), kill_all)


# -- plain workers ---------------------------------------------------------------


async def _plain(n: int, spawn: Callable[[], Awaitable[object]], floor: bool) -> KillRun:
    procs = [await spawn() for _ in range(n)]
    await asyncio.gather(*(expect_line(p.stdout, b"ready") for p in procs))  # type: ignore[attr-defined]
    pids = [p.pid for p in procs]  # type: ignore[attr-defined]
    watch = DeathWatch()
    await watch.start(pids)
    deadline = time.monotonic() + LEAD
    for p in procs:
        p.stdin.write(f"{deadline!r}\n".encode())  # type: ignore[attr-defined]
    await asyncio.gather(*(expect_line(p.stdout, b"armed") for p in procs))  # type: ignore[attr-defined]
    assert time.monotonic() < deadline, "workers armed after the deadline: raise LEAD"
    run = KillRun()
    pidfds = [os.pidfd_open(pid) for pid in pids] if floor else []
    if floor:
        _kill_at(deadline, pidfds, run.decision)
    run.missed = len(await watch.wait_all(LEAD + MISS_AFTER))
    run.kill = [watch.deaths[pid] - deadline for pid in pids if pid in watch.deaths]
    for fd in pidfds:
        os.close(fd)
    for p in procs:
        if p.returncode is None:  # type: ignore[attr-defined]
            p.kill()  # type: ignore[attr-defined]
        await p.wait()  # type: ignore[attr-defined]
    return run


async def floor_plain(n: int) -> KillRun:
    """Plain workers killed directly by the harness."""
    pipe = asyncio.subprocess.PIPE
    argv = python_worker_argv("none")

    async def spawn() -> object:
        return await asyncio.create_subprocess_exec(
            *argv, stdin=pipe, stdout=pipe, env=worker_env()
        )

    return await _plain(n, spawn, floor=True)


def _decisions_into(server: TimerServer, run_decisions: list[float]) -> TimerServer:
    """Record the decision latency of every kill ``server`` makes (its typed events)."""

    def on_event(event: Event) -> None:
        if isinstance(event, KillWorkerProcess):
            run_decisions.append(event.latency)

    server.events.subscribe(on_event)
    return server


#: Serve metrics from every aiotimer server measured, scraped every 100 ms (``--with-metrics``).
WITH_METRICS = False


def _scraped(server: TimerServer) -> Callable[[], None]:
    """Serve ``server``'s metrics, scraped every 100 ms by another process, until stop()."""
    url = server.serve_metrics().url
    code = (
        "import sys, time, urllib.request\n"
        "while True:\n"
        "    urllib.request.urlopen(sys.argv[1], timeout=5).read()\n"
        "    time.sleep(0.1)\n"
    )
    scraper = subprocess.Popen([sys.executable, "-c", code, url], stderr=subprocess.DEVNULL)

    def stop() -> None:
        scraper.kill()
        scraper.wait()

    return stop


async def aiotimer_pipe(
    n: int, server: TimerServer | None = None, *, realtime: bool = False
) -> KillRun:
    """aiotimer's TimerServer in this loop (``server``, or a default one); workers over pipes.

    ``realtime``: the default server with ``realtime=True``.
    """
    decisions: list[float] = []
    pipe = asyncio.subprocess.PIPE
    server = server or TimerServer(realtime=realtime)
    async with _decisions_into(server, decisions) as server:
        stop_scraping = _scraped(server) if WITH_METRICS else (lambda: None)
        argv = python_worker_argv("aiotimer")

        async def spawn() -> object:
            return await server.spawn(*argv, stdin=pipe, stdout=pipe, env=worker_env())

        run = await _plain(n, spawn, floor=False)
        stop_scraping()
    run.decision = decisions
    return run


async def aiotimer_socket(n: int, *, realtime: bool = False) -> KillRun:
    """aiotimer's socket listener; workers it did not spawn connect (``AIOTIMER_SOCKET``)."""
    decisions: list[float] = []
    pipe = asyncio.subprocess.PIPE
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "sock", "timer.sock")
        async with _decisions_into(TimerServer(realtime=realtime), decisions) as server:
            await listen_socket(server, path)
            argv = python_worker_argv("aiotimer")
            env = {**worker_env(), "AIOTIMER_SOCKET": path}

            async def spawn() -> object:
                return await asyncio.create_subprocess_exec(*argv, stdin=pipe, stdout=pipe, env=env)

            run = await _plain(n, spawn, floor=False)
    run.decision = decisions
    return run


# -- torch workers -----------------------------------------------------------------


async def _torch(
    n: int, mode: str, *, fifo: str = "", max_interval: float = 0.01, floor: bool = False
) -> KillRun:
    host = await start_torch_host(mode, fifo, max_interval)
    assert host.stdin is not None and host.stdout is not None
    run = KillRun()
    try:
        host.stdin.write(f"kill {n}\n".encode())
        pids = [int(p) for p in (await host.stdout.readline()).split()]
        watch = DeathWatch()
        await watch.start(pids)
        deadline = time.monotonic() + LEAD
        wall_deadline = deadline - time.monotonic() + time.time()
        host.stdin.write(f"{deadline!r}\n".encode())
        for _ in range(n):
            await expect_line(host.stdout, b"armed")
        assert time.monotonic() < deadline, "workers armed after the deadline: raise LEAD"
        pidfds = [os.pidfd_open(pid) for pid in pids] if floor else []
        if floor:
            _kill_at(deadline, pidfds, run.decision)
        run.missed = len(await watch.wait_all(LEAD + max_interval + MISS_AFTER))
        run.kill = [watch.deaths[pid] - deadline for pid in pids if pid in watch.deaths]
        for fd in pidfds:
            os.close(fd)
        for pid in pids:  # whatever was never killed
            if pid not in watch.deaths:
                os.kill(pid, signal.SIGKILL)
        if host.returncode is None:
            host.stdin.write(b"quit\n")
        host.stdin.close()
        rest = await asyncio.wait_for(host.stdout.read(), 30)
        for line in rest.decode().splitlines():
            if line.startswith("decision "):
                run.decision.append(float(line.split()[1]) - wall_deadline)
    finally:
        if host.returncode is None:
            try:
                await asyncio.wait_for(host.wait(), 10)
            except TimeoutError:
                host.kill()
                await host.wait()
    return run


async def floor_torch(n: int) -> KillRun:
    """Torch workers killed directly by the harness."""
    return await _torch(n, "none", floor=True)


async def aiotimer_fifo(n: int, *, realtime: bool = False) -> KillRun:
    """aiotimer's TimerServer in this loop serving torch's own FileTimerClient on a FIFO."""
    decisions: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        fifo = os.path.join(tmp, "timer.fifo")
        async with _decisions_into(TimerServer(realtime=realtime), decisions) as server:
            await listen_fifo(server, fifo)
            run = await _torch(n, "client-file", fifo=fifo)
    run.decision = decisions
    return run


def torch_file(max_interval: float) -> Callable[[int], Awaitable[KillRun]]:
    """torch's FileTimerServer (in a host process it will kill) at ``max_interval``."""

    async def measure(n: int) -> KillRun:
        with tempfile.TemporaryDirectory() as tmp:
            fifo = os.path.join(tmp, "timer.fifo")
            return await _torch(n, "host-file", fifo=fifo, max_interval=max_interval)

    return measure


def torch_local(max_interval: float) -> Callable[[int], Awaitable[KillRun]]:
    """torch's LocalTimerServer (in a host process) at ``max_interval``."""

    async def measure(n: int) -> KillRun:
        return await _torch(n, "host-local", max_interval=max_interval)

    return measure


@dataclass(frozen=True)
class Backend:
    """A kill-latency backend: how to measure it, its worker kind, and its loops."""

    name: str
    measure: Callable[[int], Awaitable[KillRun]]
    kind: str  # "plain" or "torch": which floor it is compared with
    is_floor: bool = False
    on_every_loop: bool = False  # aiotimer rows run on each loop; the rest once
    needs_torch: bool = False


def backends(torch_defaults: bool) -> list[Backend]:
    """Every kill-latency backend; torch's defaults only when asked for (they take seconds)."""
    rows = [
        Backend("floor (plain)", floor_plain, "plain", is_floor=True),
        Backend("aiotimer-pipe", aiotimer_pipe, "plain", on_every_loop=True),
        Backend("aiotimer-socket", aiotimer_socket, "plain", on_every_loop=True),
        Backend("floor (torch)", floor_torch, "torch", is_floor=True, needs_torch=True),
        Backend("aiotimer-fifo", aiotimer_fifo, "torch", on_every_loop=True, needs_torch=True),
        # The same with TimerServer(realtime=True): the dying victims of a burst
        # cannot preempt the server before it has signalled them all.
        Backend(
            "aiotimer-pipe rt", partial(aiotimer_pipe, realtime=True), "plain", on_every_loop=True
        ),
        Backend(
            "aiotimer-fifo rt",
            partial(aiotimer_fifo, realtime=True),
            "torch",
            on_every_loop=True,
            needs_torch=True,
        ),
        Backend("torch-file@0.01", torch_file(0.01), "torch", needs_torch=True),
        Backend("torch-local@0.01", torch_local(0.01), "torch", needs_torch=True),
    ]
    if torch_defaults:
        rows += [
            Backend("torch-file@10", torch_file(10.0), "torch", needs_torch=True),
            Backend("torch-local@60", torch_local(60.0), "torch", needs_torch=True),
        ]
    return rows
