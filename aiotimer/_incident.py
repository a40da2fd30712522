"""An incident: what happened to one hung process, and how a person reads it.

The model (``Incident``: its facts, the steps taken, the stacks) and its
renderings (the one-line summary, the ``.txt``, the "likely culprit").
What a worker chose is escaped in every line a person reads (``_stacks.printable``).
"""

from __future__ import annotations

import datetime
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ._stacks import Stacks, printable

__all__ = ["Incident", "iso_time", "likely_culprit"]

# Python files whose frames are a collective (the innermost one names it).
_COLLECTIVE_FILES = ("torch/distributed/distributed_c10d.py",)


def iso_time(wall: float) -> str:
    moment = datetime.datetime.fromtimestamp(wall, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


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
    return printable(
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
    #: how many more times the process expired in the same scope within the repeat
    #: window, counted here instead of recorded one by one
    repeats: int = 0
    #: wall-clock seconds: the last of those repeats
    last_repeat: float | None = None

    def summary(self) -> str:
        """One line: who hung where (what the worker chose is escaped)."""
        who = f"rank {self.rank} (pid {self.pid})" if self.rank is not None else f"pid {self.pid}"
        scopes = ", ".join(repr(s) for s in self.scopes[:3]) + (
            " ..." if len(self.scopes) > 3 else ""
        )
        top = self.stacks.top() if self.stacks is not None else None
        where = f" in {top.function} ({top.file}:{top.line})" if top is not None else ""
        return printable(f"{who} hung in {scopes}{where}")

    def to_dict(self) -> dict[str, object]:
        """The incident as plain data (its JSON file)."""
        return {
            "time": iso_time(self.time),
            "unix_time": self.time,
            "host": self.host,
            "pid": self.pid,
            "rank": self.rank,
            "local_rank": self.local_rank,
            "attempt": self.attempt,
            "worker_pid": self.worker_pid,
            "command": self.command,
            "scopes": self.scopes,
            "deadline": iso_time(self.deadline),
            "lateness": self.lateness,
            "observe": self.observe,
            "actions": self.actions,
            "kill_lateness": self.kill_lateness,
            "torch_error_file": self.torch_error_file,
            "stacks": None if self.stacks is None else self.stacks.to_dict(),
            "stacks_taken": self.stacks_taken,
            "others": self.others,
            "likely_culprit": self.likely_culprit,
            "repeats": self.repeats,
            "last_repeat": None if self.last_repeat is None else iso_time(self.last_repeat),
            "summary": self.summary(),
        }

    def text(self) -> str:
        """The incident for a person to read: its lines are ours, the rest is escaped."""
        lines = [
            f"aiotimer incident at {iso_time(self.time)} on {self.host}",
            f"  {self.summary()}",
        ]
        if self.likely_culprit:
            lines.append(f"  likely culprit: {self.likely_culprit}")
        if self.attempt is not None:
            lines.append(f"  attempt: {self.attempt}")
        lines += [
            f"  command: {' '.join(self.command) or '?'}",
            f"  expired: {', '.join(repr(s) for s in self.scopes)} "
            f"(deadline {iso_time(self.deadline)}, handled {self.lateness * 1e3:.2f} ms after it)",
            "  what was done:",
        ]
        for action in self.actions:
            lines.append(f"    - {action.get('text', action)}")
        if self.repeats:
            last = f", the last at {iso_time(self.last_repeat)}" if self.last_repeat else ""
            lines.append(
                f"  repeats: it expired {self.repeats} more time{'s' if self.repeats > 1 else ''}"
                f"{last} (counted here, not recorded one by one)"
            )
        if self.stacks is not None:
            how = ", ".join(filter(None, [self.stacks.method, _taken_text(self.stacks_taken)]))
            lines.append(f"stacks of pid {self.pid} ({how or 'none'}):")
            lines += (self.stacks.raw.rstrip() or f"  (none: {self.stacks.reason})").split("\n")
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
            lines += (str(raw).rstrip() if raw else f"  (none: {reason})").split("\n")
        # One element, one line: a newline inside one came from a worker, and is escaped.
        return "\n".join(map(printable, lines)) + "\n"
