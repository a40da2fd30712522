"""An event log for machines: every event as one JSON object per line, flushed as written.

Written by a thread of its own (``_ioplane.Sink``): the watchdog's loop only queues.
``JsonEventLog(path)`` is a ``log_event(name, info)`` hook (``TimerServer(log_event=...)``)
and, through ``subscribe``, a typed-event subscriber.  Each line holds the time,
the event's name (torch's names plus aiotimer's) and its fields, with the
common ones under fixed keys: ``pid``, ``rank`` (when known), ``scope``,
``lateness`` (seconds after the deadline), ``deadline`` (wall-clock, ISO 8601,
as ``time``; ``deadline_monotonic`` keeps the server clock's reading),
``signal`` (its name), ``incident`` (the incident file's path).
"""

from __future__ import annotations

import datetime
import json
import os
import signal as _signal
import time
from collections.abc import Callable, Mapping
from typing import IO

from ._clock import Clock, SystemClock, monotonic_to_wall
from ._events import Event, EventBus
from ._ioplane import DEFAULT_BUDGET, FileSink, Sink
from ._linux import environ_of

__all__ = ["JsonEventLog"]


def _signame(sig: object) -> object:
    if isinstance(sig, int) and sig > 0:
        try:
            return _signal.Signals(sig).name
        except ValueError:
            return sig
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
    wall-clock time.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        stream: IO[str] | None = None,
        rank_of: Callable[[int], str | None] | None = None,
        budget: int = DEFAULT_BUDGET,
        clock: Clock | None = None,
    ) -> None:
        if (path is None) == (stream is None):
            raise ValueError("give `path` or `stream`, exactly one of them")
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
        self._sink.submit(lambda: self._write(record, whose), _EVENT_BYTES)

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
        """Wait up to ``timeout`` seconds for queued lines to be written; whether they were."""
        return self._sink.flush(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (for up to ``timeout`` seconds), then close the file if ours."""
        self._sink.close(timeout)
