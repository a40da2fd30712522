"""An event log for machines: every event as one JSON object per line, flushed as written.

``JsonEventLog(path)`` is a ``log_event(name, info)`` hook (``TimerServer(log_event=...)``)
and, through ``subscribe``, a typed-event subscriber.  Each line holds the time,
the event's name (torch's names plus aiotimer's) and its fields, with the
common ones under fixed keys: ``pid``, ``rank`` (when known), ``scope``,
``lateness`` (seconds after the deadline), ``signal`` (its name), ``incident``
(the incident file's path).
"""

from __future__ import annotations

import datetime
import json
import os
import signal as _signal
import threading
import time
from collections.abc import Callable, Mapping
from typing import IO

from ._events import Event, EventBus
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


class JsonEventLog:
    """Appends every event to ``path`` (or writes to ``stream``) as a JSON line, flushed.

    ``rank_of(pid)`` says a process's rank; by default the ``RANK`` in its
    environment (read once per process, while it is alive).
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        stream: IO[str] | None = None,
        rank_of: Callable[[int], str | None] | None = None,
    ) -> None:
        if (path is None) == (stream is None):
            raise ValueError("give `path` or `stream`, exactly one of them")
        self.path = None if path is None else os.fspath(path)
        self._stream: IO[str] = (
            stream
            if stream is not None
            else open(  # noqa: SIM115
                self.path,  # type: ignore[arg-type]
                "a",
                buffering=1,
            )
        )
        self._owns = stream is None
        self._rank_of = rank_of or self._rank_from_environ
        self._ranks: dict[int, str | None] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"JsonEventLog({self.path!r})"

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
        """Log one event (the ``log_event(name, info)`` hook)."""
        record: dict[str, object] = {
            "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds"),
            "unix_time": time.time(),
            "event": name,
        }
        pid = info.get("pid")
        if isinstance(pid, int):
            record["pid"] = pid
            worker = info.get("worker_pid")
            rank = self._rank_of(worker if isinstance(worker, int) else pid)
            if rank is not None:
                record["rank"] = rank
        if "scope" in info:
            record["scope"] = info["scope"]
        elif isinstance(info.get("scopes"), list) and info["scopes"]:
            record["scope"] = info["scopes"][0]  # type: ignore[index]
        for key in ("lag", "latency"):
            if isinstance(info.get(key), float):
                record["lateness"] = info[key]
                break
        if "signal" in info:
            record["signal"] = _signame(info["signal"])
        if info.get("path"):
            record["incident"] = info["path"]
        for key, value in info.items():
            if key not in record and key not in ("worker",):
                record[key] = _plain(value)
        line = json.dumps(record, default=repr) + "\n"
        with self._lock:
            self._stream.write(line)
            self._stream.flush()

    def close(self) -> None:
        """Close the file (if this log opened it)."""
        if self._owns and not self._stream.closed:
            self._stream.close()
