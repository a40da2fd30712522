"""Hardening scenarios: kills under load, under garbage, and in huge bursts.

- ``load``: W workers flood the server with legitimate acquire+release pairs
  while bystanders hang one after another: how late is each bystander's kill
  (deadline -> signal), and how many pairs/s do the flooders still get through?
  Over pipes (aiotimer's clients) and over the FIFO (torch's own clients).
- ``garbage``: one worker writes megabytes of random bytes on its pipe (or junk
  lines on the FIFO) across a bystander's deadline: how late is the kill, how
  many log records did the garbage cost, and how much server CPU?
  On the socket: thousands of connections, some sending junk, some never
  reading, across a pipe bystander's deadline.
- ``burst``: K timers in W workers all due at one instant: how late is the
  first signal, and how long is the loop blocked?
- ``capture``: N hung workers, with and without incident capture (py-spy
  stacks of the hung process and of its job, before the kill): how much later
  does the signal go out?
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from aiotimer import Event, KillWorkerProcess, TimerServer, Worker
from aiotimer.transports import listen_fifo, listen_socket

from . import kill
from ._procs import Sleeper, expect_line, python_worker_argv, start_torch_host, worker_env

PIPE = asyncio.subprocess.PIPE
#: How far ahead of "armed" a bystander's deadline lies.
LEAD = 0.3


@dataclass
class Outcome:
    """What one scenario measured."""

    decisions: list[float] = field(default_factory=list)  # seconds, deadline -> signal
    pairs_per_s: float = float("nan")
    log_records: int = 0
    server_cpu_s: float = float("nan")
    loop_blocked: float = float("nan")  # deadline -> the loop answers a knock made at +5 ms
    missed: int = 0
    others: int = 0  # kills of processes that were not meant to hang (or a second kill)
    kills: list[tuple[int, float]] = field(default_factory=list)  # (pid, decision seconds)
    realtime: bool = False  # whether the server's thread ran real-time
    # How late a separate normal-priority process woke from 1 ms sleeps meanwhile
    # (p50, p99, max ms): the floor for any process at normal priority.
    sleeper_ms: tuple[float, float, float] = (float("nan"),) * 3

    def tally(self, hung: list[int]) -> None:
        """Split ``kills`` into the hung processes' decisions, the missed and the others."""
        first: dict[int, float] = {}
        for pid, latency in self.kills:
            if pid in first or pid not in hung:
                self.others += 1
            else:
                first[pid] = latency
        self.decisions = list(first.values())
        self.missed = len(set(hung) - first.keys())


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@contextlib.contextmanager
def _log_records(out: Outcome, reps: int) -> Iterator[None]:
    """Count into ``out`` the aiotimer log records the block costs, per repetition."""
    counting = _Counting()
    log = logging.getLogger("aiotimer")
    log.addHandler(counting)
    try:
        yield
    finally:
        log.removeHandler(counting)
        out.log_records = counting.records // max(1, reps)


class _Counting(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.records += 1


def _decisions(server: TimerServer, into: list[float], kills: list[tuple[int, float]]) -> None:
    def on_event(event: Event) -> None:
        if isinstance(event, KillWorkerProcess):
            into.append(event.latency)
            kills.append((event.pid, event.latency))

    server.events.subscribe(on_event)


async def _spawn(server: TimerServer, *mode: str) -> Worker:
    worker = await server.spawn(
        *python_worker_argv(*mode), stdin=PIPE, stdout=PIPE, env=worker_env()
    )
    await expect_line(worker.stdout, b"ready")
    return worker


async def _pipe_bystander(server: TimerServer) -> int:
    """One worker arms a deadline ``LEAD`` ahead and hangs; its pid (once it is gone)."""
    worker = await _spawn(server, "aiotimer")
    assert worker.stdin is not None
    worker.stdin.write(f"{time.monotonic() + LEAD!r}\n".encode())
    await expect_line(worker.stdout, b"armed")
    try:
        await asyncio.wait_for(worker.wait(), LEAD + 10)
    except TimeoutError:
        worker.kill()
        await worker.wait()
    return worker.pid


async def _torch_bystander(host: asyncio.subprocess.Process) -> int:
    """A torch-client worker of ``host`` arms a deadline ``LEAD`` ahead and hangs; its pid."""
    assert host.stdin is not None and host.stdout is not None
    host.stdin.write(b"kill 1\n")
    pid = int(await host.stdout.readline())
    host.stdin.write(f"{time.monotonic() + LEAD!r}\n".encode())
    await expect_line(host.stdout, b"armed")
    await asyncio.sleep(LEAD + 0.2)
    return pid


async def _quit(host: asyncio.subprocess.Process) -> None:
    assert host.stdin is not None
    host.stdin.write(b"quit\n")
    host.stdin.close()
    await host.wait()


# -- kill under load -----------------------------------------------------------------


async def load_pipe(flooders: int, bystanders: int, realtime: bool = False) -> Outcome:
    """Bystanders hang one after another while ``flooders`` pipe workers flood the server.

    ``realtime``: the server's thread runs SCHED_RR (``TimerServer(realtime=True)``).
    """
    out = Outcome()
    seconds = 2.0 + bystanders * (LEAD + 0.6)
    sleeper = Sleeper()
    async with TimerServer(realtime=realtime) as server:
        out.realtime = server.realtime
        _decisions(server, out.decisions, out.kills)
        floods = [
            await server.spawn(
                *python_worker_argv("pump", repr(seconds)),
                stdin=PIPE,
                stdout=PIPE,
                env=worker_env(),
            )
            for _ in range(flooders)
        ]
        for f in floods:
            await expect_line(f.stdout, b"ready")
        for f in floods:
            assert f.stdin is not None
            f.stdin.write(b"go\n")
        t0, base = time.monotonic(), server.statistics().requests
        await asyncio.sleep(1.0)
        await sleeper.start()
        hung = [await _pipe_bystander(server) for _ in range(bystanders)]
        elapsed = time.monotonic() - t0
        done = server.statistics().requests - base
        out.sleeper_ms = await sleeper.stop()
        for f in floods:
            assert f.stdout is not None
            await asyncio.wait_for(f.stdout.readline(), seconds + 60)
            await f.wait()
    out.pairs_per_s = done / 2 / elapsed
    out.tally(hung)
    return out


async def load_fifo(flooders: int, bystanders: int, realtime: bool = False) -> Outcome:
    """The same with torch's own ``FileTimerClient`` on a FIFO, flooders and bystanders alike.

    torch's clients never block: a full FIFO makes them raise, and these retry
    at once, so all ``flooders`` stay runnable and share the cores with the server.
    """
    out = Outcome()
    seconds = 2.0 + bystanders * (LEAD + 0.6)
    sleeper = Sleeper()
    with tempfile.TemporaryDirectory() as tmp:
        fifo = os.path.join(tmp, "timer.fifo")
        async with TimerServer(realtime=realtime) as server:
            out.realtime = server.realtime
            _decisions(server, out.decisions, out.kills)
            await listen_fifo(server, fifo)
            flood = await start_torch_host("client-file", fifo)
            hung = await start_torch_host("client-file", fifo)
            assert flood.stdin is not None and flood.stdout is not None
            flood.stdin.write(f"pump {flooders} {seconds!r}\n".encode())
            t0, base = time.monotonic(), server.statistics().requests
            await asyncio.sleep(1.0)
            await sleeper.start()
            hung_pids = [await _torch_bystander(hung) for _ in range(bystanders)]
            elapsed = time.monotonic() - t0
            done = server.statistics().requests - base
            out.sleeper_ms = await sleeper.stop()
            await asyncio.wait_for(flood.stdout.readline(), seconds + 60)
            await _quit(flood)
            await _quit(hung)
    out.pairs_per_s = done / 2 / elapsed
    out.tally(hung_pids)
    return out


# -- garbage ---------------------------------------------------------------------------


async def garbage_pipe(size: int, reps: int) -> Outcome:
    """A worker writes ``size`` random bytes on its pipe across a bystander's deadline."""
    out = Outcome()
    with _log_records(out, reps):
        async with TimerServer() as server:
            _decisions(server, out.decisions, out.kills)
            cpu0 = _cpu()
            for _ in range(reps):
                polluter = await _spawn(server, "garbage", str(size))
                bystander = await _spawn(server, "aiotimer")
                assert polluter.stdin is not None and bystander.stdin is not None
                deadline = time.monotonic() + LEAD
                bystander.stdin.write(f"{deadline!r}\n".encode())
                await expect_line(bystander.stdout, b"armed")
                await asyncio.sleep(max(0.0, deadline - 0.1 - time.monotonic()))
                polluter.stdin.write(b"go\n")  # the garbage flows across the deadline
                await expect_line(polluter.stdout, b"done")
                if await asyncio.wait_for(bystander.wait(), 30) != -signal.SIGKILL:
                    out.missed += 1
                polluter.stdin.close()
                await polluter.wait()
            out.server_cpu_s = (_cpu() - cpu0) / reps
    return out


async def garbage_fifo(size: int, reps: int) -> Outcome:
    """``size`` bytes of junk lines on the FIFO across a torch bystander's deadline."""
    out = Outcome()
    junk_writer = (
        "import os, sys\n"
        "fd = os.open(sys.argv[1], os.O_WRONLY)\n"
        'junk = (b\'{"not": "a request"}\\n\' * (int(sys.argv[2]) // 20 + 1))[: int(sys.argv[2])]\n'
        "for i in range(0, len(junk), 4096):\n"
        "    os.write(fd, junk[i:i + 4096])\n"
    )
    with _log_records(out, reps), tempfile.TemporaryDirectory() as tmp:
        fifo = os.path.join(tmp, "timer.fifo")
        async with TimerServer() as server:
            _decisions(server, out.decisions, out.kills)
            await listen_fifo(server, fifo)
            hung = await start_torch_host("client-file", fifo)
            assert hung.stdin is not None and hung.stdout is not None
            cpu0 = _cpu()
            for _ in range(reps):
                hung.stdin.write(b"kill 1\n")
                await hung.stdout.readline()
                deadline = time.monotonic() + LEAD
                hung.stdin.write(f"{deadline!r}\n".encode())
                await expect_line(hung.stdout, b"armed")
                await asyncio.sleep(max(0.0, deadline - 0.1 - time.monotonic()))
                writer = await asyncio.create_subprocess_exec(
                    sys.executable, "-c", junk_writer, fifo, str(size)
                )
                await writer.wait()
                await asyncio.sleep(0.3)
            out.server_cpu_s = (_cpu() - cpu0) / reps
            await _quit(hung)
    out.missed = reps - len(out.decisions)
    return out


#: A hostile peer of the socket: ``connects`` connections, as fast as it can; one in
#: ten sends junk, one in a thousand stays open and never reads its greeting.
_SOCKET_FLOOD = """
import random, socket, sys
path, connects = sys.argv[1], int(sys.argv[2])
junk = random.Random(5).randbytes(1 << 16)
print("ready", flush=True)
sys.stdin.readline()
kept = []
for i in range(connects):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        if i % 10 == 0:
            s.sendall(junk[i % 60000 :][:512], socket.MSG_NOSIGNAL)
    except OSError:
        pass
    if i % 1000 == 0:
        kept.append(s)
    else:
        s.close()
print("done", flush=True)
sys.stdin.readline()
"""


async def garbage_socket(connects: int, reps: int) -> Outcome:
    """``connects`` hostile connections to the socket across a pipe bystander's deadline."""
    out = Outcome()
    with _log_records(out, reps), tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "sock", "timer.sock")
        async with TimerServer() as server:
            _decisions(server, out.decisions, out.kills)
            await listen_socket(server, path)
            cpu0 = _cpu()
            for _ in range(reps):
                flooder = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-c",
                    _SOCKET_FLOOD,
                    path,
                    str(connects),
                    stdin=PIPE,
                    stdout=PIPE,
                )
                await expect_line(flooder.stdout, b"ready")
                bystander = await _spawn(server, "aiotimer")
                assert flooder.stdin is not None and bystander.stdin is not None
                deadline = time.monotonic() + LEAD
                bystander.stdin.write(f"{deadline!r}\n".encode())
                await expect_line(bystander.stdout, b"armed")
                await asyncio.sleep(max(0.0, deadline - 0.1 - time.monotonic()))
                flooder.stdin.write(b"go\n")  # the flood runs across the deadline
                if await asyncio.wait_for(bystander.wait(), 60) != -signal.SIGKILL:
                    out.missed += 1
                await asyncio.wait_for(expect_line(flooder.stdout, b"done"), 600)
                flooder.stdin.close()
                await flooder.wait()
            out.server_cpu_s = (_cpu() - cpu0) / reps
    return out


# -- bursts ----------------------------------------------------------------------------


async def burst(workers: int, timers_each: int) -> Outcome:
    """``workers`` workers arm ``timers_each`` timers each, all due at one instant."""
    out = Outcome()
    lead = 2.0 + workers * timers_each / 100_000
    async with TimerServer(max_timers_per_process=None, max_scope_chars_per_process=None) as server:
        _decisions(server, out.decisions, out.kills)
        procs = [await _spawn(server, "burst", str(timers_each)) for _ in range(workers)]
        deadline = time.monotonic() + lead
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(f"{deadline!r}\n".encode())
        for p in procs:
            await asyncio.wait_for(expect_line(p.stdout, b"armed"), lead + 60)
        total = workers * timers_each
        while server.statistics().active_timers < total and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert server.statistics().active_timers == total, "armed after the deadline: raise lead"
        # A probe knocks on the loop from another thread 5 ms after the deadline:
        # when the loop answers (counted from the deadline) says how long the
        # burst kept it busy.
        loop = asyncio.get_running_loop()
        answered: asyncio.Future[float] = loop.create_future()
        probe = deadline + 0.005

        def knock() -> None:
            time.sleep(max(0.0, probe - time.monotonic()))
            loop.call_soon_threadsafe(lambda: answered.set_result(time.monotonic()))

        threading.Thread(target=knock, daemon=True).start()
        out.loop_blocked = await answered - deadline
        for p in procs:
            await asyncio.wait_for(p.wait(), 60)
        out.missed = workers - len(out.decisions)
    return out


# -- incident capture --------------------------------------------------------------------


async def capture(workers: int, with_capture: bool, reps: int) -> Outcome:
    """``workers`` hung workers killed, their stacks captured first or not: decision latencies."""
    out = Outcome()
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(reps):
            server = TimerServer(incident_dir=tmp, dump_timeout=1.0) if with_capture else None
            run = await kill.aiotimer_pipe(workers, server)
            out.decisions += run.decision
            out.missed += run.missed
    return out
