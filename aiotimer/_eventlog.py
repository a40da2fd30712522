"""An event log for machines: every event as one JSON object per line, flushed as written.

Written by a thread of its own (``_ioplane.Sink``): the watchdog's loop only queues.
``JsonEventLog(path)`` is a ``log_event(name, info)`` hook (``TimerServer(log_event=...)``)
and, through ``subscribe``, a typed-event subscriber.  Each line holds the time,
the event's name (torch's names plus aiotimer's) and its fields, with the
common ones under fixed keys: ``pid``, ``rank`` (when known), ``scope``,
``lateness`` (seconds after the deadline), ``deadline`` (wall-clock, ISO 8601,
as ``time``; ``deadline_monotonic`` keeps the server clock's reading),
``signal`` (its name), ``incident`` (the incident file's path).

Bounded: a process expiring again and again in one scope (report-only requests,
torch's ``signal: 0`` with a deadline already past; observe mode) makes one
"timer expired" line per ``repeat_window`` seconds, not one per expiry: the
first is written as it comes, the repeats within the window are counted, and
one line stands for them when the window is over (the next event after it, or
"watchdog stopped", ``flush()``, ``close()``): the last repeat's fields with ``count`` (how many
expiries it stands for) and ``since`` (when the first of them came).  Scopes
are written as the worker sent them (JSON escapes them).
"""

from __future__ import annotations

import collections
import datetime
import json
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import IO

from ._clock import Clock, SystemClock, monotonic_to_wall
from ._events import TIMER_EXPIRED, WATCHDOG_STOPPED, Event, EventBus
from ._ioplane import DEFAULT_BUDGET, FileSink, Sink
from ._linux import environ_of, signal_name
from ._validate import check_seconds

__all__ = ["DEFAULT_REPEAT_WINDOW", "JsonEventLog"]

#: Seconds within which a process's repeated expiries in one scope make one line.
DEFAULT_REPEAT_WINDOW = 10.0
# (pid, scope) pairs counted at once; past it, the oldest window is closed early.
_MAX_WINDOWS = 4096


def _signame(sig: object) -> object:
    """A signal's name for the log; a number Python has no name for stays a number."""
    if isinstance(sig, int) and sig > 0:
        name = signal_name(sig)
        return sig if name == str(sig) else name
    return sig


def _plain(value: object) -> object:
    """``value`` as JSON can hold it (objects that are not data become their ``repr``)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return repr(value)


def _iso(wall: float) -> str:
    """``wall`` (seconds since the epoch) in ISO 8601, UTC, to the microsecond."""
    moment = datetime.datetime.fromtimestamp(wall, datetime.UTC)
    return moment.isoformat(timespec="microseconds")


# What one event is taken to weigh against the writer's budget (most lines are shorter).
_EVENT_BYTES = 512


class _Window:
    """One (pid, scope)'s expiries since its last line: how many, the first's time, the last."""

    __slots__ = ("count", "last", "since", "started", "whose")

    def __init__(self, started: float) -> None:
        self.started = started
        self.count = 0
        self.since: object = None
        self.last: dict[str, object] | None = None
        self.whose: int | None = None


class JsonEventLog:
    """Appends every event to ``path`` (or writes to ``stream``) as a JSON line, flushed.

    Lines are written by a writer thread of its own (the I/O plane): a slow
    disk, or a FIFO nobody reads, never holds the watchdog's loop; when the
    writer falls ``budget`` bytes behind, events are dropped, counted
    (``dropped``) and warned about.  ``flush()`` waits for what is queued.
    ``rank_of(pid)`` says a process's rank (called on the loop: it must not
    block); by default the ``RANK`` in its environment, read once per process
    in the writer thread.  ``clock``: the server's (deadlines are on its
    monotonic time line; default the system clock), to write them as
    wall-clock time, and to time ``repeat_window`` (seconds; 0: every expiry
    its own line): a process's repeated expiries in one scope within it make
    one line with a ``count`` (see the module's docstring).
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        stream: IO[str] | None = None,
        rank_of: Callable[[int], str | None] | None = None,
        budget: int = DEFAULT_BUDGET,
        clock: Clock | None = None,
        repeat_window: float = DEFAULT_REPEAT_WINDOW,
    ) -> None:
        if (path is None) == (stream is None):
            raise ValueError("give `path` or `stream`, exactly one of them")
        self.repeat_window = check_seconds("repeat_window", repeat_window, allow_zero=True)
        # (pid, scope) -> its window, oldest first (every window lasts as long)
        self._windows: collections.OrderedDict[tuple[int, str], _Window] = collections.OrderedDict()
        self._counting = threading.Lock()
        self.path = None if path is None else os.path.abspath(os.fspath(path))
        if self.path is not None and not os.path.isdir(os.path.dirname(self.path)):
            raise ValueError(f"`path` {self.path!r}: its directory does not exist")
        self._stream = stream
        self._rank_of = rank_of
        self._clock: Clock = SystemClock() if clock is None else clock
        self._ranks: dict[int, str | None] = {}  # the writer thread's alone
        if self.path is not None:
            self._files: FileSink | None = FileSink(f"event log {self.path}", budget=budget)
            self._sink: Sink = self._files
        else:
            self._files = None
            self._sink = Sink("event log", budget=budget)

    def __repr__(self) -> str:
        return f"JsonEventLog({self.path!r})"

    @property
    def dropped(self) -> int:
        """Events dropped because the writer fell too far behind."""
        return self._sink.dropped_jobs

    def _rank_from_environ(self, pid: int) -> str | None:
        if pid not in self._ranks:
            self._ranks[pid] = environ_of(pid).get("RANK")
        return self._ranks[pid]

    def subscribe(self, events: EventBus) -> None:
        """Log every event of ``events`` (a ``TimerServer``'s ``events``)."""
        events.subscribe(self.log)

    def log(self, event: Event) -> None:
        """Log a typed event."""
        self(event.name, event.info())

    def __call__(self, name: str, info: Mapping[str, object]) -> None:
        """Log one event (the ``log_event(name, info)`` hook); never blocks."""
        record: dict[str, object] = {
            "time": _iso(time.time()),
            "unix_time": time.time(),
            "event": name,
        }
        whose: int | None = None
        pid = info.get("pid")
        if isinstance(pid, int):
            record["pid"] = pid
            worker = info.get("worker_pid")
            whose = worker if isinstance(worker, int) else pid
            if self._rank_of is not None:
                rank = self._rank_of(whose)
                if rank is not None:
                    record["rank"] = rank
                whose = None
        if "scope" in info:
            record["scope"] = info["scope"]
        elif isinstance(info.get("scopes"), list) and info["scopes"]:
            record["scope"] = info["scopes"][0]  # type: ignore[index]
        for key in ("lag", "latency"):
            if isinstance(info.get(key), float):
                record["lateness"] = info[key]
                break
        deadline = info.get("deadline")
        if isinstance(deadline, float):  # on the server's monotonic clock: as `time` is
            record["deadline"] = _iso(monotonic_to_wall(self._clock, deadline))
            record["deadline_monotonic"] = deadline
        if "signal" in info:
            record["signal"] = _signame(info["signal"])
        if info.get("path"):
            record["incident"] = info["path"]
        for key, value in info.items():
            if key not in record and key not in ("worker",):
                record[key] = _plain(value)
        if self.repeat_window > 0:
            with self._counting:
                self._close_windows(self._clock.now(), every=name == WATCHDOG_STOPPED)
                if name == TIMER_EXPIRED and self._counted(record, whose):
                    return
        self._submit(record, whose)

    def _submit(self, record: dict[str, object], whose: int | None) -> None:
        self._sink.submit(lambda: self._write(record, whose), _EVENT_BYTES)

    def _counted(self, record: dict[str, object], whose: int | None) -> bool:
        """Whether ``record`` (an expiry) is a repeat, counted in its window.  Locked."""
        pid, scope = record.get("pid"), record.get("scope")
        if not isinstance(pid, int) or not isinstance(scope, str):
            return False
        key = (pid, scope)
        window = self._windows.get(key)
        if window is None:  # the first: written now, its repeats counted from here
            self._windows[key] = _Window(self._clock.now())
            while len(self._windows) > _MAX_WINDOWS:
                self._end(*self._windows.popitem(last=False), restart=False)
            return False
        if not window.count:
            window.since = record["time"]
        window.count += 1
        window.last, window.whose = record, whose
        return True

    def _close_windows(self, now: float, *, every: bool = False) -> None:
        """Write a line for each window that is over (``every``: for all).  Locked."""
        while self._windows:
            key, window = next(iter(self._windows.items()))
            if not every and now - window.started < self.repeat_window:
                return
            del self._windows[key]
            self._end(key, window, restart=not every, now=now)

    def _end(
        self, key: tuple[int, str], window: _Window, *, restart: bool, now: float = 0.0
    ) -> None:
        """Write the line that stands for ``window``'s repeats; a flood goes on counting."""
        if not window.count or window.last is None:
            return
        line = dict(window.last, count=window.count, since=window.since)
        self._submit(line, window.whose)
        if restart:  # still coming: the next window counts from now, one line each
            self._windows[key] = _Window(now)

    def _write(self, record: dict[str, object], whose: int | None) -> None:
        """In the writer thread: the rank from ``/proc`` if needed, then the line."""
        if whose is not None:
            rank = self._rank_from_environ(whose)
            if rank is not None:
                record["rank"] = rank
        line = json.dumps(record, default=repr) + "\n"
        if self._files is not None:
            assert self.path is not None
            self._files._append(self.path, line.encode())
        else:
            assert self._stream is not None
            self._stream.write(line)
            self._stream.flush()

    def flush(self, timeout: float = 5.0) -> bool:
        """Write the repeats counted so far, then wait up to ``timeout`` seconds for queued
        lines to be written; whether they were."""
        self._close_all()
        return self._sink.flush(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (for up to ``timeout`` seconds), then close the file if ours."""
        self._close_all()
        self._sink.close(timeout)

    def _close_all(self) -> None:
        with self._counting:
            self._close_windows(self._clock.now(), every=True)
