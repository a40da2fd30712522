"""The processes a server watches, and who may arm a timer that kills which of them.

``ProcessRegistry`` is the one place a process is known: by pid (the live
process with that pid) and by id (what heap entries name as their owner).  A
process is held by a pidfd, so its pid cannot be reused under us, and its exit
is seen on the loop (a pidfd turns readable) with no thread and no polling; an
exited process is forgotten here, in one place.

Entitlement: a request names a pid.  Before the first timer for a pid is
armed, the channel it arrived on says whether its senders may name that pid
(``Applicant.entitled``); the rules it draws on are the functions below.
"""

from __future__ import annotations

import asyncio
import math
import os
import resource
from collections.abc import Callable, Iterator
from typing import Protocol

from ._linux import (
    ProcessGone,
    descends_from,
    has_exited,
    monotonic_offset,
    open_pidfd,
    pidfd_alive,
    pidfd_signal,
    process_uid,
)

# Where this process's own time namespace puts CLOCK_MONOTONIC (0 in the initial one).
_OWN_OFFSET = monotonic_offset()

__all__ = [
    "TREE_RESERVE",
    "Applicant",
    "ProcessRegistry",
    "SpawnedTree",
    "WatchedProcess",
    "descendant_of",
    "foreign_descendant_of",
]


# -- entitlement rules ---------------------------------------------------------


def descendant_of(pid: int, roots: frozenset[int]) -> str | None:
    """``None`` if ``pid`` is this user's and is, or descends from, one of ``roots``."""
    uid = process_uid(pid)
    if uid is None:
        return f"pid {pid} does not exist"
    if uid != os.getuid():
        return f"pid {pid} belongs to uid {uid}, not to this server's uid {os.getuid()}"
    if not descends_from(pid, roots):
        if has_exited(pid):  # an exiting process is re-parented: its ancestry says nothing
            return f"pid {pid} has exited: it does not exist"
        names = ", ".join(str(r) for r in sorted(roots))
        return f"pid {pid} does not descend from the server or a configured root ({names})"
    return None


def foreign_descendant_of(pid: int, roots: frozenset[int]) -> str | None:
    """For requests from other processes (FIFO, queue): as above, and never the server."""
    if pid == os.getpid():
        return f"pid {pid} is the timer server itself"
    return descendant_of(pid, roots)


class SpawnedTree:
    """A process the server spawned, as the core knows it: the root of a process tree.

    Its ``reaper`` (``None``: the server's) and ``process_group`` apply to the
    expiries of the root and of its descendants.  ``expired_scopes`` and
    ``killed_by_watchdog`` are the one record of what the watchdog did to the
    root itself; the killer writes them, a launcher reads them (``Worker``
    shows them).  The core knows no more of a launcher's workers than this.
    """

    __slots__ = ("expired_scopes", "killed_by_watchdog", "pid", "process_group", "reaper")

    def __init__(
        self, pid: int, reaper: Callable[..., object] | None = None, process_group: bool = False
    ) -> None:
        self.pid = pid
        self.reaper = reaper
        self.process_group = process_group
        #: scopes of the root's expired timers, in the order they expired
        #: (at most the first 100 of each expiry)
        self.expired_scopes: list[str] = []
        #: whether the watchdog signalled the root
        self.killed_by_watchdog = False

    def __repr__(self) -> str:
        return f"<SpawnedTree pid={self.pid}>"


class Applicant(Protocol):
    """What admission needs of a channel: its id, its spawned tree (if any), its rules."""

    @property
    def id(self) -> int:
        """The channel's id, unique in this process."""

    @property
    def spawned(self) -> SpawnedTree | None:
        """The spawned process whose pipe this is, if any."""

    def entitled(self, pid: int) -> str | None:
        """``None`` if requests on this channel may name ``pid``, else the reason not."""

    def tree_of(self, pid: int) -> int:
        """The worker tree ``pid`` belongs to (a spawned worker's pid, or a root's child)."""


# -- watched processes -----------------------------------------------------------


class WatchedProcess:
    """A process known to the server, held by a pidfd so its pid cannot be reused under us."""

    __slots__ = (
        "_exit_future",
        "_loop",
        "_on_exit",
        "channels",
        "clock_exact",
        "clock_offset",
        "dump_signal",
        "exited",
        "id",
        "pid",
        "pidfd",
        "reaping",
        "returncode",
        "spawned",
        "tree",
    )

    def __init__(
        self,
        process_id: int,
        pid: int,
        pidfd: int,
        loop: asyncio.AbstractEventLoop,
        on_exit: Callable[[WatchedProcess], None],
        spawned: SpawnedTree | None,
    ) -> None:
        self.id = process_id
        self.pid = pid
        self.pidfd = pidfd
        #: the spawned process it is, or descends from (its pipe's), if any
        self.spawned = spawned
        #: the worker tree it is counted in, for fair shares (see ``ProcessRegistry``)
        self.tree = spawned.pid if spawned is not None else pid
        self.exited = False
        #: a reaper is at work on it: further expiries do not call another
        self.reaping = False
        #: the signal on which it said it dumps its stacks (0: it did not say)
        self.dump_signal = 0
        #: ids of the channels it was admitted on
        self.channels: set[int] = set()
        #: the server's monotonic clock minus this process's: read from the kernel
        #: (``clock_exact``), or else the smallest ``receipt - sent`` seen (never too small)
        self.clock_offset = math.inf
        self.clock_exact = False
        theirs = monotonic_offset(pid)
        if theirs is not None and _OWN_OFFSET is not None:
            self.clock_offset = _OWN_OFFSET - theirs
            self.clock_exact = True
        #: exit status, for a child of the server whose status could be read
        self.returncode: int | None = None
        self._loop = loop
        self._on_exit = on_exit
        self._exit_future: asyncio.Future[None] | None = None
        loop.add_reader(pidfd, self._exited)

    def __repr__(self) -> str:
        state = "exited" if self.exited else ("reaping" if self.reaping else "running")
        return f"<WatchedProcess pid={self.pid} {state}>"

    def _exited(self) -> None:
        if self.exited:
            return
        self.exited = True
        self.returncode = _exit_status(self.pidfd)
        self.close()
        if self._exit_future is not None and not self._exit_future.done():
            self._exit_future.set_result(None)
        self._on_exit(self)

    def gone(self) -> bool:
        """Whether it has exited, asking the kernel rather than waiting for the loop to say so."""
        if self.exited:
            return True
        if pidfd_alive(self.pidfd):
            return False
        self._exited()
        return True

    def close(self) -> None:
        """Stop watching and close the pidfd (on exit, and when the server closes)."""
        if self.pidfd >= 0:
            self._loop.remove_reader(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = -1

    def send_signal(self, sig: int, *, group: bool = False) -> None:
        """Signal this very process (or its group) via its pidfd; ``ProcessGone`` if exited."""
        if self.pidfd < 0:
            raise ProcessGone(f"process {self.pid} has exited")
        pidfd_signal(self.pidfd, self.pid, sig, group=group)

    def exit_future(self) -> asyncio.Future[None]:
        """A future that is done once the process has exited (shared: never cancel it)."""
        if self._exit_future is None:
            self._exit_future = self._loop.create_future()
            if self.exited:
                self._exit_future.set_result(None)
        return self._exit_future


def _exit_status(pidfd: int) -> int | None:
    """The exit status of our child behind ``pidfd``, left for its waiter to reap; or ``None``."""
    try:
        result = os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except (ChildProcessError, OSError):  # not our child, or already reaped
        return None
    if result is None:
        return None
    if result.si_code == os.CLD_EXITED:
        return result.si_status
    return -result.si_status


#: Admissions every worker tree may have, whatever the others took.
TREE_RESERVE = 16


class ProcessRegistry:
    """Every process the server watches, by pid and by id; admission of new ones.

    ``on_exit(process)`` is called once for each watched process that exits,
    after it has been forgotten here.

    Fair shares: each watched process holds a pidfd, and admissions stop at half
    the fd limit (``fd_budget``).  That budget is shared among worker trees (a
    spawned worker and its descendants; for the FIFO and the queue, a root's
    child and its descendants): a tree may hold at most
    ``fd_budget // (trees + 1)`` processes (``trees``: those holding any; the
    ``+ 1`` keeps room for one more), and never fewer than ``TREE_RESERVE``.
    So one worker whose children flood admissions cannot take every other
    worker's: its requests over its share are rejected, theirs still admitted.
    """

    __slots__ = (
        "_fd_budget",
        "_ids",
        "_loop",
        "_on_exit",
        "_per_channel",
        "_per_tree",
        "by_id",
        "by_pid",
        "max_per_channel",
    )

    def __init__(
        self, on_exit: Callable[[WatchedProcess], None], *, max_per_channel: int | None = None
    ) -> None:
        #: pid -> the live process with that pid
        self.by_pid: dict[int, WatchedProcess] = {}
        #: id -> process, for the owners of heap entries
        self.by_id: dict[int, WatchedProcess] = {}
        #: most processes one channel may have admitted at once (``None``: no cap)
        self.max_per_channel = max_per_channel
        self._per_channel: dict[int, int] = {}
        self._per_tree: dict[int, int] = {}  # tree -> processes watched in it
        self._on_exit = on_exit
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ids = iter(range(1, 2**63))
        # Each watched process holds a pidfd.  Requests may admit processes only
        # while half the fd table is left for everything else: a flood of
        # admissions must never make the next spawn() fail with EMFILE.
        self._fd_budget = max(64, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 2)

    def __len__(self) -> int:
        return len(self.by_id)

    def __iter__(self) -> Iterator[WatchedProcess]:
        return iter(list(self.by_id.values()))

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Watch exits on ``loop`` from now on."""
        self._loop = loop

    def watch(
        self,
        pid: int,
        *,
        spawned: SpawnedTree | None = None,
        pidfd: int | None = None,
        tree: int | None = None,
    ) -> WatchedProcess:
        """Start watching ``pid`` (a process the server spawned, say); ``ProcessGone`` if gone."""
        assert self._loop is not None, "the registry is not bound to a loop"
        fd = open_pidfd(pid) if pidfd is None else pidfd
        process = WatchedProcess(next(self._ids), pid, fd, self._loop, self._forget, spawned)
        if tree is not None:
            process.tree = tree
        self.by_pid[pid] = process
        self.by_id[process.id] = process
        self._per_tree[process.tree] = self._per_tree.get(process.tree, 0) + 1
        return process

    def tree_share(self) -> int:
        """How many processes a worker tree already watched may hold now (class docstring)."""
        return max(TREE_RESERVE, self._fd_budget // (len(self._per_tree) + 1))

    def admit(
        self,
        applicant: Applicant,
        pid: int,
        *,
        revalidate: bool = False,
        pidfd: int | None = None,
    ) -> WatchedProcess | str:
        """The process ``pid`` names, if ``applicant`` may arm timers for it; else why not.

        With ``revalidate``, a known process is first asked whether it is still
        alive, so that a request from a new process that reused an exited
        one's pid is never attached to the exited one.  ``pidfd``: the process,
        held already (a socket peer's, from the kernel); taken over: kept for
        the process if it is admitted and new, else closed.
        """
        if pidfd is None:
            return self._admit(applicant, pid, revalidate, None)
        try:
            admitted = self._admit(applicant, pid, revalidate, pidfd)
        except BaseException:
            os.close(pidfd)
            raise
        if isinstance(admitted, str) or admitted.pidfd != pidfd:
            os.close(pidfd)
        return admitted

    def _admit(
        self, applicant: Applicant, pid: int, revalidate: bool, given: int | None
    ) -> WatchedProcess | str:
        known = self.by_pid.get(pid)
        if known is not None and (known.exited or (revalidate and known.gone())):
            known = None
        cid = applicant.id
        if known is not None and cid in known.channels:
            return known
        admitted = self._per_channel.get(cid, 0)
        if self.max_per_channel is not None and admitted >= self.max_per_channel:
            return (
                f"the channel already watches {admitted} processes, its cap "
                f"(max_processes_per_channel={self.max_per_channel})"
            )
        if known is not None:
            reason = applicant.entitled(pid)
            if reason is not None:
                return reason
            self.attach(known, cid)
            return known
        if len(self.by_id) >= self._fd_budget:
            return (
                f"already {len(self.by_id)} processes watched, half of this process's file "
                f"descriptor limit; raise RLIMIT_NOFILE to watch more"
            )
        grove = applicant.tree_of(pid)
        held = self._per_tree.get(grove, 0)
        trees = len(self._per_tree) + (0 if held else 1)  # counting this one
        share = max(TREE_RESERVE, self._fd_budget // (trees + 1))
        if held >= share:
            return (
                f"worker tree {grove} already watches {held} processes, its fair share "
                f"(half the fd limit, {self._fd_budget}, shared among {trees} trees and one more)"
            )
        # Hold the process by a pidfd before checking who it is: if the pid is
        # reused after the check, the pidfd shows the old process gone.
        if given is not None:
            pidfd = given
        else:
            try:
                pidfd = open_pidfd(pid)
            except ProcessGone:
                return f"pid {pid} does not exist"
            except OSError as exc:
                return f"pid {pid} cannot be watched: {exc}"
        reason = applicant.entitled(pid)
        if reason is None and not pidfd_alive(pidfd):
            reason = f"pid {pid} exited while it was checked"
        if reason is not None:
            if given is None:
                os.close(pidfd)
            return reason
        process = self.watch(pid, spawned=applicant.spawned, pidfd=pidfd, tree=grove)
        self.attach(process, cid)
        return process

    def attach(self, process: WatchedProcess, cid: int) -> None:
        """Record that ``process`` was admitted on channel ``cid``."""
        process.channels.add(cid)
        self._per_channel[cid] = self._per_channel.get(cid, 0) + 1

    def channel_closed(self, cid: int) -> None:
        """Channel ``cid`` will send nothing more: it no longer counts against any process."""
        self._per_channel.pop(cid, None)
        for process in self.by_id.values():
            process.channels.discard(cid)

    def _forget(self, process: WatchedProcess) -> None:
        if self.by_pid.get(process.pid) is process:
            del self.by_pid[process.pid]
        if self.by_id.pop(process.id, None) is None:
            return
        in_tree = self._per_tree.get(process.tree, 0) - 1
        if in_tree > 0:
            self._per_tree[process.tree] = in_tree
        else:
            self._per_tree.pop(process.tree, None)
        for cid in process.channels:
            left = self._per_channel.get(cid)
            if left is not None:
                self._per_channel[cid] = left - 1
        self._on_exit(process)

    def close(self) -> None:
        """Stop watching every process (the server is closing)."""
        for process in list(self.by_id.values()):
            process.close()
        self.by_pid.clear()
        self.by_id.clear()
        self._per_tree.clear()
