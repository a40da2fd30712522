"""Isolation: a bystander's expiry is handled on time while a neighbour is hostile.

Three cases, each run on both loops, with the server at normal priority and
real-time (``TimerServer(realtime=True)``):

- ``stalled stdout``: a worker floods its stdout, relayed by the launcher's own
  pieces (``launcher.Output`` and ``launcher._Relay``) to a pipe nobody reads:
  a terminal that stopped reading (Ctrl-S, a stalled ``| tee``).
- ``hostile dump path``: hanging workers replace their stack-dump file with a
  FIFO, so capturing their stacks for their incidents (py-spy turned off: the
  client's faulthandler dump) meets a file that blocks whoever opens it
  carelessly.
- ``full disk``: the incident directory, the event log and the hostile workers'
  output logs (``--log-dir``'s ``FileSink``) are on a full 256 KiB tmpfs, and
  hanging workers' incidents cannot be written (mounting needs root; skipped
  otherwise).

Meanwhile bystanders (one process each, reaped by a plain ``SignalReaper()``)
hang one after another, their deadlines ``GAP`` apart; in the last two cases a
hostile worker's deadline falls 1-12 ms before every other bystander's.  Per
bystander: the decision (deadline -> the server handled its expiry,
``TimerExpired.lag``) and the signal (deadline -> SIGKILL sent,
``KillWorkerProcess.latency``).  Target: decision p99 <= 2 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from aiotimer import (
    Event,
    IncidentRecorded,
    JsonEventLog,
    KillWorkerProcess,
    SignalReaper,
    TimerExpired,
    TimerServer,
    Worker,
)
from aiotimer._ioplane import FileSink
from aiotimer._stacks import ENV_PY_SPY
from aiotimer.launcher import Output, _Relay

from ._procs import expect_line, python_worker_argv, worker_env

PIPE = asyncio.subprocess.PIPE
CASES = ("stalled stdout", "hostile dump path", "full disk")
#: The target: how late a bystander's expiry may be handled, at the 99th percentile.
TARGET_P99 = 0.002
#: From "arm now" to the first deadline.
LEAD = 0.4
#: Between two bystanders' deadlines.
GAP = 0.08
#: How far before a bystander's deadline a hostile worker's falls (cycled through).
BEFORE = (0.001, 0.003, 0.006, 0.012)
#: How long the flood runs before the first bystander arms (the pipe and the budget fill).
STALL = 0.2
#: How long after the last deadline a worker may take to be killed before it counts as missed.
WAIT = 30.0

# A worker that floods its stdout, flat out, until killed.
FLOOD = """
import os
block = (b"x" * 1023 + b"\\n") * 64
while True:
    os.write(1, block)
"""

# A worker that arms a timer (so its client opens its stack-dump file), then, as
# ``fifo``, puts a FIFO where that file was; it arms the deadline it is sent and
# hangs, silently (``fifo``) or printing a line every 5 ms (``noisy``).
HOSTILE = """
import os, sys, time, aiotimer
from aiotimer._protocol import dump_file_name
kind = sys.argv[1]
with aiotimer.expires(after=60, scope="warm-up"):
    pass
if kind == "fifo":
    path = os.path.join(os.environ["AIOTIMER_DUMP_DIR"], dump_file_name(os.getpid()))
    os.unlink(path)
    os.mkfifo(path)
print("ready", flush=True)
deadline = float(sys.stdin.readline())
aiotimer.get_client().acquire("hostile", deadline)
print("armed", flush=True)
line = b"y" * 1023 + b"\\n"
while True:
    if kind == "noisy":
        sys.stdout.buffer.write(line)
        sys.stdout.buffer.flush()
        time.sleep(0.005)
    else:
        time.sleep(3600)
"""


@dataclass
class Outcome:
    """What one run measured (seconds)."""

    case: str
    bystanders: int = 0
    hostile: int = 0
    decisions: list[float] = field(default_factory=list)  # TimerExpired.lag, per bystander
    signals: list[float] = field(default_factory=list)  # KillWorkerProcess.latency, per bystander
    missed: int = 0  # bystanders not killed by the watchdog
    others: int = 0  # kills of processes not meant to hang, and second kills
    hostile_killed: int = 0
    realtime: bool = False  # whether the server ran its boost
    #: what the hostility cost (bytes dropped, dumps refused, writes failed): it happened
    effect: dict[str, int] = field(default_factory=dict)
    skipped: str | None = None  # why the case could not run here

    def effect_text(self) -> str:
        """The hostility's cost, for the table."""
        e = self.effect
        if self.case == "stalled stdout":
            return f"{e.get('dropped_bytes', 0) / 1e6:.0f} MB of output dropped"
        if self.case == "hostile dump path":
            return f"{e.get('fifo_refused', 0)}/{self.hostile} FIFO dumps refused"
        return (
            f"{e.get('incidents_lost', 0)}/{self.hostile} incidents lost, "
            f"{e.get('log_write_errors', 0)} log writes failed"
        )


class _Seen:
    """A server's events that matter here."""

    def __init__(self) -> None:
        self.lags: dict[int, float] = {}
        self.kills: list[tuple[int, float]] = []
        self.incidents: list[IncidentRecorded] = []

    def __call__(self, event: Event) -> None:
        if isinstance(event, TimerExpired) and event.pid is not None:
            self.lags.setdefault(event.pid, event.lag)
        elif isinstance(event, KillWorkerProcess):
            self.kills.append((event.pid, event.latency))
        elif isinstance(event, IncidentRecorded):
            self.incidents.append(event)


@contextlib.contextmanager
def _no_py_spy() -> Iterator[None]:
    """Captures fall back to the client's faulthandler dump (and cost no py-spy runs)."""
    before = os.environ.get(ENV_PY_SPY)
    os.environ[ENV_PY_SPY] = ""
    try:
        yield
    finally:
        if before is None:
            del os.environ[ENV_PY_SPY]
        else:
            os.environ[ENV_PY_SPY] = before


async def _spawn(server: TimerServer, bystanders: int, kind: str, hostile: int) -> list[Worker]:
    """``bystanders`` bystanders, then ``hostile`` hostile workers of ``kind``; all ready."""

    async def one(argv: list[str], reaper: SignalReaper | None = None) -> Worker:
        worker = await server.spawn(*argv, stdin=PIPE, stdout=PIPE, env=worker_env(), reaper=reaper)
        await expect_line(worker.stdout, b"ready")
        return worker

    bystander = python_worker_argv("aiotimer")
    hostile_argv = [sys.executable, "-c", HOSTILE, kind]
    return list(
        await asyncio.gather(
            *(one(bystander, reaper=SignalReaper()) for _ in range(bystanders)),
            *(one(hostile_argv) for _ in range(hostile)),
        )
    )


async def _arm(bystanders: list[Worker], hostile: list[Worker]) -> float:
    """Send every worker its deadline and wait until all armed; the last deadline.

    Bystander ``j`` is due ``LEAD + j * GAP`` from now; hostile worker ``i`` a
    little (``BEFORE``) before bystander ``i * len(bystanders) // len(hostile)``.
    """
    start = time.monotonic()  # the workers' clock (uvloop's loop.time() is in whole ms)
    due = [start + LEAD + j * GAP for j in range(len(bystanders))]
    due += [
        due[i * len(bystanders) // len(hostile)] - BEFORE[i % len(BEFORE)]
        for i in range(len(hostile))
    ]
    workers = bystanders + hostile

    async def arm(worker: Worker, deadline: float) -> None:
        assert worker.stdin is not None
        worker.stdin.write(f"{deadline!r}\n".encode())
        await expect_line(worker.stdout, b"armed")

    await asyncio.gather(*(arm(w, d) for w, d in zip(workers, due, strict=True)))
    if time.monotonic() >= min(due):
        raise RuntimeError("isolation: workers armed after the first deadline; raise LEAD")
    return max(due)


async def _deaths(workers: list[Worker], last: float) -> None:
    """Wait until every worker has exited, or ``WAIT`` after ``last`` has passed."""

    async def death(worker: Worker) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(worker.wait(), max(0.0, last - time.monotonic()) + WAIT)

    await asyncio.gather(*(death(w) for w in workers))


def _tally(out: Outcome, seen: _Seen, bystanders: list[Worker], hostile: list[Worker]) -> None:
    """Decisions and signals of the bystanders; who was missed; what else was killed."""
    mine = {w.pid for w in bystanders}
    theirs = {w.pid for w in hostile}
    first: dict[int, float] = {}
    for pid, latency in seen.kills:
        if pid in first or pid not in mine | theirs:
            out.others += 1
        else:
            first[pid] = latency
    out.bystanders, out.hostile = len(bystanders), len(hostile)
    out.decisions = [seen.lags[w.pid] for w in bystanders if w.pid in seen.lags]
    out.signals = [first[w.pid] for w in bystanders if w.pid in first]
    out.missed = sum(1 for w in bystanders if w.pid not in first or w.returncode != -signal.SIGKILL)
    out.hostile_killed = sum(1 for w in hostile if w.pid in first)


async def _finish(tasks: list[asyncio.Task[None]]) -> None:
    """Let relays end (their workers are gone: end of file), cancelling what does not."""
    if not tasks:
        return
    _, late = await asyncio.wait(tasks, timeout=5.0)
    for task in late:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# -- the three cases --------------------------------------------------------------------


async def stalled_stdout(bystanders: int, realtime: bool) -> Outcome:
    """Bystanders hang while a worker's flood is relayed to a terminal that never reads."""
    out = Outcome("stalled stdout")
    unread, terminal_fd = os.pipe()  # the read end is kept open, and never read
    terminal = open(terminal_fd, "wb", buffering=0)  # noqa: SIM115 (closed below)
    devnull = open(os.devnull, "wb", buffering=0)  # noqa: SIM115
    output = Output(terminal, devnull)
    relays: list[asyncio.Task[None]] = []
    try:
        async with TimerServer(realtime=realtime) as server:
            out.realtime = server.realtime
            seen = _Seen()
            server.events.subscribe(seen)
            output.bind(asyncio.get_running_loop(), lambda: None)
            workers = await _spawn(server, bystanders, "", 0)
            flood = await server.spawn(sys.executable, "-c", FLOOD, stdout=PIPE, env=worker_env())
            relay = _Relay(output, b"[rank0]: ", False, None)
            relays.append(asyncio.create_task(relay.run(flood.stdout)))
            await asyncio.sleep(STALL)
            last = await _arm(workers, [])
            await _deaths(workers, last)
            out.effect["dropped_bytes"] = output.dropped
            out.effect["queued_bytes"] = output.out.queued
            flood.kill()
            await _finish(relays)
            _tally(out, seen, workers, [])
    finally:
        for task in relays:
            task.cancel()
        # The terminal goes away: the writer thread, blocked in write(), gets EPIPE and ends.
        os.close(unread)
        output.close(5.0)
        terminal.close()
        devnull.close()
    return out


def _incident_reasons(seen: _Seen) -> list[str]:
    """The capture's reason (why there are no stacks) in each incident written."""
    reasons = []
    for event in seen.incidents:
        if event.path is None:
            continue
        with contextlib.suppress(OSError, ValueError):
            stacks = json.loads(Path(event.path).read_text()).get("stacks") or {}
            reasons.append(str(stacks.get("reason")))
    return reasons


async def hostile_dump_path(bystanders: int, realtime: bool) -> Outcome:
    """Bystanders hang while hostile workers, with a FIFO for a dump file, hang and are captured."""
    out = Outcome("hostile dump path")
    hostile = max(1, bystanders // 2)
    with (
        tempfile.TemporaryDirectory(prefix="aiotimer-isolation-") as tmp,
        _no_py_spy(),
    ):
        async with TimerServer(incident_dir=Path(tmp) / "incidents", realtime=realtime) as server:
            out.realtime = server.realtime
            seen = _Seen()
            server.events.subscribe(seen)
            workers = await _spawn(server, bystanders, "fifo", hostile)
            mine, theirs = workers[:bystanders], workers[bystanders:]
            last = await _arm(mine, theirs)
            await _deaths(workers, last)
            _tally(out, seen, mine, theirs)
        # Closed: every incident was recorded first.
        out.effect["incidents"] = len(seen.incidents)
        out.effect["fifo_refused"] = sum(
            "not a regular file" in reason for reason in _incident_reasons(seen)
        )
    return out


@contextlib.contextmanager
def full_tmpfs(where: Path, dirs: tuple[str, ...]) -> Iterator[str | None]:
    """A 256 KiB tmpfs at ``where`` with ``dirs`` made in it, then filled up.

    Yields ``None``, or why it could not be mounted (it needs root).  Unmounted
    on the way out, whatever happened.
    """
    where.mkdir()
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(where)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        yield f"cannot mount a tmpfs: {exc}"
        return
    if mounted.returncode != 0:
        yield f"cannot mount a tmpfs: {mounted.stderr.strip() or mounted.returncode}"
        return
    try:
        for name in dirs:  # made before the filler takes the last block
            (where / name).mkdir()
        # Unbuffered: a buffered file would fail again when closed, with what it still holds.
        with contextlib.suppress(OSError), open(where / "filler", "wb", buffering=0) as f:
            while True:
                f.write(b"\0" * 4096)
        yield None
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True, timeout=30)


async def full_disk(bystanders: int, realtime: bool) -> Outcome:
    """Bystanders hang while hostile workers hang and write output, all of it to a full disk."""
    out = Outcome("full disk")
    hostile = max(1, bystanders // 2)
    with tempfile.TemporaryDirectory(prefix="aiotimer-isolation-") as tmp:
        disk = Path(tmp) / "full"
        with full_tmpfs(disk, ("incidents", "logs")) as refused:
            if refused is not None:
                out.skipped = refused
                return out
            await _full_disk(out, disk, bystanders, hostile, realtime)
    return out


async def _full_disk(
    out: Outcome, disk: Path, bystanders: int, hostile: int, realtime: bool
) -> None:
    logs = FileSink("--log-dir")
    event_log = JsonEventLog(disk / "events.jsonl")
    devnull = open(os.devnull, "wb", buffering=0)  # noqa: SIM115 (closed below)
    output = Output(devnull, devnull)
    relays: list[asyncio.Task[None]] = []
    try:
        with _no_py_spy():
            async with TimerServer(
                incident_dir=disk / "incidents", log_event=event_log, realtime=realtime
            ) as server:
                out.realtime = server.realtime
                seen = _Seen()
                server.events.subscribe(seen)
                workers = await _spawn(server, bystanders, "noisy", hostile)
                mine, theirs = workers[:bystanders], workers[bystanders:]
                last = await _arm(mine, theirs)
                for i, worker in enumerate(theirs):  # their output, as --log-dir keeps it
                    log = disk / "logs" / str(i) / "stdout.log"
                    relay = _Relay(output, f"[rank{i}]: ".encode(), False, log, logs)
                    relays.append(asyncio.create_task(relay.run(worker.stdout)))
                await _deaths(workers, last)
                await _finish(relays)
                _tally(out, seen, mine, theirs)
        hostile_pids = {w.pid for w in theirs}
        out.effect["incidents_lost"] = sum(
            1 for e in seen.incidents if e.pid in hostile_pids and e.path is None
        )
        out.effect["log_write_errors"] = logs.errors
    finally:
        for task in relays:
            task.cancel()
        logs.close(5.0)
        event_log.close(5.0)
        output.close(5.0)
        devnull.close()


MEASURES = {
    "stalled stdout": stalled_stdout,
    "hostile dump path": hostile_dump_path,
    "full disk": full_disk,
}
