"""``aiotimer run``'s job: ranks, restarts, output relay, exit codes; and ``aiotimer serve``."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TextIO

from ._events import KILL_WORKER_PROCESS, TIMER_EXPIRED
from ._reapers import SignalReaper
from ._server import TimerServer

__all__ = ["EXIT_WATCHDOG", "EXIT_WORKER_FAILED", "RankResult", "run_job", "serve_command"]

#: ``aiotimer run`` exit status when a worker was still hanging after its last restart.
EXIT_WATCHDOG = 124
#: ``aiotimer run`` exit status when a worker failed on its own.
EXIT_WORKER_FAILED = 1


@dataclass
class RankResult:
    """How one rank of ``aiotimer run`` ended."""

    rank: int
    returncode: int | None = None
    attempts: int = 0
    watchdog_kills: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line for the summary."""
        restarts = self.attempts - 1
        tail = f" after {restarts} restart{'s' if restarts != 1 else ''}" if restarts else ""
        kills = f"; watchdog kills: {'; '.join(self.watchdog_kills)}" if self.watchdog_kills else ""
        if self.returncode == 0:
            return f"rank {self.rank}: ok{tail}{kills}"
        if self.returncode is not None and self.returncode < 0:
            name = signal.Signals(-self.returncode).name
            status = f"killed by {name}"
        else:
            status = f"exit status {self.returncode}"
        return f"rank {self.rank}: FAILED, {status}{tail}{kills}"


class _Printer:
    """Prints worker output with a rank prefix, and the watchdog's actions as they happen."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.ranks: dict[int, int] = {}

    def line(self, text: str) -> None:
        self.out.write(text if text.endswith("\n") else text + "\n")
        self.out.flush()

    def who(self, pid: object) -> str:
        rank = self.ranks.get(pid) if isinstance(pid, int) else None
        return f"rank {rank} (pid {pid})" if rank is not None else f"pid {pid}"

    def event(self, name: str, info: Mapping[str, object]) -> None:
        if name == TIMER_EXPIRED:
            lag = info.get("lag")
            late = f"{lag * 1e3:.2f} ms" if isinstance(lag, float) else "?"
            self.line(
                f"aiotimer: {self.who(info.get('pid'))}: timer {info.get('scope')!r} "
                f"expired ({late} after its deadline)"
            )
        elif name == KILL_WORKER_PROCESS:
            sig = info.get("signal")
            sig_name = signal.Signals(sig).name if isinstance(sig, int) and sig > 0 else str(sig)
            latency = info.get("latency")
            late = f"{latency * 1e3:.2f} ms" if isinstance(latency, float) else "?"
            self.line(
                f"aiotimer: sent {sig_name} to {self.who(info.get('pid'))} "
                f"({late} after the deadline)"
            )

    async def pump(self, stream: asyncio.StreamReader | None, prefix: str) -> None:
        if stream is None:
            return
        while line := await stream.readline():
            self.line(prefix + line.decode(errors="replace"))


async def run_job(
    command: Sequence[str],
    *,
    nprocs: int = 1,
    max_restarts: int = 0,
    reaper: SignalReaper | None = None,
    out: TextIO | None = None,
) -> int:
    """Run ``nprocs`` watched copies of ``command``; return the job's exit status.

    Each copy gets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``
    and ``AIOTIMER_RESTART_COUNT`` as torchrun would set them.  A copy killed by
    the watchdog is restarted up to ``max_restarts`` times.  Returns 0 when every
    rank succeeded, 124 when one was still hanging after its last restart, and
    1 when one failed on its own.
    """
    if not command:
        raise ValueError("`command` must name a program to run, got an empty command")
    printer = _Printer(sys.stdout if out is None else out)
    results = [RankResult(rank) for rank in range(nprocs)]

    async with TimerServer(reaper=reaper, log_event=printer.event) as server:

        async def run_rank(result: RankResult) -> None:
            rank = result.rank
            while True:
                env = dict(os.environ)
                env.update(
                    RANK=str(rank),
                    LOCAL_RANK=str(rank),
                    WORLD_SIZE=str(nprocs),
                    LOCAL_WORLD_SIZE=str(nprocs),
                    AIOTIMER_RESTART_COUNT=str(result.attempts),
                    PYTHONUNBUFFERED="1",
                )
                worker = await server.spawn(
                    command[0],
                    *command[1:],
                    env=env,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
                printer.ranks[worker.pid] = rank
                result.attempts += 1
                prefix = f"[rank{rank}]: "
                await asyncio.gather(
                    printer.pump(worker.stdout, prefix), printer.pump(worker.stderr, prefix)
                )
                result.returncode = await worker.wait()
                if worker.killed_by_watchdog:
                    result.watchdog_kills.append(
                        f"attempt {result.attempts - 1} in {', '.join(worker.expired_scopes)}"
                    )
                    if result.attempts <= max_restarts:
                        printer.line(
                            f"aiotimer: restarting rank {rank} "
                            f"(restart {result.attempts} of {max_restarts})"
                        )
                        continue
                return

        await asyncio.gather(*(run_rank(r) for r in results))

    printer.line("aiotimer: summary")
    for result in results:
        printer.line("  " + result.describe())
    if any(r.returncode != 0 and r.watchdog_kills for r in results):
        return EXIT_WATCHDOG
    if any(r.returncode != 0 for r in results):
        return EXIT_WORKER_FAILED
    return 0


async def serve_command(
    command: Sequence[str],
    *,
    fifo: str,
    roots: Sequence[int] = (),
    reaper: SignalReaper | None = None,
) -> int:
    """Serve torch timer clients on ``fifo`` while ``command`` runs; return its exit status.

    ``command`` (torchrun, typically) gets ``TORCHELASTIC_TIMER_FILE=fifo``, which
    torchrun hands on to every worker, so workers that use torch's own
    ``FileTimerClient`` are served by aiotimer.  SIGINT and SIGTERM are passed
    on to the command.
    """
    from .transports.fifo import listen_fifo

    if not command:
        raise ValueError("`command` must name a program to run, got an empty command")
    async with TimerServer(reaper=reaper) as server:
        await listen_fifo(server, fifo, roots=roots)
        env = dict(os.environ)
        env["TORCHELASTIC_TIMER_FILE"] = fifo
        child = await server.spawn(command[0], *command[1:], env=env)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, child.send_signal, sig)
        try:
            returncode = await child.wait()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
    return returncode if returncode >= 0 else 128 - returncode
