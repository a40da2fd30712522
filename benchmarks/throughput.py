"""Throughput: W workers run acquire+release pairs as fast as they can for a few seconds.

Reports pairs/s the clients sent, requests/s the server actually processed in
that window, the backlog left unprocessed when the clients stopped, and client
errors.  A server that accepts requests it cannot process is not fast: the
processed rate and the backlog count.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from aiotimer import TimerServer, Worker
from aiotimer.transports import listen_fifo, listen_socket

from ._procs import expect_line, python_worker_argv, start_torch_host, worker_env


@dataclass
class Throughput:
    """One measurement."""

    seconds: float
    pairs: int
    errors: int
    processed: int  # requests the server applied by the time the clients stopped

    @property
    def sent_pairs_per_s(self) -> float:
        """Acquire+release pairs per second the clients completed."""
        return self.pairs / self.seconds

    @property
    def processed_per_s(self) -> float:
        """Requests per second the server applied."""
        return self.processed / self.seconds

    @property
    def backlog(self) -> int:
        """Requests sent but not yet applied when the clients stopped."""
        return max(0, 2 * self.pairs - self.processed)


async def aiotimer_pipe(workers: int, seconds: float) -> Throughput:
    """aiotimer over pipes: W spawned workers using ``aiotimer.expires``."""
    pipe = asyncio.subprocess.PIPE
    async with TimerServer() as server:
        procs = [
            await server.spawn(
                *python_worker_argv("pump", repr(seconds)),
                stdin=pipe,
                stdout=pipe,
                env=worker_env(),
            )
            for _ in range(workers)
        ]
        return await _pump(server, procs, seconds)


async def aiotimer_socket(workers: int, seconds: float) -> Throughput:
    """aiotimer over its socket: W workers it did not spawn, using ``aiotimer.expires``."""
    pipe = asyncio.subprocess.PIPE
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "sock", "timer.sock")
        async with TimerServer() as server:
            await listen_socket(server, path)
            env = {**worker_env(), "AIOTIMER_SOCKET": path}
            procs = [
                await asyncio.create_subprocess_exec(
                    *python_worker_argv("pump", repr(seconds)), stdin=pipe, stdout=pipe, env=env
                )
                for _ in range(workers)
            ]
            return await _pump(server, procs, seconds)


async def _pump(
    server: TimerServer, procs: Sequence[Worker | asyncio.subprocess.Process], seconds: float
) -> Throughput:
    """Start the pumping workers ``procs`` together; what they did in the window."""
    await asyncio.gather(*(expect_line(p.stdout, b"ready") for p in procs))
    base = server.statistics().requests
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(b"go\n")
    pairs = errors = 0
    processed = 0
    for p in procs:
        assert p.stdout is not None
        line = await asyncio.wait_for(p.stdout.readline(), seconds + 60)
        if not processed:  # the first to finish: the window has closed
            processed = server.statistics().requests - base - len(procs)  # less the hellos
        _, n, e = line.split()
        pairs += int(n)
        errors += int(e)
    for p in procs:
        await p.wait()
    return Throughput(seconds, pairs, errors, processed)


async def _torch_host(
    workers: int,
    seconds: float,
    mode: str,
    fifo: str = "",
    max_interval: float = 0.01,
    processed: Callable[[], int] | None = None,
) -> Throughput:
    host = await start_torch_host(mode, fifo, max_interval)
    assert host.stdin is not None and host.stdout is not None
    base = processed() if processed else 0
    host.stdin.write(f"pump {workers} {seconds!r}\n".encode())
    line = (await asyncio.wait_for(host.stdout.readline(), seconds + 120)).decode().split()
    done = processed() - base if processed else 0
    pairs, errors = int(line[1]), int(line[2])
    line = (await asyncio.wait_for(host.stdout.readline(), 60)).decode().split()
    if processed is None:
        done = int(line[1])  # what the hosted torch server registered
    host.stdin.write(b"quit\n")
    host.stdin.close()
    await host.wait()
    return Throughput(seconds, pairs, errors, done)


async def aiotimer_fifo(workers: int, seconds: float) -> Throughput:
    """aiotimer's FIFO listener serving torch's own FileTimerClient."""
    with tempfile.TemporaryDirectory() as tmp:
        fifo = os.path.join(tmp, "timer.fifo")
        async with TimerServer() as server:
            await listen_fifo(server, fifo)

            def processed() -> int:
                stats = server.statistics()
                return stats.requests

            return await _torch_host(workers, seconds, "client-file", fifo, processed=processed)


def torch_file(max_interval: float) -> Callable[[int, float], Awaitable[Throughput]]:
    """torch's FileTimerServer at ``max_interval``."""

    async def measure(workers: int, seconds: float) -> Throughput:
        with tempfile.TemporaryDirectory() as tmp:
            fifo = os.path.join(tmp, "timer.fifo")
            return await _torch_host(workers, seconds, "host-file", fifo, max_interval)

    return measure


def torch_local(max_interval: float) -> Callable[[int, float], Awaitable[Throughput]]:
    """torch's LocalTimerServer at ``max_interval``."""

    async def measure(workers: int, seconds: float) -> Throughput:
        return await _torch_host(workers, seconds, "host-local", max_interval=max_interval)

    return measure


#: name -> (measure, runs on every loop, needs torch)
BACKENDS: dict[str, tuple[Callable[[int, float], Awaitable[Throughput]], bool, bool]] = {
    "aiotimer-pipe": (aiotimer_pipe, True, False),
    "aiotimer-socket": (aiotimer_socket, True, False),
    "aiotimer-fifo": (aiotimer_fifo, True, True),
    "torch-file@0.01": (torch_file(0.01), False, True),
    "torch-local@0.01": (torch_local(0.01), False, True),
}
