"""``aiotimer run``: N watched copies of a command, run as torchrun runs them; ``aiotimer serve``.

The launcher is what a scheduler (systemd, Slurm, Kubernetes) and a shell talk
to, so it keeps their conventions:

- SIGTERM, SIGINT, SIGHUP and SIGQUIT (torchrun's set) are forwarded to every
  worker as SIGTERM; after ``stop_grace`` seconds the rest get SIGKILL; the
  launcher exits 128 + the signal's number.  If the launcher itself is
  SIGKILLed, the kernel kills every worker (``PR_SET_PDEATHSIG``).
- It is a child subreaper: a worker's daemonised or double-forked descendants
  are re-parented to it, stay watched, and are killed when their attempt ends.
- Restarts follow torchrun: when a rank fails or its watchdog fires, the whole
  group is stopped and started again (``restart_policy="group"``), up to
  ``max_restarts`` times; ``"rank"`` restarts only a rank the watchdog killed.
- Worker output is relayed in chunks, whatever the line length (``\\r`` progress
  bars included): stdout to stdout, stderr to stderr, a ``[rankK]: `` prefix at
  the start of each line.  The launcher's own lines go to stderr, once each.
- torchrun's environment: ``TORCHELASTIC_RUN_ID`` (``run_id``, a new uuid by
  default), ``TORCHELASTIC_ERROR_FILE`` per rank and attempt (in ``log_dir``, or
  in a private directory), where torch's ``@record`` leaves a failed rank's
  error; ``OMP_NUM_THREADS=1`` when unset and more than one rank.
- The summary says how each rank ended (a rank stopped only because the group
  restarted or stopped is "stopped", not FAILED), then the root cause: the
  first failure, with its error file's message or its incident's hung frame.
- Exit status: 0 every rank succeeded; 124 the last attempt ended with a
  watchdog expiry; 1 a rank failed on its own; 2 a usage error; 128+n stopped
  by signal n; 141 (SIGPIPE's) when its stdout was closed (``| head``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

from ._cgroup import JobCgroup, kill_cgroup
from ._eventlog import JsonEventLog
from ._events import (
    Event,
    IncidentRecorded,
    KillWorkerProcess,
    RequestRejected,
    SignalSent,
    TimerExpired,
    logger,
)
from ._expiry import Reaper
from ._ioplane import FileSink, StreamSink, run_blocking
from ._linux import (
    become_subreaper,
    descendants,
    environ_of,
    live_processes,
    signal_name,
)
from ._metrics import MetricsServer
from ._protocol import ENV_SOCKET
from ._server import TimerServer
from ._workers import Worker

__all__ = [
    "EXIT_SIGPIPE",
    "EXIT_USAGE",
    "EXIT_WATCHDOG",
    "EXIT_WORKER_FAILED",
    "STOP_SIGNALS",
    "Job",
    "RankResult",
    "TorchError",
    "UsageError",
    "read_error_file",
    "resolve_program",
    "serve_command",
]

#: A rank failed on its own.
EXIT_WORKER_FAILED = 1
#: A usage error (a missing or non-executable program included).
EXIT_USAGE = 2
#: The last attempt ended with a watchdog expiry (``timeout(1)``'s status).
EXIT_WATCHDOG = 124
#: The launcher's stdout was closed (128 + SIGPIPE, as a shell reports it).
EXIT_SIGPIPE = 128 + signal.SIGPIPE
#: Signals the launcher stops on, as torchrun does.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
#: The environment variable that marks every process of one attempt of a rank.
ENV_TOKEN = "AIOTIMER_JOB_TOKEN"
#: Most bytes of a torch error file read (``read_error_file``).
ERROR_FILE_LIMIT = 256 * 1024
_CHUNK = 64 * 1024
# The root cause shows at most this many lines of an error's message, each cut this wide.
_ROOT_CAUSE_LINES = 8
_ROOT_CAUSE_WIDTH = 240
_LINE_BREAK = re.compile(rb"(\n|\r)")


class UsageError(Exception):
    """A mistake in how the launcher was called; the CLI prints it on one line and exits 2."""


def resolve_program(name: str) -> str:
    """The path ``name`` runs as, or ``UsageError`` naming it (missing, or not executable)."""
    if os.sep in name:
        if not os.path.exists(name):
            raise UsageError(f"{name}: no such file")
        if os.path.isdir(name) or not os.access(name, os.X_OK):
            raise UsageError(f"{name}: not an executable program")
        return name
    found = shutil.which(name)
    if found is None:
        raise UsageError(f"{name}: command not found")
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def serve_metrics(
    server: TimerServer,
    host: str,
    port: int,
    *,
    workers: Callable[[], Mapping[str, int]] | None = None,
    restarts: Callable[[], int] | None = None,
) -> MetricsServer:
    """``server.serve_metrics(...)``, with a failure to serve as a ``UsageError`` (one line).

    A port already in use (two jobs on one node), an address that is not this
    host's, a host name that does not resolve, prometheus_client missing: the
    job has not started yet, and the flag is named.
    """
    try:
        return server.serve_metrics(host=host, port=port, workers=workers, restarts=restarts)
    except OSError as exc:
        why = exc.strerror or str(exc)
        raise UsageError(
            f"--metrics-host {host} --metrics-port {port}: cannot serve metrics there ({why})"
        ) from None
    except (ValueError, RuntimeError) as exc:
        raise UsageError(f"--metrics-port {port}: {exc}") from None


@dataclass(frozen=True)
class TorchError:
    """What a torch error file (``TORCHELASTIC_ERROR_FILE``) says: torch's ``@record``'s format.

    ``message`` is ``"<Type>: <text>"``; ``where`` the innermost frame of its
    traceback (``file:line in function``), if it has one; ``path`` the file.
    """

    message: str
    where: str | None
    path: str


_FRAME = re.compile(r'^\s*File "(?P<file>.+)", line (?P<line>\d+), in (?P<function>.+)$', re.M)


def read_error_file(
    path: str | os.PathLike[str], limit: int = ERROR_FILE_LIMIT
) -> TorchError | None:
    """Read the torch error file at ``path``; ``None`` if there is none (or it is empty).

    At most ``limit`` bytes are read, never through a symlink, and only from a
    regular file; a file that is too large or not torch's format is said so in
    ``message``.  Blocks: the I/O plane's (``run_blocking``), never the loop's.
    """
    if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
        raise ValueError(f"`limit` must be a positive number of bytes, got {limit!r}")
    where = os.fspath(path)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(where, flags)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return TorchError(f"(cannot read it: {exc.strerror or exc})", None, where)
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            return TorchError("(not a regular file)", None, where)
        raw = f.read(limit + 1)
    if not raw.strip():
        return None
    if len(raw) > limit:
        return TorchError(f"(larger than {limit} bytes: not read)", None, where)
    try:
        data = json.loads(raw)
    except ValueError as exc:
        return TorchError(f"(not torch's error file format: {exc})", None, where)
    outer = data.get("message") if isinstance(data, dict) else None
    inner = outer if isinstance(outer, dict) else {}
    text = outer if isinstance(outer, str) else inner.get("message")
    if not isinstance(text, str):
        return TorchError("(not torch's error file format: no message)", None, where)
    extra = inner.get("extraInfo")
    stack = extra.get("py_callstack") if isinstance(extra, dict) else None
    frames = list(_FRAME.finditer(stack)) if isinstance(stack, str) else []
    top = frames[-1] if frames else None
    at = None if top is None else f"{top['file']}:{top['line']} in {top['function']}"
    return TorchError(text, at, where)


@dataclass
class RankResult:
    """How one rank of a job ended (its last attempt)."""

    rank: int
    returncode: int | None = None
    attempts: int = 0
    #: the scopes the watchdog fired on, per attempt
    watchdog_kills: list[str] = field(default_factory=list)
    #: whether the rank's last attempt ended with a watchdog expiry
    expired: bool = False
    #: expiries recorded in observe mode (nothing was signalled)
    observed: list[str] = field(default_factory=list)
    #: why the launcher stopped the rank while it still ran ("group stop after rank 1
    #: failed", "the launcher got SIGTERM"); ``None``: it ended on its own
    stopped: str | None = None
    #: the pid of the last attempt's worker
    pid: int | None = None
    #: what the last attempt's error file said (torch's ``@record``, or the watchdog's)
    error: TorchError | None = None
    #: the last attempt's incident: its one-line summary (who hung in which scope, where)
    incident: str | None = None
    #: ... and its file (``.txt``)
    incident_path: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the last attempt ended well: exit status 0, no watchdog expiry."""
        return self.returncode == 0 and not self.expired and self.stopped is None

    def status(self) -> str:
        """How the last attempt's worker ended: ``exit status 1``, ``killed by SIGKILL``."""
        if self.returncode is None:
            status = "did not start"
        elif self.returncode < 0:
            status = f"killed by {signal_name(-self.returncode)}"
        else:
            status = f"exit status {self.returncode}"
        return f"its watchdog fired, then {status}" if self.expired else status

    def describe(self) -> str:
        """One line for the summary."""
        restarts = self.attempts - 1
        tail = f" after {restarts} restart{'s' if restarts != 1 else ''}" if restarts > 0 else ""
        kills = f"; watchdog kills: {'; '.join(self.watchdog_kills)}" if self.watchdog_kills else ""
        if self.observed:
            kills += f"; expiries observed: {'; '.join(self.observed)}"
        if self.ok:
            return f"rank {self.rank}: ok{tail}{kills}"
        if self.stopped is not None:
            return f"rank {self.rank}: stopped ({self.stopped}), {self.status()}{tail}{kills}"
        return f"rank {self.rank}: FAILED, {self.status()}{tail}{kills}"


class Output:
    """Where the launcher writes: worker stdout to ``out``; worker stderr, its own lines to ``err``.

    Each stream is written by a writer thread of its own (``_ioplane.StreamSink``):
    a terminal that stops reading (Ctrl-S, a slow ``| tee``, a blocking log
    driver) holds back output, never the watchdog.  What does not fit in a
    stream's budget is dropped, counted and warned about (``--log-dir`` keeps
    every byte).  ``on_closed`` (given to ``bind``) is called once, on the
    loop, if ``out`` is closed under it (``| head``).
    """

    def __init__(self, out: BinaryIO, err: BinaryIO) -> None:
        self._on_closed: Callable[[], None] = lambda: None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.out = StreamSink("stdout", out, on_broken=self._broken)
        self.err = StreamSink("stderr", err)

    @property
    def closed(self) -> bool:
        """Whether ``out``'s reader has gone."""
        return self.out.broken

    @property
    def dropped(self) -> int:
        """Bytes dropped because a stream did not keep up."""
        return self.out.dropped_bytes + self.err.dropped_bytes

    def bind(self, loop: asyncio.AbstractEventLoop, on_closed: Callable[[], None]) -> None:
        """Report a closed ``out`` on ``loop``, by calling ``on_closed``."""
        self._loop = loop
        self._on_closed = on_closed
        if self.out.broken:
            loop.call_soon(self._on_closed)

    def _broken(self) -> None:  # in the writer thread
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody to tell
                loop.call_soon_threadsafe(self._on_closed)

    def write(self, to_err: bool, data: bytes) -> None:
        """Queue worker output; never blocks."""
        (self.err if to_err else self.out).write(data)

    def say(self, text: str) -> None:
        """One line of the launcher's own."""
        self.err.write(f"aiotimer: {text}\n".encode())

    def close(self, timeout: float = 60.0) -> None:
        """Write what is queued, for up to ``timeout`` seconds in all.  Blocks."""
        end = time.monotonic() + timeout
        self.out.close(timeout)
        self.err.close(max(0.0, end - time.monotonic()))


class _Relay:
    """Copies one worker stream to the output in chunks, a rank prefix at each line start.

    A chunk's unfinished last line (no ``\\n`` or ``\\r`` yet) is held back until
    the next chunk or a short quiet spell, so one rank's line is seldom split by
    another's; a line longer than a chunk passes through in pieces.  With a
    log file, every chunk is also appended to it (by ``logs``, a writer thread).
    """

    #: How long an unfinished line waits for its end before it is written as it is.
    HOLD = 0.02

    def __init__(
        self,
        output: Output,
        prefix: bytes,
        to_err: bool,
        log: Path | None,
        logs: FileSink | None = None,
    ) -> None:
        self._output = output
        self._prefix = prefix
        self._to_err = to_err
        self._log = log if logs is not None else None
        self._logs = logs
        self._at_line_start = True
        self._held = b""

    def _emit(self, data: bytes) -> None:
        if not data:
            return
        # A line starts after "\\n", and after "\\r" too (a progress bar redraws its line).
        pieces = _LINE_BREAK.split(data)
        for i in range(0, len(pieces), 2):
            if pieces[i] and (i > 0 or self._at_line_start):
                pieces[i] = self._prefix + pieces[i]
        self._at_line_start = data.endswith((b"\n", b"\r"))
        self._output.write(self._to_err, b"".join(pieces))

    async def run(self, stream: asyncio.StreamReader | None) -> None:
        """Relay ``stream`` until its end of file (the worker's writes never wait for ours)."""
        if stream is None:
            return
        if self._logs is not None and self._log is not None:
            self._logs.open_file(self._log)
        try:
            while True:
                try:
                    timeout = self.HOLD if self._held else None
                    chunk = await asyncio.wait_for(stream.read(_CHUNK), timeout)
                except TimeoutError:
                    self._emit(self._held)  # a quiet spell: write the line as it stands
                    self._held = b""
                    continue
                if not chunk:
                    break
                if self._logs is not None and self._log is not None:
                    self._logs.append(self._log, chunk)
                data = self._held + chunk
                end = max(data.rfind(b"\n") + 1, data.rfind(b"\r"))
                if len(data) - end > _CHUNK:
                    end = len(data)  # a very long line: pass it through in pieces
                self._held = data[end:]
                self._emit(data[:end])
            self._emit(self._held)
        finally:
            if self._logs is not None and self._log is not None:
                self._logs.close_file(self._log)


#: The events the launcher prints a line for (``describe``).
PRINTED_EVENTS = (TimerExpired, KillWorkerProcess, SignalSent, RequestRejected, IncidentRecorded)
#: Names a process in the launcher's lines: ``who(pid, worker_pid)``.
Who = Callable[[int | None, int | None], str]


def rank_namer(rank_of: Callable[[int], str | None]) -> Who:
    """``aiotimer run``'s names: ``rank 1 (pid 42)``, ``rank 1's descendant pid 43``.

    ``rank_of(worker_pid)`` names the rank a spawned worker runs.
    """

    def who(pid: int | None, worker_pid: int | None) -> str:
        rank = rank_of(worker_pid) if worker_pid is not None else None
        if rank is None:
            return f"pid {pid}"
        if pid == worker_pid:
            return f"rank {rank} (pid {pid})"
        return f"rank {rank}'s descendant pid {pid}"

    return who


def describe(event: Event, who: Who) -> str | None:
    """The line the launcher prints for ``event`` (``None``: not one it prints).

    ``who(pid, worker_pid)`` names a process (see ``rank_namer``).
    """
    if isinstance(event, TimerExpired):
        return (
            f"{who(event.pid, event.worker_pid)}: timer {event.scope!r} expired "
            f"({event.lag * 1e3:.2f} ms after its deadline)"
        )
    if isinstance(event, KillWorkerProcess):
        return (
            f"sent {signal_name(event.signal)} to {who(event.pid, event.worker_pid)} "
            f"({event.latency * 1e3:.2f} ms after the deadline)"
        )
    if isinstance(event, SignalSent):  # an escalation: SIGTERM, the grace, then this
        return (
            f"{who(event.pid, event.worker_pid)} still running {event.latency:.2f}s after the "
            f"deadline: sent {signal_name(event.signal)}"
        )
    if isinstance(event, RequestRejected):
        return f"rejected a request on {event.channel}: {event.reason}"
    if isinstance(event, IncidentRecorded):
        where = f"; incident: {Path(event.path).with_suffix('.txt')}" if event.path else ""
        return f"{event.summary}{where}"
    return None


class ServeLines:
    """``aiotimer serve``'s lines for watchdog events: each once, naming the rank.

    Its processes are torchrun's workers, not ours: a rank is the ``RANK`` in the
    process's environment, read (a ``/proc`` read can block) in the writer
    thread of ``err``, once per process.  The first event of an expiry comes
    while the process still lives (stacks are captured before the kill), so
    the later lines of a killed rank name it too; with ``--dump-timeout 0``
    the kill comes first, and a rank already gone is named by its pid only.
    """

    #: Most processes whose rank is remembered.
    REMEMBERED = 4096

    def __init__(self, err: StreamSink) -> None:
        self._err = err
        self._ranks: dict[int, str | None] = {}  # the writer thread's alone

    def __call__(self, event: Event) -> None:
        """Print ``event``'s line, if it has one; never blocks."""
        if isinstance(event, PRINTED_EVENTS):
            self._err.submit(lambda: self._write(event), 256)

    def _write(self, event: Event) -> None:  # in the writer thread
        line = describe(event, self._who)
        if line:
            self._err.write(f"aiotimer: {line}\n".encode())

    def _who(self, pid: int | None, worker_pid: int | None) -> str:
        if pid is None:
            return "an exited process"
        if pid not in self._ranks:
            if len(self._ranks) >= self.REMEMBERED:
                del self._ranks[next(iter(self._ranks))]
            self._ranks[pid] = environ_of(pid).get("RANK")
        rank = self._ranks[pid]
        return f"pid {pid}" if rank is None else f"rank {rank} (pid {pid})"


@dataclass
class _Rank:
    """One rank in one attempt."""

    result: RankResult
    worker: Worker
    token: str
    relays: list[asyncio.Task[None]]
    #: its worker's exit (its status), awaited by the restart policies
    exit: asyncio.Task[int]
    attempt: int
    #: its TORCHELASTIC_ERROR_FILE (``None``: none could be made)
    error_file: str | None
    #: why the launcher is stopping it, once it is (its exit is then no failure)
    stopping: str | None = None
    #: when it failed (``time.monotonic()``): its timer expired, or it exited != 0
    failed_at: float | None = None
    error: TorchError | None = None
    #: its incident's summary line and ``.txt`` file
    incident: tuple[str, str | None] | None = None
    #: the cgroup it runs in (``None``: cgroups cannot be used here)
    cgroup: Path | None = None

    @property
    def expired_scopes(self) -> list[str]:
        """Its worker's expired scopes: the watchdog's own record, not rebuilt from events."""
        return self.worker.expired_scopes


class Job:
    """``aiotimer run``: ``nprocs`` watched copies of ``command``, restarted as torchrun would.

    ``realtime``: as ``TimerServer``'s (``"auto"``: the boost where permitted).
    ``run_id``: every rank's ``TORCHELASTIC_RUN_ID`` (default: a new uuid, as
    ``torchrun --standalone`` makes).  Each rank and attempt gets a
    ``TORCHELASTIC_ERROR_FILE``: ``log_dir/attempt_K/RANK/error.json``, or the
    same in a private directory (``mkdtemp``) that is removed at the end unless
    an error file was written in it.  ``cgroup``: each rank's attempt runs in a
    cgroup v2 of its own, ended with ``cgroup.kill`` (where permitted; see
    ``_cgroup``), so nothing it started outlives it, whatever it did to leave
    its process group.
    """

    def __init__(
        self,
        command: Sequence[str],
        *,
        nprocs: int = 1,
        max_restarts: int = 0,
        restart_policy: str = "group",
        reaper: Reaper | None = None,
        stop_grace: float = 10.0,
        log_dir: str | os.PathLike[str] | None = None,
        output: Output | None = None,
        event_log: str | os.PathLike[str] | None = None,
        metrics_port: int | None = None,
        metrics_host: str = "127.0.0.1",
        metrics_linger: float = 0.0,
        realtime: bool | Literal["auto"] = "auto",
        cgroup: bool = True,
        run_id: str | None = None,
    ) -> None:
        if not command:
            raise UsageError("a command to run is required after --")
        if restart_policy not in ("group", "rank"):
            raise ValueError(f"`restart_policy` must be 'group' or 'rank', got {restart_policy!r}")
        if run_id is not None and not (isinstance(run_id, str) and run_id.isprintable() and run_id):
            raise ValueError(f"`run_id` must be a non-empty printable string, got {run_id!r}")
        self.command = [resolve_program(command[0]), *command[1:]]
        self.nprocs = nprocs
        self.max_restarts = max_restarts
        self.restart_policy = restart_policy
        self.stop_grace = stop_grace
        self.log_dir = None if log_dir is None else Path(log_dir)
        self._logs = None if log_dir is None else FileSink("--log-dir")
        self._reaper = reaper
        self._observe = bool(getattr(reaper, "observe", False))
        self.event_log = event_log
        self.metrics_port = metrics_port
        self.metrics_host = metrics_host
        self.metrics_linger = metrics_linger
        self.realtime = realtime
        self.cgroup = cgroup
        self._cgroup: JobCgroup | None = None
        #: ranks started again so far (``aiotimer_restarts_total``): a group restart of
        #: N ranks counts N, a restart of one rank (``restart_policy="rank"``) counts 1
        self.restarts = 0
        self._lingering = False
        self.output = output or Output(sys.stdout.buffer, sys.stderr.buffer)
        self.results = [RankResult(rank) for rank in range(nprocs)]
        self._job_id = uuid.uuid4().hex[:12]
        #: every rank's TORCHELASTIC_RUN_ID
        self.run_id = str(uuid.uuid4()) if run_id is None else run_id
        #: where the error files go: ``log_dir``, or a private directory once running;
        #: absolute, as the watchdog writes only to an absolute TORCHELASTIC_ERROR_FILE
        self.error_dir: Path | None = None if log_dir is None else Path(log_dir).absolute()
        self._private_error_dir = False
        self._error_dir_warned = False
        self._omp_threads: str | None = None  # OMP_NUM_THREADS for the ranks, if we set it
        self._last: dict[int, _Rank] = {}  # rank -> its latest attempt
        #: the socket aiotimer clients of the job connect to (AIOTIMER_SOCKET), once running
        self._socket: str | None = None
        self._stop_signal = 0
        self._stopped = asyncio.Event()
        self._force = False
        self._live: dict[int, _Rank] = {}  # worker pid -> rank, this attempt
        self._incidents: set[int | None] = set()  # worker pids with an incident recorded
        self._incident_recorded = asyncio.Event()
        self._capture_wait = float(getattr(reaper, "dump_timeout", 0.0)) + 4.0
        self._who = rank_namer(self._rank_of)

    # -- stopping ----------------------------------------------------------

    def stop(self, signum: int) -> None:
        """Stop the job as if it got signal ``signum``; a second stop kills at once.

        Once the job has ended and its metrics linger, a stop ends the linger.
        """
        if self._lingering:
            self.output.say(f"got {signal_name(signum)}: the metrics linger no longer")
            self._stopped.set()
            return
        if self._stop_signal:
            self._force = True
            for rank in self._live.values():
                rank.worker.kill()
            return
        self._stop_signal = signum
        self._stopping_all(f"the launcher got {signal_name(signum)}")
        self.output.say(
            f"got {signal_name(signum)}: stopping every rank (SIGTERM, then SIGKILL after "
            f"{self.stop_grace:g}s)"
        )
        self._stopped.set()

    def _stdout_closed(self) -> None:
        if not self._stop_signal:
            self._stop_signal = signal.SIGPIPE
            self._stopping_all("its stdout was closed")
            self._stopped.set()

    def _stopping_all(self, why: str) -> None:
        """Mark every running rank as being stopped by the launcher: its exit is no failure."""
        for rank in self._live.values():
            if rank.stopping is None:
                rank.stopping = why

    # -- events ------------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        if isinstance(event, TimerExpired) and event.pid == event.worker_pid:
            rank = self._live.get(event.pid) if event.pid is not None else None
            if rank is not None and not self._observe:  # an observed expiry fails nothing
                self._failed(rank)
        elif isinstance(event, IncidentRecorded):
            self._incidents.add(event.worker_pid)
            self._incident_recorded.set()
            rank = self._live.get(event.pid) if event.pid == event.worker_pid else None
            if rank is not None and rank.incident is None:
                txt = None if event.path is None else str(Path(event.path).with_suffix(".txt"))
                rank.incident = (event.summary, txt)
        line = describe(event, self._who)
        if line:
            self.output.say(line)

    def _failed(self, rank: _Rank) -> None:
        """``rank`` failed now (unless the launcher is stopping it): the first time counts."""
        if rank.failed_at is None and rank.stopping is None:
            rank.failed_at = time.monotonic()

    def _exited(self, rank: _Rank) -> None:
        """``rank``'s worker exited (called as it is seen, so failures keep their order)."""
        if rank.worker.returncode not in (None, 0):
            self._failed(rank)

    # -- ranks ---------------------------------------------------------------

    def _environment(
        self, rank: int, attempt: int, master_port: int, token: str, error_file: str | None
    ) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(master_port))
        env.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            GROUP_RANK="0",
            WORLD_SIZE=str(self.nprocs),
            LOCAL_WORLD_SIZE=str(self.nprocs),
            AIOTIMER_RESTART_COUNT=str(attempt),
            TORCHELASTIC_RESTART_COUNT=str(attempt),
            TORCHELASTIC_MAX_RESTARTS=str(self.max_restarts),
            TORCHELASTIC_RUN_ID=self.run_id,
            PYTHONUNBUFFERED="1",
        )
        if self._omp_threads is not None:
            env["OMP_NUM_THREADS"] = self._omp_threads
        if error_file is not None:
            env["TORCHELASTIC_ERROR_FILE"] = error_file
        else:  # never an outer launcher's file (aiotimer run inside a torchrun worker)
            env.pop("TORCHELASTIC_ERROR_FILE", None)
        env[ENV_TOKEN] = token
        if self._socket is not None:
            env[ENV_SOCKET] = self._socket
        return env

    async def _error_file(self, rank: int, attempt: int) -> str | None:
        """Make ``attempt_K/RANK/`` for ``rank``'s error file (a stale one is removed); its path.

        ``None`` (said once) if the directory cannot be made: the rank runs without one.
        """
        if self.error_dir is None:
            return None
        path = self.error_dir / f"attempt_{attempt}" / str(rank) / "error.json"
        try:
            await run_blocking(_prepare_error_file, path)
        except OSError as exc:
            if not self._error_dir_warned:
                self._error_dir_warned = True
                flag = "" if self._private_error_dir else "--log-dir: "
                self.output.say(
                    f"{flag}cannot make torch's error file {path} ({exc.strerror or exc}): "
                    "ranks run without TORCHELASTIC_ERROR_FILE"
                )
            return None
        return str(path)

    async def _start_rank(
        self, server: TimerServer, result: RankResult, attempt: int, master_port: int
    ) -> _Rank:
        token = f"{self._job_id}/{result.rank}/{attempt}"
        error_file = await self._error_file(result.rank, attempt)
        pipe = asyncio.subprocess.PIPE
        argv = list(self.command)
        cgroup = None
        if self._cgroup is not None:
            cgroup = await run_blocking(self._cgroup.rank, result.rank, attempt)
            argv = JobCgroup.enter(cgroup, argv)
        worker = await server.spawn(
            *argv,
            env=self._environment(result.rank, attempt, master_port, token, error_file),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=pipe,
            stderr=pipe,
        )
        result.attempts = attempt + 1
        prefix = f"[rank{result.rank}]: ".encode()
        logs = self.log_dir / f"attempt_{attempt}" / str(result.rank) if self.log_dir else None
        relays = [
            asyncio.create_task(
                _Relay(self.output, prefix, to_err, logs / name if logs else None, self._logs).run(
                    stream
                )
            )
            for to_err, name, stream in (
                (False, "stdout.log", worker.stdout),
                (True, "stderr.log", worker.stderr),
            )
        ]
        exit = asyncio.ensure_future(worker.wait())
        rank = _Rank(result, worker, token, relays, exit, attempt, error_file, cgroup=cgroup)
        exit.add_done_callback(lambda _: self._exited(rank))
        if self._stop_signal:  # a stop came while it started
            rank.stopping = f"the launcher got {signal_name(self._stop_signal)}"
        self._live[worker.pid] = rank
        self._last[result.rank] = rank
        return rank

    async def _incidents_of(self, ranks: Sequence[_Rank]) -> None:
        """Wait (bounded) until the expired ranks' incidents are recorded.

        An incident captures the other ranks' stacks too (the culprit is often
        the rank that never joined the collective): they are stopped after.
        """
        if not hasattr(self._reaper, "dump_timeout"):
            return
        expired = {r.worker.pid for r in ranks if r.expired_scopes}
        deadline = asyncio.get_running_loop().time() + self._capture_wait
        while expired - self._incidents and not self._force:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return
            self._incident_recorded.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._incident_recorded.wait(), left)

    async def _end(self, ranks: Sequence[_Rank], why: str) -> None:
        """Stop what is left of ``ranks``: SIGTERM, the grace, SIGKILL; then their descendants.

        ``why`` the launcher stops them (the summary's "stopped (...)"); then
        the failed ranks' error files are read.
        """
        await self._incidents_of(ranks)
        running = [r for r in ranks if r.worker.returncode is None]
        for rank in running:
            if rank.stopping is None:
                rank.stopping = why
            rank.worker.terminate()
        if running and not self._force:
            waits = [asyncio.create_task(r.worker.wait()) for r in running]
            _, late = await asyncio.wait(waits, timeout=self.stop_grace)
            for task in late:
                task.cancel()
        for rank in running:
            if rank.worker.returncode is None:
                rank.worker.kill()
        for rank in ranks:
            await rank.worker.wait()
        # What they left: their cgroups hold all of it; a /proc scan finds what it can
        # where there are none.  Both block: the I/O plane's, not the loop's.
        for rank in ranks:
            if rank.cgroup is not None:
                await run_blocking(kill_cgroup, rank.cgroup)
        await run_blocking(
            kill_descendants, {r.worker.pid for r in ranks}, {r.token for r in ranks}
        )
        for rank in ranks:
            # The descendants are gone, so are the last writers: the relays end.
            _, unfinished = await asyncio.wait(rank.relays, timeout=5.0)
            for relay in unfinished:
                relay.cancel()
            self._live.pop(rank.worker.pid, None)
        await asyncio.wait([r.exit for r in ranks])  # done: the worker was waited for
        # What torch's @record (or the watchdog) left, read off the loop.
        failed = [(r, r.error_file) for r in ranks if r.failed_at or r.expired_scopes]
        files = [(rank, path) for rank, path in failed if path is not None]
        errors = await asyncio.gather(*(run_blocking(read_error_file, f) for _, f in files))
        for (rank, _), error in zip(files, errors, strict=True):
            rank.error = error

    def _settle(self, rank: _Rank, attempt: int) -> bool:
        """Record how ``rank`` ended; whether it ended well (exit 0, no expiry, not stopped)."""
        result = rank.result
        result.returncode = rank.worker.returncode
        result.pid = rank.worker.pid
        result.expired = bool(rank.expired_scopes) and not self._observe
        if self._observe:  # expiries were recorded, not enforced: they fail nothing
            result.observed += [f"attempt {attempt} in {s}" for s in rank.expired_scopes]
        if result.expired:
            scopes = ", ".join(dict.fromkeys(rank.expired_scopes)) or "?"
            result.watchdog_kills.append(f"attempt {attempt} in {scopes}")
        failed = rank.failed_at is not None or result.expired
        result.stopped = rank.stopping if rank.stopping is not None and not failed else None
        result.error = rank.error
        result.incident, result.incident_path = rank.incident or (None, None)
        return result.ok

    def _first_failure(self, ranks: Iterable[_Rank]) -> _Rank | None:
        """The rank that failed first among ``ranks`` (``None``: none failed)."""
        failed = [r for r in ranks if r.failed_at is not None]
        return min(failed, key=lambda r: r.failed_at or 0.0, default=None)

    def _failure(self, rank: _Rank, *, how: bool = False) -> str:
        """``rank 1 failed``, ``rank 1's watchdog fired``; with ``how``, how it ended.

        ``how``: ``rank 1 failed, exit status 1``, ``rank 1's watchdog fired in 'step'``
        (once the rank's worker has exited).
        """
        r = rank.result.rank
        if rank.expired_scopes and not self._observe:
            scopes = ", ".join(repr(s) for s in dict.fromkeys(rank.expired_scopes))
            return f"rank {r}'s watchdog fired" + (f" in {scopes}" if how else "")
        return f"rank {r} failed" + (f", {rank.result.status()}" if how else "")

    # -- the two restart policies ---------------------------------------------

    async def _run_group(self, server: TimerServer) -> None:
        for attempt in range(self.max_restarts + 1):
            port = _free_port()
            ranks = [await self._start_rank(server, r, attempt, port) for r in self.results]
            pending = {r.exit: r for r in ranks}
            stop = asyncio.create_task(self._stopped.wait())
            failed = False
            while pending and not failed and not stop.done():
                done, _ = await asyncio.wait([*pending, stop], return_when=asyncio.FIRST_COMPLETED)
                for task in done & pending.keys():
                    failed = failed or pending.pop(task).failed_at is not None
            stop.cancel()
            last = attempt == self.max_restarts
            first = self._first_failure(ranks)
            cause = "" if first is None else f" after {self._failure(first)}"
            why = f"group {'stop' if last else 'restart'}{cause}"
            await self._end(ranks, why)
            ok = all([self._settle(r, attempt) for r in ranks])
            if ok or self._stop_signal or last:
                return
            self.restarts += self.nprocs
            first = self._first_failure(ranks)
            cause = "" if first is None else f": {self._failure(first, how=True)}"
            self.output.say(
                f"restarting all {self.nprocs} ranks (restart {attempt + 1} of "
                f"{self.max_restarts}){cause}"
            )

    async def _run_rank(self, server: TimerServer, result: RankResult) -> None:
        for attempt in range(self.max_restarts + 1):
            rank = await self._start_rank(server, result, attempt, _free_port())
            stop = asyncio.create_task(self._stopped.wait())
            await asyncio.wait([rank.exit, stop], return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            await self._end([rank], "the launcher stopped")  # only a stop leaves it running
            ok = self._settle(rank, attempt)
            if ok or not result.expired or self._stop_signal or attempt == self.max_restarts:
                return
            self.restarts += 1
            self.output.say(
                f"restarting rank {result.rank} (restart {attempt + 1} of {self.max_restarts})"
            )

    # -- the job -----------------------------------------------------------------

    def _rank_of(self, pid: int) -> str | None:
        rank = self._live.get(pid)
        return None if rank is None else str(rank.result.rank)

    def workers_by_state(self) -> dict[str, int]:
        """How many ranks run now, and how the others last ended."""
        states = {"running": len(self._live), "succeeded": 0, "failed": 0}
        running = {r.result.rank for r in self._live.values()}
        for result in self.results:
            if result.rank in running or result.returncode is None:
                continue
            states["succeeded" if result.ok else "failed"] += 1
        return states

    async def _prepare(self) -> None:
        """Before the first rank: the error files' directory, OMP_NUM_THREADS (said once)."""
        if self.error_dir is None:
            try:
                made = await run_blocking(tempfile.mkdtemp, prefix="aiotimer-run-")
            except OSError as exc:
                self.output.say(
                    f"cannot make a temporary directory for torch's error files "
                    f"({exc.strerror or exc}): ranks run without TORCHELASTIC_ERROR_FILE "
                    "(--log-dir DIR puts them in DIR)"
                )
            else:
                self.error_dir = Path(made)
                self._private_error_dir = True
        if "OMP_NUM_THREADS" not in os.environ and self.nprocs > 1:
            self._omp_threads = "1"
            self.output.say(
                f"OMP_NUM_THREADS is not set: setting it to 1 for every rank, so that "
                f"{self.nprocs} ranks do not overload this host; tune it for your job as needed"
            )

    async def _discard_error_dir(self) -> None:
        """Remove the private error files' directory, unless a rank or the watchdog wrote one.

        An incident names the error file the watchdog wrote, and the summary
        the root cause's: they stay where they were said to be.
        """
        if self._private_error_dir and self.error_dir is not None:
            await run_blocking(_remove_unless_error_files, self.error_dir)

    async def run(self) -> int:
        """Run the job to its end; return its exit status."""
        become_subreaper()
        loop = asyncio.get_running_loop()
        self.output.bind(loop, self._stdout_closed)
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self.stop, sig)
        log = (
            None if self.event_log is None else JsonEventLog(self.event_log, rank_of=self._rank_of)
        )
        status: int | None = None
        try:
            await self._prepare()
            if self.cgroup:
                self._cgroup = await _job_cgroup(f"aiotimer-{self._job_id}")
            async with TimerServer(
                reaper=self._reaper, log_event=log, realtime=self.realtime
            ) as server:
                server.events.subscribe(self._on_event)
                # A ranks' helper that is not its child (started through a daemon, a
                # container exec) reaches the watchdog here (AIOTIMER_SOCKET).
                self._socket = await listen_private_socket(server)
                metrics = None
                if self.metrics_port is not None:
                    metrics = serve_metrics(
                        server,
                        self.metrics_host,
                        self.metrics_port,
                        workers=self.workers_by_state,
                        restarts=lambda: self.restarts,
                    )
                    self.output.say(f"metrics on {metrics.url} (health: /healthz)")
                if self.restart_policy == "group":
                    await self._run_group(server)
                else:
                    await asyncio.gather(*(self._run_rank(server, r) for r in self.results))
                if metrics is not None and self.metrics_linger > 0 and not self._stop_signal:
                    # The job is over: say how it ended now, and let the scrapers see it.
                    status = self._summary()
                    await self._linger(metrics.url)
        finally:
            for sig in STOP_SIGNALS:
                loop.remove_signal_handler(sig)
            # The watchdog is closed: what is left to write may take its time.
            if log is not None:
                await run_blocking(log.close)
            if self._logs is not None:
                await run_blocking(self._logs.close)
            if self._cgroup is not None:
                await run_blocking(self._cgroup.close)
            await self._discard_error_dir()
        if status is None:
            status = self._summary()
        # The watchdog is closed: the summary may wait for a slow terminal.
        await run_blocking(self.output.close)
        return status

    async def _linger(self, url: str) -> None:
        """Keep serving the metrics ``metrics_linger`` seconds (a stop signal ends it early)."""
        self._lingering = True
        self._stopped.clear()
        self.output.say(
            f"the job has ended; its metrics stay up {self.metrics_linger:g}s more on {url} "
            "(--metrics-linger)"
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopped.wait(), self.metrics_linger)

    def _summary(self) -> int:
        """Print the summary, the root cause last; the job's exit status."""
        if self._stop_signal == signal.SIGPIPE:
            return EXIT_SIGPIPE
        self.output.say(f"summary of run {self.run_id}")
        lines = [result.describe() for result in self.results]
        if not all(r.ok for r in self.results):
            lines += self._root_cause()
        self.output.write(True, "".join(f"  {line}\n" for line in lines).encode())
        if self._stop_signal:
            return 128 + self._stop_signal
        if any(r.expired for r in self.results):
            return EXIT_WATCHDOG
        if any(r.returncode != 0 for r in self.results):
            return EXIT_WORKER_FAILED
        return 0

    def _root_cause(self) -> list[str]:
        """The summary's "Root cause" block: the first failure of the ranks' last attempts."""
        last = [self._last[r.rank] for r in self.results if r.rank in self._last]
        first = self._first_failure(last)
        if first is None:
            # Failed without a time: an expiry while being stopped, or never started.
            first = next((r for r in last if not r.result.ok and r.result.stopped is None), None)
        if first is None:
            if self._stop_signal:
                return [f"Root cause: the launcher got {signal_name(self._stop_signal)}"]
            return ["Root cause: unknown"]
        result = first.result
        lines = [
            f"Root cause: rank {result.rank} (pid {first.worker.pid}), attempt {first.attempt}, "
            f"the first to fail: {result.status()}"
        ]
        details: list[str] = []
        if result.expired and result.incident:
            details.append(result.incident)  # who hung in which scope, in which frame
            if result.incident_path:
                details.append(f"incident: {result.incident_path}")
        elif result.expired:
            scopes = ", ".join(repr(s) for s in dict.fromkeys(first.expired_scopes))
            details.append(f"its timer {scopes} expired")
        if result.error is not None and not (result.expired and result.incident):
            text = result.error.message.splitlines() or [""]
            details += [line[:_ROOT_CAUSE_WIDTH] for line in text[:_ROOT_CAUSE_LINES]]
            if len(text) > _ROOT_CAUSE_LINES:
                details.append(f"... ({len(text) - _ROOT_CAUSE_LINES} more lines)")
            if result.error.where:
                details.append(f"at {result.error.where}")
        if result.error is not None:
            details.append(f"error file: {result.error.path}")
        elif not result.expired:
            details.append(
                "no error file: decorate the worker's entry point with torch's @record "
                "(torch.distributed.elastic.multiprocessing.errors) to have its error here"
            )
        return lines + [f"  {line}" for line in details]


async def _linger(url: str, seconds: float, err: StreamSink) -> None:
    """``aiotimer serve``: keep serving the metrics ``seconds`` more; a stop signal ends it."""
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    err.write(
        f"aiotimer: the command has ended; its metrics stay up {seconds:g}s more on {url} "
        "(--metrics-linger)\n".encode()
    )
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stopped.set)
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopped.wait(), seconds)
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)


async def _job_cgroup(name: str) -> JobCgroup | None:
    """The job's cgroup, or ``None`` (said once, at info level: it is the common case
    for an unprivileged user, and process groups and tokens still work)."""
    made = await run_blocking(JobCgroup.create, name)
    if isinstance(made, str):
        logger.info(
            "no cgroup for the job (%s): what ranks leave behind is found by process "
            "group, ancestry and job token",
            made,
        )
        return None
    return made


def kill_descendants(workers: set[int], tokens: set[str]) -> int:
    """SIGKILL what is left of some workers' process trees; return how many were killed.

    A process belongs to them if it descends from one of ``workers`` or, having
    been re-parented when its parent exited, still carries one of ``tokens`` in
    its environment.  Those re-parented to this process (a subreaper) are reaped.
    """
    me = os.getpid()
    processes = live_processes()
    doomed = descendants(frozenset(workers), processes)
    for pid, parent in processes.items():
        adopted = pid not in doomed and pid not in workers and parent in (me, 1)
        if adopted and environ_of(pid).get(ENV_TOKEN) in tokens:
            doomed.add(pid)
    for pid in doomed:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    # Our adopted children: reap them, so no zombie is left.
    _reap([pid for pid in doomed if processes.get(pid) == me])
    return len(doomed)


def _prepare_error_file(path: Path) -> None:
    """Make ``path``'s directory and remove a stale file there.  Blocks: the I/O plane's.

    A file left by an earlier job in the same ``--log-dir`` would be taken for
    this attempt's error (and the watchdog never writes over a file).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _remove_unless_error_files(directory: Path) -> bool:
    """Remove ``directory`` unless an ``error.json`` is in it; whether it was removed.

    Blocks: the I/O plane's.
    """
    if any(directory.glob("attempt_*/*/error.json")):
        return False
    shutil.rmtree(directory, ignore_errors=True)
    return True


def _reap(pids: list[int], timeout: float = 1.0) -> None:
    """Reap our children ``pids`` (just SIGKILLed), waiting at most ``timeout`` seconds in all.

    Blocks (it sleeps between tries): the I/O plane's, never the loop's.
    """
    deadline = time.monotonic() + timeout
    left = set(pids)
    while left:
        for pid in list(left):
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    left.discard(pid)
            except ChildProcessError:
                left.discard(pid)
        if not left or time.monotonic() > deadline:
            return
        time.sleep(0.001)


class _PrivateDirectory:
    """A directory removed (with whatever was moved aside in it) when the server closes."""

    def __init__(self, path: str) -> None:
        self.path = path

    async def aclose(self) -> None:
        """Remove the directory, off the loop."""
        await run_blocking(shutil.rmtree, self.path, True)


async def listen_private_socket(server: TimerServer, roots: Sequence[int] = ()) -> str:
    """Serve aiotimer clients on a socket in a fresh 0700 directory; the socket's path.

    The directory goes when the server closes.  A fixed name in /tmp could be
    taken (or swapped) first by any user; ``mkdtemp`` makes a new one atomically.
    """
    from .transports.socket import listen_socket

    directory = tempfile.mkdtemp(prefix="aiotimer-")
    server.add_listener(_PrivateDirectory(directory))  # closed after the socket's listener
    path = os.path.join(directory, "timer.sock")
    await listen_socket(server, path, roots=roots)
    return path


async def serve_command(
    command: Sequence[str],
    *,
    fifo: str,
    roots: Sequence[int] = (),
    reaper: Reaper | None = None,
    event_log: str | os.PathLike[str] | None = None,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
    metrics_linger: float = 0.0,
    realtime: bool | Literal["auto"] = "auto",
    cgroup: bool = True,
) -> int:
    """Serve torch timer clients on ``fifo`` while ``command`` runs; return its exit status.

    ``command`` (torchrun, typically) gets ``TORCHELASTIC_TIMER_FILE=fifo``, which
    torchrun hands on to every worker, so workers that use torch's own
    ``FileTimerClient`` are served by aiotimer.  SIGTERM, SIGINT, SIGHUP and SIGQUIT
    are passed on to the command; what it leaves behind is killed when it exits.
    ``realtime``: as ``TimerServer``'s (``"auto"``: the boost where permitted).  ``cgroup``:
    the command runs in a cgroup v2 of its own where permitted, killed with
    ``cgroup.kill`` when it exits (see ``Job``).
    """
    from .transports.fifo import check_fifo_path, listen_fifo

    if not command:
        raise UsageError("a command to run is required after --")
    program = resolve_program(command[0])
    directory = os.path.dirname(os.path.abspath(fifo))
    if not os.path.isdir(directory):
        raise UsageError(f"--fifo {fifo}: no such directory {directory}")
    try:
        check_fifo_path(fifo, "--fifo")
    except FileExistsError as exc:
        raise UsageError(str(exc)) from None
    become_subreaper()
    token = uuid.uuid4().hex
    log = None if event_log is None else JsonEventLog(event_log)
    err = StreamSink("stderr", sys.stderr.buffer)
    async with TimerServer(reaper=reaper, log_event=log, realtime=realtime) as server:
        server.events.subscribe(ServeLines(err))
        try:
            await listen_fifo(server, fifo, roots=roots)
        except (FileExistsError, PermissionError) as exc:  # taken since the check, or not ours
            raise UsageError(f"--fifo {fifo}: {exc.strerror or exc}") from None
        # aiotimer's own clients (expires, timer) in the command's processes: they do
        # not inherit a pipe through torchrun, they connect here.
        socket_path = await listen_private_socket(server, roots)
        metrics = None
        if metrics_port is not None:
            metrics = serve_metrics(server, metrics_host, metrics_port)
            err.write(f"aiotimer: metrics on {metrics.url} (health: /healthz)\n".encode())
        env = dict(os.environ)
        env["TORCHELASTIC_TIMER_FILE"] = fifo
        env[ENV_SOCKET] = socket_path
        env[ENV_TOKEN] = token
        if env.pop("TORCHELASTIC_ENABLE_FILE_TIMER", None) is not None:
            err.write(
                b"aiotimer: unset TORCHELASTIC_ENABLE_FILE_TIMER for the command: aiotimer "
                b"serves torch's timer clients on TORCHELASTIC_TIMER_FILE itself (torchrun "
                b"would start a second server on it)\n"
            )
        job = await _job_cgroup(f"aiotimer-{token[:12]}") if cgroup else None
        argv = [program, *command[1:]]
        if job is not None:  # torchrun, its agent, its ranks and whatever they start
            argv = JobCgroup.enter(await run_blocking(job.rank, 0, 0), argv)
        child = await server.spawn(*argv, env=env)
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, child.send_signal, sig)
        try:
            returncode = await child.wait()
        finally:
            for sig in STOP_SIGNALS:
                loop.remove_signal_handler(sig)
            if job is not None:
                await run_blocking(job.close)
            await run_blocking(kill_descendants, {child.pid}, {token})
        if metrics is not None and metrics_linger > 0:
            await _linger(metrics.url, metrics_linger, err)
    if log is not None:
        await run_blocking(log.close)
    await run_blocking(err.close)
    return returncode if returncode >= 0 else 128 - returncode
