"""What aiotimer asks of Linux: pidfds, /proc ancestry, scheduling, timerfds, inotify, prctl.

Process identity goes through pidfds, so a reused pid is never signalled.  A
timerfd is a one-shot CLOCK_MONOTONIC alarm that a loop watches like any fd: a
loop's own timers are only millisecond-accurate (epoll's timeout is in whole
milliseconds, libuv's clock ticks in them), a timerfd armed at an absolute time
goes off at it to within the kernel's timer slack.  ``os.timerfd_create``
exists from Python 3.13; before that the same libc calls are reached through
ctypes, and where neither works ``timerfd_create`` returns -1 and callers fall
back to the loop's timers.
"""

from __future__ import annotations

import ctypes
import math
import os
import signal as _signal
import struct
import time
from collections.abc import Callable

__all__ = [
    "ProcessGone",
    "IN_NAME_CHANGES",
    "become_subreaper",
    "descends_from",
    "descendants",
    "die_with_parent",
    "enter_realtime",
    "environ_of",
    "has_exited",
    "tree_root",
    "holds_pipe",
    "live_processes",
    "monotonic_offset",
    "inotify_names",
    "inotify_watch_dir",
    "open_pidfd",
    "parent_pid",
    "pidfd_alive",
    "pidfd_no_wakeup_preemption",
    "pidfd_signal",
    "process_uid",
    "restore_scheduling",
    "signal_name",
    "timerfd_arm_at",
    "timerfd_create",
]

_BATCH_PARAM = os.sched_param(0)


def signal_name(sig: int) -> str:
    """``"SIGKILL"`` for 9; the number itself for a signal Python has no name for."""
    try:
        return _signal.Signals(sig).name
    except ValueError:
        return str(sig)


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
    """Send ``sig`` through ``pidfd``; with ``group``, to the process group the process is in.

    Raises ``ProcessGone`` when the process has exited.  For a group signal the
    pidfd first proves that ``pid`` is still this process, so the group read
    for it is a live group (a group id is not reused while a member lives).
    The group is signalled whether or not the process leads it (a worker's
    forked child is killed with the group its worker leads); the server's own
    group never is: a process in it is signalled alone.  An empty group (the
    process left it in between) is not an exit: the process is then signalled
    alone.
    """
    try:
        if group:
            _signal.pidfd_send_signal(pidfd, 0)
            pgid = os.getpgid(pid)
            if pgid != os.getpgrp():
                try:
                    os.killpg(pgid, sig)
                    return
                except ProcessLookupError:
                    pass
        _signal.pidfd_send_signal(pidfd, sig)
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


#: The real-time priority ``enter_realtime`` takes: the lowest, which runs
#: before every normal task and after any real-time work the machine has.
REALTIME_PRIORITY = 1


def enter_realtime() -> tuple[int, int] | None:
    """Move the calling thread to SCHED_RR; what ``restore_scheduling`` takes back.

    Returns the thread's previous ``(policy, priority)`` (the policy with its
    ``SCHED_RESET_ON_FORK`` flag, if set), or ``None`` if it was real-time
    already (then nothing is changed).  ``SCHED_RESET_ON_FORK`` goes with it:
    processes and threads created from this thread start as normal tasks, so
    a spawned worker never inherits the priority.  Raises ``PermissionError``
    without CAP_SYS_NICE or an RLIMIT_RTPRIO of 1 or more.
    """
    policy = os.sched_getscheduler(0)
    if policy & ~os.SCHED_RESET_ON_FORK in (os.SCHED_FIFO, os.SCHED_RR):
        return None
    previous = (policy, os.sched_getparam(0).sched_priority)
    os.sched_setscheduler(
        0, os.SCHED_RR | os.SCHED_RESET_ON_FORK, os.sched_param(REALTIME_PRIORITY)
    )
    return previous


def restore_scheduling(previous: tuple[int, int]) -> None:
    """Put the calling thread back on the policy ``enter_realtime`` returned.

    Clearing ``SCHED_RESET_ON_FORK`` takes CAP_SYS_NICE (a thread that got
    real-time through RLIMIT_RTPRIO may not): the flag is then kept, which
    only means that children of a thread with a negative nice start at 0.
    """
    policy, priority = previous
    try:
        os.sched_setscheduler(0, policy, os.sched_param(priority))
    except PermissionError:
        if policy & os.SCHED_RESET_ON_FORK:
            raise
        os.sched_setscheduler(0, policy | os.SCHED_RESET_ON_FORK, os.sched_param(priority))


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    # The command name may hold spaces and parentheses: split after the last ')'.
    return raw[raw.rindex(b")") + 2 :].decode().split()


def has_exited(pid: int) -> bool:
    """Whether ``pid`` is gone or a zombie (exited, not yet reaped)."""
    try:
        return _stat_fields(pid)[0] in ("Z", "X")
    except (OSError, ValueError, IndexError):
        return True


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


def holds_pipe(pid: int, inode: int) -> bool:
    """Whether process ``pid`` has the pipe with inode ``inode`` open (``/proc/PID/fd``)."""
    wanted = f"pipe:[{inode}]"
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for name in names:
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") == wanted:
                return True
        except OSError:
            continue
    return False


def monotonic_offset(pid: int | str = "self") -> float | None:
    """The CLOCK_MONOTONIC offset of ``pid``'s time namespace, seconds; ``None`` if unreadable."""
    try:
        with open(f"/proc/{pid}/timens_offsets") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) == 3 and fields[0] in ("monotonic", "1"):
            return int(fields[1]) + int(fields[2]) / 1e9
    return 0.0


# Most bytes of an environment read (the kernel's own cap on exec arguments is of this order).
_ENVIRON_BYTES = 2 << 20


def environ_of(pid: int) -> dict[str, str]:
    """The environment ``pid`` was started with (``/proc/PID/environ``); empty if unreadable.

    Bounded, but it can block (the kernel reads the process's memory): off the
    watchdog's loop, call it through ``_ioplane.run_blocking``.
    """
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read(_ENVIRON_BYTES)
    except OSError:
        return {}
    env: dict[str, str] = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            env[key.decode(errors="replace")] = value.decode(errors="replace")
    return env


def live_processes() -> dict[int, int]:
    """Every process this user can see that has not exited: pid -> parent pid."""
    found: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = _stat_fields(int(entry))
        except (OSError, ValueError, IndexError):
            continue
        if fields[0] not in ("Z", "X"):
            found[int(entry)] = int(fields[1])
    return found


def descendants(roots: set[int] | frozenset[int], processes: dict[int, int]) -> set[int]:
    """The pids in ``processes`` (pid -> parent) that descend from any of ``roots``."""
    children: dict[int, list[int]] = {}
    for pid, parent in processes.items():
        children.setdefault(parent, []).append(pid)
    found: set[int] = set()
    stack = list(roots)
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


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


def tree_root(pid: int, roots: set[int] | frozenset[int]) -> int | None:
    """The process of ``pid``'s ancestry just below one of ``roots`` (``pid`` itself, if a
    child of one): the worker tree it belongs to.  ``None`` if it descends from none."""
    below = pid
    current: int | None = pid
    seen = 0
    while current is not None and current > 0 and seen < 4096:
        if current in roots:
            return below
        if current == 1:
            return None
        below = current
        current = parent_pid(current)
        seen += 1
    return None


# -- timerfd -----------------------------------------------------------------

_TFD_TIMER_ABSTIME = 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _libc_api() -> tuple[Callable[[], int], Callable[[int, int], None]] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        timerfd_create = libc.timerfd_create
        timerfd_settime = libc.timerfd_settime
    except (OSError, AttributeError):
        return None
    timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
    timerfd_create.restype = ctypes.c_int
    timerfd_settime.argtypes = [
        ctypes.c_int,
        ctypes.c_int,
        ctypes.POINTER(_Itimerspec),
        ctypes.c_void_p,
    ]
    timerfd_settime.restype = ctypes.c_int

    def create() -> int:
        fd: int = timerfd_create(time.CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return fd

    def arm_ns(fd: int, when_ns: int) -> None:
        spec = _Itimerspec()
        spec.it_value.tv_sec, spec.it_value.tv_nsec = divmod(when_ns, 1_000_000_000)
        if timerfd_settime(fd, _TFD_TIMER_ABSTIME, ctypes.byref(spec), None) < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    return create, arm_ns


def _os_api() -> tuple[Callable[[], int], Callable[[int, int], None]] | None:
    os_create = getattr(os, "timerfd_create", None)
    os_settime_ns = getattr(os, "timerfd_settime_ns", None)
    if os_create is None or os_settime_ns is None:
        return None
    flags = os.O_NONBLOCK | os.O_CLOEXEC

    def create() -> int:
        fd: int = os_create(time.CLOCK_MONOTONIC, flags=flags)
        return fd

    def arm_ns(fd: int, when_ns: int) -> None:
        os_settime_ns(fd, flags=_TFD_TIMER_ABSTIME, initial=when_ns)

    return create, arm_ns


_API = _os_api() or _libc_api()


def timerfd_create() -> int:
    """A new non-blocking, close-on-exec CLOCK_MONOTONIC timerfd, or -1 if unavailable."""
    if _API is None:
        return -1
    try:
        return _API[0]()
    except OSError:
        return -1


def timerfd_arm_at(fd: int, when: float) -> None:
    """Make ``fd`` readable at ``when`` (``time.monotonic()`` seconds), never before it."""
    assert _API is not None, "timerfd_arm_at() needs a timerfd from timerfd_create()"
    # Round up: the timer must not go off before ``when``.  Zero would disarm it.
    _API[1](fd, max(1, math.ceil(when * 1e9)))


# -- inotify ---------------------------------------------------------------------

#: inotify events that mean a name in a watched directory went away or changed.
IN_NAME_CHANGES = 0x40 | 0x80 | 0x100 | 0x200  # MOVED_FROM | MOVED_TO | CREATE | DELETE
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
_INOTIFY_EVENT = struct.Struct("=iIII")


def _inotify_api() -> tuple[Callable[[int], int], Callable[[int, bytes, int], int]] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        init1 = libc.inotify_init1
        add_watch = libc.inotify_add_watch
    except (OSError, AttributeError):
        return None
    init1.argtypes = [ctypes.c_int]
    init1.restype = ctypes.c_int
    add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    add_watch.restype = ctypes.c_int
    return init1, add_watch


_INOTIFY = _inotify_api()


def inotify_watch_dir(path: str | os.PathLike[str], mask: int = IN_NAME_CHANGES) -> int:
    """A non-blocking inotify fd watching directory ``path`` for ``mask``; -1 if unavailable."""
    if _INOTIFY is None:
        return -1
    fd = _INOTIFY[0](_IN_NONBLOCK | _IN_CLOEXEC)
    if fd < 0:
        return -1
    if _INOTIFY[1](fd, os.fsencode(path), mask) < 0:
        os.close(fd)
        return -1
    return fd


def inotify_names(data: bytes) -> list[bytes]:
    """The file names in a buffer of inotify events read from an inotify fd."""
    names: list[bytes] = []
    pos = 0
    while pos + _INOTIFY_EVENT.size <= len(data):
        _, _, _, length = _INOTIFY_EVENT.unpack_from(data, pos)
        pos += _INOTIFY_EVENT.size
        names.append(data[pos : pos + length].rstrip(b"\0"))
        pos += length
    return names


# -- prctl -----------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def die_with_parent(parent: int, sig: int = _signal.SIGKILL) -> None:
    """In a child between fork and exec: get ``sig`` when ``parent`` dies; exit if it has.

    ``PR_SET_PDEATHSIG`` survives exec.  The parent may have died before the
    call: then the child was re-parented already and exits at once.
    """
    _prctl(_PR_SET_PDEATHSIG, sig)
    if os.getppid() != parent:
        os._exit(1)


def become_subreaper() -> bool:
    """Make this process a child subreaper: orphaned descendants are re-parented to it."""
    return _prctl(_PR_SET_CHILD_SUBREAPER, 1)
