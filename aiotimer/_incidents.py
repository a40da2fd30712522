"""Incidents: why a worker hung, captured before it is killed, written where a person finds it.

On an expiry, ``IncidentReaper`` works in steps (the escalation tiers):

1. capture the hung process's stacks (py-spy, or the client's faulthandler
   dump), and, in parallel, the other processes of its job (the culprit is
   often the rank that never joined the collective).  Bounded: the kill is
   never later than ``deadline + dump_timeout``.  Each process is captured
   once per burst, and that capture is copied into every incident that lists
   the process (its own included, even if it finished after the kill), stamped
   with when it was taken relative to that incident's deadline;
2. if the process runs under torchrun (``TORCHELASTIC_ERROR_FILE`` in its
   environment), write torch's error file, so torchrun's "Root Cause" names the
   expired scope and the hung stack instead of "Signal 9 received";
3. the kill itself (by default ``SignalReaper``: signal, grace, SIGKILL), or
   nothing at all in observe mode;
4. one JSON file per incident, never overwriting another, and a readable
   ``.txt`` beside it, each step and its time in both, and a "likely culprit"
   when exactly one rank is outside the collective the others wait in.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import itertools
import json
import os
import shutil
import signal as _signal
import socket
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._clock import Clock, monotonic_to_wall
from ._events import EVENT_LOGGED, logger
from ._expiry import Expiry, Reaper
from ._ioplane import run_blocking
from ._linux import environ_of
from ._reapers import SignalReaper
from ._stacks import Stacks, capture_stacks, dump_file, find_py_spy
from ._validate import check_seconds

__all__ = [
    "DEFAULT_DUMP_TIMEOUT",
    "Incident",
    "IncidentReaper",
    "IncidentRecorder",
    "likely_culprit",
]

#: Seconds after a deadline by which the kill goes out, captured or not.  Measured
#: (``py-spy dump --native``, torch 2.13, 2 cores both kept busy, two runs of 20
#: dumps): an idle torch process 0.1-0.8 s, a gloo rank waiting in ``all_reduce``
#: 0.6-1.4 s, both ranks of a 2-rank job at once 0.8-1.9 s (p90 1.4-1.9 s), 3.7 s
#: at worst (README, Incidents).  The kill goes out as soon as the capture is in:
#: the bound is reached only when it is slow.
DEFAULT_DUMP_TIMEOUT = 5.0
# The other processes' captures may run this much longer than the hung one's:
# they are not being killed, but the incident waits for them.
_OTHERS_EXTRA = 2.0
# At most this many other processes are captured.
_OTHERS_MAX = 32
# A capture is shared with every incident that wants it while it runs and for
# this long after it finished (one burst); each incident says when it was taken.
_SHARE_FOR = 2.0
# Python files whose frames are a collective (the innermost one names it).
_COLLECTIVE_FILES = ("torch/distributed/distributed_c10d.py",)
# Most bytes of a /proc file (cmdline) read: a process controls its own.
_PROC_BYTES = 64 * 1024
_seq = itertools.count(1)


def _iso(wall: float) -> str:
    moment = datetime.datetime.fromtimestamp(wall, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _cmdline(pid: int) -> list[str]:
    """``pid``'s command line (at most ``_PROC_BYTES`` of it).  Blocks: the I/O plane's."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read(_PROC_BYTES)
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


@dataclass(frozen=True)
class _Facts:
    """What ``/proc`` says of a process, read in the I/O plane (it can block on the process)."""

    rank: str | None = None
    local_rank: str | None = None
    command: tuple[str, ...] = ()
    torch_error_file: str | None = None
    #: the attempt (restart count, from 0) it belongs to, as its launcher said
    attempt: str | None = None


def _facts(pid: int) -> _Facts:
    env = environ_of(pid)
    return _Facts(
        env.get("RANK"),
        env.get("LOCAL_RANK"),
        tuple(_cmdline(pid)),
        env.get("TORCHELASTIC_ERROR_FILE"),
        env.get("AIOTIMER_RESTART_COUNT") or env.get("TORCHELASTIC_RESTART_COUNT"),
    )


def _signame(sig: int) -> str:
    try:
        return _signal.Signals(sig).name
    except ValueError:
        return str(sig)


class _Capture:
    """One capture of one process's stacks, shared by every incident of a burst that lists it.

    ``started`` and ``finished`` are on the server's clock, so each incident can
    say when the stacks were taken relative to its own deadline.
    """

    __slots__ = ("finished", "pid", "started", "task", "with_dump")

    def __init__(
        self, pid: int, task: asyncio.Task[Stacks], clock: Clock, *, with_dump: bool
    ) -> None:
        self.pid = pid
        self.task = task
        self.started = clock.now()
        self.finished: float | None = None
        #: whether it may fall back on the client's faulthandler dump (it had an expiry)
        self.with_dump = with_dump
        task.add_done_callback(lambda _: setattr(self, "finished", clock.now()))

    def result(self) -> Stacks | None:
        """The stacks, once the capture has finished (a capture never raises)."""
        if not self.task.done() or self.task.cancelled() or self.task.exception() is not None:
            return None
        return self.task.result()

    def stacks(self, bound: float) -> Stacks:
        """The stacks, or why there are none (it had not finished within ``bound`` seconds)."""
        found = self.result()
        if found is not None:
            return found
        return Stacks(self.pid, reason=f"not captured within {bound:.3g}s")

    def taken(self, deadline: float) -> dict[str, float | None]:
        """When it was taken and finished, in seconds after ``deadline`` (negative: before)."""
        return {
            "after_deadline": round(self.started - deadline, 6),
            "done_after_deadline": None
            if self.finished is None
            else round(self.finished - deadline, 6),
        }


def _taken_text(taken: object) -> str:
    """``taken at the deadline +0.012s, done +0.188s`` (for the incident's text)."""
    if not isinstance(taken, dict) or not isinstance(taken.get("after_deadline"), float):
        return ""

    def seconds(value: float) -> str:
        return f"{round(value, 3) + 0.0:+.3f}s"  # + 0.0: never "-0.000s"

    text = f"taken at the deadline {seconds(taken['after_deadline'])}"
    done = taken.get("done_after_deadline")
    return text + (f", done {seconds(done)}" if isinstance(done, float) else ", not done")


def _collective(stacks: Stacks) -> str | None:
    """The collective a process waits in (torch.distributed's function), if any."""
    for thread in stacks.threads:
        for frame in thread.frames:  # innermost first
            if not frame.native and frame.file.replace("\\", "/").endswith(_COLLECTIVE_FILES):
                return frame.function
    return None


def likely_culprit(processes: Iterable[tuple[int, str | None, Stacks | None]]) -> str | None:
    """The likely culprit (``rank R (pid P), the only rank not in C, ...``), or ``None``.

    ``processes``: each process of the job as ``(pid, rank, stacks)``.  A rank is
    in a collective if any of its processes' stacks is in one
    (``torch.distributed``'s ``all_reduce``, ``barrier``, ...).  Said only when
    every rank's stacks are known, all but one rank wait in the same
    collective, and that one waits in none: the rank that never joined.
    """
    ranks: dict[str, list[tuple[int, Stacks | None]]] = {}
    for pid, rank, stacks in processes:
        if rank is not None:
            ranks.setdefault(rank, []).append((pid, stacks))
    inside: dict[str, str] = {}
    outside: list[str] = []
    for rank, members in ranks.items():
        known = [stacks for _, stacks in members if stacks is not None and stacks.ok]
        if not known:
            return None  # a rank we know nothing of could be the culprit as well
        found = next((c for c in map(_collective, known) if c is not None), None)
        if found is None:
            outside.append(rank)
        else:
            inside[rank] = found
    if len(outside) != 1 or not inside or len(set(inside.values())) != 1:
        return None
    (rank,) = outside
    (collective,) = set(inside.values())
    pid, stacks = next((p, s) for p, s in ranks[rank] if s is not None and s.ok)
    assert stacks is not None
    top = stacks.top()
    where = f"; it is in {top.function} ({top.file}:{top.line})" if top is not None else ""
    waiting = ", ".join(sorted(inside, key=lambda r: (len(r), r)))
    return (
        f"rank {rank} (pid {pid}), the only rank not in {collective}, where "
        f"rank{'s' if len(inside) > 1 else ''} {waiting} wait{'' if len(inside) > 1 else 's'}"
        f"{where}"
    )


@dataclass
class Incident:
    """Everything known about one expiry: who hung, where, what was done about it."""

    pid: int
    scopes: list[str]
    #: wall-clock seconds: when the expiry was handled, and the earliest expired deadline
    time: float
    deadline: float
    #: how late the expiry was handled (seconds after the deadline)
    lateness: float
    host: str = field(default_factory=socket.gethostname)
    rank: str | None = None
    local_rank: str | None = None
    command: list[str] = field(default_factory=list)
    worker_pid: int | None = None
    #: each step taken, in order: capture, error file, signals (with their times)
    actions: list[dict[str, object]] = field(default_factory=list)
    stacks: Stacks | None = None
    #: when ``stacks`` were taken: ``after_deadline`` and ``done_after_deadline`` (seconds)
    stacks_taken: dict[str, float | None] | None = None
    others: list[dict[str, object]] = field(default_factory=list)
    #: the attempt (restart count, from 0) the process belongs to, if its launcher said
    attempt: str | None = None
    #: "rank R (pid P), the only rank not in <collective>, ...": when exactly one rank is
    #: outside the collective the others wait in
    likely_culprit: str | None = None
    #: seconds from the deadline to the first signal (``None``: no signal, observe mode)
    kill_lateness: float | None = None
    torch_error_file: str | None = None
    observe: bool = False
    #: the JSON file it was written to, once it has been
    path: Path | None = None

    def summary(self) -> str:
        """One line: who hung where."""
        who = f"rank {self.rank} (pid {self.pid})" if self.rank is not None else f"pid {self.pid}"
        scopes = ", ".join(repr(s) for s in self.scopes[:3]) + (
            " ..." if len(self.scopes) > 3 else ""
        )
        top = self.stacks.top() if self.stacks is not None else None
        where = f" in {top.function} ({top.file}:{top.line})" if top is not None else ""
        return f"{who} hung in {scopes}{where}"

    def to_dict(self) -> dict[str, object]:
        """The incident as plain data (its JSON file)."""
        return {
            "time": _iso(self.time),
            "unix_time": self.time,
            "host": self.host,
            "pid": self.pid,
            "rank": self.rank,
            "local_rank": self.local_rank,
            "attempt": self.attempt,
            "worker_pid": self.worker_pid,
            "command": self.command,
            "scopes": self.scopes,
            "deadline": _iso(self.deadline),
            "lateness": self.lateness,
            "observe": self.observe,
            "actions": self.actions,
            "kill_lateness": self.kill_lateness,
            "torch_error_file": self.torch_error_file,
            "stacks": None if self.stacks is None else self.stacks.to_dict(),
            "stacks_taken": self.stacks_taken,
            "others": self.others,
            "likely_culprit": self.likely_culprit,
            "summary": self.summary(),
        }

    def text(self) -> str:
        """The incident for a person to read."""
        lines = [
            f"aiotimer incident at {_iso(self.time)} on {self.host}",
            f"  {self.summary()}",
        ]
        if self.likely_culprit:
            lines.append(f"  likely culprit: {self.likely_culprit}")
        if self.attempt is not None:
            lines.append(f"  attempt: {self.attempt}")
        lines += [
            f"  command: {' '.join(self.command) or '?'}",
            f"  expired: {', '.join(repr(s) for s in self.scopes)} "
            f"(deadline {_iso(self.deadline)}, handled {self.lateness * 1e3:.2f} ms after it)",
            "  what was done:",
        ]
        for action in self.actions:
            lines.append(f"    - {action.get('text', action)}")
        if self.stacks is not None:
            how = ", ".join(filter(None, [self.stacks.method, _taken_text(self.stacks_taken)]))
            lines.append(f"stacks of pid {self.pid} ({how or 'none'}):")
            lines.append(self.stacks.raw.rstrip() or f"  (none: {self.stacks.reason})")
            if self.stacks.ok and self.stacks.reason:
                lines.append(f"  (note: {self.stacks.reason})")
        for other in self.others:
            rank = f" (rank {other['rank']})" if other.get("rank") is not None else ""
            stacks = other.get("stacks")
            raw = stacks.get("raw") if isinstance(stacks, dict) else ""
            reason = stacks.get("reason") if isinstance(stacks, dict) else ""
            method = stacks.get("method") if isinstance(stacks, dict) else None
            how = ", ".join(filter(None, [method, _taken_text(other.get("taken"))]))
            command = other.get("command")
            shown = " ".join(command) if isinstance(command, list) else ""
            lines.append(f"stacks of pid {other['pid']}{rank} ({how or 'none'}): {shown}")
            lines.append(str(raw).rstrip() if raw else f"  (none: {reason})")
        return "\n".join(lines) + "\n"


class IncidentRecorder:
    """Writes incidents into ``directory``: ``incident-<time>-<pid>-<n>.json`` and ``.txt``.

    A new incident never overwrites a file; an incident's own files are
    replaced atomically when it is updated (the kill escalated).
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        # Absolute: the path is reported (events, torch's error file) to readers elsewhere.
        self.directory = Path(directory).absolute()
        # Two I/O-plane threads may claim one incident at once (torch's error file,
        # still pending when its wait timed out, and the incident's own write):
        # without the lock each would make a file, and one would stay empty.
        self._claiming = threading.Lock()

    def claim(self, incident: Incident) -> Path:
        """Give ``incident`` a file of its own (created empty, never another's).

        Safe to call from several threads at once: one file is made.
        """
        with self._claiming:
            return self._claim(incident)

    def _claim(self, incident: Incident) -> Path:
        if incident.path is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            stamp = datetime.datetime.fromtimestamp(incident.time, tz=datetime.UTC)
            base = f"incident-{stamp:%Y%m%dT%H%M%S}-pid{incident.pid}-{os.getpid()}-{next(_seq)}"
            path = self.directory / f"{base}.json"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            os.close(fd)  # claimed: nothing else will write there
            incident.path = path
        return incident.path

    def write(self, incident: Incident) -> Path:
        """Write (or update) ``incident``'s files; return the JSON file's path."""
        self.claim(incident)
        assert incident.path is not None
        self._replace(incident.path, json.dumps(incident.to_dict(), indent=1) + "\n")
        self._replace(incident.path.with_suffix(".txt"), incident.text())
        return incident.path

    @staticmethod
    def _replace(path: Path, text: str) -> None:
        # A random name, created exclusively: a file or symlink put there
        # beforehand is never written through.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def write_torch_error_file(path: str, incident: Incident) -> bool:
    """Write torchrun's error file for ``incident`` at ``path``, unless a file is there already.

    torchrun shows the error file of the first failed rank as the "Root Cause"
    of its ``ChildFailedError``.  A file the worker wrote itself is never replaced.
    """
    stacks = incident.stacks
    summary = f"aiotimer: watchdog timeout: {incident.summary()}"
    details = [
        summary,
        f"timer {', '.join(repr(s) for s in incident.scopes)} expired "
        f"{incident.lateness * 1e3:.2f} ms ago (deadline {_iso(incident.deadline)})",
    ]
    if incident.path is not None:
        details.append(f"incident: {incident.path.with_suffix('.txt')}")
    if stacks is not None:
        details.append(stacks.raw.rstrip() if stacks.ok else f"(no stacks: {stacks.reason})")
    data = {
        "message": {
            "message": f"TimeoutError: {summary}",
            "extraInfo": {"py_callstack": "\n".join(details), "timestamp": str(int(time.time()))},
        }
    }
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = os.open(path, flags, 0o644)
    except FileExistsError:
        return False
    except OSError as exc:
        logger.warning("cannot write torchrun's error file %s: %s", path, exc)
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    return True


class IncidentReaper:
    """A reaper that first finds out why a process hung, then kills it (or only observes).

    ``kill``: what to do once the stacks are in (default ``SignalReaper()``:
    SIGKILL; ``SignalReaper("TERM", grace=5)`` for TERM, grace, KILL).
    ``dump_timeout``: the kill goes out at most this many seconds after the
    deadline, whatever the capture found (0: no capture).  ``directory``: where
    incidents are written (``None``: not written).  ``observe``: record and
    report, send no signal.  ``related()``: the pids of the hung process's job,
    captured too.  ``dump_dir``: where aiotimer clients write faulthandler
    dumps (``AIOTIMER_DUMP_DIR``).  ``on_incident(incident)`` is called once an
    incident is written.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        kill: Reaper | None = None,
        dump_timeout: float = DEFAULT_DUMP_TIMEOUT,
        observe: bool = False,
        related: Callable[[], Iterable[int]] | None = None,
        dump_dir: str | os.PathLike[str] | None = None,
        on_incident: Callable[[Incident], None] | None = None,
    ) -> None:
        if kill is not None and not callable(kill):
            raise TypeError(f"`kill` must be a reaper (callable), got {kill!r}")
        self.kill: Reaper = SignalReaper() if kill is None else kill
        self.dump_timeout = check_seconds("dump_timeout", dump_timeout, allow_zero=True)
        self.recorder = None if directory is None else IncidentRecorder(directory)
        self.observe = bool(observe)
        self.related = related
        self.dump_dir = None if dump_dir is None else Path(dump_dir)
        self.on_incident = on_incident
        #: the incidents recorded so far, most recent last
        self.incidents: list[Incident] = []
        self._own_dump_dir = False
        # pid -> its latest capture, shared within a burst (see ``_capture``)
        self._captures: dict[int, _Capture] = {}

    def __repr__(self) -> str:
        where = self.recorder.directory if self.recorder is not None else None
        return (
            f"IncidentReaper({str(where)!r}, kill={self.kill!r}, "
            f"dump_timeout={self.dump_timeout}, observe={self.observe})"
        )

    def attach(
        self,
        *,
        related: Callable[[], Iterable[int]],
        on_incident: Callable[[Incident], None],
    ) -> None:
        """Called by a ``TimerServer``: its job's processes, and where incidents are reported."""
        if self.related is None:
            self.related = related
        previous = self.on_incident

        def report(incident: Incident) -> None:
            on_incident(incident)
            if previous is not None:
                previous(incident)

        self.on_incident = report

    def open(self) -> Path:
        """Make the directory clients write their faulthandler dumps into (if it has none)."""
        if self.dump_dir is None:
            self.dump_dir = Path(tempfile.mkdtemp(prefix="aiotimer-dumps-"))
            self._own_dump_dir = True
        return self.dump_dir

    def close(self) -> None:
        """Remove the dump directory ``open()`` made."""
        if self._own_dump_dir and self.dump_dir is not None:
            shutil.rmtree(self.dump_dir, ignore_errors=True)
            self.dump_dir = None
            self._own_dump_dir = False

    @property
    def dump_signal(self) -> int:
        """The signal aiotimer clients should register their faulthandler dump on."""
        return int(getattr(self.kill, "dump_signal", _signal.SIGUSR2))

    def __call__(self, expiry: Expiry) -> Coroutine[Any, Any, None]:
        """Capture, record, then kill: in a follow-up task (a capture takes time)."""
        return self._run(expiry)

    def _start(self, expiry: Expiry) -> Incident:
        """The incident's facts that need no I/O (``/proc`` is read in the I/O plane)."""
        clock = expiry.clock
        now = clock.now()
        return Incident(
            pid=expiry.pid,
            scopes=expiry.scopes(100),
            time=monotonic_to_wall(clock, now),
            deadline=monotonic_to_wall(clock, expiry.deadline),
            lateness=now - expiry.deadline,
            worker_pid=expiry.worker_pid,
            observe=self.observe,
        )

    def _capture(
        self, pid: int, timeout: float, clock: Clock, expiry: Expiry | None = None
    ) -> _Capture:
        """A capture of ``pid``'s stacks, shared by every incident of the burst that wants it.

        When 16 ranks expire together, each incident wants every rank's stacks:
        each process is captured once, not 16 times over, and every incident
        that lists it gets that one capture (stamped with when it was taken).
        """
        now = clock.now()
        for old in [
            p
            for p, c in self._captures.items()
            if c.finished is not None and now - c.finished > _SHARE_FOR
        ]:
            del self._captures[old]
        shared = self._captures.get(pid)
        # A capture made for another incident cannot fall back on this process's own
        # faulthandler dump (it had no expiry to ask with): without py-spy, start one that can.
        if shared is not None and (expiry is None or shared.with_dump or find_py_spy()):
            return shared
        dump_path = None
        if expiry is not None and self.dump_dir is not None:
            dump_path = dump_file(self.dump_dir, pid)
        task = asyncio.ensure_future(
            capture_stacks(
                pid,
                timeout=timeout,
                dump_signal=0 if expiry is None else expiry.dump_signal,
                dump_path=dump_path,
                send=None if expiry is None else (lambda _sig: expiry.dump_stacks()),
            )
        )
        capture = self._captures[pid] = _Capture(pid, task, clock, with_dump=expiry is not None)
        return capture

    def _latest(self, capture: _Capture) -> _Capture:
        """The best capture of ``capture``'s process now: a later one that found stacks wins."""
        latest = self._captures.get(capture.pid)
        if latest is None or latest is capture:
            return capture
        found = latest.result()
        return latest if found is not None and found.ok else capture

    async def _capture_others(
        self, pid: int, timeout: float, clock: Clock
    ) -> list[tuple[int, _Facts, _Capture]]:
        """Start capturing the job's other processes; each with what ``/proc`` says of it."""
        related = self.related
        # related() scans /proc for descendants: the I/O plane's work.
        found = await asyncio.wait_for(run_blocking(related), timeout) if related else ()
        pids = [p for p in found if p != pid][:_OTHERS_MAX]
        captures = [self._capture(other, timeout, clock) for other in pids]
        facts = [asyncio.ensure_future(run_blocking(_facts, other)) for other in pids]
        others: list[tuple[int, _Facts, _Capture]] = []
        for other, capture, fact in zip(pids, captures, facts, strict=True):
            try:
                known = await asyncio.wait_for(fact, 1.0)
            except (TimeoutError, OSError):
                known = _Facts()
            others.append((other, known, capture))
        return others

    async def _run(self, expiry: Expiry) -> None:
        """Capture, write torch's error file, kill; then record.  The kill always happens.

        Capture is best effort and bounded: whatever it does (runs out of
        time, fails, raises ``MemoryError``), the kill goes out at the latest
        ``dump_timeout`` after the deadline.  Files are written in the I/O
        plane; only the error file is waited for before the kill (torchrun
        reads it when the worker dies), and no longer than the same bound.
        """
        incident = self._start(expiry)
        main: _Capture | None = None
        others: asyncio.Task[list[tuple[int, _Facts, _Capture]]] | None = None
        try:
            main, others = await self._before_kill(expiry, incident)
        except Exception:  # best effort: the kill goes out whatever went wrong here
            logger.exception("preparing the incident of pid %d failed; killing it", expiry.pid)
        follow_up: object = None
        if self.observe:
            incident.actions.append({"step": "observe", "text": "observe mode: no signal sent"})
        elif not expiry.exited:
            follow_up = self.kill(expiry)
        self._note_signals(incident, expiry)
        try:
            await self._gather(expiry, incident, main, others)
        except Exception:
            logger.exception("capturing the other processes of pid %d failed", expiry.pid)
        await self._record(incident)
        if isinstance(follow_up, Awaitable):
            try:
                await follow_up
            finally:
                if self._note_signals(incident, expiry):
                    await self._record(incident, again=True)

    async def _gather(
        self,
        expiry: Expiry,
        incident: Incident,
        main: _Capture | None,
        others: asyncio.Task[list[tuple[int, _Facts, _Capture]]] | None,
    ) -> None:
        """Copy every capture the incident lists into it, once finished (bounded), with its time.

        Its own process's capture too: one shared with another incident of the
        burst may finish after this kill went out (it was taken before).
        """
        clock = expiry.clock
        end = expiry.deadline + self.dump_timeout + _OTHERS_EXTRA

        def left() -> float:
            return max(0.0, end - clock.now())

        listed: list[tuple[int, _Facts, _Capture]] = []
        if others is not None:
            try:
                listed = await asyncio.wait_for(others, left() + 1.0)
            except TimeoutError:
                logger.warning("listing the other processes of pid %d took too long", expiry.pid)
        captures = [self._latest(c) for c in [*([main] if main else []), *(c for *_, c in listed)]]
        pending = [c.task for c in captures if not c.task.done()]
        if pending:
            await asyncio.wait(pending, timeout=left())
        bound = self.dump_timeout + _OTHERS_EXTRA
        if main is not None:
            main = self._latest(main)
            found = main.result()
            if found is not None or incident.stacks is None:
                incident.stacks = main.stacks(bound)
            incident.stacks_taken = main.taken(expiry.deadline)
            self._note_capture(incident, main, expiry.deadline)
        entries: list[tuple[int, str | None, Stacks | None]] = [
            (incident.pid, incident.rank, incident.stacks)
        ]
        for other, known, capture in listed:
            capture = self._latest(capture)
            stacks = capture.stacks(bound)
            entries.append((other, known.rank, stacks))
            incident.others.append(
                {
                    "pid": other,
                    "rank": known.rank,
                    "command": list(known.command),
                    "stacks": stacks.to_dict(),
                    "taken": capture.taken(expiry.deadline),
                }
            )
        incident.likely_culprit = likely_culprit(entries)

    @staticmethod
    def _note_capture(incident: Incident, capture: _Capture, deadline: float) -> None:
        """Say in the capture step how it went, once it is known (it may end after the kill).

        ``deadline``: the incident's, on the server's clock.
        """
        step = next((a for a in incident.actions if a.get("step") == "capture"), None)
        stacks = incident.stacks
        if step is None or stacks is None:
            return
        taken = capture.taken(deadline)
        step["method"] = stacks.method
        step["seconds"] = round(stacks.seconds, 6)
        step["taken_after_deadline"] = taken["after_deadline"]
        if stacks.ok:
            text = f"captured stacks with {stacks.method} in {stacks.seconds:.3f}s"
            if capture.started < deadline - 1e-3:
                text += " (shared with an earlier incident)"
        else:
            text = f"no stacks: {stacks.reason}"
        if step.get("after_kill"):
            text += "; the kill did not wait for it (dump_timeout)"
        step["text"] = text

    async def _before_kill(
        self, expiry: Expiry, incident: Incident
    ) -> tuple[_Capture | None, asyncio.Task[list[tuple[int, _Facts, _Capture]]] | None]:
        """Capture the stacks, read ``/proc``, write torch's error file: all within the bound."""
        clock = expiry.clock
        end = expiry.deadline + self.dump_timeout

        def left() -> float:
            return max(0.0, end - clock.now())

        facts = asyncio.ensure_future(run_blocking(_facts, expiry.pid))
        main = others = None
        if self.dump_timeout > 0:
            budget = left()
            main = self._capture(expiry.pid, budget, clock, expiry)
            others = asyncio.ensure_future(
                self._capture_others(expiry.pid, budget + _OTHERS_EXTRA, clock)
            )
            # The bound holds whatever the capture does: the kill is never later
            # than deadline + dump_timeout.
            try:
                incident.stacks = await asyncio.wait_for(asyncio.shield(main.task), budget)
                after_kill = False
            except TimeoutError:
                late = f"the capture did not finish within dump_timeout ({self.dump_timeout:g}s)"
                incident.stacks = Stacks(expiry.pid, reason=late, seconds=budget)
                after_kill = True
            incident.stacks_taken = main.taken(expiry.deadline)
            incident.actions.append(
                {
                    "step": "capture",
                    "method": incident.stacks.method,
                    "seconds": round(incident.stacks.seconds, 6),
                    "after_deadline": round(clock.now() - expiry.deadline, 6),
                    "after_kill": after_kill,
                    "text": "",
                }
            )
            self._note_capture(incident, main, expiry.deadline)
        try:
            known = await asyncio.wait_for(asyncio.shield(facts), left())
        except TimeoutError:
            facts.add_done_callback(lambda f: f.cancelled() or f.exception())
            return main, others
        incident.rank, incident.local_rank = known.rank, known.local_rank
        incident.attempt = known.attempt
        incident.command = list(known.command)
        incident.torch_error_file = known.torch_error_file
        files = asyncio.ensure_future(run_blocking(self._write_error_file, incident))
        try:
            wrote = await asyncio.wait_for(asyncio.shield(files), left())
        except TimeoutError:
            # Written later (or never, if the disk is stuck): the kill does not wait.
            logger.warning("torch's error file for pid %d was not written in time", expiry.pid)
            files.add_done_callback(lambda f: f.cancelled() or f.exception())
            return main, others
        if wrote:
            incident.actions.append(
                {"step": "torch error file", "text": f"wrote {incident.torch_error_file}"}
            )
        return main, others

    def _write_error_file(self, incident: Incident) -> bool:
        """Claim the incident's file and write torch's error file.  Blocks: the I/O plane's."""
        if self.recorder is not None:
            try:  # its path goes into torch's error file
                self.recorder.claim(incident)
            except OSError as exc:
                logger.error("cannot write incidents into %s: %s", self.recorder.directory, exc)
        error_file = incident.torch_error_file
        if not error_file or self.observe:
            return False
        return write_torch_error_file(error_file, incident)

    def _note_signals(self, incident: Incident, expiry: Expiry) -> bool:
        """Add the signals sent since last noted to the incident; whether there were any."""
        noted = sum(1 for a in incident.actions if a.get("step") == "signal")
        new = list(zip(expiry.signals_sent, expiry.signal_times, strict=True))[noted:]
        for sig, at in new:
            after = at - expiry.deadline
            if incident.kill_lateness is None:
                incident.kill_lateness = after
            incident.actions.append(
                {
                    "step": "signal",
                    "signal": _signame(sig),
                    "after_deadline": round(after, 6),
                    "text": f"sent {_signame(sig)} {after:.3f}s after the deadline",
                }
            )
        return bool(new)

    async def _record(self, incident: Incident, *, again: bool = False) -> None:
        """Write ``incident`` (in the I/O plane), then report it."""
        if not again:
            self.incidents.append(incident)
        if self.recorder is not None:
            try:
                await run_blocking(self.recorder.write, incident)
            except Exception as exc:  # a full or unwritable disk costs the file, nothing else
                logger.error("cannot write the incident of pid %d: %s", incident.pid, exc)
                if again:
                    return
                incident.path = None  # reported without a file
        if not again and self.on_incident is not None:
            self.on_incident(incident)
        if not again:
            logger.warning(
                "%s%s",
                incident.summary(),
                f"; incident: {incident.path.with_suffix('.txt')}" if incident.path else "",
                extra=EVENT_LOGGED,
            )
