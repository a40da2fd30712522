"""One-shot CLOCK_MONOTONIC timer file descriptors (Linux ``timerfd``).

A loop's own timers are only millisecond-accurate (epoll's timeout is in whole
milliseconds and libuv's clock ticks in them), so an alarm on them is up to a
couple of milliseconds late or early.  A timerfd armed at an absolute
CLOCK_MONOTONIC time becomes readable at that time to within the kernel's timer
slack, and the loop's poller wakes for it like for any other fd.

``os.timerfd_create`` exists from Python 3.13; before that the same two libc
calls are reached through ctypes.  Where neither works, ``create`` returns -1 and
callers fall back to the loop's timers.
"""

from __future__ import annotations

import ctypes
import math
import os
import time
from collections.abc import Callable

__all__ = ["arm_at", "create"]

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


def create() -> int:
    """A new non-blocking, close-on-exec CLOCK_MONOTONIC timerfd, or -1 if unavailable."""
    if _API is None:
        return -1
    try:
        return _API[0]()
    except OSError:
        return -1


def arm_at(fd: int, when: float) -> None:
    """Make ``fd`` readable at ``when`` (``time.monotonic()`` seconds), never before it."""
    assert _API is not None, "arm_at() needs a timerfd from create()"
    # Round up: the timer must not go off before ``when``.  Zero would disarm it.
    _API[1](fd, max(1, math.ceil(when * 1e9)))
