"""Incidents: why a worker hung, captured before it is killed, written where a person finds it.

On an expiry, ``IncidentReaper`` works in steps (the escalation tiers):

1. capture the hung process's stacks (py-spy, or the client's faulthandler
   dump), and, in parallel, the other processes of its job (the culprit is
   often the rank that never joined the collective).  Bounded: the kill is
   never later than ``deadline + dump_timeout``.  Each process is captured
   once per burst, and that capture is copied into every incident that lists
   the process (its own included, even if it finished after the kill), stamped
   with when it was taken relative to that incident's deadline;
2. if the process runs under torchrun (``TORCHELASTIC_ERROR_FILE`` in the
   environment its launcher gave it), write torch's error file, so torchrun's
   "Root Cause" names the expired scope and the hung stack instead of "Signal 9
   received".  Created only where the hung process's own uid could create it
   (see ``write_torch_error_file``);
3. the kill itself (by default ``SignalReaper``: signal, grace, SIGKILL), or
   nothing at all in observe mode;
4. one JSON file per incident, never overwriting another, and a readable
   ``.txt`` beside it, each step and its time in both, and a "likely culprit"
   when exactly one rank is outside the collective the others wait in.

Bounded: a process that expires again in the same scope within
``repeat_window`` (observe mode, a custom reaper that lets it live) is counted
in its first incident (``repeats``), not recorded again; the directory keeps at
most ``max_incidents`` incidents and ``max_incident_bytes`` bytes of them,
removing its own oldest ``incident-*`` files first; ``IncidentReaper.incidents``
keeps only the latest few in memory.

What a worker chose (scopes, thread, file and function names, its command line,
its environment's values) is escaped (``_stacks.printable``) in every line a
person reads: the log, the ``.txt``, torch's error file.  The ``.json`` keeps
the data as it was (JSON escapes it); its display fields (``summary``,
``likely_culprit``, stacks' ``raw`` text, actions' ``text``) are escaped too.
"""

from __future__ import annotations

import asyncio
import collections
import math
import os
import shutil
import signal as _signal
import tempfile
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._clock import Cancellable, Clock, monotonic_to_wall
from ._errorfile import error_file_source, owner_of, try_error_file
from ._events import EVENT_LOGGED, logger
from ._expiry import Expiry, Reaper
from ._incident import Incident, likely_culprit
from ._ioplane import _executor, run_blocking
from ._linux import environ_of, signal_name
from ._reapers import SignalReaper
from ._recorder import DEFAULT_MAX_INCIDENT_BYTES, DEFAULT_MAX_INCIDENTS, IncidentRecorder
from ._stacks import Stacks, capture_stacks, dump_file, find_py_spy
from ._validate import check_seconds

__all__ = ["DEFAULT_DUMP_TIMEOUT", "DEFAULT_REPEAT_WINDOW", "IncidentReaper"]

#: Seconds after a deadline by which the kill goes out, captured or not.  Measured
#: (``py-spy dump --native``, torch 2.13, 2 cores both kept busy, two runs of 20
#: dumps): an idle torch process 0.1-0.8 s, a gloo rank waiting in ``all_reduce``
#: 0.6-1.4 s, both ranks of a 2-rank job at once 0.8-1.9 s (p90 1.4-1.9 s), 3.7 s
#: at worst (docs/incidents.md).  The kill goes out as soon as the capture is in:
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
# Most bytes of a /proc file (cmdline) read: a process controls its own.
_PROC_BYTES = 64 * 1024
#: Seconds after an incident within which the same process expiring again in the same
#: scope is counted in that incident (``repeats``) instead of making another.
DEFAULT_REPEAT_WINDOW = 60.0
# An incident's repeat count is rewritten at most this often (seconds; and at close).
_REWRITE_EVERY = 5.0
# Incidents of one process per window, whatever scopes it names: past them, its
# expiries are counted in its latest incident (a scope per step makes no flood).
_NEW_PER_PROCESS = 8
# (process, scope) pairs remembered for the window (each holds its incident).
_MAX_RECENT = 256
# Incidents kept in memory (``IncidentReaper.incidents``); the rest are on disk.
_KEEP_INCIDENTS = 32


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


def _process_of(expiry: Expiry) -> object:
    """The server's record of ``expiry``'s process: held by a pidfd, it is that process
    whatever its pid later names (an ``Expiry`` built elsewhere: its pid)."""
    return getattr(expiry, "_process", None) or expiry.pid


def _facts(pid: int) -> _Facts:
    env = environ_of(pid)
    return _Facts(
        env.get("RANK"),
        env.get("LOCAL_RANK"),
        tuple(_cmdline(pid)),
        env.get("TORCHELASTIC_ERROR_FILE"),
        env.get("AIOTIMER_RESTART_COUNT") or env.get("TORCHELASTIC_RESTART_COUNT"),
    )


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


class _Recent:
    """A process's incident in one scope, counting its repeats until its window is over."""

    __slots__ = (
        "clock",
        "handle",
        "incident",
        "key",
        "last_write",
        "process",
        "started",
        "written",
    )

    def __init__(
        self, key: tuple[int, str], incident: Incident, process: object, clock: Clock
    ) -> None:
        self.key = key
        self.incident = incident
        #: the server's record of the process (see ``_process_of``)
        self.process = process
        self.clock = clock
        self.started = clock.now()
        #: the repeat count in the incident's files, and when it was last written there
        self.written = 0
        self.last_write = -math.inf
        self.handle: Cancellable | None = None


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

    Bounded outputs: ``repeat_window`` (seconds; 0: off): when the same process
    expires again in the same scope within it (observe mode, or a ``kill`` that
    let it live), the kill still goes out, but nothing is captured and no new
    incident is made: the first one counts it (``repeats``, rewritten at most
    every 5 s); past 8 incidents of one process in a window, any scope counts
    in its latest.  ``max_incidents`` and ``max_incident_bytes``: the
    directory's budget (see ``IncidentRecorder``).
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
        repeat_window: float = DEFAULT_REPEAT_WINDOW,
        max_incidents: int | None = DEFAULT_MAX_INCIDENTS,
        max_incident_bytes: int | None = DEFAULT_MAX_INCIDENT_BYTES,
    ) -> None:
        if kill is not None and not callable(kill):
            raise TypeError(f"`kill` must be a reaper (callable), got {kill!r}")
        self.kill: Reaper = SignalReaper() if kill is None else kill
        self.dump_timeout = check_seconds("dump_timeout", dump_timeout, allow_zero=True)
        self.repeat_window = check_seconds("repeat_window", repeat_window, allow_zero=True)
        self.recorder = (
            None
            if directory is None
            else IncidentRecorder(
                directory, max_incidents=max_incidents, max_bytes=max_incident_bytes
            )
        )
        self.observe = bool(observe)
        self.related = related
        self.dump_dir = None if dump_dir is None else Path(dump_dir)
        self.on_incident = on_incident
        #: the latest incidents recorded (at most 32; every one is on disk), most recent last
        self.incidents: collections.deque[Incident] = collections.deque(maxlen=_KEEP_INCIDENTS)
        self._own_dump_dir = False
        # pid -> its latest capture, shared within a burst (see ``_capture``)
        self._captures: dict[int, _Capture] = {}
        # (pid, scope) -> its incident of the current window, oldest first (see ``_repeat_of``)
        self._recent: collections.OrderedDict[tuple[int, str], _Recent] = collections.OrderedDict()
        # pid -> its incidents of the current window: how many, and the latest
        self._per_pid: dict[int, tuple[int, _Recent]] = {}
        self._rewrites: set[asyncio.Future[None]] = set()

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
        if self.recorder is not None:  # what the incident directory holds: read meanwhile
            _executor().submit(self._preload, self.recorder)
        if self.dump_dir is None:
            self.dump_dir = Path(tempfile.mkdtemp(prefix="aiotimer-dumps-"))
            self._own_dump_dir = True
        return self.dump_dir

    @staticmethod
    def _preload(recorder: IncidentRecorder) -> None:
        try:
            recorder.preload()
        except OSError as exc:  # said again, if it matters, when an incident is written
            logger.debug("cannot read the incident directory %s: %s", recorder.directory, exc)

    def close(self) -> None:
        """Write the repeat counts not written yet (in the I/O plane); remove the dump directory."""
        for recent in self._recent.values():
            self._flush(recent, at_close=True)
        self._recent.clear()
        self._per_pid.clear()
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

    # -- repeats: one incident per process and scope per window ----------------

    def _repeat_of(self, expiry: Expiry) -> _Recent | None:
        """The incident that counts ``expiry`` as a repeat, if any (``None``: it gets its own)."""
        if self.repeat_window <= 0:
            return None
        self._forget(expiry.clock.now())
        pid, process = expiry.pid, _process_of(expiry)
        scopes = expiry.scopes(1)
        recent = self._recent.get((pid, scopes[0] if scopes else ""))
        if recent is not None and recent.process is process:
            return recent
        many = self._per_pid.get(pid)
        if many is not None and many[0] >= _NEW_PER_PROCESS and many[1].process is process:
            return many[1]  # a new scope each time makes no flood either
        return None

    def _remember(self, expiry: Expiry, incident: Incident) -> None:
        """Count the process's next expiries in ``incident`` for ``repeat_window`` seconds."""
        if self.repeat_window <= 0:
            return
        key = (expiry.pid, incident.scopes[0] if incident.scopes else "")
        recent = _Recent(key, incident, _process_of(expiry), expiry.clock)
        old = self._recent.pop(key, None)
        if old is not None:  # the pid names another process now
            self._drop(old)
        self._recent[key] = recent
        many = self._per_pid.get(expiry.pid)
        same = many is not None and many[1].process is recent.process
        self._per_pid[expiry.pid] = ((many[0] if many and same else 0) + 1, recent)
        while len(self._recent) > _MAX_RECENT:
            self._drop(self._recent.popitem(last=False)[1])

    def _forget(self, now: float) -> None:
        """End the windows that are over (oldest first: they all last ``repeat_window``)."""
        while self._recent:
            oldest = next(iter(self._recent.values()))
            if now - oldest.started < self.repeat_window:
                return
            self._recent.popitem(last=False)
            self._drop(oldest)

    def _drop(self, recent: _Recent) -> None:
        """``recent``'s window is over: its count written, itself forgotten."""
        self._flush(recent)
        pid = recent.key[0]
        many = self._per_pid.get(pid)
        if many is None or many[1].process is not recent.process:
            return
        if many[1] is recent or many[0] <= 1:
            del self._per_pid[pid]
        else:
            self._per_pid[pid] = (many[0] - 1, many[1])

    async def _repeat(self, expiry: Expiry, recent: _Recent) -> None:
        """Count ``expiry`` in ``recent``'s incident; kill as ever (unless observing)."""
        incident = recent.incident
        clock = expiry.clock
        incident.repeats += 1
        incident.last_repeat = monotonic_to_wall(clock, clock.now())
        if incident.repeats == 1:
            logger.info(
                "pid %d expired again in %r: counted in its incident of %gs ago%s, "
                "not recorded again (repeat_window %gs)",
                expiry.pid,
                expiry.scopes(1)[0] if expiry.scopes(1) else "",
                clock.now() - recent.started,
                f" ({incident.path.with_suffix('.txt')})" if incident.path else "",
                self.repeat_window,
            )
        self._schedule(recent)
        if self.observe or expiry.exited:
            return
        follow_up = self.kill(expiry)
        if isinstance(follow_up, Awaitable):
            await follow_up

    def _schedule(self, recent: _Recent) -> None:
        """Rewrite ``recent``'s incident with its count now, or once ``_REWRITE_EVERY`` is up."""
        if recent.handle is not None or self.recorder is None:
            return
        delay = recent.last_write + _REWRITE_EVERY - recent.clock.now()
        if delay <= 0:
            self._flush(recent)
        else:
            recent.handle = recent.clock.call_later(delay, lambda: self._flush(recent))

    def _flush(self, recent: _Recent, *, at_close: bool = False) -> None:
        """Rewrite ``recent``'s incident if its count changed (in the I/O plane)."""
        if recent.handle is not None:
            recent.handle.cancel()
            recent.handle = None
        incident = recent.incident
        if self.recorder is None or incident.repeats == recent.written:
            return
        recent.written = incident.repeats
        recent.last_write = recent.clock.now()
        if at_close:  # the loop may stop now: the pool's threads finish it before exit
            _executor().submit(self._rewrite, self.recorder, incident)
            return
        task = asyncio.ensure_future(self._record(incident, again=True))
        self._rewrites.add(task)
        task.add_done_callback(self._rewrites.discard)

    @staticmethod
    def _rewrite(recorder: IncidentRecorder, incident: Incident) -> None:
        try:
            recorder.write(incident)
        except Exception as exc:
            logger.error("cannot write the incident of pid %d: %s", incident.pid, exc)

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
        recent = self._repeat_of(expiry)
        if recent is not None:
            await self._repeat(expiry, recent)
            return
        incident = self._start(expiry)
        self._remember(expiry, incident)
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
        # The child that writes as the process's uid is bounded by the same deadline
        # (a second at least: the wait for it is, and the kill does not wait longer).
        files = asyncio.ensure_future(
            run_blocking(self._write_error_file, incident, expiry.worker_pid, max(left(), 1.0))
        )
        try:
            done = await asyncio.wait_for(asyncio.shield(files), left())
        except TimeoutError:
            # Written later (or never, if the disk is stuck): the kill does not wait.
            logger.warning("torch's error file for pid %d was not written in time", expiry.pid)
            files.add_done_callback(lambda f: f.cancelled() or f.exception())
            return main, others
        if done is not None:
            incident.torch_error_file, text = done
            incident.actions.append({"step": "torch error file", "text": text})
        return main, others

    def _write_error_file(
        self, incident: Incident, worker_pid: int | None, timeout: float
    ) -> tuple[str, str] | None:
        """Claim the incident's file, then write torch's error file: its path, what was done.

        The path is the one the process's launcher set (see
        ``error_file_source``), absolute, and the file is created as the
        process's own uid could (see ``write_torch_error_file``).  ``None``: no
        error file asked for.  Blocks: the I/O plane's.
        """
        if self.recorder is not None:
            try:  # its path goes into torch's error file
                self.recorder.claim(incident)
            except OSError as exc:
                logger.error("cannot write incidents into %s: %s", self.recorder.directory, exc)
        own = incident.torch_error_file
        if self.observe:
            return None
        path, source = error_file_source(incident.pid, worker_pid, own)
        if not path:
            return None
        where = ""
        if source != incident.pid:
            where = f" (where pid {source}'s launcher set it"
            if own and own != path:
                where += f"; pid {incident.pid}'s own environment says {own!r}: not used"
            where += ")"
        owner = owner_of(incident.pid)
        why = "the process is gone" if owner is None else None
        if owner is not None:
            why = try_error_file(path, incident, owner, timeout)
        if why is None:
            return path, f"wrote {path}{where}"
        if why == "exists":
            return path, f"torch's error file {path} exists already (left as it is){where}"
        return path, f"torch's error file {path!r} not written: {why}{where}"

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
                    "signal": signal_name(sig),
                    "after_deadline": round(after, 6),
                    "text": f"sent {signal_name(sig)} {after:.3f}s after the deadline",
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
