"""Process identity: pidfds (so a reused pid is never signalled) and ancestry checks."""

from __future__ import annotations

import errno
import os
import signal as _signal

__all__ = [
    "ProcessGone",
    "descends_from",
    "open_pidfd",
    "parent_pid",
    "pidfd_alive",
    "pidfd_no_wakeup_preemption",
    "pidfd_signal",
    "process_uid",
]

# From <linux/pidfd.h>; kernels before 6.9 reject it with EINVAL.
_PIDFD_SIGNAL_PROCESS_GROUP = 4
_BATCH_PARAM = os.sched_param(0)


class ProcessGone(ProcessLookupError):
    """The process behind a pidfd has exited (and may have been reaped)."""


def open_pidfd(pid: int) -> int:
    """Open a pidfd for ``pid`` (close-on-exec).  Raises ``ProcessGone`` if it is gone."""
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        raise ProcessGone(f"process {pid} does not exist") from None


def pidfd_alive(pidfd: int) -> bool:
    """Whether the process behind ``pidfd`` has not exited yet."""
    try:
        _signal.pidfd_send_signal(pidfd, 0)
    except ProcessLookupError:
        return False
    return True


def pidfd_signal(pidfd: int, pid: int, sig: int, *, group: bool = False) -> None:
    """Send ``sig`` through ``pidfd``; with ``group``, to the process group it leads.

    Raises ``ProcessGone`` when the process has exited.  A group signal goes
    through the pidfd where the kernel allows it (6.9+); otherwise the pidfd first
    proves that ``pid`` is still this process, so its group id is still its own.
    """
    try:
        if not group:
            _signal.pidfd_send_signal(pidfd, sig)
            return
        try:
            _signal.pidfd_send_signal(pidfd, sig, None, _PIDFD_SIGNAL_PROCESS_GROUP)
            return
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
        _signal.pidfd_send_signal(pidfd, 0)
        os.killpg(os.getpgid(pid), sig)
    except ProcessLookupError:
        raise ProcessGone(f"process {pid} has exited") from None


def pidfd_no_wakeup_preemption(pidfd: int, pid: int) -> bool:
    """Move the process behind ``pidfd`` to SCHED_BATCH; whether that worked.

    A SCHED_BATCH task keeps its share of the CPU but, when woken, does not
    preempt the running one.  Before a burst of kills this keeps the first
    victims' exits from preempting the process that is signalling the rest.
    Unprivileged, and harmless to a process about to die.

    ``sched_setscheduler`` takes a pid, not a pidfd.  The kill path needs no
    extra syscall to make that safe: it signals through ``pidfd`` right after,
    and a pid is reused only once its process has been reaped, so a process
    that the pidfd still reaches then was the one changed.
    """
    if pidfd < 0:
        return False
    try:
        os.sched_setscheduler(pid, os.SCHED_BATCH, _BATCH_PARAM)
    except OSError:
        return False
    return True


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    # The command name may hold spaces and parentheses: split after the last ')'.
    return raw[raw.rindex(b")") + 2 :].decode().split()


def parent_pid(pid: int) -> int | None:
    """Parent of ``pid`` from /proc, or ``None`` if ``pid`` is gone."""
    try:
        return int(_stat_fields(pid)[1])
    except (OSError, ValueError, IndexError):
        return None


def process_uid(pid: int) -> int | None:
    """Real uid of ``pid``, or ``None`` if it is gone."""
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def descends_from(pid: int, ancestors: set[int] | frozenset[int]) -> bool:
    """Whether ``pid`` is one of ``ancestors`` or a descendant of one of them."""
    seen = 0
    current: int | None = pid
    while current is not None and current > 0 and seen < 4096:
        if current in ancestors:
            return True
        if current == 1:
            return False
        current = parent_pid(current)
        seen += 1
    return False
